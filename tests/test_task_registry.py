"""A task is one definition: a toy task declared in this file alone trains, evaluates, resumes and is refused with
changed settings through the real entry machinery and training loop, with no project file edited."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dataloaders.collate import clip_sample
from dataloaders.video import normalize_video
from engine.checkpointing import load_restore
from engine.entry import run_main
from engine.evaluation import EvalContext
from engine.tasks import registry
from engine.tasks.base import Task
from engine.tasks.registry import PreparedRun, RunContext, TaskDefinition, register_task
from modules.checkpoint import read_model_state_dict
from modules.model import T2VLP

SOT, EOT = 49406, 49407
FRAMES, WORDS = 3, 8


class ToyClips(Dataset):
    """Random uint8 clips and captions, the same for the same seed."""

    def __init__(self, count: int, seed: int, image_size: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.videos = torch.randint(0, 256, (count, FRAMES, 3, image_size, image_size), generator=generator,
                                    dtype=torch.uint8)
        self.words = torch.randint(1, 40000, (count, WORDS - 2), generator=generator)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = [SOT, *self.words[index].tolist(), EOT]
        return clip_sample(ids, [1] * WORDS, self.videos[index], torch.ones(FRAMES, dtype=torch.long), f"toy{index}",
                           index)


def toy_loss(model: torch.nn.Module, batch: dict[str, Any], margin: float) -> torch.Tensor:
    """Cross-entropy of each caption over the batch's videos, the matching logit lowered by `margin`."""
    text, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
    frames, _ = model.encode_video(batch["video"], batch["video_mask"])
    sim = model.similarity(text, frames, batch["video_mask"])
    sim = sim - margin * torch.eye(len(sim), device=sim.device)
    return F.cross_entropy(sim, torch.arange(len(sim), device=sim.device))


def make_toy_evaluator(dataset: ToyClips, settings: EvalContext, margin: float):
    def evaluate(model: torch.nn.Module, step: int, epoch: int) -> dict[str, Any]:
        model.eval()
        batch = {key: torch.stack([dataset[i][key] for i in range(len(dataset))])
                 for key in ("input_ids", "attention_mask", "video", "video_mask")}
        batch["video"] = normalize_video(batch["video"])
        with torch.no_grad():
            loss = float(toy_loss(model, batch, margin))
        record = {"task": "toy", "split": "val", "step": step, "epoch": epoch, "loss": loss, "n": len(dataset)}
        settings.run.log_metrics(record)
        return record

    return evaluate


def prepare(context: RunContext, model: torch.nn.Module) -> PreparedRun:
    args = context.args

    def objective(model, batch, step_context):
        loss = args.toy_weight * toy_loss(model, batch, args.toy_margin)
        return {"loss": loss, "toy_loss": loss.detach()}

    evaluation = ToyClips(6, seed=99, image_size=model.image_resolution)
    task = Task("toy", objective, TOY.new_param_patterns,
                evaluate=make_toy_evaluator(evaluation, context.eval_context(), args.toy_margin))
    return PreparedRun(task, lambda: ToyClips(16, seed=1, image_size=model.image_resolution))


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--toy_margin", type=float, default=0.0, help="Margin subtracted from matching logits.")


def check_flags(args: argparse.Namespace) -> str | None:
    return "--toy_margin must be >= 0" if args.toy_margin < 0 else None


TOY = TaskDefinition(
    name="toy", prepare=prepare, new_param_patterns=("logit_scale",), defaults={"eval_steps": 0, "new_params_lr": 0.05},
    loss_weights=("toy",), add_flags=add_flags, check_flags=check_flags, run_config_flags=("toy_margin",),
)


@pytest.fixture()
def toy_registered(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the registration ends with the test
    register_task(TOY)


def toy_argv(clip: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--do_train", "--output_dir", str(output_dir), "--visual_pretrain_path", str(clip), "--epochs", "2",
            "--batch_size", "4", "--max_frames", str(FRAMES), "--max_words", str(WORDS), "--num_thread_reader", "0",
            "--lr", "1e-3", "--freeze_layer_num", "-1", "--loose_type", "--no-tensorboard", "--toy_margin", "0.5",
            *extra]


def test_a_task_defined_in_one_place_trains_evaluates_and_resumes(toy_registered, tiny_clip_checkpoint, tmp_path,
                                                                  capsys):
    out = tmp_path / "toy"
    assert run_main("toy", toy_argv(tiny_clip_checkpoint, out)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(row["task"], row["step"], row["epoch"]) for row in rows] == [("toy", 4, 1), ("toy", 8, 2)]

    # the last row is the toy loss of the last checkpoint, computed here independently of the loop
    model = T2VLP.from_pretrained(str(tiny_clip_checkpoint))
    model.load_state_dict(read_model_state_dict(out / "ckpt" / "pytorch_model.bin.8"))
    model.eval()
    evaluation = ToyClips(6, seed=99, image_size=model.image_resolution)
    batch = {key: torch.stack([evaluation[i][key] for i in range(6)]) for key in ("input_ids", "attention_mask",
                                                                                 "video", "video_mask")}
    batch["video"] = normalize_video(batch["video"])
    with torch.no_grad():
        assert rows[-1]["loss"] == pytest.approx(float(toy_loss(model, batch, 0.5)), rel=1e-5)

    # its definition reached the parser, the LR groups and restore.bin
    log = (out / "log.txt").read_text()
    assert "LR group new_decay         lr 0.05 " in log and "1 tensors, 1 parameters: clip.logit_scale" in log
    restore = load_restore(out)
    assert restore["run_config"]["task"] == "toy"
    assert (restore["run_config"]["toy_margin"], restore["run_config"]["toy_weight"]) == (0.5, 1.0)
    assert restore["settings"]["new_params_lr"] == 0.05

    # a rerun of the finished run trains nothing; its own flag is fixed by restore.bin like the shared ones
    assert run_main("toy", toy_argv(tiny_clip_checkpoint, out)) == 0
    assert "already finished" in (out / "log.txt").read_text()
    capsys.readouterr()
    assert run_main("toy", toy_argv(tiny_clip_checkpoint, out, "--toy_margin", "0.25", "--epochs", "3")) == 2
    assert "toy_margin 0.5 -> 0.25" in capsys.readouterr().err


def test_a_task_checks_its_own_flags(toy_registered, tiny_clip_checkpoint, tmp_path, capsys):
    for flags, message in [(["--toy_margin", "-1"], "--toy_margin must be >= 0"),
                           (["--toy_weight", "0"], "the loss weights (--toy_weight) must be >= 0, one > 0")]:
        with pytest.raises(SystemExit) as exit_info:
            run_main("toy", toy_argv(tiny_clip_checkpoint, tmp_path / "bad", *flags))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unknown_tasks_and_datasets_are_named():
    with pytest.raises(ValueError, match="unknown task 'nope'; expected one of .*'clip'.*'qa'"):
        run_main("nope", [])
    with pytest.raises(ValueError, match=r"retrieval: dataset must be one of \('msrvtt', 'msvd', 'lsmdc', 'didemo', 'activitynet'\)"):
        run_main("retrieval", [], dataset="youcook")
