"""ActivityNet Captions paragraph retrieval: the loader on the real file's first entry (paragraph text and tokens
as CLIP4Clip's), id lists, file names with and without `v_`, missing videos reported; a demo-sized
`DATASET=activitynet` run through start_retrieval.sh."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from dataloaders.activitynet import activitynet_dataset, activitynet_pairs
from modules.errors import InputError
from modules.tokenization import ClipTokenizer
from tests.test_stage1_training import metrics
from tests.torchrun import ROOT
from tests.video_helpers import write_numbered_video

# The first entry of the real train.json, verbatim.
FIRST_TRAIN_ENTRY = ('{"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81], '
                     '[56.26, 79.42]], "sentences": ["A young woman is seen standing in a room and leads into her '
                     'dancing.", " The girl dances around the room while the camera captures her movements.", " She '
                     'continues dancing around the room and ends by laying on the floor."]}}')
PARAGRAPH = ("A young woman is seen standing in a room and leads into her dancing. The girl dances around the room "
             "while the camera captures her movements. She continues dancing around the room and ends by laying on "
             "the floor.")


def entry(*sentences: str) -> dict:
    return {"duration": 3.0, "timestamps": [[0.0, 3.0]] * len(sentences), "sentences": list(sentences)}


@pytest.fixture()
def annotations(tmp_path) -> Path:
    folder = tmp_path / "activitynet"
    folder.mkdir()
    train = json.loads(FIRST_TRAIN_ENTRY)
    train["v_second"] = entry("One sentence only.")
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "val_1.json").write_text(json.dumps({"v_a": entry("A first.", " A second."), "v_b": entry("B."),
                                                   "v_gone": entry("No file.")}))
    videos = folder / "videos"
    write_numbered_video(videos / "QOlSCBRmfWY.mp4", 8)  # CLIP4Clip's names: the id without v_
    write_numbered_video(videos / "sub" / "v_a.mp4", 8)  # with v_, in a sub-folder
    write_numbered_video(videos / "b.avi", 8)  # another container
    (videos / "second.json").write_text("{}")  # not a video: never taken for one
    return folder


def test_the_real_entry_gives_clip4clips_paragraph_and_tokens(annotations):
    pairs = activitynet_pairs(annotations, "train")
    assert pairs[0] == ("v_QOlSCBRmfWY", PARAGRAPH)
    clip4clip_text = " ".join(json.loads(FIRST_TRAIN_ENTRY)["v_QOlSCBRmfWY"]["sentences"])  # spaces as they are
    assert "  " in clip4clip_text
    tokenizer = ClipTokenizer()
    assert tokenizer.encode(PARAGRAPH, 64) == tokenizer.encode(clip4clip_text, 64)


def test_videos_are_found_with_or_without_v_and_missing_ones_reported(annotations, caplog):
    with caplog.at_level(logging.WARNING, logger="t2vlp.data"):
        train = activitynet_dataset(annotations, annotations / "videos", "train", max_words=32, max_frames=4)
    assert [video_id for video_id, _ in train.pairs] == ["v_QOlSCBRmfWY"]  # v_second has no file
    assert "1 video(s) have no file" in caplog.text and "v_second" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2vlp.data"):
        test = activitynet_dataset(annotations, annotations / "videos", "test", max_words=32, max_frames=4,
                                   feature_framerate=10)
    assert test.split.video_ids == ["v_a", "v_b", "v_gone"] and test.split.captions[0] == "A first. A second."
    assert "val_1.json: 1 of 3 videos have no file" in caplog.text and "v_gone" in caplog.text
    videos = test.video_dataset()
    assert videos[0]["video_id"] == "v_a" and videos[1]["video_id"] == "v_b" and videos[2] is None
    assert int(videos[0]["video_mask"].sum()) == 4  # 8 frames at 10 fps, 4 sampled over the whole video


def test_clip4clips_id_lists_choose_and_order_the_videos(annotations):
    (annotations / "val_ids.json").write_text(json.dumps(["v_b", "v_a"]))
    assert [video_id for video_id, _ in activitynet_pairs(annotations, "test")] == ["v_b", "v_a"]
    (annotations / "val_ids.json").write_text(json.dumps(["v_b", "v_nowhere"]))
    with pytest.raises(InputError, match="1 id.s. have no entry in .*val_1.json"):
        activitynet_pairs(annotations, "test")
    with pytest.raises(InputError, match="evaluate with --eval_split test"):
        activitynet_pairs(annotations, "val")


def demo_activitynet(demo: dict[str, Path], folder: Path) -> Path:
    """The demo's MSR-VTT videos laid out as ActivityNet Captions: each training video's captions as its sentences
    (after the first with a leading space, as the real file), the test videos in val_1.json; one test video has no
    file."""
    data = json.loads(demo["data_json"].read_text())
    sentences: dict[str, list[str]] = {}
    for item in data["sentences"]:
        sentences.setdefault(item["video_id"], []).append(item["caption"])
    with open(demo["train_csv"], newline="") as handle:
        train_ids = [row["video_id"] for row in csv.DictReader(handle)]
    with open(demo["test_csv"], newline="") as handle:
        test_ids = [row["video_id"] for row in csv.DictReader(handle)]

    def split(ids):
        return {f"v_{video_id}": {"duration": 2.0, "timestamps": [[0, 1]] * 2,
                                  "sentences": [sentences[video_id][0], " " + sentences[video_id][1]]}
                for video_id in ids}

    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(split(train_ids)))
    (folder / "val_1.json").write_text(json.dumps(split(test_ids)))
    videos = folder / "ActivityNet_Videos"
    videos.mkdir()
    for video_id in train_ids + test_ids[1:]:
        (videos / f"{video_id}.mp4").symlink_to(demo["videos_dir"] / f"{video_id}.mp4")
    return folder


@pytest.mark.integration
def test_a_demo_sized_run_through_the_launcher(small_demo_source, tiny_fusion_clip_checkpoint, stage1_checkpoint,
                                              tmp_path):
    data = demo_activitynet(small_demo_source, tmp_path / "activitynet")
    output = tmp_path / "run"
    env = {**os.environ, "DATASET": "activitynet", "DATA_PATH": str(data), "INIT_MODEL": str(stage1_checkpoint),
           "CLIP_PATH": str(tiny_fusion_clip_checkpoint), "OUTPUT_PATH": str(output), "NPROC_PER_NODE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        ["bash", str(ROOT / "start_retrieval.sh"), "--epochs", "1", "--batch_size", "8", "--batch_size_val", "8",
         "--max_frames", "4", "--num_thread_reader", "0", "--fusion_layers", "2", "--rerank_top_k", "3",
         "--eval_steps", "0"], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (output / "log.txt").read_text()
    assert "--max_words 56 --datatype activitynet" in log  # the recipe: the most the fusion sequence holds
    rows = metrics(output)
    assert {row["dataset"] for row in rows} == {"activitynet"} and {row["scoring"] for row in rows} == \
        {"meanP", "rerank"}
    # the test video without a file is skipped and counted, as in every retrieval evaluation
    assert {(row["n_texts"], row["n_videos"], row["n_skipped"]) for row in rows} == {(5, 5, 1)}
    assert "val_1.json: 1 of 6 videos have no file" in log
    assert sorted({row["step"] for row in rows}) == [0, 3]  # before training and after the one epoch (24 videos)
