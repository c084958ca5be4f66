"""Stage 1 from WebVid TFRecords on 2 processes x 2 DataLoader workers: every clip once per epoch."""

from __future__ import annotations

import collections
import json

import pytest

from tests.torchrun import ROOT, run_torchrun

pytestmark = pytest.mark.integration


def test_two_processes_two_workers_see_every_clip_once_per_epoch(webvid_demo, tiny_clip_checkpoint, tmp_path):
    run_torchrun(
        ROOT / "tests" / "dist_webvid_helper.py", str(tmp_path), str(tiny_clip_checkpoint),
        str(webvid_demo["labels"]), str(webvid_demo["tfrecord_dir"] / "path.index"), nproc=2,
    )

    n_clips = len(json.loads(webvid_demo["labels"].read_text()))
    assert n_clips == 64
    seen = collections.defaultdict(list)  # epoch -> indices
    files = sorted(tmp_path.glob("seen_rank*_pid*.txt"))
    ranks_with_workers = collections.Counter(path.name.split("_")[1] for path in files)
    assert ranks_with_workers == {"rank0": 4, "rank1": 4}  # 2 workers per rank, fresh each of 2 epochs
    for path in files:
        for line in path.read_text().splitlines():
            epoch, index = map(int, line.split())
            seen[epoch].append(index)
    assert sorted(seen) == [0, 1]
    for epoch, indices in seen.items():
        assert sorted(indices) == list(range(n_clips)), f"epoch {epoch}"
    assert seen[0] != seen[1]  # reshuffled per epoch
    assert (tmp_path / "run" / "ckpt" / "pytorch_model.bin.16").is_file()
