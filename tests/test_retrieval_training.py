"""Retrieval fine-tuning end to end on the small demo data: what is reported and selected, evaluation of an
original-format downstream checkpoint, and the original README's command run from the task folder."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from modules.checkpoint import original_format_state_dict, read_model_state_dict
from modules.model import T2VLP, T2VLPConfig
from tests.test_stage1_training import metrics
from tests.torchrun import ROOT, original_task_folder, run_torchrun

sys.path.insert(0, str(ROOT / "video_text_retrieval"))
import main_task_retrieval_msrvtt  # noqa: E402


def retrieval_argv(demo: dict[str, Path], clip: Path, init_model: Path, output_dir: Path, *extra: str) -> list[str]:
    """The original README's retrieval flags (docs/method.md §8), pointed at the small demo data and tiny CLIP."""
    return [
        "--do_train", "--num_thread_reader=0", "--epochs=1", "--batch_size=8", "--n_display=1",
        f"--train_csv={demo['train_csv']}", f"--val_csv={demo['test_csv']}", f"--data_path={demo['data_json']}",
        f"--features_path={demo['videos_dir']}", "--warmup_proportion=0.1", f"--output_dir={output_dir}",
        "--lr=1e-3", "--new_params_lr=1e-3", "--max_words=16", "--max_frames=3", "--batch_size_val=4",
        "--datatype=msrvtt", "--feature_framerate=2", "--coef_lr=1e-1", "--freeze_layer_num=0", "--slice_framepos=2",
        "--loose_type", "--linear_patch=2d", "--sim_header=meanP", f"--init_model={init_model}",
        f"--visual_pretrain_path={clip}", "--fusion_layers=2", "--rerank_top_k=3", "--eval_steps=2",
        "--save_steps=2", f"--cross_config_path={ROOT / 'CLIP-modules'}", "--no-tensorboard", *extra,
    ]


@pytest.fixture(scope="module")
def retrieval_run(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrieval")
    argv = retrieval_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, out, "--dsl", "--qbnorm")
    assert main_task_retrieval_msrvtt.main(argv) == 0
    return out


def test_retrieval_reports_before_and_after_and_selects_by_rerank(retrieval_run, stage1_checkpoint,
                                                                  small_demo_source):
    records = [r for r in metrics(retrieval_run) if "report" not in r]
    steps = sorted({r["step"] for r in records})
    assert steps == [0, 2, 3]  # before training, at --eval_steps 2 and at the end (24 videos / batch 8 = 3 steps)
    for step in steps:
        labels = [(r["scoring"], r.get("base")) for r in records if r["step"] == step]
        assert labels == [("meanP", None), ("dsl", "meanP"), ("rerank", None), ("dsl", "rerank"), ("qbnorm", "meanP")]
    assert all(r["dataset"] == "msrvtt" and r["n_texts"] == r["n_videos"] == 6 for r in records)
    # QB-Norm's bank: every caption of the training videos (never the test split's); text->video only
    data = json.loads(small_demo_source["data_json"].read_text())
    train_videos = {line.split(",")[0] for line in small_demo_source["train_csv"].read_text().splitlines()[1:]}
    n_train_captions = sum(item["video_id"] in train_videos for item in data["sentences"])
    qbnorm = [r for r in records if r["scoring"] == "qbnorm"]
    assert all(r["bank"] == {"source": "the training split", "size": n_train_captions} and r["v2t"] is None
               and (r["beta"], r["k"]) == (20.0, 1) for r in qbnorm)
    best = json.loads((retrieval_run / "best_checkpoint.json").read_text())
    reranks = {r["step"]: r["t2v"]["R1"] for r in records if r["scoring"] == "rerank" and r["step"] > 0}
    best_step = min(step for step, value in reranks.items() if value == max(reranks.values()))
    assert (best["metric"], best["step"]) == ("rerank t2v R1", best_step)
    assert best["value"] == pytest.approx(reranks[best_step], abs=1e-6)  # metrics.jsonl rounds to 6 decimals
    assert Path(best["checkpoint"]) == retrieval_run / "ckpt" / f"pytorch_model.bin.{best_step}"
    log = (retrieval_run / "log.txt").read_text()
    assert "evaluating the starting checkpoint before training (step 0)" in log
    assert f"model selection: new best rerank t2v R1 {reranks[best_step]:.4g} at step {best_step}" in log
    assert "sim_loss" in log and "vtm_loss" in log and "align_loss" in log
    # the backbone trains at lr x coef_lr (the contrastive loss is not detached); the fusion list at its fixed rate
    trained, start = read_model_state_dict(best["checkpoint"]), read_model_state_dict(stage1_checkpoint)
    assert not torch.equal(trained["clip.transformer.resblocks.1.attn.in_proj_weight"],
                           start["clip.transformer.resblocks.1.attn.in_proj_weight"].float())
    assert "LR group new_decay         lr 0.001" in log and "LR group backbone_decay    lr 0.0001" in log


