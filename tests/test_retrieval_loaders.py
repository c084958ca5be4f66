"""MSVD, LSMDC, DiDeMo and full-test MSR-VTT retrieval loaders on the real formats and their edge cases
(docs/data.md §3), with real video files."""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
from pathlib import Path

import pytest

from dataloaders.didemo import didemo_dataset, didemo_pairs
from dataloaders.lsmdc import lsmdc_dataset, parse_clip_id, read_lsmdc_rows
from dataloaders.msrvtt import MSRVTTFullTestDataset
from dataloaders.msvd import msvd_dataset, msvd_pairs, read_id_list
from dataloaders.raw_video_text import AnnotationError
from engine.args import parse_args
from engine.tasks.retrieval import build_retrieval_datasets
from modules.errors import InputError
from modules.tokenization import ClipTokenizer
from tests.real_fixtures import REAL_FIXTURES, needs_real
from tests.test_msrvtt import write_msrvtt_json
from tests.test_video import frame_indices, write_index_video

SMALL = dict(max_words=16, max_frames=4, image_size=16, feature_framerate=1)


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


# ----------------------------------------------------------------------------------------------------- MSVD

@needs_real("msvd")
def test_real_msvd_lists_with_and_without_final_newline(tmp_path):
    real = REAL_FIXTURES / "msvd"
    assert not (real / "train_list.txt").read_bytes().endswith(b"\n")
    assert (real / "test_list.txt").read_bytes().endswith(b"\n")
    train = read_id_list(real / "train_list.txt")
    assert len(train) == 32 and "" not in train
    with_newline = tmp_path / "train_list.txt"
    with_newline.write_bytes((real / "train_list.txt").read_bytes() + b"\n")  # the X-Pool copy
    assert read_id_list(with_newline) == train
    val = read_id_list(real / "val_list.txt")
    assert "c_-eFL7Sfw4_19_35" in val  # `_` and `-` inside the YouTube id
    assert any(video_id.startswith("-") for video_id in train + val + read_id_list(real / "test_list.txt"))


