"""Conversion over many machines: --num_parts N --part K, one part killed with SIGKILL and rerun, then --merge;
the same clips as one conversion. And stage 1 trained on a store converted from webdataset shards."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import frozen_tfrecord as ft
import main_task_clip
from dataloaders.clip_store import read_frames
from tests.stage1_helpers import stage1_argv
from tests.test_frozen_tfrecord import kill_when_written, make_many_videos, output_bytes
from tests.test_webdataset_input import videos as member_videos  # noqa: F401 (fixture)
from tests.test_webdataset_input import write_shards


def convert(*args: str) -> ft.ConversionSummary:
    return ft.convert(ft.parse_args([*args, "--no_progress"]))


@pytest.mark.integration
def test_three_parts_one_killed_then_merged_equal_one_conversion(tmp_path):
    videos = make_many_videos(tmp_path, 7)  # 7 videos, shard_size 2: shards 0-3; parts 0 (0, 3), 1 (1), 2 (2)
    args = ["--video_dir", str(videos), "--csv", str(tmp_path / "labels.csv"), "--shard_size", "2"]
    convert(*args, "--output_dir", str(tmp_path / "reference"), "--workers", "0")

    shared = tmp_path / "shared"
    for part in (1, 2):
        summary = convert(*args, "--output_dir", str(shared), "--num_parts", "3", "--part", str(part),
                          "--workers", "0")
        assert summary.n_shards == 1 and not (shared / "path.index").exists()
    # part 0 is killed while its second shard (3: videos 2006) is stuck on a FIFO, after its first (0) is done
    blocking = videos / "2006.mp4"
    real_video = blocking.rename(tmp_path / "2006.mp4")
    os.mkfifo(blocking)
    kill_when_written(shared / "path-00000.meta.json", *args, "--output_dir", str(shared), "--num_parts", "3",
                      "--part", "0", "--workers", "1")
    assert not (shared / "path-00003.meta.json").exists()
    blocking.unlink()
    real_video.rename(blocking)
    with pytest.raises(ft.InputError, match=r"shard\(s\) are missing or incomplete .* rerun part\(s\) 0 of 3"):
        convert("--merge", "--output_dir", str(shared))
    summary = convert(*args, "--output_dir", str(shared), "--num_parts", "3", "--part", "0", "--workers", "0")
    assert (summary.n_shards, summary.n_shards_resumed) == (2, 1)

    summary = convert("--merge", "--output_dir", str(shared))
    assert summary.n_written == 7
    assert output_bytes(shared) == output_bytes(tmp_path / "reference")
    assert not list(shared.glob(".*.tmp"))


def test_parts_in_separate_folders_merge_without_copying(tmp_path, member_videos):  # noqa: F811
    shards = tmp_path / "shards"
    write_shards(shards, member_videos)
    spec = f"{shards}/{{00000..00002}}.tar"
    convert("--webdataset", spec, "--output_dir", str(tmp_path / "reference"), "--workers", "0")
    for part in range(3):
        convert("--webdataset", spec, "--output_dir", str(tmp_path / f"part{part}"), "--num_parts", "3",
                "--part", str(part), "--workers", "0")
    merged = tmp_path / "merged"
    convert("--merge", *(str(tmp_path / f"part{part}") for part in range(3)), "--output_dir", str(merged))
    assert not list(merged.glob("*.tfrecord"))  # nothing copied: the index points into the parts' folders
    index = (merged / "path.index").read_text()
    assert "../part1/path-00001.tfrecord" in index
    reference = tmp_path / "reference"
    assert [line.split("\t")[0] for line in index.splitlines()] == \
        [line.split("\t")[0] for line in (reference / "path.index").read_text().splitlines()]
    for name in ("frozen_train_labels.json", "failures.tsv"):
        assert (merged / name).read_text() == (reference / name).read_text()
    for clip_id in json.loads((reference / "frozen_train_labels.json").read_text()):
        assert np.array_equal(read_frames(merged, clip_id["video_id"]), read_frames(reference, clip_id["video_id"]))


def test_merge_refuses_parts_of_another_conversion(tmp_path, member_videos):  # noqa: F811
    shards = tmp_path / "shards"
    write_shards(shards, member_videos)
    convert("--webdataset", f"{shards}/{{00000..00002}}.tar", "--output_dir", str(tmp_path / "a"), "--num_parts", "2",
            "--part", "0", "--workers", "0")
    convert("--webdataset", f"{shards}/{{00000..00001}}.tar", "--output_dir", str(tmp_path / "b"), "--num_parts", "2",
            "--part", "1", "--workers", "0")
    with pytest.raises(ft.InputError, match="belongs to another conversion"):
        convert("--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--output_dir", str(tmp_path / "merged"))
    with pytest.raises(ft.InputError, match="no part manifest"):
        convert("--merge", str(shards), "--output_dir", str(tmp_path / "merged"))


def test_stage1_trains_on_a_store_converted_from_webdataset_shards(small_demo_source, tiny_clip_checkpoint, tmp_path):
    from tools.demo import write_webdataset_shards

    pattern = write_webdataset_shards(small_demo_source["webvid_csv"], small_demo_source["webvid_videos_dir"],
                                      tmp_path / "shards", per_shard=10)
    store = tmp_path / "store"
    summary = convert("--webdataset", pattern, "--id_field", "videoid", "--output_dir", str(store), "--workers", "0")
    assert summary.n_input_shards == 3 and summary.n_written == 24
    from_files = tmp_path / "from_files"  # the same store as from the videos and the csv, byte for byte
    convert("--video_dir", str(small_demo_source["webvid_videos_dir"]), "--csv", str(small_demo_source["webvid_csv"]),
            "--output_dir", str(from_files), "--workers", "0", "--shard_size", "10")
    for name in ("path.index", "frozen_train_labels.json", *(f"path-0000{n}.tfrecord" for n in range(3))):
        assert (store / name).read_bytes() == (from_files / name).read_bytes(), name

    out = tmp_path / "run"
    argv = stage1_argv(small_demo_source, tiny_clip_checkpoint, out, "--max_steps=2")
    argv = [flag for flag in argv if not flag.startswith(("--data_path", "--train_csv"))]
    argv += [f"--data_path={store / 'frozen_train_labels.json'}", f"--dir_path={store}"]
    assert main_task_clip.main(argv) == 0
    log = (out / "log.txt").read_text()
    assert "training on WebVid TFRecords" in log and "step 2/" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["t2v"]["R1"] >= 0
