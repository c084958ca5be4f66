"""What every raw-video dataset shares (MSR-VTT, MSVD, LSMDC, DiDeMo): decoding a clip with the frame-sampling
flags, tokenising its caption, skipping undecodable videos, reproducible per-sample randomness, and the
retrieval evaluation split.

Samples follow docs/architecture.md §2.3: a dict with input_ids, attention_mask, video (uint8), video_mask, video_id and
index, or `None` when the video cannot be decoded (logged once per video id and counted; batches report it
through `collate_clips`' `n_skipped`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from dataloaders.collate import clip_sample
from dataloaders.frame_store import FrameStore
from dataloaders.retrieval_split import (
    RetrievalSplit,
    SplitCaptions,
    SplitVideos,
    clean_evaluation_pairs,
    index_video_files,
)
from dataloaders.video import SLICE_UNIFORM, ClipSampling, load_video_clip
from dataloaders.video_decoding import VideoDecodeError
from modules.errors import InputError

logger = logging.getLogger("t2vlp.data")


class TextTokenizer(Protocol):
    def encode(self, text: str, max_words: int) -> tuple[list[int], list[int]]: ...


class AnnotationError(InputError, ValueError):
    """An annotation file is malformed; the message names the file (and line or item)."""


def read_json_file(path: str | Path) -> Any:
    """A JSON file's content; invalid JSON is an AnnotationError naming the file and line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from error


def default_tokenizer() -> TextTokenizer:
    from modules.tokenization import ClipTokenizer

    return ClipTokenizer()