def write_msvd(root: Path, lists: dict[str, list[str]], captions: dict[str, list[list[str]]],
               final_newline: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for subset, ids in lists.items():
        (root / f"{subset}_list.txt").write_text("\n".join(ids) + ("\n" if final_newline else ""))
    with open(root / "raw-captions.pkl", "wb") as handle:
        pickle.dump(captions, handle, protocol=4)
    return root


MSVD_CAPTIONS = {
    "-4wsuPCjDBc_5_15": [["a", "man", "sings"], ["someone", "is", "singing"], ["a", "man", "performs"]],
    "-_hbPLsZvvo_19_25": [["a", "cat", "plays"]],
    "zzit5b_-ukg_5_20": [["a", "woman", "cooks"], ["na"]],
    "bQJQGoJF7_k_145_153": [["a", "dog", "runs"]],
}


@pytest.fixture(scope="module")
def msvd_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("msvd")
    lists = {"train": ["bQJQGoJF7_k_145_153", "-_hbPLsZvvo_19_25"], "val": ["zzit5b_-ukg_5_20"],
             "test": ["-4wsuPCjDBc_5_15", "zzit5b_-ukg_5_20"]}
    write_msvd(root / "msvd_data", lists, MSVD_CAPTIONS)
    videos = root / "YouTubeClips" / "nested"  # found recursively, by name without extension
    videos.mkdir(parents=True)
    write_index_video(videos / "-4wsuPCjDBc_5_15.avi", n_frames=16, fps=4)
    write_index_video(videos / "zzit5b_-ukg_5_20.avi", n_frames=8, fps=4)
    write_index_video(videos / "bQJQGoJF7_k_145_153.avi", n_frames=12, fps=4)
    return root


def test_msvd_one_training_sample_per_caption_and_multi_sentence_test(msvd_root, tokenizer, caplog):
    data, videos = msvd_root / "msvd_data", msvd_root / "YouTubeClips"
    assert msvd_pairs(data, "train") == [("bQJQGoJF7_k_145_153", "a dog runs"), ("-_hbPLsZvvo_19_25", "a cat plays")]
    with caplog.at_level("WARNING"):
        train = msvd_dataset(data, videos, "train", tokenizer=tokenizer, **SMALL)
    assert len(train) == 1 and "-_hbPLsZvvo_19_25" in caplog.text  # no file: left out, said
    assert train[0]["video_id"] == "bQJQGoJF7_k_145_153"
    test = msvd_dataset(data, videos, "test", tokenizer=tokenizer, **SMALL)
    split = test.split
    assert split.video_ids == ["-4wsuPCjDBc_5_15", "zzit5b_-ukg_5_20"]
    assert split.captions == ["a man sings", "someone is singing", "a man performs", "a woman cooks", "na"]
    assert split.caption_video == [0, 0, 0, 1, 1] and split.multi_sentence
    clip = test.video_dataset()[0]
    assert clip["video_mask"].tolist() == [1, 1, 1, 1]  # 16 frames at 4 fps, 1 per second: seconds 0-4 -> 5, cut to 4
    assert test.caption_dataset()[4]["input_ids"][0] == tokenizer.encode("na", 16)[0][0]


def test_msvd_zero_pads_short_videos(msvd_root, tokenizer):
    test = msvd_dataset(msvd_root / "msvd_data", msvd_root / "YouTubeClips", "test", tokenizer=tokenizer,
                        **{**SMALL, "max_frames": 6})
    clip = test.video_dataset()[1]  # 8 frames at 4 fps: seconds 0, 1, 2 -> frames 0, 4 (second 2 does not exist)
    assert clip["video_mask"].tolist() == [1, 1, 0, 0, 0, 0]
    assert clip["video"][2:].abs().sum() == 0


def test_msvd_errors_name_the_file(tmp_path):
    root = write_msvd(tmp_path / "a", {"train": ["x_1_2", "y_1_2"]}, {"x_1_2": [["a"]]})
    with pytest.raises(AnnotationError, match=r"raw-captions.pkl: no caption for 1 clip.*y_1_2"):
        msvd_pairs(root, "train")
    root = write_msvd(tmp_path / "b", {"train": ["x_1_2", "", "x_1_2"]}, {"x_1_2": [["a"]]})
    with pytest.raises(AnnotationError, match=r"train_list.txt, line 3: x_1_2 is listed again \(first on line 1\)"):
        msvd_pairs(root, "train")
    root = write_msvd(tmp_path / "c", {"train": ["x_1_2"]}, {"x_1_2": ["a caption as a string"]})
    with pytest.raises(AnnotationError, match="caption 0 is not a list of words"):
        msvd_pairs(root, "train")
    (root / "raw-captions.pkl").write_bytes(b"not a pickle")
    with pytest.raises(AnnotationError, match="not a readable pickle"):
        msvd_pairs(root, "train")


# ---------------------------------------------------------------------------------------------------- LSMDC

LSMDC_TRAIN = (
    "0003_CASABLANCA_00.22.52.160-00.22.52.787\t00.22.52.160\t00.22.52.787\t00.22.51.474\t00.22.53.474\t"
    "SOMEONE looks up.\n"
    "0003_CASABLANCA_00.22.52.160-00.22.52.787\t00.22.52.160\t00.22.52.787\t00.22.51.474\t00.22.53.474\t"
    "He  turns away. \n"
    "1054_Harry_Potter_and_the_prisoner_of_azkaban_01.02.27.034-01.02.30.100\t01.02.27.034\t01.02.30.100\t"
    "01.02.27.034\t01.02.30.100\t\" Now SOMEONE fills out paperwork.\n"
    "3009_BATTLE_LOS_ANGELES_00.01.02.003-00.01.05.000\t00.01.02.003\t00.01.05.000\t00.01.02.003\t00.01.05.000\t"
    "SOMEONE's rifle \"clicks\"."  # no final newline, like LSMDC16_annos_val_tmp.csv
)


@pytest.fixture(scope="module")
def lsmdc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lsmdc")
    data = root / "data"
    data.mkdir()
    (data / "LSMDC16_annos_training.csv").write_text(LSMDC_TRAIN)
    test_lines = LSMDC_TRAIN.splitlines()[2:]
    (data / "LSMDC16_challenge_1000_publictect.csv").write_text("\n".join(test_lines) + "\n")
    for movie, clip in [("0003_CASABLANCA", "0003_CASABLANCA_00.22.52.160-00.22.52.787"),
                        ("1054_Harry_Potter_and_the_prisoner_of_azkaban",
                         "1054_Harry_Potter_and_the_prisoner_of_azkaban_01.02.27.034-01.02.30.100")]:
        folder = root / "avi" / movie  # per-movie folders
        folder.mkdir(parents=True)
        write_index_video(folder / f"{clip}.avi", n_frames=8, fps=4)
    return root


def test_lsmdc_rows_split_on_tabs_not_csv(lsmdc_root):
    rows = read_lsmdc_rows(lsmdc_root / "data" / "LSMDC16_annos_training.csv")
    assert len(rows) == 4  # the unbalanced quote of row 3 does not swallow row 4
    assert rows[2].sentence == "\" Now SOMEONE fills out paperwork."
    assert rows[3].sentence == "SOMEONE's rifle \"clicks\"." and rows[3].line == 4
    assert rows[1].sentence == "He  turns away."
    assert rows[2].movie == "1054_Harry_Potter_and_the_prisoner_of_azkaban"
    assert (rows[2].start, rows[2].end) == ("01.02.27.034", "01.02.30.100")


def test_lsmdc_clip_id_regex_is_anchored_at_the_end():
    assert parse_clip_id("3009_BATTLE_LOS_ANGELES_00.01.02.003-00.01.05.000") == (
        "3009_BATTLE_LOS_ANGELES", "00.01.02.003", "00.01.05.000")
    assert parse_clip_id("0001_A_B_00.00.01.000-00.00.02.000_00.00.03.000-00.00.04.000")[0] == \
        "0001_A_B_00.00.01.000-00.00.02.000"
    assert parse_clip_id("CASABLANCA_00.22.52.160-00.22.52.787") is None  # no movie number
    assert parse_clip_id("0003_CASABLANCA_00.22.52-00.22.52.787") is None


def test_lsmdc_training_keys_by_row_and_drops_clips_without_video(lsmdc_root, tokenizer, caplog):
    with caplog.at_level("WARNING"):
        train = lsmdc_dataset(lsmdc_root / "data", lsmdc_root / "avi", "train", tokenizer=tokenizer, **SMALL)
    assert len(train) == 3 and "3009_BATTLE_LOS_ANGELES" in caplog.text
    assert [train.pairs[i][1] for i in (0, 1)] == ["SOMEONE looks up.", "He  turns away."]  # same clip, two rows
    assert train[1]["video_id"] == "0003_CASABLANCA_00.22.52.160-00.22.52.787"
    test = lsmdc_dataset(lsmdc_root / "data", lsmdc_root / "avi", "test", tokenizer=tokenizer, **SMALL)
    assert not test.split.multi_sentence and len(test.split.video_ids) == 2
    assert test.video_dataset()[1] is None  # no file: skipped (and counted) at evaluation, not dropped silently


@pytest.mark.parametrize("line, message", [
    ("0003_CASABLANCA_00.22.52.160-00.22.52.787\t1\t2\t3\tonly five fields", r"line 2: 5 tab-separated fields"),
    ("CASABLANCA\t1\t2\t3\t4\ta sentence", r"line 2: clip id 'CASABLANCA' is not"),
    ("0003_CASABLANCA_00.22.52.160-00.22.52.787\t1\t2\t3\t4\t  ", r"line 2: empty sentence"),
])
def test_lsmdc_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "LSMDC16_annos_val.csv"
    path.write_text(LSMDC_TRAIN.splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(AnnotationError, match=rf"LSMDC16_annos_val.csv, {message}"):
        read_lsmdc_rows(path)


# --------------------------------------------------------------------------------------------------- DiDeMo

@needs_real("didemo")
@pytest.mark.parametrize("subset", ["val", "test"])
def test_real_didemo_paragraphs(tmp_path, subset):
    real = REAL_FIXTURES / "didemo"
    items = json.loads((real / f"{subset}_data.json").read_text())
    listed = [line.strip() for line in (real / f"{subset}_list.txt").read_text().splitlines() if line.strip()]
    pairs = didemo_pairs(real, subset)
    assert [video for video, _ in pairs] == listed
    unlisted = {item["video"] for item in items} - set(listed)
    if subset == "val":
        assert unlisted  # the excerpt keeps a json video missing from the list: filtered out
        assert any(video.endswith(".") for video in listed)  # a bare-dot name kept as it is
    by_video = dict(pairs)
    for video in listed[:5]:  # independent join: descriptions of the video in file order
        expected = " ".join(item["description"].strip() for item in items if item["video"] == video)
        assert by_video[video] == expected
    assert not any(text.endswith((" ", "\n")) for text in by_video.values())


def test_didemo_window_bare_dot_names_and_filtering(tmp_path, tokenizer):
    data, videos = tmp_path / "data", tmp_path / "videos"
    data.mkdir()
    videos.mkdir()
    items = [
        {"num_segments": 6, "description": "a dog jumps ", "times": [[0, 0], [0, 1]], "video": "1@N01_2_a.",
         "annotation_id": 1},
        {"num_segments": 6, "description": "the dog lands\n", "times": [[1, 1]] * 7, "video": "1@N01_2_a.",
         "annotation_id": 2},
        {"num_segments": 5, "description": "not listed", "times": [[2, 2]], "video": "9@N01_9_z.mov",
         "annotation_id": 3},
    ]
    (data / "test_data.json").write_text(json.dumps(items))
    (data / "test_list.txt").write_text("1@N01_2_a.\n")
    # OpenCV picks the container by extension: write .mp4, then give the files DiDeMo's names
    write_index_video(videos / "long.mp4", n_frames=80, fps=2).rename(videos / "1@N01_2_a.")  # 40 s
    write_index_video(videos / "short.mp4", n_frames=4, fps=2).rename(videos / "1@N01_2_a")  # must not be used
    test = didemo_dataset(data, videos, "test", tokenizer=tokenizer, **{**SMALL, "max_frames": 40})
    assert test.split.captions == ["a dog jumps the dog lands"] and test.split.video_ids == ["1@N01_2_a."]
    clip = test.video_dataset()[0]
    assert int(clip["video_mask"].sum()) == 32  # seconds 0..31 of 40, one frame per second
    assert frame_indices(clip["video"][:32].permute(0, 2, 3, 1).numpy()) == list(range(0, 64, 2))


def test_didemo_listed_video_without_annotation_fails(tmp_path):
    (tmp_path / "val_data.json").write_text(json.dumps([{"description": "x", "video": "a.mp4"}]))
    (tmp_path / "val_list.txt").write_text("a.mp4\nb.mp4\n")
    with pytest.raises(AnnotationError, match=r"val_data.json: no description for 1 video.*b.mp4"):
        didemo_pairs(tmp_path, "val")
    (tmp_path / "val_data.json").write_text('[{"description": "x", "video": "a.mp4"},\n{"video": 3}]')
    with pytest.raises(AnnotationError, match=r"val_data.json: item 1 lacks"):
        didemo_pairs(tmp_path, "val")
    (tmp_path / "val_data.json").write_text('[{"description": "x",\n "video": }]')
    with pytest.raises(AnnotationError, match=r"val_data.json, line 2: invalid JSON"):
        didemo_pairs(tmp_path, "val")


# -------------------------------------------------------------------------------- MSR-VTT and the flags

def test_msrvtt_full_test_split_is_multi_sentence(tmp_path, tokenizer):
    captions = {"video7010": ["a b", "c d"], "video7011": ["e f"], "video5": ["train only"]}
    path = write_msrvtt_json(tmp_path / "MSRVTT_data.json", captions)
    data = json.loads(path.read_text())
    for video in data["videos"]:
        video["split"] = "train" if video["video_id"] == "video5" else "test"
    path.write_text(json.dumps(data))
    test = MSRVTTFullTestDataset(path, tmp_path, tokenizer=tokenizer, **SMALL)
    assert test.split.video_ids == ["video7010", "video7011"]
    assert sorted(zip(test.split.caption_video, test.split.captions)) == [(0, "a b"), (0, "c d"), (1, "e f")]
    data["videos"][0].pop("split")
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"videos\[0\] lacks"):
        MSRVTTFullTestDataset(path, tmp_path, tokenizer=tokenizer, **SMALL)


def retrieval_args(*flags: str) -> argparse.Namespace:
    return parse_args(["--do_train", "--output_dir", "o", "--max_words", "16", "--max_frames", "6",
                       "--batch_size", "2", *flags], task="retrieval", world_size=1)


def test_msrvtt_retrieval_loader_repeats_frames_and_msvd_zero_pads(tmp_path, msvd_root):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_index_video(videos / "video0.mp4", n_frames=8, fps=4)  # 2 s at 1 frame/s: seconds 0, 1, (2) -> 2 frames
    write_msrvtt_json(tmp_path / "MSRVTT_data.json", {"video0": ["a b"]})
    (tmp_path / "train.csv").write_text("video_id\nvideo0\n")
    (tmp_path / "test.csv").write_text("key,vid_key,video_id,sentence\nret0,msr0,video0,a b\n")
    args = retrieval_args("--train_csv", str(tmp_path / "train.csv"), "--val_csv", str(tmp_path / "test.csv"),
                          "--data_path", str(tmp_path / "MSRVTT_data.json"), "--features_path", str(videos),
                          "--slice_framepos", "0")
    train, evaluation = build_retrieval_datasets(args, "msrvtt", image_size=16)
    clip = evaluation.video_dataset()[0]
    assert clip["video_mask"].tolist() == [1] * 6  # always 6 real frames (linspace over the 2 decoded)
    # linspace(0, 1, 6) truncated to int, as the original: the first decoded frame five times, then the second
    assert frame_indices(clip["video"].permute(0, 2, 3, 1).numpy()) == [0, 0, 0, 0, 0, 4]
    assert train()[0]["video_mask"].tolist() == [1] * 6
    args = retrieval_args("--data_path", str(msvd_root / "msvd_data"),
                          "--features_path", str(msvd_root / "YouTubeClips"))
    train, evaluation = build_retrieval_datasets(args, "msvd", image_size=16)
    assert evaluation.video_dataset()[1]["video_mask"].tolist() == [1, 1, 0, 0, 0, 0]


def test_retrieval_flags_fail_clearly(tmp_path, msvd_root):
    args = retrieval_args("--data_path", str(msvd_root / "msvd_data" / "raw-captions.pkl"))
    with pytest.raises(InputError, match="must be the folder of the MSVD annotation files"):
        build_retrieval_datasets(args, "msvd", image_size=16)
    empty = tmp_path / "empty"
    empty.mkdir()
    args = retrieval_args("--data_path", str(msvd_root / "msvd_data"), "--features_path", str(empty))
    with pytest.raises(InputError, match="none of the first 2 videos of the test split"):
        build_retrieval_datasets(args, "msvd", image_size=16)
    args = retrieval_args("--data_path", str(tmp_path), "--features_path", str(msvd_root / "YouTubeClips"))
    with pytest.raises(InputError, match="test_list.txt"):
        build_retrieval_datasets(args, "msvd", image_size=16)
    shutil.rmtree(empty)
