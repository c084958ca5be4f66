"""Raw-video decoding with OpenCV (docs/method.md §9.8) and CLIP input normalisation (docs/method.md §2.3).

Frames stay uint8 until they reach the device; `normalize_video` turns them into the model's float input there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dataloaders.files import is_utf8, printable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SLICE_HEAD, SLICE_TAIL, SLICE_UNIFORM = 0, 1, 2
ORDER_KEEP, ORDER_REVERSE, ORDER_SHUFFLE = 0, 1, 2
PAD_MODES = ("zero", "repeat")


class VideoDecodeError(RuntimeError):
    """A video file is missing, empty, corrupt or yields no frame."""


def open_capture(path: str, *args: object) -> cv2.VideoCapture:
    """`cv2.VideoCapture(path, *args)` for any file name. OpenCV takes a name only as UTF-8 text (other bytes crash
    it), so a file whose name is not UTF-8 is opened here and handed to it as /proc/self/fd/N."""
    if is_utf8(path):
        return cv2.VideoCapture(path, *args)
    fd = os.open(path, os.O_RDONLY)
    try:
        through = f"/proc/self/fd/{fd}"
        if not os.path.exists(through):
            raise VideoDecodeError(f"{printable(path)}: the file name is not valid UTF-8 and OpenCV reads only such "
                                   "names on this system: rename the file (or convert with --decoder pyav)")
        return cv2.VideoCapture(through, *args)  # FFmpeg opens the file again; ours is closed below
    finally:
        os.close(fd)


def read_frames(
    path: str | Path,
    feature_framerate: int = 1,
    start_time: int | None = None,
    end_time: int | None = None,
) -> np.ndarray:
    """Decode the sampled frames of a video as RGB uint8 [n, H, W, 3], exactly as the original's CV2 extractor.

    `feature_framerate` frames per second are taken at offsets `0, step, 2*step, ...` with
    `step = fps // feature_framerate` (at least 1); `feature_framerate <= 0` takes every frame. Seconds run from
    `start_time` (default 0) to `end_time` (default: the duration, ceil(frame_count / fps)) inclusive, and
    reading stops at the first failed read.
    """
    return read_sampled_frames(path, feature_framerate, start_time, end_time).frames


class SampledFrames(NamedTuple):
    frames: np.ndarray  # RGB uint8 [n, H, W, 3]
    positions: np.ndarray  # int64 [n]: frame number of each in the video
    fps: int  # the video's frame rate as the sampler read it (an int, as the original's extractor)


def read_sampled_frames(
    path: str | Path,
    feature_framerate: int = 1,
    start_time: int | None = None,
    end_time: int | None = None,
) -> SampledFrames:
    """`read_frames` with the frame number of each frame and the frame rate."""
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(f"video file not found: {printable(str(path))}")
    capture = open_capture(str(path))
    try:
        if not capture.isOpened():
            raise VideoDecodeError(f"cannot open video (empty or corrupt file?): {printable(str(path))}")
        fps = int(capture.get(cv2.CAP_PROP_FPS))
        if fps <= 0:
            raise VideoDecodeError(f"video reports {fps} frames per second (corrupt file?): {printable(str(path))}")
        frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        first_second, last_second = _second_window(math.ceil(frame_count / fps), start_time, end_time)
        offsets = _offsets_within_second(fps, feature_framerate)
        frames, positions = _read_seconds(capture, fps, offsets, first_second, last_second)
    finally:
        capture.release()
    if not frames:
        raise VideoDecodeError(f"no frame could be decoded from video: {printable(str(path))}")
    return SampledFrames(np.stack(frames), np.asarray(positions, dtype=np.int64), fps)


def _second_window(duration: int, start_time: int | None, end_time: int | None) -> tuple[int, int]:
    if start_time is None and end_time is None:
        return 0, duration
    check_window(start_time, end_time)
    return start_time, min(end_time, duration)


def check_window(start_time: int | None, end_time: int | None) -> None:
    """A clip window is both bounds or neither, with 0 <= start_time < end_time (seconds)."""
    if (start_time is None) != (end_time is None) or (start_time is not None and not 0 <= start_time < end_time):
        raise ValueError(f"need 0 <= start_time < end_time (both given), got {start_time}, {end_time}")


def _offsets_within_second(fps: int, feature_framerate: int) -> list[int]:
    if feature_framerate <= 0:
        return list(range(fps))
    step = max(fps // feature_framerate, 1)
    # When feature_framerate > fps the original asserts; we take every frame of the second instead.
    return list(range(0, fps, step))[:feature_framerate]


def _read_seconds(
    capture: cv2.VideoCapture, fps: int, offsets: list[int], first_second: int, last_second: int
) -> tuple[list[np.ndarray], list[int]]:
    frames, positions = [], []
    for second in range(first_second, last_second + 1):
        for offset in offsets:
            position = second * fps + offset
            capture.set(cv2.CAP_PROP_POS_FRAMES, position)
            ok, frame = capture.read()
            if not ok or frame is None:
                return frames, positions
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            positions.append(position)
    return frames, positions


def resize_center_crop(frames: np.ndarray | torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """RGB uint8 frames [n, H, W, 3] -> uint8 [n, 3, S, S]: shorter side to S (bicubic, antialiased), center crop."""
    tensor = torch.as_tensor(frames).permute(0, 3, 1, 2)
    tensor = TF.resize(tensor, [image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(tensor, [image_size, image_size]).contiguous()


def select_frame_indices(n_frames: int, max_frames: int, slice_framepos: int, pad_mode: str) -> np.ndarray:
    """Indices of the decoded frames to keep.

    More than `max_frames`: head (0), tail (1) or `linspace` truncated to int (2). Fewer: all of them for
    pad_mode "zero" (the rest is zero-padded later), `linspace` up-sampling to exactly `max_frames` (frames
    repeat) for pad_mode "repeat".
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if n_frames > max_frames:
        if slice_framepos == SLICE_HEAD:
            return np.arange(max_frames)
        if slice_framepos == SLICE_TAIL:
            return np.arange(n_frames - max_frames, n_frames)
        if slice_framepos == SLICE_UNIFORM:
            return np.linspace(0, n_frames - 1, num=max_frames, dtype=int)
        raise ValueError(f"slice_framepos must be 0, 1 or 2, got {slice_framepos}")
    if pad_mode == "repeat":
        return np.linspace(0, n_frames - 1, num=max_frames, dtype=int)
    return np.arange(n_frames)


