"""dataloaders/webvid.py: index resolution, both record layouts, the Dataset contract, rank/worker sharding."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from tfrecord.writer import TFRecordWriter
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import frozen_tfrecord as ft
from conversion.decoders import sample_positions
from dataloaders.clip_store import WebVidIndex, read_frames
from dataloaders.collate import collate_clips
from dataloaders.tfrecord_io import iter_records
from dataloaders.webvid import WebVidDataset
from engine.sampler import ResumableDistributedSampler
from modules.tokenization import EOT_ID, SOT_ID
from tests.test_frozen_tfrecord import frame_colour, write_colour_video

N_VIDEOS = 8
N_FRAMES = {f"{3000 + n}": 14 + n for n in range(N_VIDEOS)}  # 14..21 frames: 12 sampled from each


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A converted JPEG store of N_VIDEOS test videos (96x64, so frames are cropped to 64x64 squares)."""
    root = tmp_path_factory.mktemp("webvid")
    for number, (video_id, n_frames) in enumerate(N_FRAMES.items()):
        write_colour_video(root / "videos" / f"{video_id}.mp4", n_frames, number, size=(96, 64))
    rows = "".join(f'{video_id},"Clip {video_id} wow!; so cheap!$",1\n' for video_id in N_FRAMES)
    (root / "results_2M_train.csv").write_text("videoid,name,page_idx\n" + rows, encoding="utf-8")
    ft.convert(ft.parse_args(["--video_dir", str(root / "videos"), "--csv", str(root / "results_2M_train.csv"),
                              "--output_dir", str(root / "WebVid_TFRecord"), "--shard_size", "3",
                              "--workers", "0", "--no_progress"]))
    return root / "WebVid_TFRecord"


def make_dataset(store, **options) -> WebVidDataset:
    defaults = dict(max_words=16, max_frames=12, image_size=32, slice_framepos=2, frame_order=0, seed=0)
    return WebVidDataset(store / "frozen_train_labels.json", store / "path.index", **(defaults | options))


def frame_means(video: torch.Tensor, video_mask: torch.Tensor) -> np.ndarray:
    real = video[video_mask.bool()].float()
    return real.mean(dim=(2, 3)).numpy()


def expected_colours(number: int, positions: list[int]) -> np.ndarray:
    return np.stack([frame_colour(number, p) for p in positions]).astype(float)


# ----------------------------------------------------------------------------------------------- index


def test_index_duplicates_and_original_style_paths(store, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere"
    shutil.copytree(store, moved)
    lines = (moved / "path.index").read_text().splitlines()
    first_id, _, first_offset = lines[0].split("\t")
    second_id, second_shard, second_offset = lines[1].split("\t")
    original_style = [
        f"{first_id}\t./WebVid_Test/{lines[0].split(chr(9))[1]}\t{first_offset}",  # writer-CWD relative
        f"{second_id}\t{moved / second_shard}\t{second_offset}",  # absolute
        f"{first_id}\t{second_shard}\t{second_offset}",  # duplicate id: ignored
        "",
    ]
    (moved / "path.index").write_text("\n".join(original_style + lines[2:]) + "\n")
    monkeypatch.chdir(tmp_path)
    index = WebVidIndex(moved)
    assert len(index) == N_VIDEOS
    assert index.locate(first_id) == (str(moved / "path-00000.tfrecord"), int(first_offset))
    assert index.locate(second_id) == (str(moved / second_shard), int(second_offset))
    assert index.locate("nope") is None
    np.testing.assert_array_equal(read_frames(moved, first_id), read_frames(store, first_id))


def test_index_reports_a_malformed_line(tmp_path):
    (tmp_path / "path.index").write_text("1\tpath-00000.tfrecord\t0\n2\tpath-00000.tfrecord\n")
    with pytest.raises(ValueError, match=r"path\.index, line 2"):
        WebVidIndex(tmp_path / "path.index")


def test_records_written_by_the_tfrecord_package_in_the_original_layout(tmp_path):
    rng = np.random.default_rng(1)
    clips = {"11": rng.integers(0, 256, (12, 256, 256, 3), dtype=np.uint8),
             "12": rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)}
    writer = TFRecordWriter(str(tmp_path / "path-00000.tfrecord"))
    for bgr in clips.values():
        writer.write({"image": (bgr.tobytes(), "byte")})
    writer.close()
    offsets = [offset for offset, _ in iter_records(tmp_path / "path-00000.tfrecord")]
    (tmp_path / "path.index").write_text("".join(
        f"{video_id}\tpath-00000.tfrecord\t{offset}\n" for video_id, offset in zip(clips, offsets, strict=True)))
    for video_id, bgr in clips.items():
        frames = read_frames(tmp_path / "path.index", video_id, verify_crc=True)
        np.testing.assert_array_equal(frames, bgr[..., ::-1])  # BGR -> RGB


# ----------------------------------------------------------------------------------------------- samples


