"""Clips as model input: frame selection (docs/method.md §9.8), resizing, padding and CLIP input normalisation
(docs/method.md §2.3); the decoding itself is dataloaders/video_decoding.py.

Frames stay uint8 until they reach the device; `normalize_video` turns them into the model's float input there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dataloaders.video_decoding import read_frames

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SLICE_HEAD, SLICE_TAIL, SLICE_UNIFORM = 0, 1, 2
ORDER_KEEP, ORDER_REVERSE, ORDER_SHUFFLE = 0, 1, 2
PAD_MODES = ("zero", "repeat")


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
