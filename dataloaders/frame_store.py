"""Decode-once frame store for the downstream datasets (MSR-VTT, MSVD, LSMDC, DiDeMo, captioning, QA).

Fine-tuning decodes every raw video once per sample per epoch (about 20 times per MSR-VTT video and epoch with
`--expand_msrvtt_sentences`), and seeking through a video costs far more than reading a few small images. The
store holds, per video, exactly the frames the raw-video loader decodes at one `--feature_framerate`, already
resized and center-cropped to the model's input size, in TFRecord shards written by
`frozen_tfrecord.py --video_dir DIR --feature_framerate N --image_size S`. Reading then applies the loader's
own frame selection, order, window and padding (`dataloaders.video`) to the stored frames, so a clip read from a
PNG store equals, bit for bit, the clip decoded from the raw video with the same flags (tests/test_frame_store.py).

Layout: the converter's shards and `<name>.index`, plus `<name>.frame_store.json` naming the sampling the
frames were stored at; records are looked up by the video file's name without extension.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dataloaders.clip_store import (
    ClipRecordError,
    WebVidIndex,
    check_record_id,
    index_file,
    parse_clip_record,
)
from dataloaders.tfrecord_io import RecordReader
from dataloaders.video import ClipSampling, clip_frame_indices, pad_clip
from dataloaders.video_decoding import VideoDecodeError, check_window
from modules.errors import InputError

logger = logging.getLogger("t2vlp.data")

MANIFEST_SUFFIX = ".frame_store.json"
LOSSLESS_FORMATS = ("png",)


@dataclass(frozen=True)
class FrameStoreManifest:
    """What a store holds: frames sampled at `feature_framerate` per second, `image_size` squared, as images of
    `frame_format` (png: lossless, so equal to raw decoding; jpeg: smaller, within JPEG error of it)."""

    feature_framerate: int
    image_size: int
    frame_format: str

    def to_json(self) -> str:
        return json.dumps({"kind": "downstream_frame_store", **asdict(self)}, indent=1) + "\n"

    @classmethod
    def read(cls, path: Path) -> FrameStoreManifest:
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            return cls(int(content["feature_framerate"]), int(content["image_size"]), str(content["frame_format"]))
        except FileNotFoundError as error:
            raise InputError(f"{path} not found: --frame_store must be a store written by `frozen_tfrecord.py "
                             f"--video_dir ... --feature_framerate N` (a WebVid store has no such file)") from error
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path}: not a frame store manifest ({error})") from error

    @property
    def lossless(self) -> bool:
        return self.frame_format in LOSSLESS_FORMATS


def manifest_path(index_path: str | os.PathLike) -> Path:
    """`<name>.frame_store.json` beside `<name>.index` (a folder means its `path.index`)."""
    index = Path(index_file(index_path))
    return index.with_name(index.name[: -len(".index")] + MANIFEST_SUFFIX)


class FrameStore:
    """Clips read from a frame store, with the same keywords and result as `dataloaders.video.load_video_clip`.

    Opened lazily per process (the index is numpy arrays, shard files open on first read), so a dataset holding
    one can be built before DataLoader workers start.
    """

    def __init__(self, path: str | os.PathLike, *, feature_framerate: int, image_size: int) -> None:
        self.path = str(path)
        self.manifest = FrameStoreManifest.read(manifest_path(path))
        wanted = FrameStoreManifest(feature_framerate, image_size, self.manifest.frame_format)
        if wanted != self.manifest:
            raise InputError(f"--frame_store {path} holds frames at --feature_framerate "
                             f"{self.manifest.feature_framerate} and image size {self.manifest.image_size}; this run "
                             f"samples {feature_framerate} per second at {image_size}. Convert the videos again with "
                             f"these settings, or leave out --frame_store")
        self.index = WebVidIndex(path)
        self._reader = RecordReader()
        logger.info("frames from the frame store %s: %d videos at %d per second, %d pixels, %s%s", path,
                    len(self.index), feature_framerate, image_size, self.manifest.frame_format,
                    "" if self.manifest.lossless else " (lossy: close to, not equal to, decoding the videos)")

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def load_clip(
        self,
        key: str,
        sampling: ClipSampling,
        *,
        rng: np.random.Generator | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip of the video stored under `key` (file name without extension), as `load_video_clip` gives
        it from the file; raises VideoDecodeError when it is not stored, its record is damaged, or the window
        holds no stored frame."""
        rate, image_size = sampling.feature_framerate, sampling.image_size
        if (rate, image_size) != (self.manifest.feature_framerate, self.manifest.image_size):
            raise ValueError(f"this store holds frames at {self.manifest.feature_framerate} per second and "
                             f"{self.manifest.image_size} pixels, not {rate} and {image_size}")
        check_window(start_time, end_time)
        location = self.index.locate(key)
        if location is None:
            raise VideoDecodeError(f"video {key} is not in the frame store {self.path}")
        try:
            record = parse_clip_record(self._reader.read(*location))
            check_record_id(record, key)
            available = self._frames_in_window(record, start_time, end_time)
            indices = clip_frame_indices(len(available), sampling.max_frames, sampling.slice_framepos,
                                         sampling.frame_order, sampling.pad_mode, rng)
            frames = record.frames(available[indices])
        except (OSError, ValueError) as error:  # RecordCorruptError and ClipRecordError are ValueErrors
            raise VideoDecodeError(f"frame store {self.path}, video {key}: {error}") from error
        if frames.shape[1:3] != (image_size, image_size):
            raise VideoDecodeError(f"frame store {self.path}, video {key}: frames of {frames.shape[1:3]}, the "
                                   f"manifest says {image_size}")
        return pad_clip(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), sampling.max_frames)

    @staticmethod
    def _frames_in_window(record, start_time: int | None, end_time: int | None) -> np.ndarray:
        """Stored frames whose second lies in [start_time, end_time], as the raw decoder reads a window."""
        available = np.arange(record.num_frames)
        if start_time is not None:
            if record.frame_indices is None or not record.fps:
                raise ClipRecordError("the record has no frame positions or fps, needed to read a time window")
            seconds = record.frame_indices // record.fps
            available = available[(seconds >= start_time) & (seconds <= end_time)]
        if len(available) == 0:
            raise ClipRecordError(f"no stored frame between second {start_time} and {end_time}")
        return available
