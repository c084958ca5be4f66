"""Conversion cost per clip beside the decoding limit, per kind of source, one process, one thread.

Three kinds of H.264 source (libx264 `-preset fast`, its default keyframe interval of 250 frames and B-frames, of
FFmpeg's moving test pattern with light grain; about 0.7 Mbit/s at 596x336, as WebVid's previews):

* short clips: WebVid-like, 596x336, 8 s at 25 fps, one clip each (12 frames over the whole video);
* long videos, whole: 640x360, 4 minutes at 25 fps, a keyframe every 5 s (`--long_keyint`), one clip each;
* long sources with windows: the same long videos, 10 windows of 5-10 s each (Panda-70M, InternVid), a clip each.

For each kind, in one run, CPU ms per clip (process time, one FFmpeg and one OpenCV thread; the least of
`--rounds` rounds, each measuring every path in turn):

* `sequential`: the conversion as it was, every frame decoded from the first (OpenCV, `--decoder opencv`);
* `default`: the conversion (PyAV decoding only the frames the sampled ones depend on), byte-identical records;
* `swscale`: the default with `--resize swscale`;
* `decoding limit`: decoding only the frames the sampled ones depend on and nothing else: the packets demuxed once
  into memory, each sampled frame decoded from the keyframe at or before it, non-reference frames that are not
  sampled skipped, nothing after the last; no colour conversion, resize or JPEG (an independent loop, not the
  converter's code);
* `necessary work`: the limit plus what the default must do to the kept frames, each timed in the same run:
  colour conversion to BGR, the INTER_AREA resize to short side 256 and JPEG q 90.

Targets (docs/speed.md): default <= 1.15 x necessary work on short clips and windows; swscale >= 85% of the
limit's rate on short clips; long sources >= 3x the sequential rate. Then the start-up of a conversion worker
process (its imports), against importing torch and torchvision, which a worker paid when the converter's decoders
lived beside the training loaders.

    .venv/bin/python bench/bench_corpora.py [--n_short 48 --n_long 2 --long_seconds 240 --long_keyint 125]
"""

from __future__ import annotations

import argparse
import bisect
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import frozen_tfrecord as ft  # noqa: E402
from conversion.convert import use_one_decoding_thread  # noqa: E402
from conversion.decoders import clip_positions, scaled_size  # noqa: E402

