"""A store whose index points an id at another clip's record never pairs a caption with the wrong frames: the
reader compares the record's own id, and `frozen_tfrecord.py --verify` finds every such entry."""

from __future__ import annotations

import shutil

import frozen_tfrecord
from dataloaders.clip_store import read_frames
from dataloaders.webvid import WebVidDataset


def swapped_store(webvid_demo, folder):
    """A copy of the demo store whose index has the offsets of its first two entries swapped."""
    shutil.copytree(webvid_demo["tfrecord_dir"], folder)
    lines = (folder / "path.index").read_text(encoding="utf-8").splitlines()
    first, second = (line.split("\t") for line in lines[:2])
    lines[0] = "\t".join([first[0], first[1], second[2]])
    lines[1] = "\t".join([second[0], second[1], first[2]])
    (folder / "path.index").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return first[0], second[0]


def test_a_record_of_another_clip_is_skipped_and_counted(webvid_demo, tmp_path, caplog):
    a, b = swapped_store(webvid_demo, tmp_path / "store")
    dataset = WebVidDataset(tmp_path / "store" / "frozen_train_labels.json", tmp_path / "store", max_frames=4,
                            image_size=32)
    by_id = {dataset.video_id(i): i for i in range(len(dataset))}
    assert dataset[by_id[a]] is None and dataset[by_id[b]] is None and dataset.n_skipped == 2
    assert f"the index entry for {a} points at the record of {b}" in caplog.text
    other = next(video_id for video_id in by_id if video_id not in (a, b))
    assert dataset[by_id[other]]["video_id"] == other and dataset.n_skipped == 2
    try:
        read_frames(tmp_path / "store", a)
    except ValueError as error:
        assert f"points at the record of {b}" in str(error)
    else:
        raise AssertionError("read_frames returned another clip's frames")


def test_verify_finds_the_swapped_entries_and_passes_a_sound_store(webvid_demo, tmp_path, capsys):
    assert frozen_tfrecord.main(["--verify", str(webvid_demo["tfrecord_dir"])]) == 0
    sound = capsys.readouterr().out.splitlines()
    assert sound[0].endswith("64 entries, 64 records readable and naming their clip, 0 not")
    assert sound[-2:] == ["labels: 64, of which 0 have no record in the index", "store OK"]

    a, b = swapped_store(webvid_demo, tmp_path / "store")
    labels = (tmp_path / "store" / "frozen_train_labels.json")
    labels.write_text(labels.read_text().replace("[\n", '[\n{"video_id": "not_stored", "caption": "x"},\n', 1))
    assert frozen_tfrecord.main(["--verify", str(tmp_path / "store")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("64 entries, 62 records readable and naming their clip, 2 not")
    assert out[1].startswith(f"  {a} (line 1, ") and out[1].endswith(f"the index entry for {a} points at the record "
                                                                     f"of {b}")
    assert "labels: 65, of which 1 have no record in the index" in out and out[-1] == "store has problems (see above)"


def test_verify_of_a_folder_without_a_store_is_one_line(tmp_path, capsys):
    assert frozen_tfrecord.main(["--verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"frozen_tfrecord.py: error: --verify {tmp_path}: ")
