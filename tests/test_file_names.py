"""File names that are not UTF-8 (any byte string is a valid Linux name): a video whose name is its id cannot be
stored and is reported per file (`bad_name`); a video in a folder with such a name is read (OpenCV gets the open
file); predict.py indexes and prints them without crashing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import frozen_tfrecord as ft
from dataloaders.files import printable
from inference.results_page import thumbnails
from tests.test_predict import run_predict
from tests.video_helpers import HEIGHT, frame_number, write_numbered_video

BAD_STEM = b"clip\xff\xfe"
BAD_FOLDER = b"dir\xe9"  # Latin-1 e-acute, as an old archive might hold


@pytest.fixture(scope="module")
def named_videos(tmp_path_factory) -> Path:
    """good.mp4, clip\\xff\\xfe.mp4 and dir\\xe9/inside.mp4, three numbered videos."""
    root = tmp_path_factory.mktemp("names") / "videos"
    write_numbered_video(root / "good.mp4", 12, video=1)
    os.rename(write_numbered_video(root / "2.mp4", 12, video=2), os.fsdecode(bytes(root) + b"/" + BAD_STEM + b".mp4"))
    os.rename(write_numbered_video(root / "3" / "inside.mp4", 12, video=3).parent,
              os.fsdecode(bytes(root) + b"/" + BAD_FOLDER))
    return root


def failures_of(folder: Path) -> list[list[str]]:
    return [line.split("\t") for line in (folder / "failures.tsv").read_text(encoding="utf-8").splitlines()[1:]]


@pytest.mark.parametrize("decoder", ["opencv", "pyav"])
def test_a_name_that_is_not_utf8_is_reported_and_a_folder_that_is_not_is_read(named_videos, tmp_path, decoder):
    out = tmp_path / "store"
    summary = ft.convert(ft.parse_args(["--video_dir", str(named_videos), "--output_dir", str(out), "--num_frames",
                                        "4", "--decoder", decoder, "--workers", "0", "--no_progress"]))
    assert summary.n_written == 2
    index = (out / "path.index").read_text(encoding="utf-8")
    assert [line.split("\t")[0] for line in index.splitlines()] == ["good", "inside"]
    assert failures_of(out) == [["bad_name", "", printable(os.fsdecode(bytes(named_videos) + b"/" + BAD_STEM))
                                 + ".mp4", "the file name is not valid UTF-8, so it cannot be a clip id: rename the "
                                 "file (e.g. with convmv)"]]
    assert "\\xff\\xfe.mp4" in failures_of(out)[0][2]


@pytest.mark.integration
def test_workers_report_the_name_and_read_the_folder_too(named_videos, tmp_path):
    out = tmp_path / "store"
    summary = ft.convert(ft.parse_args(["--video_dir", str(named_videos), "--output_dir", str(out), "--num_frames",
                                        "4", "--workers", "2", "--no_progress"]))
    assert summary.n_written == 2 and [f[0] for f in failures_of(out)] == ["bad_name"]


def test_predict_indexes_and_prints_every_name(named_videos, stage1_checkpoint, tmp_path):
    indexed = run_predict("index", str(named_videos), "--init_model", str(stage1_checkpoint), "--out", str(tmp_path / "ix"),
                "--num_workers", "0", "--max_frames", "3")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert sorted(os.fsencode(entry["path"]).rsplit(b"/", 1)[-1] for entry in meta["videos"]) == \
        sorted([b"good.mp4", BAD_STEM + b".mp4", b"inside.mp4"])
    assert "3 encoded, 0 unchanged, 0 removed, 0 unreadable" in indexed.stdout
    result = run_predict("query", str(tmp_path / "ix"), "a red circle", "--top_k", "3", "--html",
                         str(tmp_path / "page.html"))
    printed = [line.split()[-1] for line in result.stdout.splitlines()]
    assert sorted(Path(path).name for path in printed) == sorted(["good.mp4", "clip\\xff\\xfe.mp4", "inside.mp4"])
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert page.count('<img alt="frame"') == 3 * 6  # every video's strip, the two odd names' too


@pytest.mark.parametrize("codec", ["mp4v", "h264"])
def test_thumbnails_are_the_frames_spread_over_the_video(tmp_path, codec):
    video = write_numbered_video(tmp_path / "v.mp4", 41, codec=codec)
    numbers = [frame_number(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
               for jpeg in thumbnails(video, count=5, height=HEIGHT)]
    assert numbers == [0, 10, 20, 30, 40]
    shutil.copy(video, os.fsdecode(bytes(tmp_path) + b"/" + BAD_STEM + b".mp4"))  # cv2 could not write it so
    assert len(thumbnails(os.fsdecode(bytes(tmp_path) + b"/" + BAD_STEM + b".mp4"), count=5)) == 5
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    assert thumbnails(tmp_path / "broken.mp4") == []
