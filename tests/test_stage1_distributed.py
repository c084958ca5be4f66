"""Two torchrun processes (gloo) compute the stage-1 loss and gradients of one process on the global batch."""

from __future__ import annotations

import torch

from tests import dist_stage1_helper
from tests.torchrun import ROOT, run_torchrun


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
