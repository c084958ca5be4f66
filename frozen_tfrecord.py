"""Convert WebVid videos (or pre-extracted frame folders) into TFRecord shards + index + labels (METHOD §9.1).

Run `python frozen_tfrecord.py --help` for the full description.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import logging
import multiprocessing
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from dataloaders.files import file_sha256
from dataloaders.frame_store import FrameStoreManifest, manifest_path
from dataloaders.tfrecord_io import write_record
from dataloaders.video import VideoDecodeError, read_sampled_frames, resize_center_crop
from dataloaders.webvid import RAW_SIDE, encode_image_clip_record, encode_raw_clip_record
from modules.errors import InputError

logger = logging.getLogger("frozen_tfrecord")

DEFAULT_OUTPUT_DIR = "./WebVid_TFRecord"
VIDEO_EXTENSIONS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts"}
FRAME_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
_VALID_ID = re.compile(r"[^\s/\\]+")

DESCRIPTION = """\
Convert WebVid into the TFRecord frame store that stage-1/2 pre-training reads (METHOD §9.1).

Inputs (one of):
  --video_dir DIR   downloaded videos, found by walking DIR once; the video id is the file name without its
                    extension, so both WebVid's videos/<page_dir>/<videoid>.mp4 and a flat DIR/<videoid>.mp4 work.
  --frames_dir DIR  (alias --input_dir) the original's input: one folder of pre-extracted frames per video,
                    DIR/<videoid>/*.jpg|png, read in sorted file-name order.
  --csv FILE        WebVid metadata (results_2M_train.csv, results_2M_val.csv, results_10M_*.csv; repeat the flag
                    for several). Columns are picked by name (videoid, name), so both the 2M and 10M column
                    orders work; quoted captions with commas/newlines are fine. With --csv only the listed ids are
                    converted and their captions go into the labels file; a csv id without a video is reported as
                    missing. Without --csv every video/folder found is converted and no labels file is written.

Frames: --num_frames (12) frames sampled uniformly over the video (the middle frame of each of 12 equal
segments; every frame when the video has fewer; 0 = keep every frame). Videos are decoded with OpenCV's FFmpeg
backend by reading sequentially up to the last sampled frame (exact positions, no keyframe-seeking errors).
Default layout: each frame JPEG-encoded (--jpeg_quality) with its shorter side scaled down to --short_side
(never up), in a tf.train.Example with keys video_id, num_frames, height, width, frame_format, frame_indices,
frames (see dataloaders/webvid.py). --raw writes the original's layout instead: one `image` feature with the raw
N x 256 x 256 x 3 BGR bytes (bilinear resize, aspect not kept; about 2.4 MB per 12-frame clip).

FRAME STORE (--feature_framerate N): a decode-once store for fine-tuning (MSR-VTT, MSVD, LSMDC, DiDeMo,
captioning, QA; pass it as --frame_store). Every video under --video_dir is decoded once with the fine-tuning
loaders' own sampler (N frames per second, 0 = every frame), each frame resized and center-cropped to
--image_size as they do, and stored as PNG (lossless; --frame_format jpeg for a smaller, slightly different
store) with its frame number and the video's fps. The loaders then read these frames instead of the video and
apply their usual selection, order, time window and padding: the same clips as decoding the videos. The store
also gets <name>.frame_store.json with the sampling; a run whose --feature_framerate or input size differs
refuses the store. Records are keyed by file name without extension; --csv, if given, limits the store to its ids.

Outputs in --output_dir (default ./WebVid_TFRecord, the training scripts' default --dir_path):
  <name>-00000.tfrecord ...     --shard_size (1000) videos per shard; standard TFRecord framing, masked CRC32C
  <name>.index                  video_id<TAB>shard file (relative to the index's folder)<TAB>byte offset
  frozen_train_labels.json      [{"video_id", "caption"}] for the videos actually written (with --csv)
  failures.tsv                  every skipped row/video: kind, video id, where (file:line or path), detail
  <name>-00000.meta.json ...    per-shard sidecars (resume state; the final files are assembled from them)

Shards are planned from the sorted list of ids, so the same inputs always give the same shards. Each shard is
written under a temporary name and renamed when complete; its sidecar is written atomically afterwards. A
re-run skips the shards whose sidecar matches the plan and the options, so an interrupted conversion resumes
and ends with files byte-identical to an uninterrupted run. Undecodable or missing videos and malformed csv rows
are logged and skipped, never fatal. Exit status: 0 when every shard is complete, 1 when no video was written or
an I/O error stopped the run (re-run to resume), 2 for bad input (a missing folder or csv).

The output folder can be moved, mounted elsewhere or copied to s3://bucket/prefix/ as it is: readers resolve
shard paths against the index's location (read_frames / WebVidDataset accept s3:// paths; boto3 settings such
as AWS_ENDPOINT_URL come from the environment).

Examples:
  python frozen_tfrecord.py --video_dir webvid/videos --csv webvid/results_2M_train.csv --workers 16
  python frozen_tfrecord.py --frames_dir webvid_frames --csv results_2M_train.csv --csv results_2M_val.csv --raw
  python main_task_clip.py --data_path WebVid_TFRecord/frozen_train_labels.json --dir_path WebVid_TFRecord ...
  python frozen_tfrecord.py --video_dir MSRVTT/videos/all --feature_framerate 1 --output_dir MSRVTT/frame_store
"""


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Failure:
    kind: str  # malformed_row | duplicate_id | missing_video | bad_video
    video_id: str
    where: str
    detail: str

    def tsv_line(self) -> str:
        fields = (self.kind, self.video_id, self.where, self.detail)
        return "\t".join(" ".join(str(f).split()) for f in fields)


@dataclass
class CsvLabels:
    captions: dict[str, str] = field(default_factory=dict)  # first occurrence of each id, in file order
    failures: list[Failure] = field(default_factory=list)
    n_rows: int = 0


class CsvHeaderError(InputError, ValueError):
    """A csv file lacks the columns that name the video id and the caption."""


def read_webvid_csvs(paths: Iterable[str | Path]) -> CsvLabels:
    """Captions by video id from WebVid csvs (header required; columns `videoid` and `name` picked by name)."""
    labels = CsvLabels()
    for path in paths:
        _read_webvid_csv(Path(path), labels)
    return labels


def _read_webvid_csv(path: Path, labels: CsvLabels) -> None:
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if "videoid" not in header or "name" not in header:
            raise CsvHeaderError(f"{path}: the header must name the columns 'videoid' and 'name', got {header}")
        id_column, caption_column = header.index("videoid"), header.index("name")
        record_start = reader.line_num + 1
        while True:
            where = f"{path}:{record_start}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                labels.failures.append(Failure("malformed_row", "", where, f"csv error: {error}"))
                continue
            finally:
                record_start = reader.line_num + 1
            if row:  # a blank line has no cells; a row of empty cells (",,,,") is reported by _add_row
                labels.n_rows += 1
                _add_row(row, len(header), id_column, caption_column, where, labels)


def _add_row(row: list[str], n_columns: int, id_column: int, caption_column: int, where: str,
             labels: CsvLabels) -> None:
    video_id = row[id_column].strip() if id_column < len(row) else ""
    if len(row) != n_columns:
        problem = f"{len(row)} fields, the header has {n_columns}"
    elif not _VALID_ID.fullmatch(video_id):
        problem = f"invalid video id {video_id!r}"
    elif not row[caption_column].strip():
        problem = "empty caption"
    elif video_id in labels.captions:
        labels.failures.append(Failure("duplicate_id", video_id, where, "id seen before; first row kept"))
        return
    else:
        labels.captions[video_id] = row[caption_column].strip()
        return
    labels.failures.append(Failure("malformed_row", video_id, where, problem))


def find_videos(video_dir: str | Path) -> dict[str, str]:
    """`video_id -> path` for every video file under `video_dir` (one walk; id = file name without extension)."""
    found: dict[str, str] = {}
    visited = set()
    for root, dirs, files in os.walk(video_dir, followlinks=True):
        if os.path.realpath(root) in visited:  # a symlinked folder seen before (or a link loop)
            dirs.clear()
            continue
        visited.add(os.path.realpath(root))
        dirs.sort()
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if extension.lower() in VIDEO_EXTENSIONS:
                path = os.path.join(root, name)
                if stem in found:
                    logger.warning("video id %s found twice: using %s, ignoring %s", stem, found[stem], path)
                else:
                    found[stem] = path
    return found


def find_frame_folders(frames_dir: str | Path) -> dict[str, str]:
    """`video_id -> folder` for every sub-folder of `frames_dir` (the original's <input_dir>/<videoid>/)."""
    return {entry.name: entry.path for entry in os.scandir(frames_dir) if entry.is_dir()}


# ----------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class EncodeOptions:
    num_frames: int = 12
    short_side: int = 256
    jpeg_quality: int = 90
    raw: bool = False
    frame_format: str = "jpeg"
    feature_framerate: int | None = None  # set: a downstream frame store (dataloaders/frame_store.py)
    image_size: int = 224  # frame store: the loader's resize + center crop

    @property
    def is_frame_store(self) -> bool:
        return self.feature_framerate is not None

    def recorded(self) -> dict:
        """The options a shard's sidecar records; WebVid sidecars keep the form they had before frame stores."""
        options = asdict(self)
        if not self.is_frame_store:
            for key in ("feature_framerate", "image_size") + (("frame_format",) if self.frame_format == "jpeg" else ()):
                options.pop(key)
        return options


def sample_positions(n_available: int, n_wanted: int) -> list[int]:
    """The middle of each of `n_wanted` equal segments; every position when there are not more than that."""
    if n_wanted <= 0 or n_available <= n_wanted:
        return list(range(n_available))
    return [int((i + 0.5) * n_available / n_wanted) for i in range(n_wanted)]


def read_video_frames(path: str, num_frames: int) -> tuple[list[np.ndarray], list[int]]:
    """Uniformly sampled BGR frames of a video and their frame positions."""
    if not os.path.exists(path):
        raise VideoDecodeError(f"file not found: {path}")
    frame_count = _open_video(path, lambda capture: int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
    if frame_count <= 0:  # no (or a bogus) count in the container: count by decoding
        frame_count = _open_video(path, lambda capture: _grab_positions(capture, [])[1])
    positions = sample_positions(frame_count, num_frames)
    frames, n_decoded = _open_video(path, lambda capture: _grab_positions(capture, positions))
    if len(frames) < len(positions):  # the container over-reported its frame count
        if n_decoded == 0:
            raise VideoDecodeError(f"no frame could be decoded: {path}")
        positions = sample_positions(n_decoded, num_frames)
        frames, _ = _open_video(path, lambda capture: _grab_positions(capture, positions))
        positions = positions[: len(frames)]
    if not frames:
        raise VideoDecodeError(f"no frame could be decoded: {path}")
    return frames, positions


def _open_video(path: str, use: Callable[[cv2.VideoCapture], object]):
    params = [cv2.CAP_PROP_N_THREADS, _decode_threads] if _decode_threads else []
    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG, params)
    try:
        if not capture.isOpened():
            raise VideoDecodeError(f"cannot open video (corrupt or not a video?): {path}")
        return use(capture)
    finally:
        capture.release()


def _grab_positions(capture: cv2.VideoCapture, positions: list[int]) -> tuple[list[np.ndarray], int]:
    """Decode sequentially; keep the frames at `positions` (sorted). With no positions, decode to the end."""
    wanted = set(positions)
    last = positions[-1] if positions else None
    frames, position = [], 0
    while last is None or position <= last:
        if not capture.grab():
            break
        if position in wanted:
            ok, frame = capture.retrieve()
            if not ok or frame is None:
                break
            frames.append(frame)
        position += 1
    return frames, position


def read_folder_frames(folder: str, num_frames: int) -> tuple[list[np.ndarray], list[int]]:
    """Uniformly sampled BGR frames of a frame folder (sorted file names) and their positions in that order."""
    if not os.path.isdir(folder):
        raise VideoDecodeError(f"frame folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in FRAME_EXTENSIONS)
    if not names:
        raise VideoDecodeError(f"no image files in {folder}")
    positions = sample_positions(len(names), num_frames)
    frames = []
    for position in positions:
        frame = cv2.imread(os.path.join(folder, names[position]), cv2.IMREAD_COLOR)
        if frame is None:
            raise VideoDecodeError(f"unreadable image {names[position]} in {folder}")
        frames.append(frame)
    return frames, positions


def encode_clip(video_id: str, frames_bgr: list[np.ndarray], positions: list[int], options: EncodeOptions) -> bytes:
    """One record payload for the sampled frames, in the layout `options` asks for."""
    if options.raw:
        resized = [cv2.resize(frame, (RAW_SIDE, RAW_SIDE)) for frame in frames_bgr]  # bilinear, as the original
        return encode_raw_clip_record(np.stack(resized))
    height, width = _scaled_size(frames_bgr[0].shape[:2], options.short_side)
    images = []
    for frame in frames_bgr:
        if frame.shape[:2] != (height, width):
            frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        images.append(encode_image(frame, options))
    return encode_image_clip_record(video_id, images, height, width, positions, options.frame_format.encode())


def encode_frame_store_clip(video_id: str, path: str, options: EncodeOptions) -> tuple[bytes, int]:
    """A frame-store record: the frames the raw-video loader samples at `--feature_framerate`, resized and
    center-cropped exactly as it does (so reading them back gives its clips), with their positions and fps."""
    sampled = read_sampled_frames(path, options.feature_framerate)
    clip = resize_center_crop(sampled.frames, options.image_size).permute(0, 2, 3, 1).numpy()
    images = [encode_image(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), options) for frame in clip]
    payload = encode_image_clip_record(video_id, images, options.image_size, options.image_size,
                                       sampled.positions.tolist(), options.frame_format.encode(), fps=sampled.fps)
    return payload, len(images)


def encode_image(frame_bgr: np.ndarray, options: EncodeOptions) -> bytes:
    if options.frame_format == "png":
        ok, encoded = cv2.imencode(".png", frame_bgr)
    else:
        ok, encoded = cv2.imencode(".jpg", frame_bgr, [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality])
    if not ok:
        raise VideoDecodeError(f"{options.frame_format.upper()} encoding failed")
    return encoded.tobytes()


def _scaled_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    height, width = size
    scale = short_side / min(height, width)
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class VideoTask:
    video_id: str
    source: str
    is_frame_folder: bool


@dataclass
class VideoResult:
    video_id: str
    payload: bytes | None
    error: str | None
    n_frames: int = 0  # frames stored in the record


def convert_video(task: VideoTask, options: EncodeOptions) -> VideoResult:
    """Worker entry point: read, sample and encode one video; failures come back as `error`, never raised."""
    try:
        if options.is_frame_store:
            payload, n_frames = encode_frame_store_clip(task.video_id, task.source, options)
            return VideoResult(task.video_id, payload, None, n_frames)
        read = read_folder_frames if task.is_frame_folder else read_video_frames
        frames, positions = read(task.source, options.num_frames)
        return VideoResult(task.video_id, encode_clip(task.video_id, frames, positions, options), None, len(frames))
    except Exception as error:  # the worker boundary: any failure on one video only skips that video
        return VideoResult(task.video_id, None, f"{type(error).__name__}: {error}")


_decode_threads = 0  # FFmpeg decoding threads per video; 0 = FFmpeg's choice (all cores)


def _init_worker() -> None:
    global _decode_threads
    _decode_threads = 1  # parallelism comes from the worker processes
    cv2.setNumThreads(1)


# ----------------------------------------------------------------------------------------------- shards


@dataclass
class ShardPlan:
    number: int
    tasks: list[VideoTask]

    @property
    def video_ids(self) -> list[str]:
        return [task.video_id for task in self.tasks]


@dataclass
class ShardState:
    """What a complete shard contributes to the final files (the content of its sidecar)."""

    file_name: str
    video_ids: list[str]
    options: dict
    size: int
    records: list[tuple[str, int]]
    labels: list[dict[str, str]]
    failures: list[list[str]]
    sha256: str = ""  # of the shard file, recorded when it was finished; checked before a rerun keeps it


class OutputLayout:
    def __init__(self, output_dir: str | Path, name: str) -> None:
        self.dir = Path(output_dir)
        self.name = name

    def shard(self, number: int) -> Path:
        return self.dir / f"{self.name}-{number:05d}.tfrecord"

    def sidecar(self, number: int) -> Path:
        return self.dir / f"{self.name}-{number:05d}.meta.json"

    @property
    def index(self) -> Path:
        return self.dir / f"{self.name}.index"


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_complete_shard(layout: OutputLayout, plan: ShardPlan, options: EncodeOptions) -> ShardState | None:
    """The sidecar state of a shard finished by an earlier run with the same plan and options, else None."""
    sidecar, shard = layout.sidecar(plan.number), layout.shard(plan.number)
    try:
        state = ShardState(**json.loads(sidecar.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if state.video_ids != plan.video_ids or state.options != options.recorded():
        return None
    if not shard.is_file() or shard.stat().st_size != state.size:
        return None
    if not state.sha256 or file_sha256(shard) != state.sha256:
        logger.warning("%s does not match the checksum recorded when it was finished: writing it again", shard)
        return None
    state.records = [tuple(record) for record in state.records]
    return state


def write_shard(layout: OutputLayout, plan: ShardPlan, results: Iterator[VideoResult], options: EncodeOptions,
                captions: dict[str, str] | None, on_video: Callable[[], None]) -> ShardState:
    """Write one shard from its (ordered) results: temp file, fsync, rename, then the sidecar."""
    shard = layout.shard(plan.number)
    temporary = shard.with_name(shard.name + ".tmp")
    records, labels, failures, offset = [], [], [], 0
    with temporary.open("wb") as stream:
        for task, result in zip(plan.tasks, results, strict=True):
            if result.payload is None:
                failures.append(Failure("bad_video", task.video_id, task.source, result.error or ""))
                logger.warning("skipping video %s (%s): %s", task.video_id, task.source, result.error)
            else:
                if options.num_frames and result.n_frames < options.num_frames:
                    failures.append(Failure("short_video", task.video_id, task.source,
                                            f"stored {result.n_frames} of the {options.num_frames} frames asked for"))
                records.append((task.video_id, offset))
                offset += write_record(stream, result.payload)
                if captions is not None:
                    labels.append({"video_id": task.video_id, "caption": captions[task.video_id]})
            on_video()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, shard)
    state = ShardState(shard.name, plan.video_ids, options.recorded(), offset, records, labels,
                       [list(asdict(f).values()) for f in failures], file_sha256(shard))
    _write_atomically(layout.sidecar(plan.number), json.dumps(asdict(state), ensure_ascii=False))
    return state


# ----------------------------------------------------------------------------------------------- conversion


@dataclass
class ConversionConfig:
    output_dir: str = DEFAULT_OUTPUT_DIR
    video_dir: str | None = None
    frames_dir: str | None = None
    csv_paths: list[str] = field(default_factory=list)
    output_name: str = "path"
    labels_name: str = "frozen_train_labels.json"
    shard_size: int = 1000
    workers: int = 0
    progress: bool = True
    options: EncodeOptions = field(default_factory=EncodeOptions)


@dataclass
class ConversionSummary:
    n_csv_rows: int = 0
    n_sources_found: int = 0
    n_selected: int = 0
    n_written: int = 0
    n_shards: int = 0
    n_shards_resumed: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def report(self) -> str:
        failures = ", ".join(f"{kind}: {count}" for kind, count in sorted(self.failures.items())) or "none"
        return (f"csv rows: {self.n_csv_rows}; videos found: {self.n_sources_found}; selected: {self.n_selected}; "
                f"written: {self.n_written} in {self.n_shards} shard(s) ({self.n_shards_resumed} kept from an "
                f"earlier run); failures: {failures}")


def plan_shards(sources: dict[str, str], is_frame_folder: bool, shard_size: int) -> list[ShardPlan]:
    """Consecutive chunks of the sorted ids: the plan depends only on the set of ids and the shard size."""
    ids = sorted(sources)
    return [
        ShardPlan(number, [VideoTask(i, sources[i], is_frame_folder) for i in ids[start : start + shard_size]])
        for number, start in enumerate(range(0, len(ids), shard_size))
    ]


def select_sources(config: ConversionConfig, summary: ConversionSummary) -> tuple[dict, CsvLabels | None, list]:
    if (config.video_dir is None) == (config.frames_dir is None):
        raise InputError("give exactly one of --video_dir and --frames_dir")
    flag, folder = ("--frames_dir", config.frames_dir) if config.frames_dir else ("--video_dir", config.video_dir)
    if not Path(folder).is_dir():
        raise InputError(f"{flag} {folder} is not a folder")
    for csv_path in config.csv_paths:
        if not Path(csv_path).is_file():
            raise InputError(f"--csv {csv_path} does not exist")
    found = find_frame_folders(config.frames_dir) if config.frames_dir else find_videos(config.video_dir)
    summary.n_sources_found = len(found)
    if not config.csv_paths:
        return found, None, []
    labels = read_webvid_csvs(config.csv_paths)
    summary.n_csv_rows = labels.n_rows
    missing = [Failure("missing_video", video_id, "", "no video file or frame folder with this id")
               for video_id in sorted(set(labels.captions) - set(found))]
    return {i: found[i] for i in labels.captions if i in found}, labels, labels.failures + missing


def convert(config: ConversionConfig) -> ConversionSummary:
    """Run (or resume) a conversion; raises if a shard cannot be written (complete shards are kept)."""
    summary = ConversionSummary()
    sources, labels, input_failures = select_sources(config, summary)
    summary.n_selected = len(sources)
    layout = OutputLayout(config.output_dir, config.output_name)
    layout.dir.mkdir(parents=True, exist_ok=True)
    plans = plan_shards(sources, config.frames_dir is not None, config.shard_size)
    states: dict[int, ShardState] = {}
    for plan in plans:
        state = load_complete_shard(layout, plan, config.options)
        if state is not None:
            states[plan.number] = state
    summary.n_shards, summary.n_shards_resumed = len(plans), len(states)
    todo = [plan for plan in plans if plan.number not in states]
    done_videos = sum(len(plan.tasks) for plan in plans if plan.number in states)
    captions = labels.captions if labels is not None else None
    with (
        tqdm(total=len(sources), initial=done_videos, unit="video", disable=not config.progress,
             dynamic_ncols=True) as bar,
        contextlib.closing(_run_shards(todo, config)) as shards,
    ):
        for plan, results in shards:
            states[plan.number] = write_shard(layout, plan, results, config.options, captions,
                                              lambda: bar.update(1))
    _assemble(layout, [states[plan.number] for plan in plans], config, input_failures, summary)
    return summary


def _run_shards(todo: list[ShardPlan], config: ConversionConfig) -> Iterator[tuple[ShardPlan, Iterator]]:
    """(plan, ordered results) per shard; with workers, the next shard is already queued while one is written."""
    work = functools.partial(convert_video, options=config.options)
    if config.workers <= 0:
        for plan in todo:
            yield plan, map(work, plan.tasks)
        return
    # Fresh interpreters: forking a parent whose OpenCV thread pool has run deadlocks cv2 in the children.
    with multiprocessing.get_context("spawn").Pool(config.workers, initializer=_init_worker) as pool:
        queued: deque = deque()
        plans = iter(todo)
        for plan in plans:
            queued.append((plan, pool.imap(work, plan.tasks, chunksize=1)))
            if len(queued) == 2:
                yield queued.popleft()
        while queued:
            yield queued.popleft()


def _assemble(layout: OutputLayout, states: list[ShardState], config: ConversionConfig,
              input_failures: list[Failure], summary: ConversionSummary) -> None:
    index_lines = [f"{video_id}\t{state.file_name}\t{offset}\n" for state in states
                   for video_id, offset in state.records]
    _write_atomically(layout.index, "".join(index_lines))
    options = config.options
    if options.is_frame_store:
        manifest = FrameStoreManifest(options.feature_framerate, options.image_size, options.frame_format)
        _write_atomically(manifest_path(layout.index), manifest.to_json())
    if config.csv_paths:
        labels = [label for state in states for label in state.labels]
        lines = ",\n".join(json.dumps(label, ensure_ascii=False) for label in labels)
        _write_atomically(layout.dir / config.labels_name, f"[\n{lines}\n]\n" if labels else "[]\n")
    failures = input_failures + [Failure(*f) for state in states for f in state.failures]
    header = "kind\tvideo_id\twhere\tdetail\n"
    _write_atomically(layout.dir / "failures.tsv", header + "".join(f.tsv_line() + "\n" for f in failures))
    summary.n_written = len(index_lines)
    for failure in failures:
        summary.failures[failure.kind] = summary.failures.get(failure.kind, 0) + 1
    for failure in input_failures:
        logger.warning("%s %s (%s): %s", failure.kind, failure.video_id or "-", failure.where, failure.detail)


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> ConversionConfig:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video_dir", help="folder of downloaded videos (walked recursively; id = file stem)")
    source.add_argument("--frames_dir", "--input_dir", dest="frames_dir",
                        help="folder of per-video frame folders <dir>/<videoid>/*.jpg|png (the original's input)")
    parser.add_argument("--csv", action="append", default=[], dest="csv_paths", metavar="FILE",
                        help="WebVid csv with videoid and name columns; repeat for several files")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"where shards, index, labels and failures.tsv go (default {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--output_name", default="path", help="shard/index file name prefix (default: path)")
    parser.add_argument("--labels_name", default="frozen_train_labels.json",
                        help="labels file name (default frozen_train_labels.json)")
    parser.add_argument("--shard_size", type=int, default=1000, help="videos per shard (default 1000)")
    parser.add_argument("--num_frames", type=int, help="frames sampled per video; 0 keeps all (12)")
    parser.add_argument("--short_side", type=int, help="frames: shorter side, never upscaled (256)")
    parser.add_argument("--jpeg_quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    parser.add_argument("--frame_format", choices=("jpeg", "png"),
                        help="image format of the frames: jpeg (default for WebVid) or png (lossless; default for "
                             "a frame store)")
    parser.add_argument("--raw", action="store_true", help="write the original's raw 256x256 BGR `image` layout")
    store = parser.add_argument_group("downstream frame store (see FRAME STORE above)")
    store.add_argument("--feature_framerate", type=int,
                       help="write a frame store: frames sampled per second exactly as the fine-tuning loaders' "
                            "flag of the same name (0: every frame)")
    store.add_argument("--image_size", type=int, default=224,
                       help="frame store: frames resized and center-cropped to this size, the model's (224)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="decoding processes; 0 decodes in this process (default: CPU count)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    options = _encode_options(parser, args)
    if args.shard_size < 1 or options.num_frames < 0 or options.short_side < 1 or not 1 <= args.jpeg_quality <= 100:
        parser.error("need --shard_size >= 1, --num_frames >= 0, --short_side >= 1, 1 <= --jpeg_quality <= 100")
    return ConversionConfig(args.output_dir, args.video_dir, args.frames_dir, args.csv_paths, args.output_name,
                            args.labels_name, args.shard_size, args.workers, not args.no_progress, options)


def _encode_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EncodeOptions:
    if args.feature_framerate is None:
        sizes = {name: value for name, value in (("num_frames", args.num_frames), ("short_side", args.short_side))
                 if value is not None}  # unset: EncodeOptions' defaults
        return EncodeOptions(**sizes, jpeg_quality=args.jpeg_quality, raw=args.raw,
                             frame_format=args.frame_format or "jpeg")
    given = [flag for flag, value in (("--num_frames", args.num_frames), ("--short_side", args.short_side),
                                      ("--raw", args.raw or None), ("--frames_dir", args.frames_dir)) if value is not None]
    if given:
        parser.error(f"a frame store (--feature_framerate) keeps every sampled frame at --image_size from "
                     f"--video_dir: {', '.join(given)} does not apply")
    if args.feature_framerate < 0 or args.image_size < 1:
        parser.error("need --feature_framerate >= 0 and --image_size >= 1")
    return EncodeOptions(num_frames=0, jpeg_quality=args.jpeg_quality, frame_format=args.frame_format or "png",
                         feature_framerate=args.feature_framerate, image_size=args.image_size)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 a conversion that wrote no video or stopped on an I/O error (complete shards are
    kept: re-run to resume), 2 bad input (missing folder or csv, a csv without the needed columns)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    try:
        summary = convert(config)
    except InputError as error:
        print(f"frozen_tfrecord.py: error: {error}", file=sys.stderr, flush=True)
        return 2
    except OSError as error:
        logger.error("conversion stopped (%s); complete shards are kept, re-run the same command to resume", error)
        return 1
    logger.info("%s", summary.report())
    logger.info("wrote %s, failures in %s", Path(config.output_dir) / f"{config.output_name}.index",
                Path(config.output_dir) / "failures.tsv")
    if summary.n_written == 0:
        logger.error("no video was written (%d selected): see %s", summary.n_selected,
                     Path(config.output_dir) / "failures.tsv")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
