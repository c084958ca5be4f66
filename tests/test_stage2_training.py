"""Stage-2 training end to end on the small demo dataset: what learns, what is reported, exact resume, and the
original README's command."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

import main_task_fusion
from engine.checkpointing import load_restore
from modules.checkpoint import read_clip_state_dict, read_model_state_dict
from tests.stage1_helpers import stage2_argv
from tests.test_original_command import original_layout
from tests.test_stage1_training import final_state, metrics
from tests.torchrun import ROOT, run_torchrun
from tools.demo import summary


def test_stage2_trains_the_fusion_encoder_and_reports_every_row(small_demo, tiny_fusion_clip_checkpoint,
                                                                 stage1_checkpoint, tmp_path):
    out = tmp_path / "run"
    argv = stage2_argv(small_demo, tiny_fusion_clip_checkpoint, stage1_checkpoint, out, "--epochs=1")
    assert main_task_fusion.main(argv) == 0
    trained, stage1 = final_state(out), read_model_state_dict(stage1_checkpoint)
    clip = read_clip_state_dict(tiny_fusion_clip_checkpoint)
    moved = lambda key, before: not torch.equal(before.float(), trained[key])  # noqa: E731
    assert moved("clip.fusion_transformer.resblocks.0.attn.in_proj_weight",
                 clip["transformer.resblocks.0.attn.in_proj_weight"])
    for key in ("clip.fusion_proj_embedding", "clip.fusion_match_matrix", "clip.fusion_logit_bias"):
        assert key in trained and key not in stage1
    # encoder outputs are detached: the CLIP towers do not move (the tube encoder does, through alignment)
    for key in ("clip.visual.transformer.resblocks.0.mlp.c_fc.weight", "clip.transformer.resblocks.1.attn.in_proj_weight",
                "clip.text_projection"):
        assert not moved(key, stage1[key]), key
    assert moved("clip.local_visual.transformer.resblocks.0.mlp.c_fc.weight",
                 stage1["clip.local_visual.transformer.resblocks.0.mlp.c_fc.weight"])

    records = metrics(out)
    rows = [("retrieval", "meanP"), ("retrieval", "rerank"), ("fusion", None)]
    assert [(r["task"], r.get("scoring"), r["step"]) for r in records] == [(*row, step) for step in (0, 3) for row in rows]
    rerank, fusion = records[4], records[5]
    assert rerank["top_k"] == 3 and rerank["n_texts"] == rerank["n_videos"] == 6 and rerank["step"] == 3
    assert {"mlm_acc", "vtm_acc", "n", "step", "epoch", "split", "vtm_pairwise_acc", "vtm_random_acc",
            "vtm_random_pairwise_acc"} <= fusion.keys()
    assert fusion["split"] == "test" and fusion["n"] == 6 and 0 <= fusion["mlm_acc"] <= 100
    shown = summary(out)
    assert f"MLM accuracy {fusion['mlm_acc']:.1f}%" in shown and f"hard negatives {fusion['vtm_pairwise_acc']:.1f}%" in shown
    assert f"random negatives: VTM balanced accuracy {fusion['vtm_random_acc']:.1f}%" in shown
    assert f"rerank): text->video R@1 {rerank['t2v']['R1']:.1f}%" in shown
    assert f"before training: fusion heads: MLM accuracy {records[2]['mlm_acc']:.1f}%" in shown
    log = (out / "log.txt").read_text()
    assert "LR group new_decay         lr 0.001" in log and "clip.fusion_positional_embedding" in log
    assert "LR group backbone_decay    lr 1e-06" in log
    assert "mlm_loss" in log and "vtm_loss" in log and "plm_loss" in log and "align_loss" in log
    assert "--mask_ratio" not in log  # stage 2 reads it


@pytest.mark.slow
def test_stage2_stop_and_resume_is_bit_identical(small_demo, tiny_fusion_clip_checkpoint, stage1_checkpoint,
                                                  tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    argv = lambda out, *extra: stage2_argv(small_demo, tiny_fusion_clip_checkpoint, stage1_checkpoint, out,  # noqa: E731
                                           "--mask_ratio=0.3", *extra)
    assert main_task_fusion.main(argv(straight)) == 0
    assert main_task_fusion.main(argv(interrupted, "--max_steps=4")) == 0
    stopped = load_restore(interrupted)
    assert stopped["global_step"] == 4 and stopped["progress"] == {**stopped["progress"], "epoch": 1,
                                                                   "samples_in_epoch": 8}
    assert main_task_fusion.main(argv(interrupted)) == 0
    expected, resumed = final_state(straight), final_state(interrupted)
    assert load_restore(interrupted)["global_step"] == 6
    assert [key for key in expected if not torch.equal(expected[key], resumed[key])] == []
    # the same evaluations in both runs (MLM masks and hard negatives are drawn the same way); --max_steps added
    # the evaluation of step 4
    assert metrics(straight) == [m for m in metrics(interrupted) if m["step"] != 4]
    log_straight = (straight / "log.txt").read_text().splitlines()
    log_resumed = (interrupted / "log.txt").read_text().splitlines()
    step_line = lambda lines, s: next(l.split("t2vlp.train: ")[1] for l in lines if f" step {s}/6 " in l)  # noqa: E731,E741
    for step in (5, 6):  # the losses logged after the resume, MLM included, equal the uninterrupted run's
        assert step_line(log_straight, step) == step_line(log_resumed, step)


# The original start_fusion.sh, with `python3 -u -m light.pytorch.launch` replaced by torchrun.
ORIGINAL_STAGE2 = (
    "main_task_fusion.py --do_train --num_thread_reader=4 --cross_config_path ./CLIP-modules --epochs=10 "
    "--batch_size=32 --n_display=50 --train_csv ${DATA_PATH}/frozen_train_labels.json "
    "--val_csv ${DATA_PATH}/MSRVTT_JSFUSION_test.csv --data_path ${DATA_PATH}/frozen_train_labels.json "
    "--features_path ${DATA_PATH}/MSRVTT_Videos --warmup_proportion 0.2 --output_dir ${OUTPUT_PATH} "
    "--lr 1e-5 --max_words 32 --max_frames 12 --batch_size_val 32 --datatype msrvtt --expand_msrvtt_sentences "
    "--feature_framerate 2 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d "
    "--sim_header meanP --init_model ${INIT_MODEL}"
)


@pytest.mark.integration
def test_original_stage2_command(webvid_demo, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path):
    # The original's stage 2 read CLIP from ./CLIP-modules/ViT-B-16.pt and WebVid from ./WebVid_TFRecord
    work, data = original_layout(webvid_demo, tiny_fusion_clip_checkpoint, tmp_path)
    output = tmp_path / "output"
    command = (ORIGINAL_STAGE2.replace("${DATA_PATH}", str(data)).replace("${OUTPUT_PATH}", str(output))
               .replace("${INIT_MODEL}", str(stage1_checkpoint)))
    arguments = shlex.split(command)
    # the tiny CLIP has 2 text blocks: the one flag added is --fusion_layers (the original's 6 needs ViT-B/16)
    run_torchrun(ROOT / arguments[0], *arguments[1:], "--fusion_layers=2", nproc=1, cwd=work, timeout=900)

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    fusion_steps = [r["step"] for r in records if r["task"] == "fusion"]
    assert fusion_steps == [2 * epoch for epoch in range(11)]  # before training, then 64 clips / 32 = 2 steps per epoch
    assert [r["scoring"] for r in records if r["task"] == "retrieval"][:2] == ["meanP", "rerank"]
    log = (output / "log.txt").read_text()
    assert "training on WebVid TFRecords" in log and "CLIP-modules/ViT-B-16.pt" in log
