"""Damaged and hostile inputs give one line and exit 2, never a traceback or a wrong result: a malformed index line,
a truncated labels file, a TorchScript archive that is not CLIP, a damaged index.json, features that are not
finite."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import main_task_clip
from tests.stage1_helpers import stage1_argv
from tests.test_predict import link_test_videos, run_predict


def stage1_on(store, demo, clip, output, *extra) -> list[str]:
    return stage1_argv(demo, clip, output, f"--data_path={store / 'frozen_train_labels.json'}",
                       f"--dir_path={store}", "--epochs=1", "--max_steps=1", "--val_csv=", *extra)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_malformed_index_line_and_a_truncated_labels_file_are_one_line(webvid_demo, tiny_clip_checkpoint,
                                                                         tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(webvid_demo["tfrecord_dir"], store)
    index = (store / "path.index").read_text().splitlines()
    video_id, shard, _ = index[3].split("\t")
    (store / "path.index").write_text("\n".join([*index[:3], f"{video_id}\t{shard}\t-5", *index[4:]]) + "\n")
    assert main_task_clip.main(stage1_on(store, webvid_demo, tiny_clip_checkpoint, tmp_path / "a")) == 2
    assert "line 4: expected 'id<TAB>shard<TAB>offset'" in one_error_line(capsys)

    shutil.copy(webvid_demo["tfrecord_dir"] / "path.index", store / "path.index")
    labels = (store / "frozen_train_labels.json").read_text()
    (store / "frozen_train_labels.json").write_text(labels[: len(labels) // 2])
    assert main_task_clip.main(stage1_on(store, webvid_demo, tiny_clip_checkpoint, tmp_path / "b")) == 2
    assert "invalid JSON" in one_error_line(capsys)


def test_a_torchscript_archive_that_is_not_clip_is_one_line(webvid_demo, tmp_path, capsys):
    archive = tmp_path / "not_clip.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(archive))
    store = webvid_demo["tfrecord_dir"]
    assert main_task_clip.main(stage1_on(store, webvid_demo, archive, tmp_path / "run")) == 2
    assert f"{archive} is not a CLIP model in OpenAI's layout" in one_error_line(capsys)


@pytest.fixture()
def index(stage1_checkpoint, small_demo_source, tmp_path):
    link_test_videos(small_demo_source, tmp_path / "videos")
    run_predict("index", str(tmp_path / "videos"), "--init_model", str(stage1_checkpoint), "--out",
                str(tmp_path / "ix"), "--num_workers", "0", "--max_frames", "3", "--feature_framerate", "2",
                "--max_words", "16")
    return tmp_path / "ix"


@pytest.mark.parametrize("damage, message", [
    (lambda meta: {**meta, "videos": ["a", "b"]}, "videos are not a list of objects with a path"),
    (lambda meta: {key: value for key, value in meta.items() if key != "settings"}, "no settings object"),
    (lambda meta: {**meta, "settings": []}, "no settings object"),
])
def test_a_damaged_index_json_is_one_line(index, damage, message):
    meta = json.loads((index / "index.json").read_text())
    (index / "index.json").write_text(json.dumps(damage(meta)))
    result = run_predict("query", str(index), "a red circle", check=False)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shape, message", [((6, 7), "7-wide features, the model's are"), ((6, 2, 16), "3-D")])
def test_features_of_another_shape_are_one_line(index, shape, message):
    np.save(index / "clip_features.npy", np.ones(shape, dtype=np.float32))
    result = run_predict("query", str(index), "a red circle", check=False)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_non_finite_row_is_never_ranked(index):
    features = np.load(index / "clip_features.npy")
    features[2] = np.nan
    np.save(index / "clip_features.npy", features)
    hits = json.loads(run_predict("query", str(index), "a red circle", "--top_k", "6", "--json").stdout)
    paths = [entry["path"] for entry in json.loads((index / "index.json").read_text())["videos"]]
    assert sorted(hit["path"] for hit in hits) == sorted(paths[:2] + paths[3:])
    assert all(np.isfinite(hit["score"]) for hit in hits)


def test_a_checkpoint_that_gives_non_finite_features_is_refused(stage1_checkpoint, small_demo_source, tmp_path):
    state = torch.load(stage1_checkpoint, weights_only=True)
    state["model_state_dict"]["clip.visual.proj"] = torch.full_like(state["model_state_dict"]["clip.visual.proj"],
                                                                    float("nan"))
    broken = tmp_path / "broken.bin"
    torch.save(state, broken)
    link_test_videos(small_demo_source, tmp_path / "videos")
    result = run_predict("index", str(tmp_path / "videos"), "--init_model", str(broken), "--out",
                         str(tmp_path / "ix"), "--num_workers", "0", "--max_frames", "3", check=False)
    assert result.returncode == 2
    assert f"{broken} gives non-finite features for every video (6): the checkpoint is damaged" in result.stderr


def test_readers_see_one_version_while_the_index_is_updated(stage1_checkpoint, small_demo_source, tmp_path,
                                                            monkeypatch):
    import fcntl
    import threading

    from inference import video_index

    videos = tmp_path / "videos"
    link_test_videos(small_demo_source, videos)
    flags = ["--init_model", str(stage1_checkpoint), "--out", str(tmp_path / "ix"), "--num_workers", "0",
             "--max_frames", "3", "--feature_framerate", "2", "--max_words", "16"]
    run_predict("index", str(videos), *flags)
    before = video_index.VideoIndex.load(tmp_path / "ix")
    for path in sorted(videos.iterdir())[:3]:
        path.unlink()  # the update drops three videos: every row after them moves

    halfway, go = threading.Event(), threading.Event()
    replace = video_index.os.replace

    def slow_replace(source, target):
        replace(source, target)
        if str(target).endswith("clip_features.npy"):  # one file of the new version in place, the rest not yet
            halfway.set()
            assert go.wait(60)

    monkeypatch.setattr(video_index.os, "replace", slow_replace)
    writer = threading.Thread(target=run_predict, args=("index", str(videos), *flags))
    writer.start()
    assert halfway.wait(120)
    with open(tmp_path / "ix" / video_index.SWAP_LOCK, "a+b") as handle:  # a reader would wait here
        with pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    go.set()
    writer.join(120)
    after = video_index.VideoIndex.load(tmp_path / "ix")
    assert len(after.paths) == 3 == after.array("clip_features").shape[0]
    # Each remaining video keeps its own feature: rows follow paths.
    rows_before = {path: row for row, path in enumerate(before.paths)}
    for row, path in enumerate(after.paths):
        np.testing.assert_array_equal(after.array("clip_features")[row], before.array("clip_features")[rows_before[path]])
