"""Video QA end to end on the small demo data: both heads train and evaluate, 2 processes count each question
once, an original-format checkpoint evaluates, MSVD-QA's original format, and the original README's MSRVTT-QA
command from the task folder."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from modules.checkpoint import original_format_state_dict, read_model_state_dict
from modules.model import T2VLP, T2VLPConfig
from modules.tokenization import ClipTokenizer
from tests.test_stage1_training import metrics
from tests.torchrun import ROOT, original_task_folder, run_torchrun

sys.path.insert(0, str(ROOT / "video_qa"))
import main_task_qa_msrvtt  # noqa: E402
import main_task_qa_msvd  # noqa: E402


def qa_argv(demo: dict[str, Path], clip: Path, init_model: Path, output_dir: Path, *extra: str,
            test_json: Path | None = None) -> list[str]:
    """The original MSRVTT-QA flags (docs/method.md §8), pointed at the small demo data and tiny CLIP."""
    qa = demo["msrvtt_qa_dir"]
    return [
        "--do_train", "--num_thread_reader=0", "--epochs=1", "--batch_size=8", "--n_display=1",
        f"--msrvtt_qa_train_json={qa / 'train.jsonl'}", f"--msrvtt_qa_val_json={qa / 'val.jsonl'}",
        f"--msrvtt_qa_test_json={test_json or qa / 'test.jsonl'}", f"--msrvtt_qa_anslabel_json={qa / 'train_ans2label.json'}",
        f"--msrvtt_features_path={demo['videos_dir']}", "--warmup_proportion=0.1", f"--output_dir={output_dir}",
        "--lr=1e-3", "--new_params_lr=1e-3", "--max_words=16", "--max_frames=3", "--batch_size_val=4",
        "--expand_msrvtt_sentences", "--feature_framerate=1", "--coef_lr=1e-1", "--freeze_layer_num=0",
        "--slice_framepos=2", "--loose_type", "--linear_patch=2d", "--sim_header=meanP", f"--init_model={init_model}",
        f"--visual_pretrain_path={clip}", "--fusion_layers=2", "--max_steps=4", "--save_steps=2", "--eval_steps=2",
        f"--cross_config_path={ROOT / 'CLIP-modules'}", "--no-tensorboard", *extra,
    ]


@pytest.fixture(scope="module")
def classifier_run(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qa_classifier")
    argv = qa_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, out)
    assert main_task_qa_msrvtt.main(argv) == 0
    return out


def test_classifier_head_trains_reports_and_selects(classifier_run, small_demo_source):
    records = metrics(classifier_run)
    assert [r["step"] for r in records] == [0, 2, 4]
    n_questions = len((small_demo_source["msrvtt_qa_dir"] / "test.jsonl").read_text().splitlines())
    for record in records:
        assert record["task"] == "qa" and record["split"] == "test" and record["head"] == "classifier"
        assert record["n"] == n_questions and 0 <= record["accuracy"] <= 100
        assert set(record["by_type"]) == {"what", "where"}
        assert sum(v["n"] for v in record["by_type"].values()) == n_questions
    train = [json.loads(line) for line in (small_demo_source["msrvtt_qa_dir"] / "train.jsonl").read_text().splitlines()]
    answers = [item["answer"] for item in train]
    majority = min(set(answers), key=lambda a: (-answers.count(a), a))
    test = [json.loads(line) for line in (small_demo_source["msrvtt_qa_dir"] / "test.jsonl").read_text().splitlines()]
    assert records[0]["majority_answer"] == majority
    assert records[0]["majority_baseline"] == pytest.approx(100 * sum(t["answer"] == majority for t in test) / len(test),
                                                            abs=1e-4)
    rows = [json.loads(line) for line in (classifier_run / "predictions_test_step4.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(n_questions))
    assert records[-1]["accuracy"] == pytest.approx(100 * sum(row["correct"] for row in rows) / len(rows), abs=1e-4)
    best = json.loads((classifier_run / "best_checkpoint.json").read_text())
    assert best["metric"] == "test accuracy" and best["step"] in (2, 4)
    saved = read_model_state_dict(best["checkpoint"])
    assert saved["answer_head.answer_embedding"].shape[0] == len(set(answers))
    log = (classifier_run / "log.txt").read_text()
    assert "answer classifier over" in log and "qa_loss" in log and "sim_loss" in log and "align_loss" not in log
    assert "LR group other_decay       lr 0.001" in log and "answer_head.answer_embedding" in log


def test_the_classifier_starts_as_the_token_head_restricted_to_the_answers(tiny_fusion_clip_checkpoint,
                                                                           stage1_checkpoint):
    tokenizer = ClipTokenizer()
    answers = ["red", "hand-feeding"]
    config = T2VLPConfig(with_fusion=True, fusion_layers=2, num_answers=2, head_dropout=0.5)
    model = T2VLP.from_pretrained(tiny_fusion_clip_checkpoint, init_model=stage1_checkpoint, config=config).eval()
    model.init_answer_head([tokenizer.bpe_ids(answer) for answer in answers])
    states = torch.randn(3, model.clip_config.embed_dim)
    token_logits = model.answer_logits(states, "first_token")
    classifier = model.answer_logits(states, "classifier")
    red = tokenizer.bpe_ids("red")
    assert len(red) == 1
    assert torch.allclose(classifier[:, 0], token_logits[:, red[0]], atol=1e-5)  # one piece: exactly the token
    pieces = tokenizer.bpe_ids("hand-feeding")
    assert torch.allclose(classifier[:, 1], token_logits[:, pieces].mean(dim=1), atol=1e-5)  # the mean of pieces


@pytest.mark.slow
def test_first_token_head_trains_and_evaluates_and_an_original_checkpoint_evaluates_alike(
        small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path):
    out = tmp_path / "first_token"
    argv = qa_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, out, "--qa_head=first_token",
                   "--max_steps=2")
    assert main_task_qa_msrvtt.main(argv) == 0
    records = metrics(out)
    assert [(r["step"], r["head"]) for r in records] == [(0, "first_token"), (2, "first_token")]
    trained = read_model_state_dict(out / "ckpt" / "pytorch_model.bin.2")
    assert "answer_head.answer_embedding" not in trained  # the original's key set
    # the same weights in the original's format (fp16 where it stored fp16) evaluate like the model saved in ours
    config = T2VLPConfig(with_fusion=True, fusion_layers=2)
    model = T2VLP.from_pretrained(tiny_fusion_clip_checkpoint, init_model=out / "ckpt" / "pytorch_model.bin.2",
                                  config=config)
    original = original_format_state_dict(model, model.clip)
    released, ours = tmp_path / "released.bin", tmp_path / "ours.bin"
    torch.save({"global_step": 2, "model_state_dict": original, "optim_state_dict": {"state": {}}}, released)
    torch.save({"global_step": 2, "model_state_dict": {k: v.float() for k, v in original.items()}}, ours)
    results = []
    for path in (released, ours):
        evaluation = tmp_path / path.stem
        argv = [a for a in qa_argv(small_demo_source, tiny_fusion_clip_checkpoint, path, evaluation,
                                   "--qa_head=first_token") if a != "--do_train"]
        assert main_task_qa_msrvtt.main(["--do_eval", *argv]) == 0
        (row,) = metrics(evaluation)
        results.append(row)
    assert results[0]["accuracy"] == results[1]["accuracy"] and results[0]["checkpoint"] == str(released.resolve())


@pytest.mark.integration
def test_two_processes_count_each_question_once(classifier_run, small_demo_source, tiny_fusion_clip_checkpoint,
                                                tmp_path):
    """17 test questions over 2 processes (9 + 8): the row and the predictions equal one process's."""
    lines = (small_demo_source["msrvtt_qa_dir"] / "test.jsonl").read_text().splitlines()[:17]
    test_json = tmp_path / "test17.jsonl"
    test_json.write_text("\n".join(lines))
    checkpoint = classifier_run / "ckpt" / "pytorch_model.bin.4"
    rows = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        argv = [a for a in qa_argv(small_demo_source, tiny_fusion_clip_checkpoint, checkpoint, out,
                                   test_json=test_json) if a != "--do_train"]
        run_torchrun(ROOT / "video_qa" / "main_task_qa_msrvtt.py", "--do_eval", *argv, nproc=nproc)
        (rows[nproc],) = metrics(out)
        rows[nproc]["predictions"] = (out / "predictions_test_step0.jsonl").read_text()
    assert rows[2]["n"] == 17
    assert {k: v for k, v in rows[1].items()} == {k: v for k, v in rows[2].items()}