class RawVideoTextDataset(Dataset):
    """Shared machinery of the raw-video datasets.

    Subclasses implement `__len__` and `_pair(index, rng) -> (video_id, caption)`, and override `locate` when
    videos are not `<features_path>/<video_id><video_extension>`. The per-sample numpy Generator is derived from
    (seed, epoch, index), so caption choice and frame shuffling are reproducible and resumable whatever the
    worker layout; call `set_epoch` at the start of every epoch. Evaluation datasets also set `split`.

    `pad_mode` says what happens to a video with fewer frames than `max_frames` (docs/method.md §9.8): "zero" keeps the
    n real frames and zero-pads (root and CLIP4Clip loaders), "repeat" up-samples with linspace so every entry is
    a real frame (the task-specific downstream loaders).

    With `frame_store` (a store of `frozen_tfrecord.py --feature_framerate`, dataloaders/frame_store.py) clips
    are read from the stored frames, found by the video file's name without extension, and equal the decoded
    ones; a video not in the store is decoded from its file (logged once).
    """

    split: RetrievalSplit | None = None

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
        frame_store: str | Path | None = None,
    ) -> None:
        self.features_path = Path(features_path)
        self.frame_store = None if frame_store is None else FrameStore(
            frame_store, feature_framerate=feature_framerate, image_size=image_size)
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
        self.max_words = max_words
        self.sampling = ClipSampling(max_frames, feature_framerate, slice_framepos, frame_order, image_size, pad_mode)
        self.seed = seed
        self.epoch = 0
        self.video_extension = video_extension
        self.n_skipped = 0
        self._warned_video_ids: set[tuple[str, str]] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def locate(self, video_id: str) -> tuple[Path, tuple[int, int] | None]:
        """The video file and the (start, end) seconds to read, None for the whole video."""
        return self.features_path / f"{video_id}{self.video_extension}", None

    def video_path(self, video_id: str) -> Path:
        return self.locate(video_id)[0]

    def load_video(self, video_id: str, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 video [T, 3, S, S] and video_mask [T]; raises VideoDecodeError."""
        path, window = self.locate(video_id)
        start, end = window if window is not None else (None, None)
        if self.frame_store is not None:
            if path.stem in self.frame_store:
                return self.frame_store.load_clip(path.stem, self.sampling, rng=rng, start_time=start, end_time=end)
            self._warn_once(video_id, "not stored",
                            f"video {video_id} is not in --frame_store {self.frame_store.path}: decoding {path}")
        return load_video_clip(path, self.sampling, rng=rng, start_time=start, end_time=end)

    def sample_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _pair(self, index: int, rng: np.random.Generator) -> tuple[str, str]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        rng = self.sample_rng(index)
        video_id, caption = self._pair(index, rng)
        try:
            video, video_mask = self.load_video(video_id, rng)
        except VideoDecodeError as error:
            self._record_skip(video_id, error)
            return None
        input_ids, attention_mask = self.tokenizer.encode(caption, self.max_words)
        return clip_sample(input_ids, attention_mask, video, video_mask, video_id, index)

    def _record_skip(self, video_id: str, error: VideoDecodeError) -> None:
        self.n_skipped += 1
        self._warn_once(video_id, "skip", f"skipping video {video_id}: {error}")

    def _warn_once(self, video_id: str, kind: str, message: str) -> None:
        if (video_id, kind) not in self._warned_video_ids:
            self._warned_video_ids.add((video_id, kind))
            logger.warning("%s", message)

    # ------------------------------------------------------------------ evaluation view

    def caption_dataset(self) -> SplitCaptions:
        return SplitCaptions(self._require_split(), self.tokenizer, self.max_words)

    def video_dataset(self) -> SplitVideos:
        return SplitVideos(self._require_split(), self.load_video, self.seed)

    def all_pairs(self) -> list[tuple[str, str]]:
        """Every (video_id, caption) of a training set (each caption once)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its pairs")

    def keep_videos(self, videos: set[str]) -> None:
        """Restrict a training set to `videos`."""
        raise NotImplementedError(f"{type(self).__name__} cannot be restricted to some videos")

    def _require_split(self) -> RetrievalSplit:
        if self.split is None:
            raise TypeError(f"{type(self).__name__} is a training dataset: it has no evaluation split")
        return self.split


class PairsDataset(RawVideoTextDataset):
    """One sample per (video_id, caption) pair, in the given order; `locate` finds the files.

    With `as_split` the pairs also form the evaluation split (one entry per caption, each video encoded once).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        features_path: str | Path,
        *,
        video_files: dict[str, Path] | None = None,
        window: tuple[int, int] | None = None,
        as_split: bool = False,
        dropped: dict[str, int] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(features_path, **options)
        self.pairs = list(pairs)
        self.video_files = video_files
        self.window = window
        if as_split:
            self.split = RetrievalSplit.from_pairs(self.pairs, dropped)

    def __len__(self) -> int:
        return len(self.pairs)

    def _pair(self, index: int, rng: np.random.Generator) -> tuple[str, str]:
        return self.pairs[index]

    def all_pairs(self) -> list[tuple[str, str]]:
        return list(self.pairs)

    def keep_videos(self, videos: set[str]) -> None:
        self.pairs = [pair for pair in self.pairs if pair[0] in videos]

    def locate(self, video_id: str) -> tuple[Path, tuple[int, int] | None]:
        if self.video_files is None:
            return super().locate(video_id)[0], self.window
        path = self.video_files.get(video_id)
        if path is None:
            raise VideoDecodeError(f"no file for video {video_id} under {self.features_path}")
        return path, self.window


def subset_dataset(pairs: Sequence[tuple[str, str]], features_path: str | Path, subset: str, source: str, *,
                   file_key: str = "stem", video_files: dict[str, Path] | None = None, **options: Any
                   ) -> PairsDataset:
    """One subset of an annotation set whose videos are files under `features_path` (found by name without
    extension, or by full name with `file_key="name"`, or given as `video_files` by id): "train" keeps the pairs
    whose video has a file (the rest left out with a warning naming `source`); val/test form an evaluation split of
    every pair (a missing video is skipped and counted when evaluated). `options` go to `PairsDataset`."""
    files = video_files if video_files is not None else index_video_files(features_path, key=file_key)
    if subset == "train":
        pairs = keep_pairs_with_videos(pairs, files, source, features_path)
        kept = [pair for pair in pairs if pair[1].strip()]
        if len(kept) < len(pairs):
            logger.warning("%s: %d empty caption(s) left out of training", source, len(pairs) - len(kept))
        return PairsDataset(kept, features_path, video_files=files, **options)
    pairs, dropped = clean_evaluation_pairs(pairs, source)
    return PairsDataset(pairs, features_path, video_files=files, as_split=True, dropped=dropped, **options)


def hold_out_videos(dataset: RawVideoTextDataset, count: int, seed: int, frame_order: int
                    ) -> tuple[RawVideoTextDataset, RawVideoTextDataset]:
    """(the training set without them, an evaluation split of them) for `count` of a training set's videos drawn
    with `seed` (the same videos on every run and rank), with all their captions; the split reads its clips with
    `frame_order`."""
    pairs = dataset.all_pairs()
    videos = sorted({video_id for video_id, _ in pairs})
    if not 0 < count < len(videos):
        raise InputError(f"--val_from_train {count}: the training split has {len(videos)} videos; hold out between 1 "
                         f"and {len(videos) - 1}")
    held = {videos[i] for i in np.random.default_rng(seed).permutation(len(videos))[:count]}
    train = copy.copy(dataset)
    train.keep_videos(set(videos) - held)
    evaluation = copy.copy(dataset)
    evaluation.sampling = replace(dataset.sampling, frame_order=frame_order)
    kept, dropped = clean_evaluation_pairs([pair for pair in pairs if pair[0] in held], "the held-out videos")
    evaluation.split = RetrievalSplit.from_pairs(kept, dropped)
    logger.info("--val_from_train: %d of %d training videos (seed %d) held out of training as the validation split "
                "(%d captions)", count, len(videos), seed, len(kept))
    return train, evaluation


def keep_pairs_with_videos(
    pairs: Sequence[tuple[str, str]], video_files: dict[str, Path], source: str, features_path: str | Path
) -> list[tuple[str, str]]:
    """Drop the pairs whose video has no file (the original did so silently); say how many, fail when none is
    left (the wrong --features_path)."""
    kept = [pair for pair in pairs if pair[0] in video_files]
    missing = sorted({video_id for video_id, _ in pairs if video_id not in video_files})
    if pairs and not kept:
        raise InputError(f"none of the {len(set(v for v, _ in pairs))} videos of {source} is under --features_path "
                         f"{features_path} (e.g. {missing[:3]})")
    if missing:
        logger.warning("%s: %d video(s) have no file under %s and are left out (%d of %d captions), e.g. %s",
                       source, len(missing), features_path, len(pairs) - len(kept), len(pairs), missing[:5])
    return kept
