"""Two torchrun processes (gloo) compute the stage-1 loss and gradients of one process on the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests import dist_stage1_helper
from tests.test_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_equal_one_process(tiny_clip_checkpoint, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(ROOT / "tests" / "dist_stage1_helper.py"), str(tmp_path), str(tiny_clip_checkpoint),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

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