def test_msvd_qa_in_its_original_format(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path):
    qa = small_demo_source["msvd_qa_dir"]
    argv = qa_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path / "out",
                   "--max_steps=2", "--eval_split=val")
    argv = [a for a in argv if not a.startswith(("--msrvtt_qa_", "--msrvtt_features_path"))] + [
        f"--msvd_qa_train_json={qa / 'train_qa.json'}", f"--msvd_qa_val_json={qa / 'val_qa.json'}",
        f"--msvd_qa_test_json={qa / 'test_qa.json'}", f"--msvd_qa_anslabel_json={qa / 'train_ans2label.json'}",
        f"--youtube_mapping={qa / 'youtube_mapping.txt'}", f"--msvd_features_path={small_demo_source['videos_dir']}"]
    assert main_task_qa_msvd.main(argv) == 0
    records = metrics(tmp_path / "out")
    n_val = len(json.loads((qa / "val_qa.json").read_text()))
    assert [(r["split"], r["step"], r["n"], r["dataset"]) for r in records] == [("val", 0, n_val, "msvd_qa"),
                                                                               ("val", 2, n_val, "msvd_qa")]
    assert "by_type" not in records[0]  # MSVD-QA has no answer types


# The original README / video_qa/start.sh, `python3 -u -m light.pytorch.launch` replaced.
ORIGINAL_QA = (
    "main_task_qa_msrvtt.py --do_train --num_thread_reader=4 --epochs=5 --batch_size=32 --n_display=50 "
    "--cross_config_path ../CLIP-modules --msrvtt_train_csv ${DATA_PATH}/MSRVTT_train.9k.csv "
    "--msrvtt_val_csv ${DATA_PATH}/MSRVTT_JSFUSION_test.csv --msrvtt_train_json ${DATA_PATH}/MSRVTT_data.json "
    "--msrvtt_qa_train_json ${DATA_PATH}/train.jsonl --msrvtt_qa_val_json ${DATA_PATH}/val.jsonl "
    "--msrvtt_qa_test_json ${DATA_PATH}/test.jsonl --msrvtt_qa_anslabel_json ${DATA_PATH}/train_ans2label.json "
    "--msrvtt_features_path ${DATA_PATH}/MSRVTT_Videos --webvid_train_json ${DATA_PATH}/frozen_train.json "
    "--webvid_tfrecord ${DATA_PATH}/WebVid_TFRecord --warmup_proportion 0.1 --output_dir ${OUTPUT_PATH} "
    "--lr 2e-4 --max_words 32 --max_frames 12 --batch_size_val 32 --expand_msrvtt_sentences "
    "--feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 "
    "--loose_type --linear_patch 2d --sim_header meanP --init_model ${INIT_MODEL}"
)


