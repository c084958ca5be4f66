"""Stage-1 training end to end on the small demo dataset: exact resume, bad videos, non-finite losses."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_task_clip
from engine.checkpointing import load_restore
from modules.model import T2VLP
from tests.stage1_helpers import stage1_argv

ROOT = Path(__file__).resolve().parents[1]


def final_state(output_dir) -> dict[str, torch.Tensor]:
    checkpoints = sorted((output_dir / "ckpt").glob("pytorch_model.bin.*"), key=lambda p: int(p.suffix[1:]))
    return torch.load(checkpoints[-1], weights_only=True)["model_state_dict"]


def make_loss_nan(monkeypatch, on_call) -> None:
    """Patch T2VLP.forward so that its loss is NaN on the forward calls (counted from 1) where on_call(n) holds."""
    original_forward = T2VLP.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        result = original_forward(self, *args, **kwargs)
        calls["n"] += 1
        if on_call(calls["n"]):
            result["loss"] = result["loss"] * float("nan")
        return result

    monkeypatch.setattr(T2VLP, "forward", forward)


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(small_demo, tiny_clip_checkpoint, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, straight, "--keep_checkpoints=0")) == 0
    # 24 pairs / batch 8 = 3 steps per epoch: stop inside epoch 2, then rerun the plain command
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, interrupted, "--max_steps=4",
                                                   "--keep_checkpoints=0")) == 0
    stopped = load_restore(interrupted)
    assert stopped["global_step"] == 4 and stopped["progress"]["epoch"] == 1
    assert stopped["progress"]["samples_in_epoch"] == 8
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, interrupted, "--keep_checkpoints=0")) == 0

    expected, resumed = final_state(straight), final_state(interrupted)
    assert load_restore(interrupted)["global_step"] == 6
    assert expected.keys() == resumed.keys()
    differing = [key for key in expected if not torch.equal(expected[key], resumed[key])]
    assert differing == []
    after_epoch_1 = torch.load(straight / "ckpt" / "pytorch_model.bin.3", weights_only=True)["model_state_dict"]
    assert not torch.equal(after_epoch_1["clip.fusion_center"], expected["clip.fusion_center"])
    # --max_steps ends a run like an epoch end: a checkpoint and an evaluation at step 4; otherwise the same
    # evaluations, with the same numbers, in both runs
    assert (interrupted / "ckpt" / "pytorch_model.bin.4").is_file()
    assert [m["step"] for m in metrics(interrupted)] == [3, 4, 6]
    assert [m["t2v"] for m in metrics(straight)] == [m["t2v"] for m in metrics(interrupted) if m["step"] != 4]


def test_training_changes_the_weights_it_should(small_demo, tiny_clip_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, out, "--epochs=1")) == 0
    trained = final_state(out)
    from modules.checkpoint import init_state_from_clip, read_clip_state_dict

    initial = init_state_from_clip(read_clip_state_dict(tiny_clip_checkpoint), None, 4, 2)
    moved = lambda key: not torch.equal(initial[key].float(), trained[key])  # noqa: E731
    assert moved("clip.visual.transformer.resblocks.0.attn.in_proj_weight")
    assert moved("clip.local_visual.transformer.resblocks.1.mlp.c_fc.weight")
    assert moved("clip.transformer.resblocks.1.mlp.c_proj.weight")
    # --freeze_layer_num 0 freezes the patch and token embeddings (CLIP4Clip semantics)
    assert not moved("clip.visual.conv1.weight")
    assert not moved("clip.token_embedding.weight")
    record = metrics(out)[-1]
    assert record["task"] == "retrieval" and record["scoring"] == "meanP"
    assert record["n_texts"] == record["n_videos"] == 6 and record["epoch"] == 1 and record["step"] == 3
    assert set(record["t2v"]) == {"R1", "R5", "R10", "MdR", "MnR"}


def test_bad_videos_are_skipped_and_counted(small_demo, tiny_clip_checkpoint, tmp_path):
    videos = small_demo["videos_dir"]
    (videos / "video0.mp4").write_bytes((videos / "video0.mp4").read_bytes()[:300])  # truncated
    (videos / "video1.mp4").write_bytes(b"")  # empty
    (videos / "video2.mp4").unlink()  # missing
    (videos / "video25.mp4").unlink()  # a test video
    out = tmp_path / "run"
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, out)) == 0
    log = (out / "log.txt").read_text()
    for video_id in ("video0", "video1", "video2", "video25"):
        assert f"skipping video {video_id}" in log
    record = metrics(out)[-1]
    assert record["n_skipped"] == 1 and record["n_texts"] == record["n_videos"] == 5
    restore = load_restore(out)
    assert restore["progress"]["skipped_videos"] == 3 * 2  # three bad training videos, seen once per epoch


def test_non_finite_losses_skip_steps_then_stop(small_demo, tiny_clip_checkpoint, tmp_path, monkeypatch, caplog,
                                                capsys):
    out = tmp_path / "run"
    make_loss_nan(monkeypatch, lambda call: call > 2)
    argv = stage1_argv(small_demo, tiny_clip_checkpoint, out, "--epochs=3", "--max_bad_steps=3", "--save_steps=1")
    with caplog.at_level(logging.WARNING):
        assert main_task_clip.main(argv) == 3  # EXIT_NON_FINITE
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # besides progress bars
    assert "error: 3 consecutive non-finite losses up to step 3" in line and "restore.bin of step 2 is intact" in line
    assert "Traceback" in (out / "log.txt").read_text() and "NonFiniteLossError" in (out / "log.txt").read_text()
    assert json.loads((out / "run.json").read_text())[-1]["outcome"].startswith("error: NonFiniteLossError: 3 ")
    assert caplog.text.count("non-finite loss at step 3: step skipped") == 3
    restore = load_restore(out)
    assert restore["global_step"] == 2  # the last good step is what was saved
    assert (out / "ckpt" / "pytorch_model.bin.2").is_file()
    assert all(torch.isfinite(v).all() for v in restore["model_state_dict"].values() if v.is_floating_point())


def test_gradient_accumulation_keeps_the_global_batch(small_demo, tiny_clip_checkpoint, tmp_path):
    out = tmp_path / "run"
    argv = stage1_argv(small_demo, tiny_clip_checkpoint, out, "--gradient_accumulation_steps=2", "--save_steps=1",
                       "--keep_checkpoints=2", "--epochs=1")
    assert main_task_clip.main(argv) == 0
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["pytorch_model.bin.2", "pytorch_model.bin.3"]
    log = (out / "log.txt").read_text()
    assert "1 epochs x 3 optimiser steps (global batch 8 = 1 processes x 4 x 2 accumulation)" in log
    assert load_restore(out)["global_step"] == 3


def test_evaluating_a_saved_checkpoint_reproduces_the_training_evaluation(small_demo, tiny_clip_checkpoint, tmp_path):
    trained = tmp_path / "train"
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, trained, "--epochs=1")) == 0
    evaluated = tmp_path / "eval"
    argv = [a for a in stage1_argv(small_demo, tiny_clip_checkpoint, evaluated) if a != "--do_train"]
    argv += ["--do_eval", f"--init_model={trained / 'ckpt' / 'pytorch_model.bin.3'}"]
    assert main_task_clip.main(argv) == 0
    during_training, standalone = metrics(trained)[-1], metrics(evaluated)[-1]
    assert standalone["t2v"] == during_training["t2v"] and standalone["v2t"] == during_training["v2t"]
    assert not (evaluated / "ckpt").exists()


@pytest.mark.integration
def test_sigterm_saves_restore_and_the_rerun_resumes(small_demo, tiny_clip_checkpoint, tmp_path):
    out = tmp_path / "run"
    argv = stage1_argv(small_demo, tiny_clip_checkpoint, out, "--epochs=200")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen([sys.executable, str(ROOT / "main_task_clip.py"), *argv], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.txt"
    deadline = time.monotonic() + 120
    while not (log.is_file() and " step 2/600 " in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 75  # stopped, not finished: schedulers can requeue on this code
    text = log.read_text()
    assert "signal 15 received: saving restore.bin at the next step boundary" in text
    stopped_at = load_restore(out)["global_step"]
    assert 2 <= stopped_at < 600
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, out, "--epochs=200",
                                           f"--max_steps={stopped_at + 1}")) == 0
    # 3 steps of 8 samples per epoch; a stop on an epoch's last step resumes with that epoch's end (save, eval)
    epoch, samples = (stopped_at - 1) // 3, ((stopped_at - 1) % 3 + 1) * 8
    assert f"resumed from restore.bin: epoch {epoch}, {samples} samples into the epoch, step {stopped_at}" in log.read_text()
    assert load_restore(out)["global_step"] == stopped_at + 1


def test_one_non_finite_micro_batch_skips_its_window_and_training_goes_on(small_demo, tiny_clip_checkpoint, tmp_path,
                                                                          monkeypatch, caplog):
    """The NaN loss back-propagates (no per-micro-batch host check) but its whole accumulation window is skipped:
    nothing of it reaches the weights or the optimiser state, and later steps train normally."""
    out = tmp_path / "run"
    make_loss_nan(monkeypatch, lambda call: call == 4)  # the second micro-batch of the second window
    argv = stage1_argv(small_demo, tiny_clip_checkpoint, out, "--epochs=2", "--gradient_accumulation_steps=2")
    with caplog.at_level(logging.WARNING):
        assert main_task_clip.main(argv) == 0
    assert caplog.text.count("non-finite loss at step 2: step skipped (1 in a row") == 1
    restore = load_restore(out)
    assert restore["global_step"] == 5  # 2 epochs x 3 windows, one skipped
    assert all(torch.isfinite(v).all() for v in restore["model_state_dict"].values() if v.is_floating_point())
    moments = [t for state in restore["optim_state_dict"]["state"].values() for t in state.values()
               if torch.is_tensor(t) and t.is_floating_point()]
    assert moments and all(torch.isfinite(t).all() for t in moments)


@pytest.mark.slow
def test_an_empty_micro_batch_is_dropped_and_resume_stays_exact(small_demo, tiny_clip_checkpoint, tmp_path,
                                                                monkeypatch, caplog):
    """A micro-batch with no decodable video is dropped on every rank and the window takes the next one instead
    (the skipped counts travel ahead of the forward); a run stopped after a step, with the next micro-batch already
    fetched ahead, resumes bit-identical to an uninterrupted one."""
    from dataloaders.msrvtt import MSRVTTTrainDataset
    from engine.sampler import ResumableDistributedSampler

    sampler = ResumableDistributedSampler(24, 1, 0, shuffle=True, seed=42)
    sampler.set_epoch(0)
    # --batch_size 8 with 2 accumulation steps: micro-batches of 4, 6 per epoch, 3 windows. These 8 samples are
    # exactly micro-batches 3 and 4 of the first epoch: both arrive through step 1's look-ahead, both are dropped,
    # and the window refills with micro-batches 5 and 6.
    undecodable = set(list(sampler)[8:16])
    original_getitem = MSRVTTTrainDataset.__getitem__

    def getitem(self, index):
        if index in undecodable:
            self.n_skipped += 1
            return None
        return original_getitem(self, index)

    monkeypatch.setattr(MSRVTTTrainDataset, "__getitem__", getitem)
    flags = ("--epochs=3", "--gradient_accumulation_steps=2")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    with caplog.at_level(logging.WARNING):
        assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, straight, *flags)) == 0
    assert caplog.text.count("no decodable video on some rank was skipped on every rank") == 2
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, interrupted, *flags,
                                           "--max_steps=3")) == 0
    stopped = load_restore(interrupted)["progress"]
    # the first step of epoch 2: its window consumed; the next two micro-batches, fetched ahead, were not
    sampler.set_epoch(1)
    in_first_window = len(undecodable & set(list(sampler)[:8]))
    assert (stopped["epoch"], stopped["samples_in_epoch"], stopped["skipped_videos"]) == (1, 8, 8 + in_first_window)
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, interrupted, *flags)) == 0
    for run in (straight, interrupted):
        restore = load_restore(run)
        # 2 + 3 + 3 steps; every undecodable sample counted once per epoch
        assert restore["global_step"] == 8 and restore["progress"]["skipped_videos"] == 24
    expected, resumed = final_state(straight), final_state(interrupted)
    assert [key for key in expected if not torch.equal(expected[key], resumed[key])] == []


def test_the_last_checkpoint_is_kept_by_default(small_demo, tiny_clip_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, out, "--epochs=2")) == 0
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["pytorch_model.bin.6"]  # 3 steps per epoch
