"""The clip store: pre-training clips stored as TFRecord shards (docs/method.md §9.1-9.2), its record schema, index
and reader, and the labels file beside it. Free of torch: the converter writes and checks stores with it;
dataloaders/webvid.py trains on them.

Two record layouts are read:

* ours (written by `frozen_tfrecord.py`), a `tf.train.Example` with
  `video_id` bytes[1] (UTF-8), `num_frames` int64[1], `height` int64[1], `width` int64[1],
  `frame_format` bytes[1] (b"jpeg" or b"png"), `frame_indices` int64[num_frames] (position of each stored frame
  in the source video or frame folder), `frames` bytes[num_frames] (one image per frame, RGB content, all frames
  of a record the same size: shorter side `--short_side` for WebVid; for a downstream frame store
  (dataloaders/frame_store.py) the loader's resized and center-cropped frames, with `fps` int64[1] added; for a
  clip of a longer video (a Panda-70M or InternVid window) `frame_indices` are frame numbers of the source and
  `clip_start`, `clip_end` float[1] (seconds) and `source_id` bytes[1] are added);
* the original's (`frozen_tfrecord.py --raw`), whose only feature is `image` bytes[1]: N x 256 x 256 x 3 raw BGR
  uint8 pixels, C order, N = len / 196608.

The index (`path.index`) has one line per record: `video_id \\t shard_path \\t byte_offset`. Our converter writes
shard paths relative to the index's folder; the original wrote them as seen from the writer's working directory,
so relative paths that do not exist next to the index are also tried against the current directory and by file
name next to the index. Absolute paths and `s3://` URLs are used as they are. Duplicate ids: the first line wins.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import ijson
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from google.protobuf.message import DecodeError

from dataloaders.tfrecord_io import (
    RecordReader,
    decode_example,
    encode_example,
    is_s3_url,
    s3_client,
    split_s3_url,
)

logger = logging.getLogger("t2vlp.data")

INDEX_FILE_NAME = "path.index"
RAW_SIDE = 256
RAW_FRAME_BYTES = RAW_SIDE * RAW_SIDE * 3
JPEG_FORMAT = b"jpeg"
PNG_FORMAT = b"png"
IMAGE_FORMATS = (JPEG_FORMAT, PNG_FORMAT)


class ClipRecordError(ValueError):
    """A record's Example cannot be parsed or holds no usable frames."""


# ----------------------------------------------------------------------------------------------- record schema


def encode_image_clip_record(
    video_id: str, encoded_frames: list[bytes], height: int, width: int, frame_indices: list[int],
    frame_format: bytes = JPEG_FORMAT, fps: int | None = None, window: tuple[float, float] | None = None,
    source_id: str | None = None,
) -> bytes:
    """Our record: encoded frames (JPEG or PNG) plus the id, count, size and source positions (see the module
    docstring); `fps` (the source's integer frame rate) is stored when given, so positions map to seconds; a clip
    of a longer video stores its `window` (start, end seconds) and `source_id`."""
    if len(encoded_frames) != len(frame_indices):
        raise ValueError("one source position per frame is needed")
    if frame_format not in IMAGE_FORMATS:
        raise ValueError(f"frame_format must be one of {IMAGE_FORMATS}, got {frame_format!r}")
    features = {
        "video_id": video_id,
        "num_frames": len(encoded_frames),
        "height": height,
        "width": width,
        "frame_format": frame_format,
        "frame_indices": list(frame_indices),
        "frames": list(encoded_frames),
    }
    if fps is not None:
        features["fps"] = fps
    if window is not None:
        features["clip_start"], features["clip_end"] = float(window[0]), float(window[1])
    if source_id is not None:
        features["source_id"] = source_id
    return encode_example(features)


def encode_raw_clip_record(frames_bgr: np.ndarray) -> bytes:
    """The original's record: one `image` feature holding N x 256 x 256 x 3 BGR uint8 bytes."""
    if frames_bgr.dtype != np.uint8 or frames_bgr.shape[1:] != (RAW_SIDE, RAW_SIDE, 3):
        raise ValueError(f"raw layout needs uint8 [N, 256, 256, 3], got {frames_bgr.dtype} {frames_bgr.shape}")
    return encode_example({"image": np.ascontiguousarray(frames_bgr).tobytes()})


def check_record_id(record: ClipRecord, video_id: str) -> None:
    """A record that names another clip than the one its index entry is for (an index edited or merged wrongly)
    would pair this caption with another clip's frames: refuse it (ClipRecordError). The original's raw records
    carry no id and pass."""
    if record.video_id is not None and record.video_id != video_id:
        raise ClipRecordError(f"the index entry for {video_id} points at the record of {record.video_id}")


