"""Downstream loading: decoding raw videos every epoch vs reading the decode-once frame store.

Synthetic MSR-VTT-like videos (320x240, 15 s at 30 fps, a drifting texture with grain; H.264 through the
ffmpeg command when it is installed, else OpenCV's mp4v) are converted with
`frozen_tfrecord.py --feature_framerate 1`, then one dataset sample after another is read the way MSR-VTT
fine-tuning reads them (1 frame per second, 12 frames by linspace with repeats, 224 px, uint8), from the videos
and from the store, in one process pinned to one core with one torch thread: what one DataLoader worker does.
The first clips of both paths are compared and must be equal.

    .venv/bin/python bench/bench_frame_store.py [--n_videos 16 --seconds 15 --codec h264]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import frozen_tfrecord as ft  # noqa: E402
from bench.bench_webvid import synthetic_frames  # noqa: E402
from dataloaders.raw_video_text import PairsDataset  # noqa: E402


def write_video(path: Path, codec: str, rng: np.random.Generator, width: int, height: int, seconds: int,
                fps: int) -> None:
    frames = synthetic_frames(rng, width, height, seconds * fps)
    if codec == "mp4v":
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        for frame in frames:
            writer.write(frame)
        writer.release()
        return
    command = ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}",
               "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "fast", str(path)]
    with subprocess.Popen(command, stdin=subprocess.PIPE) as process:
        for frame in frames:
            process.stdin.write(frame.tobytes())
        process.stdin.close()
        if process.wait() != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}")


def read_rate(dataset: PairsDataset, passes: int) -> float:
    dataset[0]  # warm-up: tokenizer, file handles
    start = time.perf_counter()
    for _ in range(passes):
        for index in range(len(dataset)):
            assert dataset[index] is not None
    return passes * len(dataset) / (time.perf_counter() - start)


def as_one_worker(measure):
    """Run `measure` on one core with one torch thread (what a DataLoader worker gets), then restore both."""
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {min(cores)})
    torch.set_num_threads(1)
    try:
        return measure()
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_videos", type=int, default=16)
    parser.add_argument("--width", type=int, default=320)  # MSR-VTT videos are 320x240
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--seconds", type=int, default=15)  # MSR-VTT clips last 10-30 s
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--codec", choices=("h264", "mp4v"), default="h264" if shutil.which("ffmpeg") else "mp4v")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args(argv)
    if args.codec == "h264" and not shutil.which("ffmpeg"):
        parser.error("--codec h264 needs the ffmpeg command (apt-get install ffmpeg); or use --codec mp4v")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        videos = root / "videos"
        videos.mkdir()
        rng = np.random.default_rng(0)
        for number in range(args.n_videos):
            write_video(videos / f"video{number}.mp4", args.codec, rng, args.width, args.height, args.seconds, args.fps)
        start = time.perf_counter()
        summary = ft.convert(ft.parse_args(["--video_dir", str(videos), "--feature_framerate", "1", "--image_size",
                                            str(args.image_size), "--output_dir", str(root / "store"),
                                            "--workers", "0", "--no_progress"]))
        convert_rate = summary.n_written / (time.perf_counter() - start)
        video_bytes = sum(p.stat().st_size for p in videos.iterdir())
        store_bytes = sum(p.stat().st_size for p in (root / "store").glob("*.tfrecord"))

        pairs = [(f"video{n}", f"caption {n}") for n in range(args.n_videos)]
        options = dict(feature_framerate=1, max_frames=12, image_size=args.image_size, pad_mode="repeat")
        raw = PairsDataset(pairs, videos, **options)
        stored = PairsDataset(pairs, videos, frame_store=root / "store", **options)
        for index in range(min(4, len(pairs))):
            assert torch.equal(raw[index]["video"], stored[index]["video"]), "the store must give the decoded frames"
        rates = as_one_worker(lambda: {"raw videos": read_rate(raw, args.passes),
                                       "frame store": read_rate(stored, args.passes)})
    print(f"{args.n_videos} synthetic videos {args.width}x{args.height}, {args.seconds} s at {args.fps} fps, "
          f"{args.codec}. Reading as MSR-VTT fine-tuning does (1 frame/s, 12 frames, {args.image_size} px), one "
          f"process on one core with one torch thread. Store written in this process at "
          f"{convert_rate:.2f} videos/s.")
    print(f"{'source':12} {'clips/s per worker':>19} {'ratio':>6} {'KiB per video on disk':>22}")
    sizes = {"raw videos": video_bytes, "frame store": store_bytes}
    for name, rate in rates.items():
        print(f"{name:12} {rate:19.1f} {rate / rates['raw videos']:5.2f}x {sizes[name] / args.n_videos / 1024:22.1f}")
    print(json.dumps({"clips_per_s": rates, "convert_videos_per_s": convert_rate, "bytes": sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
