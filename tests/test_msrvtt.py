"""MSR-VTT annotation parsing (real excerpts), datasets on real mp4 files, and batching with skipped videos."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders.collate import collate_clips, is_empty_batch
from dataloaders.msrvtt import (
    AnnotationError,
    MSRVTTTestDataset,
    MSRVTTTrainDataset,
    read_csv_columns,
    read_msrvtt_sentences,
)
from modules.tokenization import ClipTokenizer
from tests.real_fixtures import REAL_FIXTURES, needs_real
from tests.test_video import frame_indices, write_index_video

REAL_MSRVTT = REAL_FIXTURES / "msrvtt"
needs_real_msrvtt = needs_real("msrvtt")

CAPTIONS = {  # video2 has no file on disk
    "video0": ["a man is cooking", "someone cooks food !&", "a chef prepares a meal"],
    "video1": ["a dog runs", "a puppy is running in a park"],
    "video2": ["a car drives down a road"],
    "video3": ["a test caption"],
}
SMALL = dict(max_words=16, max_frames=4, image_size=16, feature_framerate=1)


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def write_msrvtt_json(path: Path, captions: dict[str, list[str]]) -> Path:
    """An `MSRVTT_data.json` in the real schema, sentences interleaved across videos as in the real file."""
    videos = [
        {"category": 9, "url": f"https://www.youtube.com/watch?v=yt{n % 2}", "video_id": video_id,
         "start time": 137.72, "end time": 149.44, "split": "train", "id": n}
        for n, video_id in enumerate(captions)
    ]
    pairs = [(video_id, caption) for video_id, texts in captions.items() for caption in texts]
    interleaved = pairs[::2] + pairs[1::2]
    sentences = [{"caption": caption, "video_id": video_id, "sen_id": n}
                 for n, (video_id, caption) in enumerate(interleaved)]
    info = {"contributor": "Microsoft MSM group", "data_created": "2016-04-14 14:30:20", "version": "1.0",
            "description": "This is 1.0 version of the 2016 MSR-VTT dataset.", "year": "2016"}
    path.write_text(json.dumps({"info": info, "videos": videos, "sentences": sentences}))
    return path


@pytest.fixture(scope="module")
def msrvtt_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("msrvtt")
    videos = root / "videos"
    videos.mkdir()
    write_index_video(videos / "video0.mp4", n_frames=24, fps=8)  # sampled frames 0, 8, 16
    write_index_video(videos / "video1.mp4", n_frames=40, fps=8)  # sampled frames 0, 8, 16, 24, 32
    write_index_video(videos / "video3.mp4", n_frames=8, fps=8)
    write_msrvtt_json(root / "MSRVTT_data.json", CAPTIONS)
    (root / "train.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\n")
    (root / "test.csv").write_text("key,vid_key,video_id,sentence\nret0,msr1,video1,a dog runs\n"
                                   "ret1,msr2,video2,a car drives\nret2,msr0,video0,a man is cooking\n")
    return root


def train_dataset(root: Path, tokenizer, **options) -> MSRVTTTrainDataset:
    return MSRVTTTrainDataset(root / "train.csv", root / "MSRVTT_data.json", root / "videos",
                              tokenizer=tokenizer, **{**SMALL, **options})


@needs_real_msrvtt
def test_real_train_csvs():
    nine_k = [row["video_id"] for row in read_csv_columns(REAL_MSRVTT / "MSRVTT_train.9k.csv", ("video_id",))]
    seven_k = [row["video_id"] for row in read_csv_columns(REAL_MSRVTT / "MSRVTT_train.7k.csv", ("video_id",))]
    assert len(nine_k) == 32 and nine_k[:3] == ["video0", "video1", "video2"] and "video7010" in nine_k
    assert len(seven_k) == 31 and seven_k[:3] == ["video0", "video1000", "video1001"] and seven_k[-1] == "video9"


@needs_real_msrvtt
def test_real_jsfusion_test_csv():
    rows = read_csv_columns(REAL_MSRVTT / "MSRVTT_JSFUSION_test.csv", ("video_id", "sentence"))
    assert len(rows) == 30
    assert rows[0] == {"video_id": "video9770", "sentence": "a person is connecting something to system"}
    assert rows[1] == {"video_id": "video9771", "sentence": "a little girl does gymnastics"}


@needs_real_msrvtt
def test_real_test_split_dataset(tmp_path, tokenizer):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_index_video(videos / "video9770.mp4", n_frames=16, fps=8)
    dataset = MSRVTTTestDataset(REAL_MSRVTT / "MSRVTT_JSFUSION_test.csv", videos, tokenizer=tokenizer, **SMALL)
    assert len(dataset) == 30
    sample = dataset[0]
    assert sample["video_id"] == "video9770" and sample["index"] == 0
    ids, mask = tokenizer.encode("a person is connecting something to system", 16)
    assert sample["input_ids"].tolist() == ids and sample["attention_mask"].tolist() == mask
    assert sample["video_mask"].tolist() == [1, 1, 0, 0]  # seconds 0..2 of a 2-s video: frames 0, 8
    assert dataset[1] is None and dataset.n_skipped == 1


@needs_real_msrvtt
def test_variant_test_csvs_fail_loudly(tmp_path, tokenizer):
    text = (REAL_MSRVTT / "MSRVTT_JSFUSION_test.csv").read_text()
    renamed = tmp_path / "renamed_column.csv"  # the www-2025/EAT copy calls the column "sentences"
    renamed.write_text(text.replace("video_id,sentence", "video_id,sentences", 1))
    semicolons = tmp_path / "semicolons.csv"  # the AIC_benchmark copy uses ';'
    semicolons.write_text(text.replace(",", ";"))
    for path in (renamed, semicolons):
        with pytest.raises(AnnotationError, match=f"{path.name}.*sentence"):
            MSRVTTTestDataset(path, tmp_path, tokenizer=tokenizer)


def test_train_csv_without_video_id_column(tmp_path, msrvtt_dir, tokenizer):
    csv_path = tmp_path / "ids.csv"
    csv_path.write_text("vid\nvideo0\n")
    with pytest.raises(AnnotationError, match="ids.csv.*video_id"):
        MSRVTTTrainDataset(csv_path, msrvtt_dir / "MSRVTT_data.json", msrvtt_dir / "videos", tokenizer=tokenizer)


def test_csv_empty_field_names_the_line(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("key,vid_key,video_id,sentence\nret0,msr1,video1,a dog\nret1,msr2,video2,\n")
    with pytest.raises(AnnotationError, match="test.csv, line 3"):
        read_csv_columns(path, ("video_id", "sentence"))


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "MSRVTT_data.json"
    path.write_text('{"videos": [],\n "sentences": [\n {"caption": "a", "video_id": "video0"},,\n]}')
    with pytest.raises(AnnotationError, match="MSRVTT_data.json, line 3"):
        read_msrvtt_sentences(path)
    path.write_text(json.dumps({"sentences": [{"caption": "a", "video_id": "video0"}, {"video_id": "video1"}]}))
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json: sentences\[1\]"):
        read_msrvtt_sentences(path)
    path.write_text(json.dumps([{"caption": "a", "video_id": "video0"}]))
    with pytest.raises(AnnotationError, match="'sentences' list"):
        read_msrvtt_sentences(path)


def test_train_video_without_captions_fails(tmp_path, msrvtt_dir, tokenizer):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("video_id\nvideo0\nvideo77\n")
    with pytest.raises(AnnotationError, match="video77"):
        MSRVTTTrainDataset(csv_path, msrvtt_dir / "MSRVTT_data.json", msrvtt_dir / "videos", tokenizer=tokenizer)


def test_expanded_pairs_follow_the_json_order(msrvtt_dir, tokenizer):
    dataset = train_dataset(msrvtt_dir, tokenizer, expand_sentences=True)
    sentences = read_msrvtt_sentences(msrvtt_dir / "MSRVTT_data.json")
    expected = [pair for pair in sentences if pair[0] != "video3"]  # video3 is not in the train csv
    assert len(dataset) == 6 and dataset.pairs == expected


def test_one_sample_per_video_without_expansion(msrvtt_dir, tokenizer):
    assert len(train_dataset(msrvtt_dir, tokenizer, expand_sentences=False)) == 3


def test_sample_contract(msrvtt_dir, tokenizer):
    dataset = train_dataset(msrvtt_dir, tokenizer, expand_sentences=True)
    index = next(i for i, pair in enumerate(dataset.pairs) if pair == ("video1", "a dog runs"))
    sample = dataset[index]
    assert set(sample) == {"input_ids", "attention_mask", "video", "video_mask", "video_id", "index"}
    assert sample["video_id"] == "video1" and sample["index"] == index
    ids, mask = tokenizer.encode("a dog runs", 16)
    assert sample["input_ids"].dtype == torch.long and sample["input_ids"].tolist() == ids
    assert sample["attention_mask"].dtype == torch.long and sample["attention_mask"].tolist() == mask
    assert sample["video"].shape == (4, 3, 16, 16) and sample["video"].dtype == torch.uint8
    # 5 sampled frames (0, 8, 16, 24, 32) cut to 4 with linspace(0, 4, 4) -> 0, 1, 2, 4
    assert frame_indices(sample["video"]) == [0, 8, 16, 32]
    assert sample["video_mask"].dtype == torch.long and sample["video_mask"].tolist() == [1, 1, 1, 1]


def test_exclamation_mark_token_id_zero_is_kept(msrvtt_dir, tokenizer):
    dataset = train_dataset(msrvtt_dir, tokenizer, expand_sentences=True)
    index = next(i for i, pair in enumerate(dataset.pairs) if pair[1] == "someone cooks food !&")
    sample = dataset[index]
    real_tokens = sample["input_ids"][sample["attention_mask"] == 1].tolist()
    assert 0 in real_tokens  # "!&" -> BPE "!" (id 0) + "&</w>"; only the WebVid loaders delete id 0


def test_zero_and_repeat_padding(msrvtt_dir, tokenizer):
    zero = MSRVTTTestDataset(msrvtt_dir / "test.csv", msrvtt_dir / "videos", tokenizer=tokenizer, **SMALL)[2]
    repeat = MSRVTTTestDataset(msrvtt_dir / "test.csv", msrvtt_dir / "videos", tokenizer=tokenizer,
                               pad_mode="repeat", **SMALL)[2]
    assert zero["video_id"] == repeat["video_id"] == "video0"
    assert zero["video_mask"].tolist() == [1, 1, 1, 0] and zero["video"][3].eq(0).all()
    assert repeat["video_mask"].tolist() == [1, 1, 1, 1]
    assert frame_indices(zero["video"][:3]) == [0, 8, 16]
    assert frame_indices(repeat["video"]) == [0, 0, 8, 16]  # linspace(0, 2, 4) = 0, 0.67, 1.33, 2 -> 0, 0, 1, 2


def test_random_caption_is_deterministic_per_seed_epoch_index(msrvtt_dir, tokenizer):
    def captions_over_epochs(dataset, epochs):
        chosen = []
        for epoch in epochs:
            dataset.set_epoch(epoch)
            chosen.append(dataset._pair(0, dataset.sample_rng(0))[1])
        return chosen

    first = train_dataset(msrvtt_dir, tokenizer, expand_sentences=False, seed=5)
    second = train_dataset(msrvtt_dir, tokenizer, expand_sentences=False, seed=5)
    epochs = list(range(12))
    chosen = captions_over_epochs(first, epochs)
    assert chosen == captions_over_epochs(second, epochs)
    assert set(chosen) == set(CAPTIONS["video0"])  # every caption shows up over 12 epochs
    assert captions_over_epochs(first, [3]) == [chosen[3]]  # resuming at epoch 3 repeats epoch 3's choice
    first.set_epoch(3)
    sample = first[0]
    assert sample["input_ids"].tolist() == tokenizer.encode(chosen[3], 16)[0]


def test_missing_video_returns_none_counts_and_warns_once(msrvtt_dir, tokenizer, caplog):
    dataset = train_dataset(msrvtt_dir, tokenizer, expand_sentences=False)
    assert dataset.video_ids[2] == "video2"
    with caplog.at_level(logging.WARNING, logger="t2vlp.data"):
        assert dataset[2] is None
        assert dataset[2] is None
    assert dataset.n_skipped == 2
    warnings = [record for record in caplog.records if record.name == "t2vlp.data"]
    assert len(warnings) == 1 and "video2" in warnings[0].getMessage()


def test_undecodable_video_returns_none(tmp_path, msrvtt_dir, tokenizer):
    root = tmp_path / "broken"
    shutil.copytree(msrvtt_dir, root)
    (root / "videos" / "video1.mp4").write_bytes(b"not a video")
    dataset = train_dataset(root, tokenizer, expand_sentences=False)
    assert dataset[1] is None and dataset[0] is not None and dataset.n_skipped == 1


def test_collate_drops_skipped_samples(msrvtt_dir, tokenizer):
    dataset = train_dataset(msrvtt_dir, tokenizer, expand_sentences=False)
    batches = list(DataLoader(dataset, batch_size=3, collate_fn=collate_clips))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["n_skipped"] == 1 and batch["batch_size"] == 2 and not is_empty_batch(batch)
    assert batch["video"].shape == (2, 4, 3, 16, 16) and batch["video"].dtype == torch.uint8
    assert batch["input_ids"].shape == (2, 16) and batch["video_mask"].shape == (2, 4)
    assert batch["video_id"] == ["video0", "video1"]
    assert batch["index"].tolist() == [0, 1]


def test_collate_all_skipped():
    batch = collate_clips([None, None])
    assert batch == {"n_skipped": 2, "batch_size": 0} and is_empty_batch(batch)
