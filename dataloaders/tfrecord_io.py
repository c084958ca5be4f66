"""TFRecord framing, `tf.train.Example` encoding and random-access record reads (local files or S3).

Framing (TensorFlow's): uint64 LE payload length, uint32 LE masked CRC32C of those 8 bytes, the payload, uint32 LE
masked CRC32C of the payload. The Example schema is the one bundled with the `tfrecord` package
(`tfrecord.example_pb2`, wire-compatible with `tf.train.Example`); TensorFlow is not needed.

Reads go through a `RecordReader`, which opens byte sources lazily and caches them per process, so a reader built
before DataLoader workers fork is safe to use in every worker (each worker opens its own files / S3 client).
"""

from __future__ import annotations

import importlib.util
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

import crc32c


def _example_schema():
    """The `tfrecord` package's generated `example_pb2` module, loaded from its file: importing it through the
    package would import torch as well (the package's __init__ does), which costs every conversion process
    seconds of start-up for nothing. The same file, so the messages are the package's own."""
    package = importlib.util.find_spec("tfrecord")
    if package is None or not package.submodule_search_locations:
        raise ImportError("the tfrecord package is not installed (pip install -r requirements.txt)")
    path = os.path.join(package.submodule_search_locations[0], "example_pb2.py")
    spec = importlib.util.spec_from_file_location("tfrecord_example_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example_pb2 = _example_schema()

HEADER_SIZE = 12  # length (8) + length CRC (4)
FOOTER_SIZE = 4  # payload CRC
_CRC_MASK_DELTA = 0xA282EAD8
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")

FeatureValue = bytes | str | int | float | Sequence[bytes] | Sequence[str] | Sequence[int] | Sequence[float]


class RecordCorruptError(ValueError):
    """A record's framing or CRC does not check out; the message names the file and the byte offset."""


# ----------------------------------------------------------------------------------------------- framing


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C of `data`."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """The full on-disk bytes of one record holding `payload`."""
    length = _LENGTH.pack(len(payload))
    return b"".join(
        (length, _CRC.pack(masked_crc32c(length)), payload, _CRC.pack(masked_crc32c(payload)))
    )


def write_record(stream: BinaryIO, payload: bytes) -> int:
    """Append one framed record to `stream`; returns the number of bytes written."""
    framed = frame_record(payload)
    stream.write(framed)
    return len(framed)


def parse_header(header: bytes, *, verify_crc: bool, source: str, offset: int) -> int:
    """Payload length from a record's 12 header bytes."""
    if len(header) < HEADER_SIZE:
        raise RecordCorruptError(
            f"{source}: truncated record header at byte offset {offset} ({len(header)} of 12 bytes)"
        )
    length_bytes = header[:8]
    if verify_crc and _CRC.unpack(header[8:12])[0] != masked_crc32c(length_bytes):
        raise RecordCorruptError(f"{source}: length CRC mismatch in the record at byte offset {offset}")
    return _LENGTH.unpack(length_bytes)[0]


def check_payload(payload: bytes, footer: bytes, *, verify_crc: bool, source: str, offset: int) -> None:
    """Raise `RecordCorruptError` when the payload is short or (with `verify_crc`) its CRC is wrong."""
    if len(footer) < FOOTER_SIZE:
        raise RecordCorruptError(f"{source}: truncated record at byte offset {offset}")
    if verify_crc and _CRC.unpack(footer)[0] != masked_crc32c(payload):
        raise RecordCorruptError(f"{source}: payload CRC mismatch in the record at byte offset {offset}")


def iter_records(path: str | os.PathLike, *, verify_crc: bool = True) -> Iterator[tuple[int, bytes]]:
    """Sequentially yield `(byte_offset, payload)` for every record of a local TFRecord file."""
    source = str(path)
    with open(path, "rb") as stream:
        offset = 0
        while header := stream.read(HEADER_SIZE):
            length = parse_header(header, verify_crc=verify_crc, source=source, offset=offset)
            payload = stream.read(length)
            footer = stream.read(FOOTER_SIZE)
            if len(payload) < length:
                raise RecordCorruptError(f"{source}: truncated record at byte offset {offset}")
            check_payload(payload, footer, verify_crc=verify_crc, source=source, offset=offset)
            yield offset, payload
            offset += HEADER_SIZE + length + FOOTER_SIZE


# ----------------------------------------------------------------------------------------------- Example


def _feature(value: FeatureValue) -> example_pb2.Feature:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if all(isinstance(v, bytes | str) for v in values):
        encoded = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
        return example_pb2.Feature(bytes_list=example_pb2.BytesList(value=encoded))
    if all(isinstance(v, int) for v in values):
        return example_pb2.Feature(int64_list=example_pb2.Int64List(value=values))
    if all(isinstance(v, int | float) for v in values):
        return example_pb2.Feature(float_list=example_pb2.FloatList(value=values))
    raise TypeError(f"cannot store {type(values[0]).__name__} values in a tf.train.Example feature")


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
    """Serialise a `tf.train.Example`; bytes/str -> bytes_list, int -> int64_list, float -> float_list.

    Serialisation is deterministic (map keys sorted), so identical inputs give identical bytes.
    """
    example = example_pb2.Example(
        features=example_pb2.Features(feature={key: _feature(value) for key, value in features.items()})
    )
    return example.SerializeToString(deterministic=True)


def decode_example(payload: bytes) -> dict[str, list]:
    """Parse a serialised `tf.train.Example` into `{key: list of values}` (bytes, int or float)."""
    example = example_pb2.Example()
    example.ParseFromString(payload)
    decoded = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        decoded[key] = list(getattr(feature, kind).value) if kind else []
    return decoded


# ----------------------------------------------------------------------------------------------- byte sources


class ByteSource(Protocol):
    costly_requests: bool  # True: worth reading ahead speculatively to save a request

    def read_at(self, offset: int, size: int | None) -> bytes: ...

    def close(self) -> None: ...


class LocalFileSource:
    """Positional reads (`os.pread`) on one file descriptor: no shared seek position, safe across threads."""

    costly_requests = False

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def read_at(self, offset: int, size: int | None) -> bytes:
        """`size` bytes from `offset` (fewer at the end of the file); None: up to the end."""
        if size is None:
            size = max(0, os.fstat(self.fd).st_size - offset)
        chunks = []
        while size > 0:
            chunk = os.pread(self.fd, size, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        os.close(self.fd)


def is_s3_url(path: str | os.PathLike) -> bool:
    return str(path).startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key/parts` -> (`bucket`, `key/parts`)."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"not an s3://bucket/key URL: {url}")
    return bucket, key


_s3_clients: dict[tuple[int, str | None], object] = {}


def s3_client():
    """A boto3 S3 client for this process, configured by the usual boto3 environment (AWS_ENDPOINT_URL, ...)."""
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    client = _s3_clients.get(key)
    if client is None:
        import boto3  # only needed for s3:// data

        client = boto3.session.Session().client("s3")
        _s3_clients[key] = client
    return client


def read_s3_object(url: str) -> bytes:
    bucket, key = split_s3_url(url)
    client = s3_client()
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except _botocore_errors() as error:  # not OSErrors
        raise OSError(f"{url}: GET failed: {error}") from error


def head_s3_object(url: str) -> dict:
    """HEAD of an S3 object (its ContentLength, ETag, ...); a missing object is FileNotFoundError, any other
    failure OSError."""
    bucket, key = split_s3_url(url)
    try:
        return s3_client().head_object(Bucket=bucket, Key=key)
    except _botocore_errors() as error:
        code = str(getattr(error, "response", {}).get("Error", {}).get("Code"))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(2, "no such S3 object", url) from error
        raise OSError(f"{url}: HEAD failed: {error}") from error


def _botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def _is_s3_range_past_end(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    return response.get("Error", {}).get("Code") == "InvalidRange"


class S3Source:
    """Ranged GETs on one object."""

    costly_requests = True

    def __init__(self, url: str) -> None:
        self.bucket, self.key = split_s3_url(url)

    def read_at(self, offset: int, size: int | None) -> bytes:
        """One ranged GET: `size` bytes from `offset`, or (None) everything from `offset` on."""
        if size is not None and size <= 0:
            return b""
        client = s3_client()
        last = "" if size is None else offset + size - 1
        try:
            response = client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={offset}-{last}")
            return response["Body"].read()
        except _botocore_errors() as error:  # not OSErrors; readers treat every I/O failure alike
            if _is_s3_range_past_end(error):
                return b""
            raise OSError(f"s3://{self.bucket}/{self.key}: ranged GET at byte {offset} failed: {error}") from error

    def close(self) -> None:
        pass


def open_source(path: str) -> ByteSource:
    return S3Source(path) if is_s3_url(path) else LocalFileSource(path)


# ----------------------------------------------------------------------------------------------- reader


class RecordReader:
    """Random-access record reads with lazily opened, per-process cached sources (at most `max_open`, LRU).

    Local files: two `pread`s (header, then payload). S3: the header is fetched together with `prefetch` more
    bytes, so a record that fits costs one ranged GET and a larger one two; `prefetch` grows to the largest
    record seen, so a store of same-sized records costs one request per record after the first.
    """

    def __init__(self, *, verify_crc: bool = False, max_open: int = 64, prefetch: int = 256 * 1024) -> None:
        self.verify_crc = verify_crc
        self.max_open = max_open
        self.prefetch = prefetch
        self._pid = os.getpid()
        self._sources: OrderedDict[str, ByteSource] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_sources"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def read(self, path: str | os.PathLike, offset: int) -> bytes:
        """The payload of the record whose header starts at `offset` in `path`."""
        path = str(path)
        source = self.source(path)
        head = source.read_at(offset, HEADER_SIZE + (self.prefetch if source.costly_requests else 0))
        length = parse_header(head[:HEADER_SIZE], verify_crc=self.verify_crc, source=path, offset=offset)
        end = HEADER_SIZE + length + FOOTER_SIZE
        if len(head) < end:
            head += source.read_at(offset + len(head), end - len(head))
            self.prefetch = max(self.prefetch, length + FOOTER_SIZE)
        payload = head[HEADER_SIZE : HEADER_SIZE + length]
        if len(payload) < length:
            raise RecordCorruptError(f"{path}: truncated record at byte offset {offset}")
        check_payload(payload, head[HEADER_SIZE + length : end], verify_crc=self.verify_crc, source=path,
                      offset=offset)
        return payload

    def close(self) -> None:
        with self._lock:
            for source in self._sources.values():
                source.close()
            self._sources.clear()

    def source(self, path: str) -> ByteSource:
        """The open source of `path` (opened in this process on first use; at most `max_open` kept)."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's handles belong to the parent
                self._sources = OrderedDict()
                self._pid = os.getpid()
            source = self._sources.get(path)
            if source is not None:
                self._sources.move_to_end(path)
                return source
            source = open_source(path)
            self._sources[path] = source
            if len(self._sources) > self.max_open:
                _, evicted = self._sources.popitem(last=False)
                evicted.close()
            return source


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file, local or `s3://`."""
    if is_s3_url(path):
        return read_s3_object(str(path)).decode("utf-8")
    return Path(path).read_text(encoding="utf-8")
