"""Launching real multi-process runs from tests: torchrun on CPU (gloo), one thread per process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: Path, *arguments: str, nproc: int, cwd: Path = ROOT, timeout: int = 300) -> None:
    """`torchrun --nproc_per_node=nproc script arguments...`; fails the test with the output's tail on error."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *arguments,
    ]
    result = subprocess.run(command, cwd=cwd, env={**os.environ, **CPU_ENV}, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def original_task_folder(tmp_path: Path, folder: str, clip: Path) -> Path:
    """A working copy laid out like the original repository for running a task script from inside its folder:
    `<work>/<folder>/` with CLIP at `../CLIP-modules/ViT-B-16.pt` (and cross-base beside it). Returns the folder."""
    import shutil

    work = tmp_path / "work"
    (work / folder).mkdir(parents=True)
    (work / "CLIP-modules").mkdir()
    shutil.copy(clip, work / "CLIP-modules" / "ViT-B-16.pt")
    shutil.copytree(ROOT / "CLIP-modules" / "cross-base", work / "CLIP-modules" / "cross-base")
    return work / folder
