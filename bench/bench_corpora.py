"""Conversion rate from video2dataset webdataset shards (PyAV, from memory) beside from files (OpenCV), on the
same H.264 videos, next to the time FFmpeg itself needs to decode the frames each path must decode.

Synthetic videos (the drifting grainy texture of bench_webvid.py) are encoded with libx264 (imageio-ffmpeg's
FFmpeg), packed into webdataset shards (<key>.mp4, .txt, .json) and listed in a WebVid csv beside the files. Both
conversions run in one worker process with one FFmpeg thread (`--workers 1`: the per-process rate; the spawn of
the worker is timed out). The decoding limit decodes, in the same process, the frames a conversion must decode:
every frame up to the last sampled one (positions are exact, so each video is decoded sequentially), once with
PyAV alone (no colour conversion, no JPEG) and once with `ffmpeg -threads 1 -i <file> -f null -` (the whole
video, process start included). The ratio says how close conversion comes to decoding alone.

    .venv/bin/python bench/bench_corpora.py [--n_videos 24 --width 596 --height 336 --seconds 8 --fps 25]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import frozen_tfrecord as ft  # noqa: E402
from bench.bench_webvid import synthetic_frames  # noqa: E402
from conversion.convert import use_one_decoding_thread  # noqa: E402
from conversion.decoders import sample_positions  # noqa: E402


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_h264(path: Path, frames, width: int, height: int, fps: int) -> None:
    command = [ffmpeg(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}",
               "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "fast", str(path)]
    subprocess.run(command, input=b"".join(frame.tobytes() for frame in frames), check=True)


def make_corpus(root: Path, n_videos: int, width: int, height: int, seconds: int, fps: int) -> None:
    """videos/<id>.mp4 + train.csv, and the same samples as webdataset shards of 8."""
    import webdataset

    rng = np.random.default_rng(0)
    (root / "videos").mkdir(parents=True)
    (root / "shards").mkdir()
    rows = []
    for number in range(n_videos):
        video_id = str(6_000_000 + number)
        write_h264(root / "videos" / f"{video_id}.mp4", synthetic_frames(rng, width, height, seconds * fps), width,
                   height, fps)
        rows.append((video_id, f"synthetic clip {number}"))
    (root / "train.csv").write_text("videoid,name\n" + "".join(f"{i},{c}\n" for i, c in rows), encoding="utf-8")
    for shard in range(0, n_videos, 8):
        with webdataset.TarWriter(str(root / "shards" / f"{shard // 8:05d}.tar")) as writer:
            for index, (video_id, caption) in enumerate(rows[shard:shard + 8]):
                key = f"{shard // 8:05d}{index:04d}"
                writer.write({"__key__": key, "mp4": (root / "videos" / f"{video_id}.mp4").read_bytes(),
                              "txt": caption, "json": json.dumps({"key": key, "status": "success",
                                                                  "videoid": video_id}).encode()})


def conversion_rate(args: list[str], n_videos: int) -> float:
    """Videos/s of a whole conversion (decode, sample, JPEG, write, verify) in this process."""
    start = time.perf_counter()
    summary = ft.convert(ft.parse_args([*args, "--workers", "0", "--no_progress"]))
    seconds = time.perf_counter() - start
    if summary.n_written != n_videos:
        raise RuntimeError(f"converted {summary.n_written} of {n_videos} videos: {summary.report()}")
    return n_videos / seconds


def pyav_decode_rate(videos: list[Path], num_frames: int) -> float:
    """Videos/s decoding with PyAV alone every frame up to the last one a conversion samples, one thread."""
    import av

    start = time.perf_counter()
    for path in videos:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            last = sample_positions(stream.frames, num_frames)[-1]
            for position, _ in enumerate(container.decode(stream)):
                if position >= last:
                    break
    return len(videos) / (time.perf_counter() - start)


def ffmpeg_decode_rate(videos: list[Path]) -> float:
    start = time.perf_counter()
    for path in videos:
        subprocess.run([ffmpeg(), "-loglevel", "error", "-threads", "1", "-i", str(path), "-f", "null", "-"],
                       check=True)
    return len(videos) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_videos", type=int, default=24)
    parser.add_argument("--width", type=int, default=596)
    parser.add_argument("--height", type=int, default=336)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--fps", type=int, default=25)
    args = parser.parse_args(argv)
    if min(args.n_videos, args.width, args.height, args.seconds, args.fps) < 1:
        parser.error("every size and count must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root, args.n_videos, args.width, args.height, args.seconds, args.fps)
        videos = sorted((root / "videos").glob("*.mp4"))
        use_one_decoding_thread()
        files = conversion_rate(["--video_dir", str(root / "videos"), "--csv", str(root / "train.csv"),
                                          "--output_dir", str(root / "from_files")], args.n_videos)
        shards = conversion_rate(["--webdataset", str(root / "shards"), "--id_field", "videoid",
                                     "--output_dir", str(root / "from_shards")], args.n_videos)
        same = all((root / "from_files" / name).read_bytes() == (root / "from_shards" / name).read_bytes()
                   for name in ("frozen_train_labels.json",))
        decode = pyav_decode_rate(videos, 12)
        ffmpeg_rate = ffmpeg_decode_rate(videos)
    print(f"{args.n_videos} H.264 videos {args.width}x{args.height}, {args.seconds} s at {args.fps} fps; one process, "
          f"one FFmpeg thread")
    print(f"{'path':58} {'videos/s':>9} {'of decoding alone':>18}")
    print(f"{'convert from files (OpenCV, --video_dir + --csv)':58} {files:9.2f} {files / decode:17.0%}")
    print(f"{'convert from webdataset shards (PyAV from memory)':58} {shards:9.2f} {shards / decode:17.0%}")
    print(f"{'decoding alone: PyAV, frames up to the last sampled one':58} {decode:9.2f} {1:17.0%}")
    print(f"{'decoding alone: ffmpeg -threads 1 -f null (whole video)':58} {ffmpeg_rate:9.2f} "
          f"{ffmpeg_rate / decode:17.0%}")
    print(f"same labels from both paths: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
