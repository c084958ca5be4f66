"""Captioning end to end on the small demo data: the caption loss, what is reported and selected, the test split
with the selected checkpoint, `--do_eval` of a checkpoint (ours and original-format), MSR-VTT, and the original
README's MSVD command from the task folder."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.evaluation.caption_metrics import METRIC_NAMES
from engine.optim import apply_freeze_rule
from engine.tasks.captioning import caption_loss_terms
from engine.tasks.registry import task_definition
from modules.checkpoint import original_format_state_dict, write_random_clip_checkpoint
from modules.fusion_objectives import TextParts, VideoParts
from modules.model import T2VLP, T2VLPConfig
from modules.tokenization import ClipTokenizer
from tests.model_helpers import TINY_FUSION_CLIP
from tests.test_stage1_training import metrics
from tests.torchrun import ROOT, original_task_folder, run_torchrun

sys.path.insert(0, str(ROOT / "video_captioning"))
import msrvtt_captioning  # noqa: E402
import msvd_captioning  # noqa: E402


def test_caption_targets_follow_the_attention_mask_even_after_an_exclamation_mark(tmp_path):
    """"!" is CLIP id 0, the padding id: the original's `next id > 0` target selection lost it (and misaligned
    predictions and targets); every real token after SOT must be a target, EOT included, padding never."""
    tokenizer = ClipTokenizer()
    ids, mask = tokenizer.encode("a red circle !?? moves", 12)
    assert 0 in ids[: sum(mask)]  # "!" inside the caption
    input_ids, attention_mask = torch.tensor([ids]), torch.tensor([mask])
    clip = write_random_clip_checkpoint(tmp_path / "clip.pt", TINY_FUSION_CLIP, seed=1)
    model = T2VLP.from_pretrained(clip, config=T2VLPConfig(with_fusion=True, fusion_layers=2)).eval()
    generator = torch.Generator().manual_seed(0)
    video = VideoParts(torch.randn(1, 3, 32, generator=generator), torch.ones(1, 3, dtype=torch.long),
                       torch.randn(1, 8, 32, generator=generator))
    _, tokens = model.encode_text(input_ids, attention_mask)
    terms = caption_loss_terms(model, video, TextParts(tokens, attention_mask), input_ids)
    length = int(attention_mask.sum())
    states = model.fuse(*video, tokens, attention_mask, causal_text=True)[0, 1 + 3 + 8:]
    expected = F.cross_entropy(model.token_logits(states[: length - 1]), input_ids[0, 1:length], reduction="sum")
    assert int(terms.count) == length - 1
    assert terms.loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)


def caption_argv(data: Path, videos: Path, clip: Path, init_model: Path, output_dir: Path, *extra: str) -> list[str]:
    """The original MSVD captioning flags (docs/method.md §8), pointed at the small demo data and tiny CLIP."""
    return [
        "--do_train", "--num_thread_reader=0", "--epochs=1", "--batch_size=8", "--n_display=1",
        f"--data_path={data}", f"--features_path={videos}", "--warmup_proportion=0.2", f"--output_dir={output_dir}",
        "--lr=1e-3", "--new_params_lr=1e-3", "--max_words=12", "--max_frames=3", "--batch_size_val=4",
        "--datatype=msvd", "--expand_msrvtt_sentences", "--feature_framerate=1", "--coef_lr=1e-1",
        "--freeze_layer_num=0", "--slice_framepos=2", "--loose_type", "--linear_patch=2d", "--sim_header=meanP",
        f"--init_model={init_model}", f"--visual_pretrain_path={clip}", "--fusion_layers=2", "--max_steps=4",
        "--eval_steps=2", "--save_steps=2", f"--cross_config_path={ROOT / 'CLIP-modules'}", "--no-tensorboard",
        *extra,
    ]


@pytest.fixture(scope="module")
def caption_run(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caption")
    argv = caption_argv(small_demo_source["msvd_dir"], small_demo_source["videos_dir"], tiny_fusion_clip_checkpoint,
                        stage1_checkpoint, out)
    assert msvd_captioning.main(argv) == 0
    return out


@pytest.mark.slow
def test_captioning_reports_val_selects_by_cider_and_tests_the_selected_checkpoint(caption_run, small_demo_source):
    records = metrics(caption_run)
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 2, 4]  # before training, at --eval_steps 2, at --max_steps 4
    for record in records:
        assert record["task"] == "caption" and record["decode"] == "greedy" and record["protocol"] == "standard"
        assert all(0 <= record[name] <= (1000 if name == "CIDEr" else 100) for name in METRIC_NAMES)
    assert all(r["n_videos"] == 4 for r in val)  # the 4 validation videos, each once
    best = json.loads((caption_run / "best_checkpoint.json").read_text())
    trained = {r["step"]: r["CIDEr"] for r in val if r["step"] > 0}
    best_step = min(step for step, value in trained.items() if value == max(trained.values()))
    assert (best["metric"], best["step"]) == ("val CIDEr", best_step)
    assert Path(best["checkpoint"]) == caption_run / "ckpt" / f"pytorch_model.bin.{best_step}"
    test = [r for r in records if r["split"] == "test"]
    assert len(test) == 1 and test[0]["step"] == best_step and test[0]["n_videos"] == 6
    predictions = json.loads((caption_run / f"predictions_test_step{best_step}.json").read_text())
    test_ids = (small_demo_source["msvd_dir"] / "test_list.txt").read_text().split()
    assert [p["video_id"] for p in predictions] == test_ids
    assert all(isinstance(p["caption"], str) and not p["caption"].endswith(" ") for p in predictions)
    log = (caption_run / "log.txt").read_text()
    assert "caption_loss" in log and "sim_loss" in log and "align_loss" in log
    assert "evaluating the test split with the checkpoint selected on val" in log
    # local_visual joins the fixed-rate group (docs/method.md §7b): the new groups hold the fusion list and local_visual
    new_groups = [line for line in log.splitlines() if "LR group new_" in line]
    assert len(new_groups) == 2 and all("lr 0.001 " in line for line in new_groups)
    in_log = sum(int(re.search(r"(\d+) tensors", line).group(1)) for line in new_groups)
    model = T2VLP(TINY_FUSION_CLIP, T2VLPConfig(with_fusion=True, fusion_layers=2))
    apply_freeze_rule(model, 0)

    def count(patterns):
        return sum(1 for name, param in model.named_parameters()
                   if param.requires_grad and any(pattern in name for pattern in patterns))

    assert in_log == count(task_definition("caption").new_param_patterns) > count(
        task_definition("retrieval").new_param_patterns)


@pytest.mark.slow
def test_do_eval_of_the_selected_checkpoint_reproduces_the_test_row(
        caption_run, small_demo_source, tiny_fusion_clip_checkpoint, tmp_path):
    best = json.loads((caption_run / "best_checkpoint.json").read_text())
    reported = next(r for r in metrics(caption_run) if r["split"] == "test")
    config = T2VLPConfig(with_fusion=True, fusion_layers=2, head_dropout=0.5)
    model = T2VLP.from_pretrained(tiny_fusion_clip_checkpoint, init_model=best["checkpoint"], config=config)
    released = tmp_path / "released.bin"  # the original's layout: fp16 where it stored fp16, optimiser state beside
    torch.save({"global_step": best["step"], "model_state_dict": original_format_state_dict(model, model.clip),
                "optim_state_dict": {"state": {}}}, released)
    for name, path in (("ours", Path(best["checkpoint"])), ("released", released)):
        out = tmp_path / name
        argv = [arg for arg in caption_argv(small_demo_source["msvd_dir"], small_demo_source["videos_dir"],
                                            tiny_fusion_clip_checkpoint, path, out) if arg != "--do_train"]
        assert msvd_captioning.main(["--do_eval", *argv]) == 0
        (row,) = metrics(out)
        assert row["split"] == "test" and row["checkpoint"] == str(path.resolve())
        if name == "ours":  # the same weights decode the same captions
            assert {k: row[k] for k in METRIC_NAMES} == {k: reported[k] for k in METRIC_NAMES}
            assert (out / "predictions_test_step0.json").read_text() == \
                (caption_run / f"predictions_test_step{best['step']}.json").read_text()
        assert not (out / "best_checkpoint.json").exists()


def test_msrvtt_captioning_uses_the_json_splits(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint,
                                                tmp_path):
    argv = caption_argv(small_demo_source["data_json"], small_demo_source["videos_dir"], tiny_fusion_clip_checkpoint,
                        stage1_checkpoint, tmp_path / "out", "--max_steps=2", "--beam_size=2",
                        "--caption_protocol=original")
    argv = [arg.replace("--datatype=msvd", "--datatype=msrvtt") for arg in argv]
    assert msrvtt_captioning.main(argv) == 0
    records = metrics(tmp_path / "out")
    assert [(r["split"], r["step"], r["n_videos"]) for r in records] == [("val", 0, 4), ("val", 2, 4), ("test", 2, 6)]
    assert all(r["decode"] == "beam2" and r["protocol"] == "original" for r in records)


def test_missing_java_stops_before_training(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint,
                                            tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("engine.evaluation.caption_metrics.shutil.which", lambda name: None)
    argv = caption_argv(small_demo_source["msvd_dir"], small_demo_source["videos_dir"], tiny_fusion_clip_checkpoint,
                        stage1_checkpoint, tmp_path / "out")
    assert msvd_captioning.main(argv) == 2
    assert "default-jre-headless" in capsys.readouterr().err
    assert not (tmp_path / "out" / "ckpt").exists() or not any((tmp_path / "out" / "ckpt").iterdir())


# The original README / video_captioning/start.sh, `python3 -u -m light.pytorch.launch` replaced.
ORIGINAL_CAPTIONING = (
    "msvd_captioning.py --do_train --num_thread_reader=4 --cross_config_path ../CLIP-modules "
    "--epochs=10 --batch_size=32 --n_display=50 --data_path ${DATA_PATH} --features_path ${DATA_PATH}/MSVD_Videos "
    "--warmup_proportion 0.2 --output_dir ${OUTPUT_PATH} --lr 5e-5 --max_words 32 --max_frames 12 "
    "--batch_size_val 32 --datatype msvd --expand_msrvtt_sentences --feature_framerate 1 --coef_lr 1e-3 "
    "--freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP "
    "--init_model ${Pretrained_Model}"
)


@pytest.mark.integration
def test_original_captioning_command_from_the_task_folder(small_demo_source, tiny_fusion_clip_checkpoint,
                                                          stage1_checkpoint, tmp_path):
    task_folder = original_task_folder(tmp_path, "video_captioning", tiny_fusion_clip_checkpoint)
    data = tmp_path / "data"
    shutil.copytree(small_demo_source["msvd_dir"], data)
    (data / "MSVD_Videos").symlink_to(small_demo_source["videos_dir"])
    output = tmp_path / "output"
    command = (ORIGINAL_CAPTIONING.replace("${DATA_PATH}", str(data)).replace("${OUTPUT_PATH}", str(output))
               .replace("${Pretrained_Model}", str(stage1_checkpoint)))
    arguments = shlex.split(command)
    # the tiny CLIP has 2 text blocks: the one flag added is --fusion_layers (the original's 6 needs ViT-B/16)
    run_torchrun(ROOT / "video_captioning" / arguments[0], *arguments[1:], "--fusion_layers=2", nproc=1,
                 cwd=task_folder, timeout=900)
    records = metrics(output)
    val_steps = [r["step"] for r in records if r["split"] == "val"]
    assert val_steps[0] == 0 and len(val_steps) == 11  # before training, then after each of the 10 epochs
    assert [r["split"] for r in records].count("test") == 1
    log = (output / "log.txt").read_text()
    assert "../CLIP-modules/ViT-B-16.pt" in log and "LR group new_decay         lr 1e-06" in log
