"""Captioning data: MSVD and MSR-VTT caption splits in their real formats, with the split rules, exclusions and
frame sampling of the original's captioning loader (docs/method.md §7b, §9.8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataloaders.captioning import (
    caption_dataset,
    caption_pairs,
    references_by_video,
)
from dataloaders.msrvtt import MSRVTT_EXCLUDED_VIDEOS
from dataloaders.raw_video_text import AnnotationError
from modules.errors import InputError
from modules.tokenization import ClipTokenizer
from tests.test_retrieval_loaders import write_msvd
from tests.test_video import frame_indices, write_index_video

SMALL = dict(max_words=16, max_frames=6, image_size=16, feature_framerate=1)


def write_msrvtt_caption_json(path: Path, numbers: list[int], captions_per_video: int = 3) -> Path:
    """`MSRVTT_data.json` in the real schema with the official split of each video number and interleaved sentences
    (not grouped by video, as in the real file)."""

    def split(number: int) -> str:
        return "train" if number <= 6512 else "validate" if number <= 7009 else "test"

    videos = [{"category": number % 20, "url": f"https://www.youtube.com/watch?v=yt{number}",
               "video_id": f"video{number}", "start time": 1.0, "end time": 11.0, "split": split(number), "id": number}
              for number in numbers]
    sentences = [{"caption": f"caption {k} of video {number}", "video_id": f"video{number}", "sen_id": 0}
                 for k in range(captions_per_video) for number in numbers]
    for sen_id, sentence in enumerate(sentences):
        sentence["sen_id"] = sen_id
    info = {"contributor": "Microsoft MSM group", "data_created": "2016-04-14 14:30:20", "version": "1.0",
            "description": "This is 1.0 version of the 2016 MSR-VTT dataset.", "year": "2016"}
    path.write_text(json.dumps({"info": info, "videos": videos, "sentences": sentences}))
    return path


NUMBERS = [0, 710, 1054, 6512, 6513, 7009, 7010, 9999]


def test_msrvtt_standard_split_with_the_training_exclusions(tmp_path):
    data = write_msrvtt_caption_json(tmp_path / "MSRVTT_data.json", NUMBERS)
    train = caption_pairs("msrvtt", data, "train")
    assert sorted({video for video, _ in train}) == ["video0", "video6512"]  # video710 and video1054 left out
    assert {"video710", "video1054"} <= MSRVTT_EXCLUDED_VIDEOS and len(MSRVTT_EXCLUDED_VIDEOS) == 9
    assert len(train) == 2 * 3
    val = caption_pairs("msrvtt", data, "val")
    assert [video for video, _ in val] == ["video6513"] * 3 + ["video7009"] * 3  # grouped by video, file order
    assert [caption for _, caption in val[:3]] == [f"caption {k} of video 6513" for k in range(3)]
    test = caption_pairs("msrvtt", data, "test")
    assert sorted({video for video, _ in test}) == ["video7010", "video9999"]


def test_msrvtt_errors_name_the_file(tmp_path):
    data = write_msrvtt_caption_json(tmp_path / "MSRVTT_data.json", [0, 1])
    with pytest.raises(AnnotationError, match="no video has split 'test'"):
        caption_pairs("msrvtt", data, "test")
    broken = json.loads(data.read_text())
    broken["sentences"] = [s for s in broken["sentences"] if s["video_id"] != "video1"]
    data.write_text(json.dumps(broken))
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json: 1 train video\(s\) have no sentence.*video1"):
        caption_pairs("msrvtt", data, "train")
    with pytest.raises(InputError, match="must be MSR-VTT's MSRVTT_data.json"):
        caption_pairs("msrvtt", tmp_path, "train")


def test_msvd_captions_are_every_reference_of_each_listed_video(tmp_path):
    root = write_msvd(tmp_path / "msvd", {"train": ["a_1_2"], "val": ["-b_c_3_4"], "test": ["zz_-d_5_9", "e_1_2"]},
                      {"a_1_2": [["x"]], "-b_c_3_4": [["y"]],
                       "zz_-d_5_9": [["a", "man", "sings"], ["na"], ["a", "man", "sings"]], "e_1_2": [["z"]]})
    test = caption_pairs("msvd", root, "test")
    assert test == [("zz_-d_5_9", "a man sings"), ("zz_-d_5_9", "na"), ("zz_-d_5_9", "a man sings"),
                    ("e_1_2", "z")]
    with pytest.raises(InputError, match="must be the MSVD folder"):
        caption_pairs("msvd", root / "raw-captions.pkl", "train")


def test_evaluation_split_lists_each_video_once_with_all_references(tmp_path):
    root = write_msvd(tmp_path / "msvd", {"train": ["a_1_2"], "test": ["v_1_2", "w_1_2"]},
                      {"a_1_2": [["x"]], "v_1_2": [["one"], ["two"], ["three"]], "w_1_2": [["four"]]})
    videos = tmp_path / "clips"
    videos.mkdir()
    for name in ("a_1_2", "v_1_2", "w_1_2"):
        write_index_video(videos / f"{name}.avi", n_frames=8, fps=4)
    test = caption_dataset("msvd", root, videos, "test", tokenizer=ClipTokenizer(), **SMALL)
    assert references_by_video(test.split) == {"v_1_2": ["one", "two", "three"], "w_1_2": ["four"]}
    assert len(test.video_dataset()) == 2  # each video decoded once, not once per caption


def test_short_videos_are_upsampled_to_real_frames_and_long_ones_sliced(tmp_path):
    """The original's captioning loader: linspace up-sampling when a video has at most max_frames frames (all
    entries real, mask all ones), --slice_framepos when it has more."""
    root = write_msvd(tmp_path / "msvd", {"train": ["short_1_2", "long_1_2"]},
                      {"short_1_2": [["x"]], "long_1_2": [["y"]]})
    videos = tmp_path / "clips"
    videos.mkdir()
    write_index_video(videos / "short_1_2.avi", n_frames=12, fps=4)  # 1 frame/s: seconds 0, 1, 2 -> frames 0, 4, 8
    write_index_video(videos / "long_1_2.avi", n_frames=40, fps=4)  # seconds 0..9 -> 10 frames
    train = caption_dataset("msvd", root, videos, "train", tokenizer=ClipTokenizer(), **SMALL)
    short = train[0]
    assert short["video_mask"].tolist() == [1] * 6
    assert frame_indices(short["video"]) == [0, 0, 0, 4, 4, 8]  # linspace(0, 2, 6) truncated: 0 0 0 1 1 2
    head = caption_dataset("msvd", root, videos, "train", tokenizer=ClipTokenizer(), **SMALL, slice_framepos=0)[1]
    assert head["video_mask"].tolist() == [1] * 6
    assert frame_indices(head["video"]) == [0, 4, 8, 12, 16, 20]


def test_training_leaves_out_videos_without_a_file(tmp_path, caplog):
    data = write_msrvtt_caption_json(tmp_path / "MSRVTT_data.json", [0, 1, 2])
    videos = tmp_path / "videos"
    videos.mkdir()
    write_index_video(videos / "video0.mp4", n_frames=8, fps=4)
    write_index_video(videos / "video2.mp4", n_frames=8, fps=4)
    with caplog.at_level("WARNING"):
        train = caption_dataset("msrvtt", data, videos, "train", tokenizer=ClipTokenizer(), **SMALL)
    assert len(train) == 2 * 3 and "video1" in caplog.text
    assert {train[i]["video_id"] for i in range(len(train))} == {"video0", "video2"}