def order_frames(indices: np.ndarray, frame_order: int, rng: np.random.Generator | None) -> np.ndarray:
    """Keep (0), reverse (1) or shuffle (2, with `rng`) the selected frames."""
    if frame_order == ORDER_KEEP:
        return indices
    if frame_order == ORDER_REVERSE:
        return indices[::-1].copy()
    if frame_order == ORDER_SHUFFLE:
        if rng is None:
            raise ValueError("frame_order 2 (shuffle) needs a numpy Generator `rng`")
        return rng.permutation(indices)
    raise ValueError(f"frame_order must be 0, 1 or 2, got {frame_order}")


@dataclass(frozen=True)
class ClipSampling:
    """How a clip is cut from a video, whatever it is read from (a file here, a frame store in
    dataloaders/frame_store.py): frames per second sampled, how many kept and how (`clip_frame_indices`), their
    size. pad_mode "zero" pads a short clip with zero frames (mask 0), "repeat" up-samples it with real frames."""

    max_frames: int = 12
    feature_framerate: int = 1
    slice_framepos: int = SLICE_UNIFORM
    frame_order: int = ORDER_KEEP
    image_size: int = 224
    pad_mode: str = "zero"


def load_video_clip(
    path: str | Path,
    sampling: ClipSampling = ClipSampling(),
    *,
    rng: np.random.Generator | None = None,
    start_time: int | None = None,
    end_time: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode, select, order, resize and pad one clip; `rng` draws a shuffled frame order, `start_time` and
    `end_time` (seconds) read a window.

    Returns video uint8 [max_frames, 3, S, S] (RGB) and video_mask LongTensor [max_frames]. With pad_mode
    "zero" the first n entries are real frames (mask 1) and the rest are zeros (mask 0); with "repeat" every
    entry is a real frame. Raises `VideoDecodeError` when the file gives no frame.
    """
    frames = read_frames(path, sampling.feature_framerate, start_time, end_time)
    indices = clip_frame_indices(len(frames), sampling.max_frames, sampling.slice_framepos, sampling.frame_order,
                                 sampling.pad_mode, rng)
    return pad_clip(resize_center_crop(frames[indices], sampling.image_size), sampling.max_frames)


def clip_frame_indices(
    n_frames: int, max_frames: int, slice_framepos: int, frame_order: int, pad_mode: str,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Which of `n_frames` decoded frames make the clip, in clip order (`select_frame_indices`, `order_frames`)."""
    return order_frames(select_frame_indices(n_frames, max_frames, slice_framepos, pad_mode), frame_order, rng)


def pad_clip(clip: torch.Tensor, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, 3, S, S] with n <= max_frames -> (video [max_frames, 3, S, S] zero-padded, video_mask [max_frames])."""
    video = torch.zeros(max_frames, *clip.shape[1:], dtype=torch.uint8)
    video[: len(clip)] = clip
    video_mask = torch.zeros(max_frames, dtype=torch.long)
    video_mask[: len(clip)] = 1
    return video, video_mask


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 CLIP input ((x / 255 - mean) / std), on the tensor's own device."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=video.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=video.device).view(3, 1, 1)
    return (video.to(torch.float32) / 255.0 - mean) / std
