"""torchrun restarts that recover: start_clip.sh with MAX_RESTARTS (c10d rendezvous), two gloo workers, one killed
with SIGKILL mid-epoch; the restarted group resumes from restore.bin and ends with the uninterrupted run's weights."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modules.checkpoint import read_model_state_dict

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["--epochs", "2", "--batch_size", "4", "--max_frames", "3", "--max_words", "16", "--batch_size_val",
             "4", "--num_thread_reader", "0", "--save_steps", "2", "--n_display", "1", "--lr", "1e-3",
             "--coef_lr", "1", "--no-tensorboard"]
LAST_STEP = 32  # 64 clips / 4 per step x 2 epochs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def data_folder(webvid_demo: dict[str, Path], root: Path) -> Path:
    """DATA_PATH laid out as start_clip.sh expects it, linking the demo's files."""
    root.mkdir()
    links = {"MSRVTT_train.9k.csv": webvid_demo["train_csv"], "MSRVTT_JSFUSION_test.csv": webvid_demo["test_csv"],
             "frozen_train_labels.json": webvid_demo["labels"], "WebVid_TFRecord": webvid_demo["tfrecord_dir"],
             "MSRVTT_Videos": webvid_demo["videos_dir"]}
    for name, target in links.items():
        (root / name).symlink_to(target)
    return root


def launch(data: Path, clip: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "DATA_PATH": str(data), "CLIP_PATH": str(clip), "OUTPUT_PATH": str(out),
           "NPROC_PER_NODE": "2", "MAX_RESTARTS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "T2VLP_DIST_SETUP_TIMEOUT_SECONDS": "30"}
    return subprocess.Popen(["bash", str(ROOT / "start_clip.sh"), *OVERRIDES], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def worker_of_rank(output_dir: Path, rank: int) -> int | None:
    """The pid of the training process of `rank` writing into `output_dir` (torchrun gives its workers sessions
    of their own)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (any(part.endswith(b"main_task_clip.py") for part in command) and str(output_dir).encode() in command
                and f"RANK={rank}".encode() in environment):
            return int(entry.name)
    return None


def test_a_killed_worker_is_restarted_and_the_run_ends_as_an_uninterrupted_one(webvid_demo, tiny_clip_checkpoint,
                                                                                tmp_path):
    data = data_folder(webvid_demo, tmp_path / "data")
    straight = launch(data, tiny_clip_checkpoint, tmp_path / "straight")
    output, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, output[-3000:]

    restarted = launch(data, tiny_clip_checkpoint, tmp_path / "restarted")
    log = tmp_path / "restarted" / "log.txt"
    try:
        deadline = time.monotonic() + 300
        while not (log.is_file() and f"step 5/{LAST_STEP}" in log.read_text()):  # early in epoch 1, a save at 4
            assert restarted.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.1)
        victim = worker_of_rank(tmp_path / "restarted", 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        output, _ = restarted.communicate(timeout=600)
    finally:
        if restarted.poll() is None:
            os.killpg(restarted.pid, signal.SIGKILL)
    assert restarted.returncode == 0, output[-3000:]
    text = log.read_text()
    assert "resumed from restore.bin" in text and "restart" in output.lower()
    expected = read_model_state_dict(tmp_path / "straight" / "ckpt" / f"pytorch_model.bin.{LAST_STEP}")
    got = read_model_state_dict(tmp_path / "restarted" / "ckpt" / f"pytorch_model.bin.{LAST_STEP}")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
