"""Test videos whose frames say which frame they are, written with OpenCV (mp4v) or FFmpeg (H.264)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 64, 48
BITS = 8  # frame numbers up to 255
BLOCK = WIDTH // BITS


def numbered_frame(number: int, video: int = 0) -> np.ndarray:
    """BGR frame: the top half shows `number` in binary (8 black or white blocks), the bottom half a colour of
    the video; survives H.264 / mp4v and JPEG."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[HEIGHT // 2:] = (40 + 30 * (video % 6), 90, 200 - 20 * (video % 6))
    for bit in range(BITS):
        if number >> bit & 1:
            frame[: HEIGHT // 2, bit * BLOCK:(bit + 1) * BLOCK] = 255
    return frame


def frame_number(frame: np.ndarray) -> int:
    """The number `numbered_frame` drew (any channel order, any size with the same aspect)."""
    height, width = frame.shape[:2]
    top = frame[: height // 2].mean(axis=2)
    block = width / BITS
    return sum(1 << bit for bit in range(BITS)
               if top[height // 8: height * 3 // 8, int(bit * block + block / 4): int((bit + 1) * block - block / 4)]
               .mean() > 128)


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_numbered_video(path: Path, n_frames: int, *, codec: str = "mp4v", fps: int = 10, video: int = 0) -> Path:
    """A video of `n_frames` numbered frames, mp4v through OpenCV or H.264 through FFmpeg (imageio-ffmpeg's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [numbered_frame(i, video) for i in range(n_frames)]
    if codec == "mp4v":
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (WIDTH, HEIGHT))
        for frame in frames:
            writer.write(frame)
        writer.release()
        return path
    command = [ffmpeg(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{WIDTH}x{HEIGHT}",
               "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "4", str(path)]
    subprocess.run(command, input=b"".join(frame.tobytes() for frame in frames), check=True)
    return path
