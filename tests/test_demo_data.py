"""The synthetic demo dataset: MSR-VTT layout, WebVid-style csv, real decodable videos, idempotent generation."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloaders import demo_data
from dataloaders.demo_data import COLOURS, make_demo_dataset
from dataloaders.msrvtt import MSRVTTTestDataset, MSRVTTTrainDataset, read_csv_columns
from dataloaders.video_decoding import read_frames
from modules.tokenization import ClipTokenizer
from tools.demo import DEMO_CLIP, latest_checkpoint

SETTINGS = dict(n_train=12, n_test=6, seed=3, size=32, fps=4, seconds=2, n_val=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo_data", **SETTINGS)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_msrvtt_layout_and_schema(demo):
    root = demo["root"]
    assert demo["videos_dir"] == root / "MSRVTT" / "videos" / "all"
    assert sorted(p.name for p in demo["videos_dir"].iterdir()) == sorted(f"video{n}.mp4" for n in range(21))
    data = load_json(demo["data_json"])
    assert set(data) == {"info", "videos", "sentences"}
    assert set(data["info"]) == {"year", "version", "description", "contributor", "data_created"}
    assert data["videos"][0].keys() == {"id", "video_id", "category", "url", "start time", "end time", "split"}
    assert [v["split"] for v in data["videos"]] == ["train"] * 12 + ["test"] * 6 + ["validate"] * 3
    sentences = data["sentences"]
    assert len(sentences) == 21 * len(demo_data.CAPTION_TEMPLATES)
    assert [s["sen_id"] for s in sentences] == list(range(len(sentences)))
    assert sentences[0].keys() == {"caption", "video_id", "sen_id"}
    grouped = all(a["video_id"] == b["video_id"] for a, b in zip(sentences[::5], sentences[4::5]))
    assert not grouped  # shuffled like the real file


def test_splits_and_unique_test_captions(demo):
    train_ids = [row["video_id"] for row in read_csv_columns(demo["train_csv"], ("video_id",))]
    assert train_ids == [f"video{n}" for n in range(12)]
    assert demo["test_csv"].read_text().splitlines()[0] == "key,vid_key,video_id,sentence"
    rows = read_csv_columns(demo["test_csv"], ("key", "vid_key", "video_id", "sentence"))
    assert [row["video_id"] for row in rows] == [f"video{n}" for n in range(12, 18)]
    assert rows[0]["key"] == "ret0" and rows[0]["vid_key"] == "msr12"
    assert len({row["sentence"] for row in rows}) == 6
    captions = {}
    for sentence in load_json(demo["data_json"])["sentences"]:
        captions.setdefault(sentence["video_id"], []).append(sentence["caption"])
    assert all(row["sentence"] in captions[row["video_id"]] for row in rows)
    assert all(len(set(texts)) == len(demo_data.CAPTION_TEMPLATES) for texts in captions.values())


def test_videos_decode_and_show_the_captioned_colour(demo):
    captions = {s["video_id"]: s["caption"] for s in load_json(demo["data_json"])["sentences"]}
    for number in range(18):
        frames = read_frames(demo["videos_dir"] / f"video{number}.mp4", feature_framerate=0)
        assert frames.shape == (8, 32, 32, 3)
        colour_name = next(name for name in COLOURS if name in captions[f"video{number}"].split())
        pixels = frames[0].reshape(-1, 3).astype(int)
        shape_pixels = pixels[np.abs(pixels - pixels[0]).sum(axis=1) > 90]  # pixels[0] is background
        shape_colour = np.median(shape_pixels, axis=0)
        assert len(shape_pixels) > 30
        assert np.abs(shape_colour - np.array(COLOURS[colour_name])).max() < 40, (number, colour_name, shape_colour)


def test_webvid_csv_and_videos(demo):
    text = demo["webvid_csv"].read_text(encoding="utf-8")
    assert text.splitlines()[0] == "videoid,name,page_idx,page_dir,duration,contentUrl"
    assert '"' in text  # names with commas are quoted
    with demo["webvid_csv"].open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    for row, number in zip(rows, range(12)):
        assert row["videoid"].isdigit() and row["duration"] == "PT00H00M02S"
        assert f"/{row['videoid']}/" in row["contentUrl"]
        video = demo["webvid_videos_dir"] / row["page_dir"] / f"{row['videoid']}.mp4"
        assert video.read_bytes() == (demo["videos_dir"] / f"video{number}.mp4").read_bytes()
    assert len({row["videoid"] for row in rows}) == 12


def test_loaders_read_the_demo(demo):
    tokenizer = ClipTokenizer()
    options = dict(tokenizer=tokenizer, max_words=16, max_frames=4, image_size=32)
    train = MSRVTTTrainDataset(demo["train_csv"], demo["data_json"], demo["videos_dir"], **options)
    test = MSRVTTTestDataset(demo["test_csv"], demo["videos_dir"], **options)
    assert len(train) == 12 * len(demo_data.CAPTION_TEMPLATES) and len(test) == 6
    sample = test[0]
    assert sample["video"].shape == (4, 3, 32, 32) and sample["video_mask"].tolist() == [1, 1, 0, 0]
    assert train[0] is not None and train.n_skipped == 0


def test_idempotent_and_deterministic(demo, tmp_path, monkeypatch):
    first_json = demo["data_json"].read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(demo_data, "_write_video", lambda *args: pytest.fail("regenerated a complete dataset"))
        assert make_demo_dataset(demo["root"], **SETTINGS) == demo
    again = make_demo_dataset(tmp_path / "again", **SETTINGS)
    for key in ("data_json", "train_csv", "test_csv", "webvid_csv"):
        assert again[key].read_bytes() == demo[key].read_bytes()
    assert (again["videos_dir"] / "video5.mp4").read_bytes() == (demo["videos_dir"] / "video5.mp4").read_bytes()
    assert demo["data_json"].read_bytes() == first_json


def test_other_settings_regenerate_cleanly(tmp_path):
    out = tmp_path / "demo"
    make_demo_dataset(out, **SETTINGS)
    paths = make_demo_dataset(out, **{**SETTINGS, "n_train": 4, "n_test": 2, "n_val": 1})
    assert len(list(paths["videos_dir"].iterdir())) == 7
    assert len(read_csv_columns(paths["test_csv"], ("video_id", "sentence"))) == 2


def test_too_many_test_videos_for_distinct_captions(tmp_path):
    with pytest.raises(ValueError, match="n_test"):
        make_demo_dataset(tmp_path / "demo", n_train=1, n_test=10_000)


def test_msvd_layout_over_the_same_videos(demo):
    from dataloaders.msvd import msvd_pairs, read_id_list

    folder = demo["msvd_dir"]
    assert read_id_list(folder / "train_list.txt") == [f"video{n}" for n in range(12)]
    assert read_id_list(folder / "test_list.txt") == [f"video{n}" for n in range(12, 18)]
    assert read_id_list(folder / "val_list.txt") == [f"video{n}" for n in range(18, 21)]
    captions = {}
    for sentence in load_json(demo["data_json"])["sentences"]:
        captions.setdefault(sentence["video_id"], []).append(sentence["caption"])
    for video_id, caption in msvd_pairs(folder, "val"):
        assert caption in captions[video_id]


def test_webvid_only_videos_extend_pretraining_without_changing_the_rest(demo, tmp_path):
    paths = make_demo_dataset(tmp_path / "with_webvid", **SETTINGS, n_webvid_only=7)
    with paths["webvid_csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 + 7
    webvid_files = sorted(paths["webvid_videos_dir"].rglob("*.mp4"))
    assert len(webvid_files) == 19 and not (paths["webvid_dir"] / "only").exists()
    assert len(list(paths["videos_dir"].iterdir())) == 21  # the MSR-VTT folder holds none of them
    # The downstream videos and annotations are those of the dataset without WebVid-only videos.
    for key in ("data_json", "train_csv", "test_csv"):
        assert paths[key].read_bytes() == demo[key].read_bytes()
    assert (paths["videos_dir"] / "video17.mp4").read_bytes() == (demo["videos_dir"] / "video17.mp4").read_bytes()
    # Each WebVid-only clip decodes and shows the colour its caption names.
    for row in rows[12:15]:
        video = next(f for f in webvid_files if f.stem == row["videoid"])
        colour = next(name for name in COLOURS if name in row["name"].lower().split())
        pixels = read_frames(video, feature_framerate=0)[0].reshape(-1, 3).astype(int)
        shape_pixels = pixels[np.abs(pixels - pixels[0]).sum(axis=1) > 90]
        assert np.abs(np.median(shape_pixels, axis=0) - np.array(COLOURS[colour])).max() < 40, row["name"]


def test_demo_launchers_start_from_the_newest_checkpoint_of_the_current_demo_model(tmp_path):
    """Checkpoints of an earlier demo CLIP (another text width) stay in ./output; the launchers must skip them."""

    def checkpoint(run: str, width: int, mtime: int) -> Path:
        path = tmp_path / run / "ckpt" / "pytorch_model.bin.10"
        path.parent.mkdir(parents=True)
        torch.save({"clip.ln_final.weight": torch.ones(width)}, path)
        os.utime(path, (mtime, mtime))
        return path

    older_fit = checkpoint("demo_stage1_a", DEMO_CLIP.transformer_width, 1_000)
    checkpoint("demo_stage1_b", DEMO_CLIP.transformer_width // 2, 2_000)  # newer, earlier demo model
    checkpoint("demo_stage2_c", DEMO_CLIP.transformer_width, 3_000)  # newer, another stage
    assert latest_checkpoint(1, tmp_path) == older_fit
    assert latest_checkpoint(2, tmp_path) == tmp_path / "demo_stage2_c" / "ckpt" / "pytorch_model.bin.10"
    (tmp_path / "demo_stage1_a" / "ckpt" / "pytorch_model.bin.10").unlink()
    assert latest_checkpoint(1, tmp_path) is None