SHORT_SIDE, QUALITY, NUM_FRAMES = 256, 90, 12


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_h264(path: Path, width: int, height: int, seconds: int, fps: int, keyint: int = 250) -> Path:
    pattern = f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds},noise=alls=4:allf=t"
    subprocess.run([ffmpeg(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", pattern, "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-preset", "fast", "-g", str(keyint), str(path)], check=True)
    return path


def windows_of(seconds: int, count: int = 10) -> list[tuple[float, float]]:
    """`count` windows of 5-10 s spread over a source (Panda-70M's clips of a video)."""
    rng = np.random.default_rng(seconds)
    starts = np.linspace(0, seconds - 10, count)
    return [(round(float(s), 3), round(float(s + rng.uniform(5, 10)), 3)) for s in starts]


def cpu_ms(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return (time.process_time() - start) * 1000


def convert_ms(folder: Path, table: Path, windowed: bool, out: Path, extra: list[str]) -> float:
    """CPU ms of a whole conversion (decode, sample, JPEG, write, verify) in this process."""
    windows = ["--start_column", "start", "--end_column", "end"] if windowed else []
    args = ["--video_dir", str(folder), "--table", str(table), "--video_column", "path", "--caption_column",
            "caption", *windows, "--output_dir", str(out), "--workers", "0", "--no_progress", *extra]
    summary = None

    def run() -> None:
        nonlocal summary
        summary = ft.convert(ft.parse_args(args))

    ms = cpu_ms(run)
    if summary.failures.get("bad_video") or not summary.n_written:
        raise RuntimeError(summary.report())
    return ms


def wanted_positions(stream, windows: list[tuple[float, float] | None]) -> list[int]:
    fps = float(stream.average_rate)
    return sorted({p for window in windows for p in clip_positions(stream.frames, fps, NUM_FRAMES, window)})


def decode_limit(path: Path, windows: list[tuple[float, float] | None]) -> tuple[list, float, int]:
    """The sampled frames (PyAV frames, not converted), the CPU ms and the number of frames decoded, decoding only
    what they depend on: per keyframe that some sampled frame needs, one run from it to its last sampled frame."""
    import av

    frames, decoded = [], 0

    def run() -> None:
        nonlocal decoded
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            codec = stream.codec_context
            codec.thread_count = 1
            stream.thread_type = "AUTO"  # as the converter's decoder (one thread either way)
            packets = [packet for packet in container.demux(stream) if packet.size]
            by_time = sorted(range(len(packets)), key=lambda i: packets[i].pts)
            wanted = {packets[by_time[p]].pts for p in wanted_positions(stream, windows)}
            keys = [i for i, packet in enumerate(packets) if packet.is_keyframe]
            runs: dict[int, int] = {}  # keyframe -> the last packet of a sampled frame that needs it
            for i, packet in enumerate(packets):
                if packet.pts in wanted:
                    start = keys[bisect.bisect_right(keys, i) - 1]
                    runs[start] = i
            for start, end in sorted(runs.items()):
                codec.flush_buffers()
                out = []
                for packet in packets[start:end + 1]:
                    codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                    out += codec.decode(packet)
                out += codec.decode(None)
                decoded += len(out)
                frames.extend(frame for frame in out if frame.pts in wanted)

    ms = cpu_ms(run)
    return frames, ms, decoded


def kept_frame_work(frames: list) -> tuple[float, float, float]:
    """CPU ms of the colour conversion, the INTER_AREA resize and the JPEG encoding of the kept frames."""
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()  # one for all frames, as the converter does: it keeps its swscale context
    images: list[np.ndarray] = []
    convert = cpu_ms(lambda: images.extend(reformatter.reformat(frame, format="bgr24").to_ndarray()
                                           for frame in frames))
    height, width = scaled_size(images[0].shape[:2], SHORT_SIDE)
    resized: list[np.ndarray] = []
    resize = cpu_ms(lambda: resized.extend(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
                                           for image in images))
    jpeg = cpu_ms(lambda: [cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, QUALITY]) for image in resized])
    return convert, resize, jpeg


def sequential_frames_decoded(path: Path, windows: list[tuple[float, float] | None]) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return max(wanted_positions(stream, windows)) + 1


def measure_kind(root: Path, name: str, videos: list[Path], windows: list[tuple[float, float] | None],
                 rounds: int) -> dict:
    """The least CPU ms per clip over `rounds` rounds, each measuring every path once in turn (a shared machine's
    slower spells fall on all of them; the least is the estimate least inflated by them, as timeit's)."""
    table = root / f"{name}.csv"
    windowed = windows != [None]
    if not windowed:
        rows = ["path,caption"] + [f"{video.name},a clip" for video in videos]
    else:
        rows = ["path,caption,start,end"] + [f"{video.name},clip {k},{w[0]},{w[1]}"
                                             for video in videos for k, w in enumerate(windows)]
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    clips = len(videos) * len(windows)
    samples: dict[str, list[float]] = {}
    for number in range(rounds):
        for label, extra in (("sequential", ["--decoder", "opencv"]), ("default", []),
                             ("swscale", ["--resize", "swscale"])):
            out = root / f"{name}-{label}-{number}"
            samples.setdefault(label, []).append(convert_ms(videos[0].parent, table, windowed, out, extra) / clips)
        parts = dict.fromkeys(("limit", "colour", "resize", "jpeg"), 0.0)
        decoded = sequential = 0
        for video in videos:
            frames, ms, n = decode_limit(video, windows)
            colour, resize, jpeg = kept_frame_work(frames)
            for key, value in zip(parts, (ms, colour, resize, jpeg)):
                parts[key] += value
            decoded += n
            sequential += sequential_frames_decoded(video, windows)
        for key, value in parts.items():
            samples.setdefault(key, []).append(value / clips)
    result = {key: min(values) for key, values in samples.items()}
    result["necessary"] = result["limit"] + result["colour"] + result["resize"] + result["jpeg"]
    same = all((root / f"{name}-default-0" / f).read_bytes() == (root / f"{name}-sequential-0" / f).read_bytes()
               for f in ("path.index", "path-00000.tfrecord"))
    result.update(clips=clips, decoded=decoded / len(videos), sequential_decoded=sequential / len(videos),
                  same=same)
    return result


def startup_ms() -> tuple[float, float]:
    """CPU ms of a fresh interpreter importing what a conversion worker imports, and of one importing torch and
    torchvision."""
    def child_cpu(code: str) -> float:
        command = [sys.executable, "-c", f"import resource, sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r}); "
                   f"{code}; usage = resource.getrusage(resource.RUSAGE_SELF); "
                   f"print((usage.ru_utime + usage.ru_stime) * 1000)"]
        return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])

    worker = child_cpu("import frozen_tfrecord, conversion.convert, conversion.webdataset_input; "
                       "assert 'torch' not in sys.modules")
    torch = child_cpu("import torch, torchvision")
    return worker, torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_short", type=int, default=48,
                        help="short clips; a conversion's fixed cost (its folder, index and labels) is spread over them")
    parser.add_argument("--n_long", type=int, default=2)
    parser.add_argument("--long_seconds", type=int, default=240)
    parser.add_argument("--long_keyint", type=int, default=125,
                        help="frames between the long sources' keyframes (125: 5 s, as streaming encodes)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of all paths in turn; the least reported")
    parser.add_argument("--short_size", default="596x336")
    parser.add_argument("--long_size", default="640x360")
    args = parser.parse_args(argv)
    if min(args.n_short, args.n_long, args.rounds) < 1 or args.long_seconds < 20:
        parser.error("need --n_short, --n_long, --rounds >= 1 and --long_seconds >= 20")
    short_size = tuple(int(v) for v in args.short_size.split("x"))
    long_size = tuple(int(v) for v in args.long_size.split("x"))
    use_one_decoding_thread()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder in ("short", "long", "warm-up"):
            (root / folder).mkdir()
        short = [write_h264(root / "short" / f"s{n:03d}.mp4", *short_size, 8, 25) for n in range(args.n_short)]
        long = [write_h264(root / "long" / f"l{n:03d}.mp4", *long_size, args.long_seconds, 25, args.long_keyint)
                for n in range(args.n_long)]
        # the first conversion in a process imports and sets up what every later one reuses: not per-clip cost
        measure_kind(root, "warm-up", [write_h264(root / "warm-up" / "w.mp4", 64, 48, 1, 25)], [None], 1)
        kinds = {"short clips": measure_kind(root, "short", short, [None], args.rounds),
                 "long videos, whole": measure_kind(root, "whole", long, [None], args.rounds),
                 "long sources, 10 windows": measure_kind(root, "windows", long, windows_of(args.long_seconds),
                                                          args.rounds)}
    worker, torch = startup_ms()
    print(f"H.264 (libx264 -preset fast): short clips {args.short_size} 8 s 25 fps x {args.n_short} (keyframe "
          f"interval 250); long {args.long_size} {args.long_seconds} s 25 fps x {args.n_long} (keyframe interval "
          f"{args.long_keyint}); one process, one thread; CPU ms per clip, the least of {args.rounds} interleaved rounds")
    header = ("kind", "clips", "sequential", "default", "swscale", "limit", "colour", "resize", "jpeg",
              "necessary", "default/nec", "swscale/limit rate", "vs sequential", "frames decoded", "same bytes")
    print(" | ".join(header))
    for kind, r in kinds.items():
        print(" | ".join([kind, str(r["clips"])] + [f"{r[key]:.1f}" for key in
                         ("sequential", "default", "swscale", "limit", "colour", "resize", "jpeg", "necessary")]
                         + [f"{r['default'] / r['necessary']:.2f}", f"{r['limit'] / r['swscale']:.0%}",
                            f"{r['sequential'] / r['default']:.1f}x",
                            f"{r['decoded']:.0f} of {r['sequential_decoded']:.0f}", str(r["same"])]))
    print(f"start-up of a conversion worker (its imports): {worker:.0f} ms CPU; importing torch + torchvision: "
          f"{torch:.0f} ms CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
