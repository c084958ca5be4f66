"""`frozen_tfrecord.py --resize swscale` against the default: per decoded frame, the colour conversion and the
scaling to the short side (256), and how far the fused result's pixels are from the default's (PSNR).

    python bench/bench_resize.py [--frames 60]

The sources are H.264 made here with FFmpeg's test pattern (testsrc2: sharp edges and text, a hard case for
resizing) at 1280x720 and 596x336; one thread.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conversion.decoders import scaled_size  # noqa: E402

SHORT_SIDE = 256


def make_video(path: Path, size: str, frames: int) -> Path:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={size}:rate=30", "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt",
                    "yuv420p", str(path)], check=True)
    return path


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def measure(path: Path) -> dict[str, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        frames = list(container.decode(stream))
    height, width = scaled_size((frames[0].height, frames[0].width), SHORT_SIDE)
    start = time.perf_counter()
    default = [cv2.resize(frame.to_ndarray(format="bgr24"), (width, height), interpolation=cv2.INTER_AREA)
               for frame in frames]
    default_ms = 1000 * (time.perf_counter() - start) / len(frames)
    start = time.perf_counter()
    fused = [frame.to_ndarray(format="bgr24", width=width, height=height, interpolation="AREA") for frame in frames]
    fused_ms = 1000 * (time.perf_counter() - start) / len(frames)
    values = [psnr(a, b) for a, b in zip(default, fused)]
    return {"default_ms": default_ms, "fused_ms": fused_ms, "psnr_min": min(values), "psnr_mean": float(np.mean(values))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as folder:
        for size in ("1280x720", "596x336"):
            result = measure(make_video(Path(folder) / f"{size}.mp4", size, args.frames))
            print(f"{size} -> short side {SHORT_SIDE}: default {result['default_ms']:.2f} ms/frame, swscale "
                  f"{result['fused_ms']:.2f} ms/frame ({result['default_ms'] / result['fused_ms']:.1f}x); PSNR of "
                  f"swscale against the default: mean {result['psnr_mean']:.1f} dB, min {result['psnr_min']:.1f} dB")


if __name__ == "__main__":
    main()
