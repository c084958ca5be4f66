"""A run that would train on nothing stops with one line instead of "finishing": labels whose clips are not in the
store's index."""

from __future__ import annotations

import json
import logging
import shutil

import main_task_clip
from tests.stage1_helpers import stage1_argv


def relabelled(labels_path, out, rename) -> str:
    labels = json.loads(labels_path.read_text(encoding="utf-8"))
    out.write_text(json.dumps([{**label, "video_id": rename(i, label["video_id"])} for i, label in enumerate(labels)]),
                   encoding="utf-8")
    return str(out)


def webvid_argv(demo, clip, output_dir, labels, *extra) -> list[str]:
    return stage1_argv(demo, clip, output_dir, f"--data_path={labels}", f"--dir_path={demo['tfrecord_dir']}",
                       "--epochs=1", "--max_steps=1", "--val_csv=", *extra)


def test_labels_of_another_store_stop_the_run_before_the_model_is_built(webvid_demo, tiny_clip_checkpoint, tmp_path,
                                                                       capsys, monkeypatch):
    import engine.entry

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the training set was checked")

    monkeypatch.setattr(engine.entry, "build_model", no_model)
    labels = relabelled(webvid_demo["labels"], tmp_path / "other_labels.json", lambda i, video_id: f"other{i}")
    output = tmp_path / "run"
    assert main_task_clip.main(webvid_argv(webvid_demo, tiny_clip_checkpoint, output, labels)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"none of the 64 labels in --data_path {labels} has a record in" in lines[0]
    assert str(webvid_demo["tfrecord_dir"] / "path.index") in lines[0]
    assert not (output / "ckpt").exists() and not (output / "restore.bin").exists()
    assert json.loads((output / "run.json").read_text())[-1]["outcome"].startswith("bad input")


def test_too_many_missing_records_stop_the_run_unless_allowed(webvid_demo, tiny_clip_checkpoint, tmp_path, capsys,
                                                              caplog):
    labels = relabelled(webvid_demo["labels"], tmp_path / "partial.json",
                        lambda i, video_id: video_id if i % 4 == 0 else f"gone{i}")
    assert main_task_clip.main(webvid_argv(webvid_demo, tiny_clip_checkpoint, tmp_path / "a", labels)) == 2
    assert "48 of 64 labels in --data_path" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="t2vlp"):
        assert main_task_clip.main(webvid_argv(webvid_demo, tiny_clip_checkpoint, tmp_path / "b", labels,
                                               "--max_missing_fraction=0.8")) == 0
    assert "48 of 64 labels" in caplog.text and (tmp_path / "b" / "ckpt" / "pytorch_model.bin.1").is_file()


def test_the_log_says_which_limit_ends_the_run(webvid_demo, tiny_clip_checkpoint, tmp_path, caplog):
    # 64 clips, batch 8: 8 steps per epoch; --max_steps 12 is beyond the one epoch asked for.
    argv = webvid_argv(webvid_demo, tiny_clip_checkpoint, tmp_path / "run", webvid_demo["labels"])
    with caplog.at_level(logging.INFO, logger="t2vlp"):
        assert main_task_clip.main([*argv, "--max_steps=12"]) == 0
    assert "the run ends after epoch 1, at step 8, before --max_steps 12 (raise --epochs to reach it)" in caplog.text
    assert "finished the last of 1 epochs at step 8, before --max_steps 12: the epochs ended the run" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="t2vlp"):
        assert main_task_clip.main([*argv, "--output_dir", str(tmp_path / "b"), "--max_steps=3"]) == 0
    assert "the run ends at --max_steps 3" in caplog.text and "reached --max_steps 3" in caplog.text


def vanished_store(webvid_demo, folder):
    """A copy of the demo store whose shards are gone (its index and labels are there)."""
    shutil.copytree(webvid_demo["tfrecord_dir"], folder)
    for shard in folder.glob("*.tfrecord"):
        shard.unlink()
    return folder


def test_a_store_that_vanished_stops_the_run(webvid_demo, tiny_clip_checkpoint, tmp_path, capsys):
    store = vanished_store(webvid_demo, tmp_path / "store")
    demo = {**webvid_demo, "tfrecord_dir": store}
    output = tmp_path / "run"
    argv = webvid_argv(demo, tiny_clip_checkpoint, output, store / "frozen_train_labels.json",
                       "--max_empty_batches=3", "--max_steps=0")
    assert main_task_clip.main(argv) == 65
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].split(": error: ", 1)[1].startswith("3 micro-batches in a row had no "
                                                   "readable video (24 videos skipped so far, reading ")
    assert str(store / "path.index") in lines[0] and "stopped: nothing saved yet" in lines[0]
    assert not (output / "ckpt").exists()
    assert json.loads((output / "run.json").read_text())[-1]["outcome"].startswith("error: TrainingDataError: ")


def test_an_epoch_without_a_readable_video_stops_the_run(webvid_demo, tiny_clip_checkpoint, tmp_path, capsys):
    store = vanished_store(webvid_demo, tmp_path / "store")
    demo = {**webvid_demo, "tfrecord_dir": store}
    argv = webvid_argv(demo, tiny_clip_checkpoint, tmp_path / "run", store / "frozen_train_labels.json",
                       "--max_steps=0")  # 8 micro-batches an epoch, fewer than --max_empty_batches 20
    assert main_task_clip.main(argv) == 65
    assert "no micro-batch of epoch 1 had a readable video" in capsys.readouterr().err


def test_converting_an_empty_folder_is_one_line_saying_why(tmp_path, capsys):
    import frozen_tfrecord

    (tmp_path / "videos").mkdir()
    argv = ["--video_dir", str(tmp_path / "videos"), "--output_dir", str(tmp_path / "out"), "--workers", "0",
            "--no_progress"]
    assert frozen_tfrecord.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"frozen_tfrecord.py: error: nothing to convert: no video under --video_dir {tmp_path / 'videos'}"]