@dataclass
class ClipRecord:
    """A parsed record; frames are decoded only when asked for, and only those asked for."""

    video_id: str | None
    num_frames: int
    encoded_frames: list[bytes] | None = None  # JPEG or PNG, one per frame
    raw_bgr: np.ndarray | None = None  # [N, H, W, 3] view on the payload
    frame_indices: np.ndarray | None = None  # int64 [N], position of each frame in its source, when recorded
    fps: int | None = None  # the source's integer frame rate, when recorded (downstream frame stores)
    window: tuple[float, float] | None = None  # a clip of a longer video: its start and end in the source (s)
    source_id: str | None = None  # ... and the source video's id

    def frames(self, indices: np.ndarray | list[int] | None = None) -> np.ndarray:
        """RGB uint8 [n, H, W, 3] of the frames at `indices` (all by default), in that order."""
        if indices is None:
            indices = range(self.num_frames)
        if self.raw_bgr is not None:
            return np.ascontiguousarray(self.raw_bgr[np.asarray(indices, dtype=np.int64), :, :, ::-1])
        decoded = [_decode_image(self.encoded_frames[i]) for i in indices]
        if len({frame.shape for frame in decoded}) > 1:
            raise ClipRecordError(f"frames of different sizes in the record of video {self.video_id}")
        return np.stack(decoded) if decoded else np.zeros((0, 0, 0, 3), np.uint8)


def parse_clip_record(payload: bytes) -> ClipRecord:
    """Parse either record layout (ours or the original's raw `image`)."""
    try:
        features = decode_example(payload)
    except DecodeError as error:
        raise ClipRecordError(f"not a tf.train.Example: {error}") from error
    video_id = features["video_id"][0].decode("utf-8") if features.get("video_id") else None
    if "frames" in features:
        encoded = features["frames"]
        if not encoded:
            raise ClipRecordError(f"record of video {video_id} holds no frame")
        positions = features.get("frame_indices")
        if positions is not None and len(positions) != len(encoded):
            raise ClipRecordError(f"record of video {video_id}: {len(positions)} frame_indices for {len(encoded)} "
                                  f"frames")
        fps = features["fps"][0] if features.get("fps") else None
        window = (features["clip_start"][0], features["clip_end"][0]) if features.get("clip_start") and \
            features.get("clip_end") else None
        source_id = features["source_id"][0].decode("utf-8") if features.get("source_id") else None
        return ClipRecord(video_id, len(encoded), encoded_frames=encoded,
                          frame_indices=None if positions is None else np.asarray(positions, dtype=np.int64), fps=fps,
                          window=window, source_id=source_id)
    if "image" in features:
        return ClipRecord(video_id, *_raw_frames(features))
    raise ClipRecordError(f"record has neither 'frames' nor 'image' (keys: {sorted(features)})")


def _raw_frames(features: dict[str, list]) -> tuple[int, None, np.ndarray]:
    image = features["image"][0] if features["image"] else b""
    height = features["height"][0] if features.get("height") else RAW_SIDE
    width = features["width"][0] if features.get("width") else RAW_SIDE
    frame_bytes = height * width * 3
    if not image or len(image) % frame_bytes:
        raise ClipRecordError(f"raw 'image' of {len(image)} bytes is not a whole number of {height}x{width} frames")
    frames = np.frombuffer(image, dtype=np.uint8).reshape(-1, height, width, 3)
    return len(frames), None, frames


def _decode_image(data: bytes) -> np.ndarray:
    frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
    if frame is None:
        raise ClipRecordError("undecodable frame image")
    return frame


# ----------------------------------------------------------------------------------------------- index


def index_file(index_path: str | os.PathLike) -> str:
    """`index_path` itself when it names a `.index` file, else `<index_path>/path.index` (a `--dir_path`)."""
    index_path = str(index_path)
    if index_path.endswith(".index"):
        return index_path
    return posixpath.join(index_path, INDEX_FILE_NAME) if is_s3_url(index_path) else str(
        Path(index_path) / INDEX_FILE_NAME
    )


def index_lines(index_path: str, text: str | Iterable[str]) -> Iterator[tuple[int, str, str, int]]:
    """(line number, video id, shard path as written, byte offset) of every entry of an index's text (or its
    lines, read as a stream), duplicates included; a malformed line is a ValueError naming it."""
    for line_number, line in enumerate(text.splitlines() if isinstance(text, str) else text, start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) < 3 or not fields[2].strip().isdigit():
            raise ValueError(f"{index_path}, line {line_number}: expected 'id<TAB>shard<TAB>offset', got {line!r}")
        yield line_number, fields[0].strip(), fields[1], int(fields[2])


