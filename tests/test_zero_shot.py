"""Zero-shot rows: a retrieval evaluation says whether the weights ever trained on the dataset's training split,
from the history checkpoints record (`trained_on`); unknown (null) for a checkpoint that records none."""

from __future__ import annotations

import sys

import pytest
import torch

from modules.checkpoint import read_model_settings
from tests.test_retrieval_training import retrieval_run  # noqa: F401 (its fixture, used below)
from tests.test_stage1_training import metrics
from tests.torchrun import ROOT

sys.path.insert(0, str(ROOT / "video_text_retrieval"))
import main_task_retrieval_msrvtt  # noqa: E402
import main_task_retrieval_msvd  # noqa: E402

pytestmark = pytest.mark.slow


def evaluate(main, demo, clip, checkpoint, output, data_flags) -> list[dict]:
    argv = ["--do_eval", f"--init_model={checkpoint}", f"--visual_pretrain_path={clip}", f"--output_dir={output}",
            f"--features_path={demo['videos_dir']}", "--max_words=16", "--max_frames=3", "--fusion_layers=2",
            "--rerank_top_k=3", "--batch_size_val=8", "--num_thread_reader=0", "--no-tensorboard", *data_flags]
    assert main.main(argv) == 0
    return metrics(output)


def test_the_history_decides_the_label(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path):
    demo, clip = small_demo_source, tiny_fusion_clip_checkpoint
    # the stage-1 checkpoint trained on the demo's MSR-VTT training split (stage1_argv: --data_path MSRVTT_data.json)
    assert read_model_settings(stage1_checkpoint)["trained_on"] == [{"task": "clip", "dataset": "msrvtt"}]
    msvd = evaluate(main_task_retrieval_msvd, demo, clip, stage1_checkpoint, tmp_path / "msvd",
                    [f"--data_path={demo['msvd_dir']}"])
    msrvtt = evaluate(main_task_retrieval_msrvtt, demo, clip, stage1_checkpoint, tmp_path / "msrvtt",
                      [f"--data_path={demo['data_json']}", f"--val_csv={demo['test_csv']}"])
    assert [(row["scoring"], row["zero_shot"]) for row in msvd] == [("meanP", True), ("rerank", True)]
    assert [(row["scoring"], row["zero_shot"]) for row in msrvtt] == [("meanP", False), ("rerank", False)]
    # a checkpoint that records no history (the original's layout): not known
    state = torch.load(stage1_checkpoint, weights_only=True)
    original = tmp_path / "pytorch_model.bin.0"
    torch.save({"global_step": 3, "model_state_dict": state["model_state_dict"]}, original)  # no model_settings
    unknown = evaluate(main_task_retrieval_msvd, demo, clip, original, tmp_path / "unknown",
                       [f"--data_path={demo['msvd_dir']}"])
    assert {row["zero_shot"] for row in unknown} == {None}


def test_fine_tuning_adds_itself_to_the_history(retrieval_run):  # noqa: F811 (the imported fixture)
    settings = read_model_settings(next((retrieval_run / "ckpt").glob("pytorch_model.bin.*")))
    assert settings["trained_on"] == [{"task": "clip", "dataset": "msrvtt"}, {"task": "retrieval", "dataset": "msrvtt"}]
    rows = [row for row in metrics(retrieval_run) if "report" not in row]
    assert {row["zero_shot"] for row in rows} == {False}  # the stage-1 weights had trained on MSR-VTT already



def test_a_stage_2_checkpoint_evaluates_zero_shot_with_its_rerank_rows(small_demo_source, webvid_demo,
                                                                        tiny_fusion_clip_checkpoint, stage1_checkpoint,
                                                                        tmp_path):
    import main_task_fusion
    from tests.stage1_helpers import stage2_argv

    stage2 = tmp_path / "stage2"
    corpus = [f"--data_path={webvid_demo['labels']}", f"--dir_path={webvid_demo['tfrecord_dir']}"]
    assert main_task_fusion.main(stage2_argv(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, stage2,
                                             "--epochs=1", "--max_steps=2", "--val_csv=", *corpus)) == 0
    checkpoint = stage2 / "ckpt" / "pytorch_model.bin.2"
    assert read_model_settings(checkpoint)["trained_on"] == [{"task": "clip", "dataset": "msrvtt"},
                                                             {"task": "fusion", "corpus": str(webvid_demo["labels"])}]
    rows = evaluate(main_task_retrieval_msvd, small_demo_source, tiny_fusion_clip_checkpoint, checkpoint,
                    tmp_path / "msvd", [f"--data_path={small_demo_source['msvd_dir']}"])
    assert [(row["scoring"], row["zero_shot"], row["split"]) for row in rows] == [("meanP", True, "test"),
                                                                                 ("rerank", True, "test")]