def test_original_format_downstream_checkpoint_evaluates_like_its_model(
        retrieval_run, small_demo_source, tiny_fusion_clip_checkpoint, tmp_path):
    trained = retrieval_run / "ckpt" / "pytorch_model.bin.3"
    config = T2VLPConfig(with_fusion=True, fusion_layers=2)
    model = T2VLP.from_pretrained(tiny_fusion_clip_checkpoint, init_model=trained, config=config)
    original = original_format_state_dict(model, model.clip)  # fp16 where the original stored fp16 (docs/method.md §2.5)
    assert original["clip.fusion_transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    assert original["clip.fusion_match_matrix"].dtype == torch.float32 and "visual_linear.weight" in original
    # the model it was "saved from": the same weights, fp16-rounded where the file is fp16, in our fp32 format
    ours = tmp_path / "ours.bin"
    torch.save({"global_step": 3, "model_state_dict": {k: v.float() for k, v in original.items()}}, ours)
    released = tmp_path / "pytorch_model.bin.3"
    torch.save({"global_step": 3, "model_state_dict": original, "optim_state_dict": {"state": {}}}, released)

    results = {}
    for name, path in (("ours", ours), ("released", released)):
        out = tmp_path / name
        argv = [arg for arg in retrieval_argv(small_demo_source, tiny_fusion_clip_checkpoint, path, out, "--dsl")
                if arg != "--do_train"]
        assert main_task_retrieval_msrvtt.main(["--do_eval", *argv]) == 0
        results[name] = metrics(out)
        log = (out / "log.txt").read_text()
        n_keys = len(original)
        assert f"{n_keys} of {n_keys} weights loaded, 0 not in it, 0 in it unused" in log  # nothing missing/unexpected
    assert len(results["released"]) == 4
    for mine, theirs in zip(results["ours"], results["released"]):
        assert (mine["scoring"], mine.get("base")) == (theirs["scoring"], theirs.get("base"))
        assert mine["t2v"] == theirs["t2v"] and mine["v2t"] == theirs["v2t"]
        assert theirs["checkpoint"] == str(released.resolve()) and theirs["step"] == 0
    assert not (tmp_path / "released" / "best_checkpoint.json").exists()  # evaluation only: no selection


# The original README / video_text_retrieval/start.sh, `python3 -u -m light.pytorch.launch` replaced.
ORIGINAL_RETRIEVAL = (
    "main_task_retrieval_msrvtt.py --do_train --num_thread_reader=4 --epochs=5 --batch_size=32 --n_display=50 "
    "--cross_config_path ../CLIP-modules --train_csv ${DATA_PATH}/MSRVTT_train.9k.csv "
    "--val_csv ${DATA_PATH}/MSRVTT_JSFUSION_test.csv --data_path ${DATA_PATH}/MSRVTT_data.json "
    "--features_path ${DATA_PATH}/MSRVTT_Videos --warmup_proportion 0.1 --output_dir ${OUT_PATH} "
    "--lr 5e-5 --max_words 32 --max_frames 12 --batch_size_val 32 --datatype msrvtt --expand_msrvtt_sentences "
    "--feature_framerate 2 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 "
    "--loose_type --linear_patch 2d --sim_header meanP --init_model ${Pretrained_PATH}"
)


@pytest.mark.integration
def test_original_retrieval_command_from_the_task_folder(small_demo_source, tiny_fusion_clip_checkpoint,
                                                         stage1_checkpoint, tmp_path):
    # The original ran from video_text_retrieval/, CLIP at ../CLIP-modules/ViT-B-16.pt; DATA_PATH holds MSR-VTT.
    task_folder = original_task_folder(tmp_path, "video_text_retrieval", tiny_fusion_clip_checkpoint)
    data = tmp_path / "data"
    data.mkdir()
    for name, key in (("MSRVTT_train.9k.csv", "train_csv"), ("MSRVTT_JSFUSION_test.csv", "test_csv"),
                      ("MSRVTT_data.json", "data_json"), ("MSRVTT_Videos", "videos_dir")):
        (data / name).symlink_to(small_demo_source[key])
    output = tmp_path / "output"
    command = (ORIGINAL_RETRIEVAL.replace("${DATA_PATH}", str(data)).replace("${OUT_PATH}", str(output))
               .replace("${Pretrained_PATH}", str(stage1_checkpoint)))
    arguments = shlex.split(command)
    # the tiny CLIP has 2 text blocks: the one flag added is --fusion_layers (the original's 6 needs ViT-B/16)
    run_torchrun(ROOT / "video_text_retrieval" / arguments[0], *arguments[1:], "--fusion_layers=2", nproc=1,
                 cwd=task_folder, timeout=900)

    records = metrics(output)
    epoch_ends = sorted({r["step"] for r in records})
    assert epoch_ends[0] == 0 and len(epoch_ends) == 6  # before training, then after each of the 5 epochs
    assert {r["scoring"] for r in records} == {"meanP", "rerank"} and all(r["top_k"] == 32 for r in records
                                                                           if r["scoring"] == "rerank")
    log = (output / "log.txt").read_text()
    assert "../CLIP-modules/ViT-B-16.pt" in log and "LR group new_decay         lr 5e-06" in log
    assert json.loads((output / "best_checkpoint.json").read_text())["metric"] == "rerank t2v R1"


def test_fine_tuning_from_a_frame_store_equals_fine_tuning_from_the_videos(
        retrieval_run, small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path):
    """--frame_store (frozen_tfrecord.py --feature_framerate 2) gives the same training and evaluation numbers."""
    import frozen_tfrecord

    store = tmp_path / "store"
    config = frozen_tfrecord.parse_args(["--video_dir", str(small_demo_source["videos_dir"]), "--feature_framerate",
                                         "2", "--image_size", "32", "--output_dir", str(store), "--workers", "0",
                                         "--no_progress"])
    assert frozen_tfrecord.convert(config).n_written > 0
    out = tmp_path / "from_store"
    argv = retrieval_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, out, "--dsl", "--qbnorm",
                          f"--frame_store={store}")
    assert main_task_retrieval_msrvtt.main(argv) == 0
    assert metrics(out) == metrics(retrieval_run)
    losses = [line.split("loss", 1)[1] for line in (out / "log.txt").read_text().splitlines() if "sim_loss" in line]
    expected = [line.split("loss", 1)[1] for line in (retrieval_run / "log.txt").read_text().splitlines()
                if "sim_loss" in line]
    assert losses == expected and len(losses) >= 3
    log = (out / "log.txt").read_text()
    assert f"frames from the frame store {store}: 34 videos at 2 per second, 32 pixels, png" in log
    assert "is not in --frame_store" not in log


