"""Two torchrun processes (gloo) compute the stage-1 loss and gradients of one process on the global batch."""

from __future__ import annotations

import pytest
import torch

import main_task_clip
from engine.checkpointing import load_restore
from tests import dist_stage1_helper
from tests.stage1_helpers import stage1_argv
from tests.torchrun import ROOT, run_torchrun

pytestmark = pytest.mark.integration


def test_two_processes_equal_one_process(tiny_clip_checkpoint, tmp_path):
    run_torchrun(ROOT / "tests" / "dist_stage1_helper.py", str(tmp_path), str(tiny_clip_checkpoint), nproc=2)

    expected_loss, expected_grads = dist_stage1_helper.loss_and_gradients(str(tiny_clip_checkpoint), tmp_path)
    assert len(expected_grads) > 100
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert abs(saved["loss"] - expected_loss) <= 1e-5 * abs(expected_loss)
        assert saved["grads"].keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            # float sums are reordered across processes: compare against the tensor's scale
            error = (saved["grads"][name] - grad).abs().max()
            assert error <= 1e-4 * grad.abs().max() + 1e-8, f"{name}: max error {error}"
    assert expected_grads["clip.fusion_center"].abs().max() > 0
    assert expected_grads["clip.logit_scale"].abs() > 0


def test_a_two_process_run_resumes_on_one_process(small_demo, tiny_clip_checkpoint, tmp_path):
    """restore.bin carries the global position: a run stopped on 2 processes finishes on 1 with the same plan."""
    out = tmp_path / "run"
    argv = stage1_argv(small_demo, tiny_clip_checkpoint, out, "--epochs=2", "--keep_checkpoints=0")
    run_torchrun(ROOT / "main_task_clip.py", *argv, "--max_steps=4", nproc=2)
    saved = load_restore(out)
    assert (saved["global_step"], saved["world_size"]) == (4, 2)

    assert main_task_clip.main(argv) == 0
    log = (out / "log.txt").read_text()
    assert "resuming a run saved with 2 processes on 1" in log
    # 24 training clips, global batch 8: 3 steps per epoch; step 4 is 8 clips into the second epoch
    assert "resumed from restore.bin: epoch 1, 8 samples into the epoch, step 4" in log
    assert load_restore(out)["global_step"] == 6
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [f"pytorch_model.bin.{s}" for s in (3, 4, 6)]