def resolve_shard_path(index_path: str, recorded: str) -> str:
    """A shard path as an index records it, resolved against the index's location (paths relative to the index,
    or to the writer's working folder as the original wrote them)."""
    if is_s3_url(recorded):
        return recorded
    if is_s3_url(index_path):
        bucket, index_key = split_s3_url(index_path)
        return f"s3://{bucket}/" + posixpath.normpath(posixpath.join(posixpath.dirname(index_key), recorded))
    index_dir = Path(index_path).parent
    candidates = [Path(recorded)] if Path(recorded).is_absolute() else [index_dir / recorded, Path(recorded)]
    candidates.append(index_dir / Path(recorded).name)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    return str(candidates[0])


class WebVidIndex:
    """`video_id -> (shard path, byte offset)`, held in numpy arrays (compact, shared copy-on-write by workers)."""

    def __init__(self, index_path: str | os.PathLike) -> None:
        self.index_path = index_file(index_path)
        columns = read_index_columns(self.index_path)
        self.shard_paths = [resolve_shard_path(self.index_path, recorded) for recorded in columns.recorded_shards]
        ids = np.asarray([video_id.encode("utf-8") for video_id in columns.video_ids.to_pylist()], dtype=bytes)
        unique_ids, first = np.unique(ids, return_index=True)
        if len(unique_ids) < len(ids):
            logger.warning("%s: %d duplicate video id line(s); the first of each is used",
                           self.index_path, len(ids) - len(unique_ids))
        self._ids = unique_ids
        self._shards = columns.shards[first]
        self._offsets = columns.offsets[first]

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, video_id: str) -> bool:
        return self._row(video_id) >= 0

    def locate(self, video_id: str) -> tuple[str, int] | None:
        """(shard path, byte offset) of the record of `video_id`, or None."""
        row = self._row(video_id)
        if row < 0:
            return None
        return self.shard_paths[self._shards[row]], int(self._offsets[row])

    def _row(self, video_id: str) -> int:
        key = str(video_id).encode("utf-8")
        row = int(np.searchsorted(self._ids, key))
        return row if row < len(self._ids) and self._ids[row] == key else -1


def load_index(index_path: str | os.PathLike) -> WebVidIndex:
    """A cached `WebVidIndex`: one parse per process, path and (for local files) modification time."""
    index_path = index_file(index_path)
    modified = None if is_s3_url(index_path) else os.stat(index_path).st_mtime_ns
    return _cached_index(index_path, modified)


@functools.lru_cache(maxsize=8)
def _cached_index(index_path: str, modified: int | None) -> WebVidIndex:
    return WebVidIndex(index_path)


_shared_reader = RecordReader()


def read_frames(index_path: str | os.PathLike, video_id: str, *, verify_crc: bool = False) -> np.ndarray:
    """All stored frames of `video_id` as RGB uint8 [N, H, W, 3], from either record layout.

    `index_path` is a `.index` file or the folder holding `path.index`, local or `s3://`. Raises KeyError for an
    id not in the index, `RecordCorruptError` (with `verify_crc`) for a damaged record, `ClipRecordError` for a
    record of another clip.
    """
    location = load_index(index_path).locate(video_id)
    if location is None:
        raise KeyError(f"video id {video_id!r} is not in {index_file(index_path)}")
    reader = RecordReader(verify_crc=True) if verify_crc else _shared_reader
    record = parse_clip_record(reader.read(*location))
    check_record_id(record, video_id)
    return record.frames()


def read_labels(labels_json: str | os.PathLike) -> tuple[list[str], list[str]]:
    """`frozen_train_labels.json` (a JSON array of `{"video_id", "caption"}`) -> (video ids, captions), as lists:
    for small files (training maps the catalogue instead, dataloaders/catalogue.py)."""
    video_ids, captions = [], []
    for video_id, caption in iter_labels(str(labels_json)):
        video_ids.append(video_id)
        captions.append(caption)
    return video_ids, captions


@dataclass
class IndexColumns:
    """Every line of an index, duplicates included, in file order."""

    video_ids: pa.Array  # strings
    shards: np.ndarray  # int32, into `recorded_shards`
    offsets: np.ndarray  # int64
    recorded_shards: list[str]  # shard paths as written, in order of first appearance


