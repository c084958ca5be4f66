"""What the converter and the trainer write follows the umask like any other tool's files (a store or run folder
shared by a group stays readable), and the converter's summary counts only the inputs it read."""

from __future__ import annotations

import os
import stat

import frozen_tfrecord
from conversion.convert import convert
from engine.checkpointing import save_atomic
from tests.conftest import convert_to_webvid_tfrecords


def modes(folder) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()
            if path.is_file() and not path.name.startswith(".")}


def test_store_and_checkpoint_files_follow_the_umask(small_demo, tmp_path):
    previous = os.umask(0o002)
    try:
        convert_to_webvid_tfrecords(small_demo, tmp_path / "store")
        save_atomic({"global_step": 1}, tmp_path / "ckpt" / "pytorch_model.bin.1")
    finally:
        os.umask(previous)
    written = modes(tmp_path / "store")
    assert {"path.index", "frozen_train_labels.json", "failures.tsv", "path-00000.tfrecord"} <= written.keys()
    assert set(written.values()) == {0o664}
    assert modes(tmp_path / "ckpt") == {"pytorch_model.bin.1": 0o664}


def test_the_summary_of_a_folder_conversion_names_no_table(small_demo, tmp_path):
    config = frozen_tfrecord.parse_args(["--video_dir", str(small_demo["webvid_videos_dir"]), "--output_dir",
                                         str(tmp_path / "store"), "--workers", "0", "--no_progress"])
    report = convert(config).report()
    assert report.startswith("videos found: 24; selected: 24; written: 24 in 1 shard(s)"), report
