"""A checkpoint carries the settings that shape its results: a copy alone answers, captions and indexes as the run's
own file does; a file that records none names what was assumed; an index's queries use the index's settings."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

from inference.trained_model import load_trained_model
from modules.checkpoint import original_format_state_dict, read_model_settings
from tests.test_predict import link_test_videos, run_predict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "video_qa"))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="module")
def qa_run(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path_factory) -> Path:
    import main_task_qa_msrvtt
    from test_qa_training import qa_argv

    out = tmp_path_factory.mktemp("qa_settings")
    assert main_task_qa_msrvtt.main(qa_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, out,
                                            "--max_steps=2", "--no-eval_before_training")) == 0
    return out


def test_the_checkpoint_records_its_settings_and_answers(qa_run, small_demo_source):
    settings = read_model_settings(qa_run / "ckpt" / "pytorch_model.bin.2")
    expected = {"task": "qa", "fusion_layers": 2, "max_frames": 3, "feature_framerate": 1, "max_words": 16,
                "slice_framepos": 2, "match_norm": "group", "qa_head": "classifier", "clip_model": None,
                "quick_gelu": True}
    assert {key: settings[key] for key in expected} == expected
    ans2label = json.loads((small_demo_source["msrvtt_qa_dir"] / "train_ans2label.json").read_text())
    assert settings["answers"] == sorted(ans2label, key=ans2label.get)


def test_a_copied_qa_checkpoint_alone_answers_as_in_place(qa_run, small_demo_source, tmp_path, caplog):
    copy = tmp_path / "empty" / "model.bin"
    copy.parent.mkdir()
    shutil.copy(qa_run / "ckpt" / "pytorch_model.bin.2", copy)
    rows = [json.loads(line) for line in (qa_run / "predictions_test_step2.jsonl").read_text().splitlines()]
    for row in rows[:3]:
        video = str(small_demo_source["videos_dir"] / f"{row['video_id']}.mp4")
        in_place = run_predict("answer", video, row["question"], "--init_model",
                               str(qa_run / "ckpt" / "pytorch_model.bin.2")).stdout
        with caplog.at_level(logging.WARNING):
            alone = run_predict("answer", video, row["question"], "--init_model", str(copy)).stdout
        assert alone == in_place and alone.split("\t")[0] == row["prediction"]
    assert "assumed" not in caplog.text  # nothing was guessed


def test_a_checkpoint_that_records_nothing_names_what_was_assumed(qa_run, small_demo_source, tmp_path, caplog):
    trained = load_trained_model(qa_run / "ckpt" / "pytorch_model.bin.2")
    bare = tmp_path / "original_format.bin"
    torch.save({"global_step": 2, "model_state_dict": original_format_state_dict(trained.model, trained.model.clip)},
               bare)
    video = str(small_demo_source["videos_dir"] / "video0.mp4")
    result = run_predict("answer", video, "what colour is the square?", "--init_model", str(bare), check=False)
    assert result.returncode == 2 and "fusion_layers 6 must be in 1..2" in result.stderr
    assert "records no fusion_layers, match_norm, max_frames, feature_framerate, slice_framepos, max_words" in (
        result.stderr)
    with caplog.at_level(logging.WARNING, logger="t2vlp.predict"):
        load_trained_model(bare, overrides={"fusion_layers": 2, "max_frames": 3})
    assumed = [record.getMessage() for record in caplog.records if "assumed" in record.getMessage()]
    assert len(assumed) == 1 and "match_norm group, feature_framerate 1, slice_framepos 2, max_words 32" in assumed[0]


def test_a_pre_training_checkpoint_used_to_answer_says_it_is_not_fine_tuned(small_demo_source, tiny_fusion_clip_checkpoint,
                                                                             stage1_checkpoint, tmp_path, caplog):
    import main_task_fusion
    from tests.stage1_helpers import stage2_argv

    out = tmp_path / "stage2"
    assert main_task_fusion.main(stage2_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, out,
                                             "--epochs=1", "--max_steps=1", "--rerank_top_k=0")) == 0
    video = str(small_demo_source["videos_dir"] / "video0.mp4")
    with caplog.at_level(logging.WARNING, logger="t2vlp.predict"):
        run_predict("caption", video, "--init_model", str(out / "ckpt" / "pytorch_model.bin.1"))
    assert "written by the 'fusion' pre-training, not fine-tuned for captioning" in caplog.text


def test_queries_use_the_index_s_settings_and_refuse_contradicting_flags(qa_run, small_demo_source, tmp_path):
    checkpoint = tmp_path / "model.bin"
    shutil.copy(qa_run / "ckpt" / "pytorch_model.bin.2", checkpoint)
    link_test_videos(small_demo_source, tmp_path / "videos")
    run_predict("index", str(tmp_path / "videos"), "--init_model", str(checkpoint), "--out", str(tmp_path / "ix"),
                "--num_workers", "0", "--match_norm", "pair")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert {k: meta["settings"][k] for k in ("fusion_layers", "match_norm", "max_frames", "max_words")} == {
        "fusion_layers": 2, "match_norm": "pair", "max_frames": 3, "max_words": 16}
    plain = run_predict("query", str(tmp_path / "ix"), "a red circle", "--rerank", "--rerank_top_k", "3", "--json")
    same = run_predict("query", str(tmp_path / "ix"), "a red circle", "--rerank", "--rerank_top_k", "3", "--json",
                       "--match_norm", "pair")
    assert plain.stdout == same.stdout and len(json.loads(plain.stdout)) == 6
    refused = run_predict("query", str(tmp_path / "ix"), "a red circle", "--rerank", "--match_norm", "group",
                          check=False)
    assert refused.returncode == 2 and "--match_norm group contradicts the index" in refused.stderr


def test_evaluating_a_complete_checkpoint_needs_no_clip_file(small_demo_source, tiny_fusion_clip_checkpoint,
                                                             stage1_checkpoint, tmp_path, capsys):
    from tests.test_retrieval_training import main_task_retrieval_msrvtt, retrieval_argv

    def argv(init_model, output, *extra):
        return [flag for flag in retrieval_argv(small_demo_source, tiny_fusion_clip_checkpoint, init_model, output,
                                                *extra)
                if not flag.startswith("--visual_pretrain_path") and flag != "--do_train"]

    trained = tmp_path / "trained"
    assert main_task_retrieval_msrvtt.main(retrieval_argv(small_demo_source, tiny_fusion_clip_checkpoint,
                                                          stage1_checkpoint, trained, "--max_steps=2")) == 0
    checkpoint = trained / "ckpt" / "pytorch_model.bin.2"
    assert main_task_retrieval_msrvtt.main(argv(checkpoint, tmp_path / "eval", "--do_eval")) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    during = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    last = {row["scoring"]: row for row in during if row["step"] == 2}
    assert [row["scoring"] for row in rows] == ["meanP", "rerank"]
    assert all(row["t2v"] == last[row["scoring"]]["t2v"] for row in rows)
    # A stage-1 checkpoint lacks what comes from CLIP (the fusion encoder's copy of the text tower): one line.
    assert main_task_retrieval_msrvtt.main(argv(stage1_checkpoint, tmp_path / "eval1", "--do_eval")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lacks 25 weights that come from CLIP (e.g. clip.fusion_" in line
    assert "fetch it with 'python CLIP-modules/fetch_clip.py' or pass --visual_pretrain_path" in line
