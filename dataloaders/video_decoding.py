"""Decoding a video file's sampled frames with OpenCV, as the original's extractor did (docs/method.md §9.8), and
opening any file name. Free of torch: the converter decodes with it; dataloaders/video.py makes model input.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from dataloaders.files import is_utf8, printable


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