def test_sample_contract(store):
    dataset = make_dataset(store)
    assert len(dataset) == N_VIDEOS
    sample = dataset[2]
    assert set(sample) == {"input_ids", "attention_mask", "video", "video_mask", "video_id", "index"}
    assert sample["video_id"] == "3002" and sample["index"] == 2
    assert sample["video"].dtype == torch.uint8 and sample["video"].shape == (12, 3, 32, 32)
    assert sample["video_mask"].dtype == torch.long and sample["video_mask"].tolist() == [1] * 12
    assert sample["input_ids"].dtype == torch.long and sample["input_ids"].shape == (16,)
    positions = sample_positions(N_FRAMES["3002"], 12)
    assert np.abs(frame_means(sample["video"], sample["video_mask"]) - expected_colours(2, positions)).max() <= 8


def test_caption_drops_bpe_id_zero_before_padding(store):
    dataset = make_dataset(store)
    assert 0 in dataset.tokenizer.bpe_ids(dataset.caption(0))  # "!;" and "!$" hold the BPE token "!" (id 0)
    sample = dataset[0]
    ids, mask = sample["input_ids"], sample["attention_mask"]
    real = ids[mask.bool()].tolist()
    assert real[0] == SOT_ID and real[-1] == EOT_ID and 0 not in real  # "!" (id 0) deleted
    assert ids[~mask.bool()].tolist() == [0] * int((mask == 0).sum())
    assert mask.tolist() == [1] * len(real) + [0] * (16 - len(real))


@pytest.mark.parametrize("slice_framepos, frame_order, kept", [
    (0, 0, [0, 1, 2, 3]),
    (1, 0, [8, 9, 10, 11]),
    (2, 0, [0, 3, 7, 11]),
    (2, 1, [11, 7, 3, 0]),
])
def test_slicing_and_frame_order(store, slice_framepos, frame_order, kept):
    sample = make_dataset(store, max_frames=4, slice_framepos=slice_framepos, frame_order=frame_order)[1]
    stored_positions = sample_positions(N_FRAMES["3001"], 12)
    expected = expected_colours(1, [stored_positions[i] for i in kept])
    assert np.abs(frame_means(sample["video"], sample["video_mask"]) - expected).max() <= 8


def test_shuffled_frame_order_is_reproducible_per_epoch(store):
    dataset = make_dataset(store, frame_order=2, seed=5)
    first = dataset[4]["video"]
    assert torch.equal(first, dataset[4]["video"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[4]["video"])


def test_fewer_frames_than_max_frames_are_zero_padded(store):
    sample = make_dataset(store, max_frames=16)[0]
    assert sample["video_mask"].tolist() == [1] * 12 + [0] * 4
    assert sample["video"][12:].count_nonzero() == 0 and sample["video"][:12].count_nonzero() > 0


def test_missing_id_and_corrupt_record_give_none(store, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    labels = json.loads((broken / "frozen_train_labels.json").read_text())
    labels.append({"video_id": "999", "caption": "not converted"})
    (broken / "frozen_train_labels.json").write_text(json.dumps(labels))
    offset = int((broken / "path.index").read_text().splitlines()[1].split("\t")[2])
    shard = bytearray((broken / "path-00000.tfrecord").read_bytes())
    shard[offset + 200] ^= 0xFF
    (broken / "path-00000.tfrecord").write_bytes(bytes(shard))

    with caplog.at_level(logging.WARNING, logger="t2vlp.data"):
        checked = make_dataset(broken, verify_crc=True)
        assert checked[N_VIDEOS] is None
        assert checked[1] is None
        assert checked[0] is not None
    assert "999" in caplog.text and "payload CRC mismatch" in caplog.text and "path-00000.tfrecord" in caplog.text
    assert checked.n_skipped == 2


# ----------------------------------------------------------------------------------------------- sharding


def torch_sampler(dataset, rank: int, epoch: int):
    sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
    sampler.set_epoch(epoch)
    return sampler


def engine_sampler(dataset, rank: int, epoch: int):
    sampler = ResumableDistributedSampler(len(dataset), num_replicas=2, rank=rank, shuffle=True, seed=3,
                                          drop_last=True)
    sampler.set_epoch(epoch)
    return sampler


@pytest.mark.parametrize("make_sampler", [torch_sampler, engine_sampler])
def test_two_ranks_with_two_workers_see_every_sample_once_per_epoch(store, make_sampler):
    dataset = make_dataset(store, image_size=16)
    assert dataset[0] is not None  # opens a shard in the parent: workers must not reuse its handles
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader = DataLoader(dataset, batch_size=2, sampler=make_sampler(dataset, rank, epoch), num_workers=2,
                                collate_fn=collate_clips)
            for batch in loader:
                assert batch["n_skipped"] == 0 and batch["video"].shape == (2, 12, 3, 16, 16)
                seen += batch["index"].tolist()
                assert batch["video_id"] == [f"{3000 + i}" for i in batch["index"].tolist()]
        assert sorted(seen) == list(range(N_VIDEOS))
