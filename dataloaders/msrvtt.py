"""MSR-VTT retrieval datasets in the CLIP4Clip layout (docs/method.md §7a, §9.3; docs/data.md §3.1).

Videos are `<features_path>/<video_id>.mp4`. Samples follow docs/architecture.md §2.3 (see dataloaders/raw_video_text.py).
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dataloaders.raw_video_text import (  # noqa: F401 (AnnotationError, TextTokenizer re-exported)
    AnnotationError,
    RawVideoTextDataset,
    TextTokenizer,
    read_json_file,
)
from dataloaders.retrieval_split import RetrievalSplit, clean_evaluation_pairs

logger = logging.getLogger("t2vlp.data")

# Videos the original's MSR-VTT captioning loader leaves out of training and its QA loader drops from every split,
# which also drops video8528 (docs/method.md §7b, §7c).
MSRVTT_EXCLUDED_VIDEOS = frozenset({
    "video710", "video1054", "video1975", "video3023", "video3071", "video5009", "video5397", "video5858",
    "video5992",
})


def read_csv_columns(path: str | Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a headed CSV file as dicts restricted to `columns` (selected by name, all required)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [name for name in columns if name not in header]
        if missing:
            raise AnnotationError(f"{path}: missing column(s) {missing}; header is {header}")
        rows = []
        for row in reader:
            if None in row:  # DictReader files fields beyond the header under None
                raise AnnotationError(f"{path}, line {reader.line_num}: {len(header) + len(row[None])} fields, the "
                                      f"header has {len(header)}: {row}")
            values = {name: row[name] for name in columns}
            if any(value is None or not value.strip() for value in values.values()):
                raise AnnotationError(f"{path}, line {reader.line_num}: empty or missing field in {row}")
            rows.append({name: value.strip() for name, value in values.items()})
    return rows


def read_msrvtt_sentences(json_path: str | Path) -> list[tuple[str, str]]:
    """`MSRVTT_data.json` -> its `sentences` as (video_id, caption) pairs in file order."""
    json_path = Path(json_path)
    data = read_json_file(json_path)
    sentences = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(sentences, list):
        raise AnnotationError(f"{json_path}: expected an object with a 'sentences' list")
    pairs = []
    for position, item in enumerate(sentences):
        video_id = item.get("video_id") if isinstance(item, dict) else None
        caption = item.get("caption") if isinstance(item, dict) else None
        if not isinstance(video_id, str) or not isinstance(caption, str):
            raise AnnotationError(f"{json_path}: sentences[{position}] lacks a string video_id/caption: {item!r}")
        pairs.append((video_id, caption))
    return pairs


class MSRVTTTrainDataset(RawVideoTextDataset):
    """MSR-VTT training pairs: the videos of `MSRVTT_train.9k.csv`/`7k.csv` with their `MSRVTT_data.json` captions.

    `csv_path` is the original `--train_csv`, `json_path` the original `--data_path`. With
    `expand_sentences=True` (`--expand_msrvtt_sentences`) every (video, caption) pair is a sample, in the
    JSON's sentence order; otherwise there is one sample per csv row and each visit draws one of the
    video's captions with the per-sample Generator (so it changes with `set_epoch`).
    """

    def __init__(
        self,
        csv_path: str | Path,
        json_path: str | Path,
        features_path: str | Path,
        *,
        expand_sentences: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(features_path, **options)
        self.expand_sentences = expand_sentences
        self.video_ids = [row["video_id"] for row in read_csv_columns(csv_path, ("video_id",))]
        sentences = read_msrvtt_sentences(json_path)
        captions = defaultdict(list)
        for video_id, caption in sentences:
            captions[video_id].append(caption)
        self.captions: dict[str, list[str]] = dict(captions)
        without_captions = [video_id for video_id in self.video_ids if video_id not in self.captions]
        if without_captions:
            raise AnnotationError(
                f"{json_path}: no caption for {len(without_captions)} video(s) listed in {csv_path}, "
                f"e.g. {without_captions[:5]}"
            )
        wanted = set(self.video_ids)
        self.pairs = [pair for pair in sentences if pair[0] in wanted] if expand_sentences else []

    def __len__(self) -> int:
        return len(self.pairs) if self.expand_sentences else len(self.video_ids)

    def all_pairs(self) -> list[tuple[str, str]]:
        return [(video_id, caption) for video_id in self.video_ids for caption in self.captions[video_id]]

    def keep_videos(self, videos: set[str]) -> None:
        self.video_ids = [video_id for video_id in self.video_ids if video_id in videos]
        self.pairs = [pair for pair in self.pairs if pair[0] in videos]

    def _pair(self, index: int, rng: np.random.Generator) -> tuple[str, str]:
        if self.expand_sentences:
            return self.pairs[index]
        video_id = self.video_ids[index]
        captions = self.captions[video_id]
        return video_id, captions[rng.integers(len(captions))]


class MSRVTTTestDataset(RawVideoTextDataset):
    """MSR-VTT 1k-A test split (`MSRVTT_JSFUSION_test.csv`, the original `--val_csv`): one caption per video."""

    def __init__(self, csv_path: str | Path, features_path: str | Path, **options: Any) -> None:
        super().__init__(features_path, **options)
        rows = read_csv_columns(csv_path, ("video_id", "sentence"))
        self.pairs, dropped = clean_evaluation_pairs([(row["video_id"], row["sentence"]) for row in rows],
                                                     str(csv_path))
        self.split = RetrievalSplit.from_pairs(self.pairs, dropped)

    def __len__(self) -> int:
        return len(self.pairs)

    def _pair(self, index: int, rng: np.random.Generator) -> tuple[str, str]:
        return self.pairs[index]


def read_msrvtt_video_splits(json_path: str | Path) -> dict[str, str]:
    """`MSRVTT_data.json` -> {video_id: split} in file order; split is "train", "validate" or "test" (the official
    video0-6512 / video6513-7009 / video7010-9999)."""
    json_path = Path(json_path)
    data = read_json_file(json_path)
    videos = data.get("videos") if isinstance(data, dict) else None
    if not isinstance(videos, list):
        raise AnnotationError(f"{json_path}: expected an object with a 'videos' list (its splits are needed)")
    splits = {}
    for position, item in enumerate(videos):
        if not isinstance(item, dict) or not isinstance(item.get("video_id"), str) or "split" not in item:
            raise AnnotationError(f"{json_path}: videos[{position}] lacks a string video_id or a split: {item!r}")
        splits[item["video_id"]] = item["split"]
    return splits


def read_msrvtt_test_videos(json_path: str | Path) -> list[str]:
    """The ids of the videos whose `split` is "test" in `MSRVTT_data.json` (video7010..video9999), in file order."""
    return [video_id for video_id, split in read_msrvtt_video_splits(json_path).items() if split == "test"]


class MSRVTTFullTestDataset(MSRVTTTestDataset):
    """The official MSR-VTT test split: all 2,990 test videos of `MSRVTT_data.json` with all their captions
    (about 20 each), a multi-sentence evaluation (`--msrvtt_test full`)."""

    def __init__(self, json_path: str | Path, features_path: str | Path, **options: Any) -> None:
        RawVideoTextDataset.__init__(self, features_path, **options)
        test_ids = read_msrvtt_test_videos(json_path)
        if not test_ids:
            raise AnnotationError(f"{json_path}: no video has split 'test'")
        wanted = set(test_ids)
        self.pairs = [pair for pair in read_msrvtt_sentences(json_path) if pair[0] in wanted]
        without = sorted(wanted - {video_id for video_id, _ in self.pairs})
        if without:
            raise AnnotationError(f"{json_path}: {len(without)} test video(s) have no sentence, e.g. {without[:5]}")
        order = {video_id: position for position, video_id in enumerate(test_ids)}
        self.pairs.sort(key=lambda pair: order[pair[0]])  # grouped by video (stable: captions keep file order)
        self.pairs, dropped = clean_evaluation_pairs(self.pairs, f"the test split of {json_path}")
        self.split = RetrievalSplit.from_pairs(self.pairs, dropped)
