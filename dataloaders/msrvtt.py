"""MSR-VTT retrieval datasets in the CLIP4Clip layout (METHOD §7a, §9.3; DATA_FORMATS §1).

Samples follow docs/CONTRACTS.md: a dict with input_ids, attention_mask, video (uint8), video_mask, video_id
and index, or `None` when the video cannot be decoded (the dataset logs it once per video id and counts it;
batches report it through `collate_clips`' `n_skipped`).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Dataset

from dataloaders.collate import clip_sample
from dataloaders.video import SLICE_UNIFORM, VideoDecodeError, load_video_clip
from modules.errors import InputError

logger = logging.getLogger("t2vlp.data")


class TextTokenizer(Protocol):
    def encode(self, text: str, max_words: int) -> tuple[list[int], list[int]]: ...


class AnnotationError(InputError, ValueError):
    """An annotation file is malformed; the message names the file (and line or item)."""


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
    with json_path.open(encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise AnnotationError(f"{json_path}, line {error.lineno}: invalid JSON ({error.msg})") from error
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


class RawVideoTextDataset(Dataset):
    """Shared machinery of the raw-video retrieval datasets: decoding, tokenising, skipping, per-sample RNG.

    Subclasses implement `__len__` and `_pair(index, rng) -> (video_id, caption)`. The per-sample numpy
    Generator is derived from (seed, epoch, index), so caption choice and frame shuffling are reproducible
    and resumable whatever the worker layout; call `set_epoch` at the start of every epoch.
    """

    def __init__(
        self,
        features_path: str | Path,
        *,
        tokenizer: TextTokenizer | None = None,
        max_words: int = 32,
        feature_framerate: int = 1,
        max_frames: int = 12,
        image_size: int = 224,
        frame_order: int = 0,
        slice_framepos: int = SLICE_UNIFORM,
        pad_mode: str = "zero",
        seed: int = 42,
        video_extension: str = ".mp4",
    ) -> None:
        self.features_path = Path(features_path)
        self.tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
        self.max_words = max_words
        self.clip_options = dict(
            max_frames=max_frames, feature_framerate=feature_framerate, slice_framepos=slice_framepos,
            frame_order=frame_order, image_size=image_size, pad_mode=pad_mode,
        )
        self.seed = seed
        self.epoch = 0
        self.video_extension = video_extension
        self.n_skipped = 0
        self._warned_video_ids: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def video_path(self, video_id: str) -> Path:
        return self.features_path / f"{video_id}{self.video_extension}"

    def sample_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _pair(self, index: int, rng: np.random.Generator) -> tuple[str, str]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        rng = self.sample_rng(index)
        video_id, caption = self._pair(index, rng)
        try:
            video, video_mask = load_video_clip(self.video_path(video_id), rng=rng, **self.clip_options)
        except VideoDecodeError as error:
            self._record_skip(video_id, error)
            return None
        input_ids, attention_mask = self.tokenizer.encode(caption, self.max_words)
        return clip_sample(input_ids, attention_mask, video, video_mask, video_id, index)

    def _record_skip(self, video_id: str, error: VideoDecodeError) -> None:
        self.n_skipped += 1
        if video_id not in self._warned_video_ids:
            self._warned_video_ids.add(video_id)
            logger.warning("skipping video %s: %s", video_id, error)


def _default_tokenizer() -> TextTokenizer:
    from modules.tokenization import ClipTokenizer

    return ClipTokenizer()


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
        self.pairs = [(row["video_id"], row["sentence"]) for row in rows]

    def __len__(self) -> int:
        return len(self.pairs)

    def _pair(self, index: int, rng: np.random.Generator) -> tuple[str, str]:
        return self.pairs[index]
