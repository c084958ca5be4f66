"""The README's two journeys, run as written on the embedded demo data: each command of their code blocks that
needs no download runs with the demo's paths, a tiny CLIP and tiny sizes substituted, and must succeed."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataloaders.demo_data import make_demo_dataset
from modules.model import T2VLP, T2VLPConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

# What makes a command tiny: one short epoch on the demo's 32-px videos, 4 frames, small batches, no workers.
TINY_RUN = "--epochs 1 --batch_size 8 --batch_size_val 8 --max_frames 4 --max_words 16 --num_thread_reader 0"


def journey_commands(title: str) -> list[str]:
    """The commands of the README's bash block under `## <title>`: continuation lines joined, comments dropped."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [command for command in commands if command and not command.startswith("#")]


def run(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_fusion_clip_checkpoint) -> dict[str, Path]:
    paths = make_demo_dataset(tmp_path_factory.mktemp("journey_demo"), n_train=24, n_test=6, size=32, fps=4,
                              seconds=2, n_val=2)
    return {**paths, "clip": tiny_fusion_clip_checkpoint}


def base_env(demo: dict[str, Path]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DATA_PATH", "INIT_MODEL", "EVAL_ONLY")}
    return {**env, "PYTHON": sys.executable, "CLIP_PATH": str(demo["clip"]), "NPROC_PER_NODE": "1",
            "OMP_NUM_THREADS": "1"}


def videos_with_captions_beside(demo: dict[str, Path], folder: Path) -> int:
    """The demo's WebVid videos as a user's folder: <id>.mp4 with <id>.txt holding its caption."""
    folder.mkdir()
    with demo["webvid_csv"].open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        video = next(demo["webvid_videos_dir"].rglob(f"{row['videoid']}.mp4"))
        (folder / video.name).symlink_to(video)
        (folder / f"{row['videoid']}.txt").write_text(row["name"], encoding="utf-8")
    return len(rows)


def msrvtt_layout(demo: dict[str, Path], folder: Path) -> Path:
    """The demo's MSR-VTT files under the names the original recipes read."""
    folder.mkdir(exist_ok=True)
    for name, source in (("MSRVTT_train.9k.csv", demo["train_csv"]), ("MSRVTT_JSFUSION_test.csv", demo["test_csv"]),
                         ("MSRVTT_data.json", demo["data_json"]), ("MSRVTT_Videos", demo["videos_dir"])):
        (folder / name).symlink_to(source)
    return folder


def test_pretrain_on_your_own_videos(demo, tmp_path):
    commands = journey_commands("Pre-train on your own videos")
    assert [c.split()[0] for c in commands] == [".venv/bin/python", "export", ".venv/bin/python",
                                                 "NPROC_PER_NODE=8", "INIT_MODEL=runs/stage1/ckpt/pytorch_model.bin.N"]
    assert "fetch_clip.py" in commands[0]  # a download: CLIP_PATH names the demo's tiny CLIP instead
    data = msrvtt_layout(demo, tmp_path / "data")
    n_videos = videos_with_captions_beside(demo, tmp_path / "videos")
    env = {**base_env(demo), "DATA_PATH": str(data)}
    assert commands[1] == "export DATA_PATH=/data/t2vlp"

    convert = commands[2].replace(".venv/bin/python", sys.executable).replace("~/videos", str(tmp_path / "videos"))
    run(convert.replace("--workers 16", "--workers 1") + " --no_progress", env, ROOT)
    labels = json.loads((data / "WebVid_TFRecord" / "frozen_train_labels.json").read_text(encoding="utf-8"))
    assert len(labels) == n_videos and not (data / "frozen_train_labels.json").exists()

    train = commands[3].replace("NPROC_PER_NODE=8", "NPROC_PER_NODE=1").replace("runs/", f"{tmp_path}/runs/")
    run(f"{train} {TINY_RUN} --max_steps 2", env, ROOT)
    stage1 = tmp_path / "runs" / "stage1"
    assert (stage1 / "ckpt" / "pytorch_model.bin.2").is_file()
    trained = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    assert trained[-1]["task"] == "retrieval" and trained[-1]["step"] == 2 and trained[-1]["n_videos"] == 6

    evaluate = commands[4].replace("pytorch_model.bin.N", "pytorch_model.bin.2").replace("runs/", f"{tmp_path}/runs/")
    run(f"{evaluate} {TINY_RUN}", env, ROOT)
    evaluated = [json.loads(line) for line in (tmp_path / "runs" / "stage1_eval" / "metrics.jsonl").read_text()
                 .splitlines()]
    assert len(evaluated) == 1 and not (tmp_path / "runs" / "stage1_eval" / "ckpt").exists()
    assert evaluated[0]["t2v"] == trained[-1]["t2v"] and evaluated[0]["v2t"] == trained[-1]["v2t"]


def test_evaluate_a_released_checkpoint(demo, tmp_path):
    commands = journey_commands("Evaluate a released checkpoint")
    assert "fetch_checkpoints.py msrvtt_retrieval" in commands[0] and "fetch_clip.py" in commands[1]  # downloads
    assert len(commands) == 3
    # A stand-in for the released file: a stage-2 model's state dict as the original saved it.
    released = tmp_path / "checkpoints" / "released" / "t2vlp_msrvtt_retrieval.bin"
    released.parent.mkdir(parents=True)
    model = T2VLP.from_pretrained(demo["clip"], config=T2VLPConfig(with_fusion=True, fusion_layers=2))
    torch.save(model.state_dict(), released)
    data = msrvtt_layout(demo, tmp_path / "msrvtt")
    evaluate = commands[2].replace("/data/msrvtt", str(data)).replace("checkpoints/", f"{tmp_path}/checkpoints/")
    output = tmp_path / "output"
    run(f"OUTPUT_PATH={output} {evaluate} {TINY_RUN} --fusion_layers 2 --rerank_top_k 3", base_env(demo), ROOT)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row["scoring"] for row in rows] == ["meanP", "rerank"]
    assert all(row["task"] == "retrieval" and row["n_videos"] == 6 and row["n_texts"] == 6 for row in rows)
