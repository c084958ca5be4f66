"""WebVid TFRecord store: conversion and reading throughput, bytes per clip, JPEG vs raw layout.

Synthetic videos (a drifting smooth texture with grain, so JPEG sizes are not those of flat colour) are
written with OpenCV, converted with frozen_tfrecord.py's `convert`, then read back through `WebVidDataset`
(12 frames -> uint8 [12, 3, 224, 224]) in one process, which is what one DataLoader worker does.

    .venv/bin/python bench/bench_webvid.py [--n_videos 32 --width 596 --height 336 --seconds 8 --workers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import frozen_tfrecord as ft  # noqa: E402
from dataloaders.webvid import WebVidDataset  # noqa: E402


def synthetic_frames(rng: np.random.Generator, width: int, height: int, n_frames: int) -> Iterator[np.ndarray]:
    """BGR uint8 frames of a smooth texture drifting 128 px over the clip, with per-pixel grain of +-6 levels."""
    texture = cv2.resize(rng.integers(0, 256, (height // 16, width // 16 + 8, 3), dtype=np.uint8),
                         (width + 128, height), interpolation=cv2.INTER_CUBIC)
    for frame_number in range(n_frames):
        shift = frame_number * 128 // n_frames
        frame = texture[:, shift : shift + width].astype(np.int16)
        frame += rng.integers(-6, 7, frame.shape, dtype=np.int16)
        yield np.clip(frame, 0, 255).astype(np.uint8)


def write_synthetic_videos(folder: Path, n_videos: int, width: int, height: int, seconds: int, fps: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(n_videos):
        frames = synthetic_frames(rng, width, height, seconds * fps)
        writer = cv2.VideoWriter(str(folder / f"{5_000_000 + number}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                 (width, height))
        for frame in frames:
            writer.write(frame)
        writer.release()
    rows = "".join(f"{5_000_000 + n},synthetic clip {n},1\n" for n in range(n_videos))
    (folder.parent / "train.csv").write_text("videoid,name,page_idx\n" + rows, encoding="utf-8")


def bench_conversion(root: Path, out: Path, workers: int, raw: bool) -> dict:
    args = ["--video_dir", str(root / "videos"), "--csv", str(root / "train.csv"), "--output_dir", str(out),
            "--workers", str(workers), "--no_progress"] + (["--raw"] if raw else [])
    start = time.perf_counter()
    summary = ft.convert(ft.parse_args(args))
    seconds = time.perf_counter() - start
    shard_bytes = sum(p.stat().st_size for p in out.glob("*.tfrecord"))
    return {"videos_per_s": summary.n_written / seconds, "bytes_per_clip": shard_bytes / summary.n_written}


def bench_reading(out: Path, image_size: int, passes: int, verify_crc: bool = True) -> float:
    torch.set_num_threads(1)  # as inside a DataLoader worker
    dataset = WebVidDataset(out / "frozen_train_labels.json", out / "path.index", max_words=32, max_frames=12,
                            image_size=image_size, slice_framepos=2, frame_order=0, seed=0, verify_crc=verify_crc)
    dataset[0]  # warm-up: tokenizer, file handles
    start = time.perf_counter()
    for _ in range(passes):
        for index in range(len(dataset)):
            sample = dataset[index]
            assert sample is not None and sample["video"].shape == (12, 3, image_size, image_size)
    return passes * len(dataset) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_videos", type=int, default=32)
    parser.add_argument("--width", type=int, default=596)  # WebVid previews are 596x336
    parser.add_argument("--height", type=int, default=336)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--read_passes", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_videos(root / "videos", args.n_videos, args.width, args.height, args.seconds, args.fps)
        results = {}
        for layout, raw in (("jpeg", False), ("raw", True)):
            in_process = bench_conversion(root, root / f"{layout}_in_process", 0, raw)
            results[layout] = bench_conversion(root, root / layout, args.workers, raw)
            results[layout]["videos_per_s_one_process"] = in_process["videos_per_s"]
            results[layout]["read_clips_per_s_per_worker"] = bench_reading(root / layout, args.image_size,
                                                                           args.read_passes)
            results[layout]["read_clips_per_s_no_crc"] = bench_reading(root / layout, args.image_size,
                                                                       args.read_passes, verify_crc=False)
    print(f"{args.n_videos} synthetic videos {args.width}x{args.height}, {args.seconds} s at {args.fps} fps. "
          f"Conversion: in this process (--workers 0), and with --workers {args.workers} including the worker "
          f"start-up. Reading: 1 process, to uint8 [12, 3, {args.image_size}, {args.image_size}], with the "
          f"record CRCs checked (the training default) and without.")
    print(f"{'layout':8} {'convert videos/s 1 proc':>24} {f'convert videos/s {args.workers} workers':>27} "
          f"{'read clips/s/worker':>20} {'no CRC check':>13} {'CRC cost':>9} {'KiB per clip':>13}")
    for layout, numbers in results.items():
        cost = numbers["read_clips_per_s_no_crc"] / numbers["read_clips_per_s_per_worker"] - 1
        print(f"{layout:8} {numbers['videos_per_s_one_process']:24.1f} {numbers['videos_per_s']:27.1f} "
              f"{numbers['read_clips_per_s_per_worker']:20.1f} {numbers['read_clips_per_s_no_crc']:13.1f} "
              f"{100 * cost:8.1f}% {numbers['bytes_per_clip'] / 1024:13.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