def test_selection_on_the_test_split_is_said_and_the_last_rows_put_beside(retrieval_run):
    records = metrics(retrieval_run)
    best = json.loads((retrieval_run / "best_checkpoint.json").read_text())
    evaluated = [r for r in records if "report" not in r and r["step"] > 0]
    last_step = max(r["step"] for r in evaluated)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("report", "selected_on")}  # noqa: E731
    selected = [r for r in records if r.get("report") == "selected"]
    last = [r for r in records if r.get("report") == "last"]
    assert selected and all(r["selected_on"] == "test" and r["step"] == best["step"] for r in selected)
    assert [strip(r) for r in selected] == [r for r in evaluated if r["step"] == best["step"]]
    assert [strip(r) for r in last] == [r for r in evaluated if r["step"] == last_step]
    assert all(r["split"] == "test" for r in records)
    assert "model selection used the test split itself (as the original and CLIP4Clip do)" in \
        (retrieval_run / "log.txt").read_text()


@pytest.mark.slow
def test_val_from_train_selects_on_held_out_videos_and_tests_once(small_demo_source, tiny_fusion_clip_checkpoint,
                                                                  stage1_checkpoint, tmp_path):
    out = tmp_path / "run"
    argv = retrieval_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, out,
                          "--val_from_train=6", "--epochs=2")
    assert main_task_retrieval_msrvtt.main(argv) == 0
    records = metrics(out)
    during = [r for r in records if r["split"] == "val_from_train"]
    test = [r for r in records if r["split"] == "test"]
    best = json.loads((out / "best_checkpoint.json").read_text())
    assert during and {r["n_videos"] for r in during} == {6}  # the held-out videos, with all their captions
    assert {r["n_texts"] for r in during} == {6 * 5} and all(r.get("multi_sentence") for r in during)  # 5 each
    assert [r["scoring"] for r in test] == ["meanP", "rerank"]  # the test split once, with the selected checkpoint
    assert all(r["step"] == best["step"] and r["selected_on"] == "val_from_train" for r in test)
    log = (out / "log.txt").read_text()
    assert "--val_from_train: 6 of 24 training videos (seed 42) held out of training" in log
    assert "training: 2 epochs x 2 optimiser steps" in log  # 18 videos left, batch 8 (24 videos: 3 steps)


def test_the_demo_summary_shows_each_row_of_the_last_evaluation_once(retrieval_run):
    from tools.demo import summary

    shown = summary(retrieval_run).splitlines()
    last = [r for r in metrics(retrieval_run) if "report" not in r][-1]["step"]
    assert shown[0] == f"demo finished (step {last}):"
    after = [line for line in shown[1:] if line.strip().startswith("retrieval (")]
    assert [line.split(":")[0].strip() for line in after] == [
        "retrieval (meanP)", "retrieval (dsl on meanP)", "retrieval (rerank)", "retrieval (dsl on rerank)",
        "retrieval (qbnorm on meanP)"]
    assert "video->text" not in after[-1]  # QB-Norm's row is text->video only