@pytest.mark.integration
def test_original_qa_command_from_the_task_folder(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint,
                                                  tmp_path):
    task_folder = original_task_folder(tmp_path, "video_qa", tiny_fusion_clip_checkpoint)
    data = tmp_path / "data"
    shutil.copytree(small_demo_source["msrvtt_qa_dir"], data)
    (data / "MSRVTT_Videos").symlink_to(small_demo_source["videos_dir"])
    output = tmp_path / "output"
    command = (ORIGINAL_QA.replace("${DATA_PATH}", str(data)).replace("${OUTPUT_PATH}", str(output))
               .replace("${INIT_MODEL}", str(stage1_checkpoint)))
    arguments = shlex.split(command)
    run_torchrun(ROOT / "video_qa" / arguments[0], *arguments[1:], "--fusion_layers=2", nproc=1,
                 cwd=task_folder, timeout=900)
    records = metrics(output)
    assert [r["step"] for r in records][0] == 0 and len(records) == 6  # before training, then after each epoch
    log = (output / "log.txt").read_text()
    for flag in ("webvid_train_json", "webvid_tfrecord", "msrvtt_train_csv", "msrvtt_val_csv", "msrvtt_train_json"):
        assert f"--{flag} " in log and "is ignored: the original QA script passed it but never read it" in log
    assert "../CLIP-modules/ViT-B-16.pt" in log and "LR group new_decay         lr 5e-06" in log
    assert "seed: 2021" in log or '"seed": 2021' in (output / "run.json").read_text()