def read_index_columns(index_path: str) -> IndexColumns:
    """An index (`id<TAB>shard<TAB>offset` lines) read as columns with pyarrow's CSV reader; a file it refuses
    (a malformed line, extra fields, stray whitespace) is read line by line instead, which names a bad line."""
    try:
        return _read_index_arrow(index_path)
    except (pa.ArrowInvalid, _NotPlain):
        return _read_index_lines(index_path)


class _NotPlain(Exception):
    pass


def _read_index_arrow(index_path: str) -> IndexColumns:
    numbers: dict[str, int] = {}
    ids, shards, offsets = [], [], []
    options = dict(
        read_options=pa_csv.ReadOptions(column_names=["video_id", "shard", "offset"], block_size=4 << 20),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False),
        convert_options=pa_csv.ConvertOptions(
            column_types={"video_id": pa.string(), "shard": pa.dictionary(pa.int32(), pa.string()),
                          "offset": pa.int64()}, strings_can_be_null=False, null_values=[]),
    )
    with open_binary(index_path) as stream:
        for batch in pa_csv.open_csv(stream, **options):
            if not batch.num_rows:
                continue
            if pc.min(batch.column(2)).as_py() < 0:
                raise _NotPlain
            dictionary = batch.column(1)
            mapping = np.array([numbers.setdefault(name, len(numbers)) for name in dictionary.dictionary.to_pylist()],
                               dtype=np.int32)
            ids.append(pc.utf8_trim_whitespace(batch.column(0)))
            shards.append(mapping[dictionary.indices.to_numpy()])
            offsets.append(batch.column(2).to_numpy())
    return _columns(ids, shards, offsets, list(numbers))


def _read_index_lines(index_path: str) -> IndexColumns:
    numbers: dict[str, int] = {}
    ids, shards, offsets = [], [], []
    with open_binary(index_path) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        chunk: list[tuple[str, int, int]] = []
        for _, video_id, recorded, offset in index_lines(index_path, text):
            chunk.append((video_id, numbers.setdefault(recorded, len(numbers)), offset))
            if len(chunk) >= 1 << 20:
                _take_chunk(chunk, ids, shards, offsets)
        _take_chunk(chunk, ids, shards, offsets)
    return _columns(ids, shards, offsets, list(numbers))


def _take_chunk(chunk: list, ids: list, shards: list, offsets: list) -> None:
    if chunk:
        ids.append(pa.array([row[0] for row in chunk], pa.string()))
        shards.append(np.array([row[1] for row in chunk], dtype=np.int32))
        offsets.append(np.array([row[2] for row in chunk], dtype=np.int64))
        chunk.clear()


def _columns(ids: list, shards: list, offsets: list, recorded: list[str]) -> IndexColumns:
    return IndexColumns(
        pa.concat_arrays(ids) if ids else pa.array([], pa.string()),
        np.concatenate(shards) if shards else np.zeros(0, np.int32),
        np.concatenate(offsets) if offsets else np.zeros(0, np.int64),
        recorded,
    )


def iter_labels(labels_path: str) -> Iterator[tuple[str, str]]:
    """(video id, caption) of every element of a labels file (a JSON array of objects with `video_id` and a
    string `caption`; other keys are ignored), parsed as a stream: a file of any size in little memory."""
    with open_binary(labels_path) as stream:
        first = stream.read(1)
        while first and first.isspace():
            first = stream.read(1)
        if first != b"[":
            raise ValueError(f"{labels_path}: expected a JSON array of {{'video_id', 'caption'}} objects")
        try:
            for position, item in enumerate(ijson.items(_Prefixed(first, stream), "item", use_float=True)):
                if not isinstance(item, dict) or "video_id" not in item or not isinstance(item.get("caption"), str):
                    raise ValueError(f"{labels_path}: item {position} lacks a video_id or a string caption: {item!r}")
                yield str(item["video_id"]), item["caption"]
        except ijson.JSONError as error:
            reason = (str(error).strip().splitlines() or ["cut short"])[0]  # the parser's own message spans lines
            raise ValueError(f"{labels_path}: invalid JSON ({reason})") from error


class _Prefixed:
    """`stream` with `head` (bytes already read from it) put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head, self._stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        head, self._head = self._head, b""
        if size is None or size < 0:
            return head + self._stream.read()
        return head + self._stream.read(max(0, size - len(head)))


def open_binary(path: str) -> BinaryIO:
    """A local file or an S3 object, as a binary stream read from its start."""
    if is_s3_url(path):
        bucket, key = split_s3_url(path)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    return open(path, "rb")
