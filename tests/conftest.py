"""Shared fixtures: a small demo dataset in MSR-VTT layout and a tiny random CLIP checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dataloaders.demo_data import make_demo_dataset
from modules.checkpoint import write_random_clip_checkpoint
from tests.model_helpers import TINY_CLIP, TINY_FUSION_CLIP


@pytest.fixture(autouse=True)
def catalogue_cache(tmp_path_factory, monkeypatch) -> Path:
    """Catalogues of stores that cannot be written beside (s3://, read-only) go to a test folder, never to the
    user's cache."""
    folder = tmp_path_factory.getbasetemp() / "catalogue_cache"
    monkeypatch.setenv("T2VLP_CATALOGUE_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory) -> Path:
    return write_random_clip_checkpoint(tmp_path_factory.mktemp("clip") / "ViT-tiny.pt", TINY_CLIP, seed=7)


@pytest.fixture(scope="session")
def tiny_fusion_clip_checkpoint(tmp_path_factory) -> Path:
    """A tiny CLIP whose text width equals its embedding size, as the fusion encoder needs."""
    return write_random_clip_checkpoint(tmp_path_factory.mktemp("clip") / "ViT-fusion.pt", TINY_FUSION_CLIP, seed=8)


@pytest.fixture(scope="session")
def small_demo_source(tmp_path_factory) -> dict[str, Path]:
    """A small demo dataset (24 train, 6 test videos); copy it before modifying (see `small_demo`)."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=24, n_test=6, size=32, fps=4, seconds=2,
                             n_val=4)


@pytest.fixture()
def small_demo(small_demo_source, tmp_path) -> dict[str, Path]:
    """A private copy of the small demo dataset that a test may damage."""
    root = tmp_path / "demo"
    shutil.copytree(small_demo_source["root"], root)
    return {key: root / path.relative_to(small_demo_source["root"]) for key, path in small_demo_source.items()}


def convert_to_webvid_tfrecords(demo: dict[str, Path], output_dir: Path) -> Path:
    """Run frozen_tfrecord.py in-process on a demo dataset's WebVid csv; returns the labels JSON."""
    import frozen_tfrecord

    config = frozen_tfrecord.parse_args(
        ["--video_dir", str(demo["webvid_videos_dir"]), "--csv", str(demo["webvid_csv"]), "--output_dir",
         str(output_dir), "--workers", "0", "--no_progress"]
    )
    frozen_tfrecord.convert(config)
    return output_dir / "frozen_train_labels.json"


@pytest.fixture(scope="session")
def webvid_demo(tmp_path_factory) -> dict[str, Path]:
    """A demo dataset with 64 training videos, converted to WebVid TFRecords (labels + index + shards)."""
    root = tmp_path_factory.mktemp("webvid_demo")
    demo = make_demo_dataset(root / "data", n_train=64, n_test=6, size=32, fps=4, seconds=2, n_val=2)
    labels = convert_to_webvid_tfrecords(demo, root / "WebVid_TFRecord")
    return {**demo, "labels": labels, "tfrecord_dir": root / "WebVid_TFRecord"}


@pytest.fixture(scope="session")
def stage1_checkpoint(small_demo_source, tiny_fusion_clip_checkpoint, tmp_path_factory) -> Path:
    """A stage-1 checkpoint of the tiny fusion-sized CLIP, trained for one epoch on the small demo."""
    import main_task_clip
    from tests.stage1_helpers import stage1_argv

    out = tmp_path_factory.mktemp("stage1")
    argv = stage1_argv(small_demo_source, tiny_fusion_clip_checkpoint, out, "--epochs=1")
    assert main_task_clip.main(argv) == 0
    return out / "ckpt" / "pytorch_model.bin.3"


# Programs whose start makes a test an integration test (`make test-unit` leaves those out). Helpers a unit test may
# start (java for the caption metrics, ffmpeg for test videos) are not among them.
PROCESS_STARTERS = {"python", "python3", "bash", "sh", "torchrun"}


def starts_a_process(args) -> bool:
    program = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
    name = os.path.basename(os.fsdecode(program)).split()[0] if program else ""
    return name in PROCESS_STARTERS or name.startswith("python") or os.fsdecode(program) == sys.executable


@pytest.fixture(autouse=True)
def _integration_marker_required(request, monkeypatch):
    """An unmarked test that starts a Python process, a shell or torchrun fails: mark it `integration`."""
    if request.node.get_closest_marker("integration"):
        return
    original_init = subprocess.Popen.__init__

    def checked_init(self, args, *rest, **options):
        if starts_a_process(args):
            pytest.fail(f"{request.node.nodeid} starts {args!r}: mark it @pytest.mark.integration", pytrace=False)
        original_init(self, args, *rest, **options)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked_init)
