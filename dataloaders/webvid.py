"""WebVid-style pre-training (docs/method.md §9.1-9.2): the Dataset over a clip store, read through its catalogue
(dataloaders/catalogue.py: ids, captions and record locations, memory-mapped) and its records
(dataloaders/clip_store.py), one at a time or by the block (dataloaders/blocks.py)."""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from dataloaders.blocks import BlockLayout, BlockReader
from dataloaders.catalogue import Catalogue, ensure_catalogue
from dataloaders.clip_store import check_record_id, index_file, parse_clip_record, resolve_shard_path
from dataloaders.collate import clip_sample
from dataloaders.tfrecord_io import RecordReader
from dataloaders.video import ORDER_KEEP, SLICE_UNIFORM, clip_frame_indices, pad_clip, resize_center_crop

logger = logging.getLogger("t2vlp.data")


class TextTokenizer(Protocol):
    def encode(self, text: str, max_words: int, drop_zero_ids: bool = False) -> tuple[list[int], list[int]]: ...


class WebVidDataset(Dataset):
    """One sample per element of `frozen_train_labels.json`, frames read from the TFRecord store (docs/method.md §9.1).

    Samples follow docs/architecture.md §2.3. Frames: more than `max_frames` are cut with `slice_framepos` (0 head,
    1 tail, 2 uniform), fewer are zero-padded with `video_mask` 0; `frame_order` 0 keeps, 1 reverses, 2 shuffles
    (with a Generator from (seed, epoch, index); call `set_epoch`). Each frame: shorter side to `image_size`
    (bicubic, antialiased), center crop. Captions: CLIP BPE with id 0 ("!") deleted, as the original WebVid
    loaders did (so "!" never reaches the model from WebVid; the attention mask, not id > 0, marks tokens).

    The labels and the index are read through the store's catalogue (`catalogue`, else found or built:
    docs/data.md §2.1); with `blocks`, records are read by the block (docs/data.md §2.2).
    A label whose id is not in the index, or whose record cannot be read, gives `None` (logged once per id).
    Shard files / S3 clients are opened lazily in the process that reads, so the dataset can be built before
    DataLoader workers fork; rank sharding is the sampler's job (e.g. DistributedSampler).
    """

    def __init__(
        self,
        labels_json: str | os.PathLike,
        index_path: str | os.PathLike,
        *,
        max_words: int = 32,
        max_frames: int = 12,
        image_size: int = 224,
        slice_framepos: int = SLICE_UNIFORM,
        frame_order: int = ORDER_KEEP,
        seed: int = 42,
        tokenizer: TextTokenizer | None = None,
        verify_crc: bool = False,
        catalogue: Catalogue | None = None,
        catalogue_cache: str | os.PathLike | None = None,
        blocks: BlockLayout | None = None,
        block_buffer: int = 8,
    ) -> None:
        self.catalogue = catalogue if catalogue is not None else ensure_catalogue(labels_json, index_path,
                                                                                  catalogue_cache)
        self.index_path = index_file(index_path)
        info = self.catalogue.info
        if info.n_duplicate_ids:
            logger.warning("%s: %d duplicate video id line(s); the first of each is used", self.index_path,
                           info.n_duplicate_ids)
        missing = self.n_missing = info.n_missing
        if missing:
            logger.warning("%d of %d labels in %s have no record in %s; those samples are skipped",
                           missing, len(self.catalogue), labels_json, self.index_path)
        self._shard_paths: dict[int, str] = {}
        self.tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
        self.max_words = max_words
        self.max_frames = max_frames
        self.image_size = image_size
        self.slice_framepos = slice_framepos
        self.frame_order = frame_order
        self.seed = seed
        self.epoch = 0
        self.n_skipped = 0
        self._warned: set[str] = set()
        self._reader = RecordReader(verify_crc=verify_crc)
        self.block_layout, self.block_buffer = blocks, block_buffer  # block mode: the sampler reads these
        self._blocks = BlockReader(blocks, self.shard_path, block_buffer + 1, self._reader) if blocks else None

    def __len__(self) -> int:
        return len(self.catalogue)

    def shard_path(self, number: int) -> str:
        """Shard `number` of the catalogue's table, resolved against the index's location (once per process)."""
        path = self._shard_paths.get(number)
        if path is None:
            path = self._shard_paths[number] = resolve_shard_path(self.index_path, self.catalogue.shards[number])
        return path

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stored_frames(self) -> int | None:
        """Frames held by the first readable record (WebVid stores the same number per video), or None."""
        for index in range(min(len(self), 16)):
            shard, offset, _ = self.catalogue.location(index)
            if shard < 0:
                continue
            try:
                return parse_clip_record(self._reader.read(self.shard_path(shard), offset)).num_frames
            except (OSError, ValueError):
                continue
        return None

    def caption(self, index: int) -> str:
        return self.catalogue.caption(index)

    def video_id(self, index: int) -> str:
        return self.catalogue.video_id(index)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        video_id = self.catalogue.video_id(index)
        clip = self._read_clip(index, video_id)
        if clip is None:
            return None
        video, video_mask = clip
        input_ids, attention_mask = self.tokenizer.encode(self.catalogue.caption(index), self.max_words,
                                                          drop_zero_ids=True)
        return clip_sample(input_ids, attention_mask, video, video_mask, video_id, index)

    def _read_clip(self, index: int, video_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        shard, offset, _ = self.catalogue.location(index)
        if shard < 0:
            return self._skip(video_id, "not in the TFRecord index")
        path = self.shard_path(shard)
        try:
            payload = self._blocks.payload(shard, offset) if self._blocks else self._reader.read(path, offset)
            record = parse_clip_record(payload)
            check_record_id(record, video_id)
            rng = np.random.default_rng([self.seed, self.epoch, index])
            indices = clip_frame_indices(record.num_frames, self.max_frames, self.slice_framepos, self.frame_order,
                                         "zero", rng)
            frames = record.frames(indices)
        except (OSError, ValueError) as error:  # RecordCorruptError and ClipRecordError are ValueErrors
            return self._skip(video_id, f"{path} @ {offset}: {error}")
        return pad_clip(resize_center_crop(frames, self.image_size), self.max_frames)

    def _skip(self, video_id: str, reason: str) -> None:
        self.n_skipped += 1
        if video_id not in self._warned:
            self._warned.add(video_id)
            logger.warning("skipping WebVid video %s: %s", video_id, reason)
        return None


def _default_tokenizer() -> TextTokenizer:
    from modules.tokenization import ClipTokenizer

    return ClipTokenizer()
