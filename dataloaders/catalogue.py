"""The catalogue of a clip store (docs/data.md §2.1): one row per training sample, in the labels file's order, with
the clip id, its caption, its shard (a number into the catalogue's shard table), the record's byte offset and, where
known, its framed length. Training maps it instead of parsing the labels and the index.

It is one Arrow IPC file (`<labels stem>.catalogue.arrow`), memory-mapped: every rank and DataLoader worker of a
node shares its pages through the page cache, and opening it reads only its footer and last batch, whatever its
size. Rows are stored in batches of `rows_per_batch` rows (the last may be shorter), so row i lies in batch
i // rows_per_batch. The last batch carries the trailer (custom metadata, JSON): the shard table, counts and the
fingerprints (size and modification time, or ETag on S3) of the labels and index it was made from; a catalogue
whose sources changed since is rebuilt.

Written by the converter and `--merge` as they write the store (conversion/shards.py), or derived once from any
store (the original's `path.index` + labels, a store of an earlier version, labels edited by hand) by a streaming
parse: `build_catalogue`, under a lock beside it, into a temp file renamed into place when complete. Free of torch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataloaders.clip_store import index_file, iter_labels, read_index_columns
from dataloaders.files import remove_temporaries, unique_temporary
from dataloaders.tfrecord_io import head_s3_object, is_s3_url, split_s3_url

logger = logging.getLogger("t2vlp.data")

CATALOGUE_SUFFIX = ".catalogue.arrow"
FORMAT = "t2vlp-catalogue"
VERSION = 1
ROWS_PER_BATCH = 1 << 16
TRAILER_KEY = b"t2vlp.catalogue"
CACHE_ENV = "T2VLP_CATALOGUE_CACHE"
SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("caption", pa.string()),
    ("shard", pa.int32()),  # into the shard table; -1: the id is not in the index
    ("offset", pa.int64()),
    ("length", pa.int64()),  # framed bytes of the record; -1: not known
])
LABEL_BATCH = 1 << 15  # labels parsed per batch while deriving


class CatalogueError(ValueError):
    """A file that is not a complete catalogue of this format."""


@dataclass
class CatalogueInfo:
    """The trailer: what a catalogue holds besides its rows."""

    n_rows: int
    rows_per_batch: int
    shards: list[str]  # shard paths as the index records them
    n_missing: int  # labels whose id is not in the index
    n_duplicate_ids: int  # index lines whose id an earlier line has (the first is used)
    sources: dict = field(default_factory=dict)  # {"labels": fingerprint, "index": fingerprint}
    format: str = FORMAT
    version: int = VERSION


# ----------------------------------------------------------------------------------------------- writing


class CatalogueWriter:
    """Rows appended in labels order, written in uniform batches to a temp file beside `path`; `finish` adds the
    trailer and renames it into place. Memory: at most two batches of rows, whatever the number of rows. As a
    context manager, left without `finish`, the temp file is removed."""

    def __init__(self, path: str | os.PathLike, rows_per_batch: int = ROWS_PER_BATCH) -> None:
        self.path = Path(path)
        self.rows_per_batch = rows_per_batch
        self.temporary = unique_temporary(self.path)
        self._sink = pa.OSFile(str(self.temporary), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self._rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self._pieces: list[pa.Table] = []
        self._pending = 0
        self.n_rows = 0
        self.finished = False

    def __enter__(self) -> CatalogueWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.finished:
            self.abort()

    def add(self, video_id: str, caption: str, shard: int, offset: int, length: int = -1) -> None:
        for name, value in zip(SCHEMA.names, (video_id, caption, shard, offset, length)):
            self._rows[name].append(value)
        if len(self._rows["video_id"]) >= 4096:
            self._take_rows()

    def add_columns(self, video_ids: pa.Array, captions: pa.Array, shards: np.ndarray, offsets: np.ndarray,
                    lengths: np.ndarray) -> None:
        self._take_rows()
        self._append(pa.table([video_ids, captions, pa.array(shards, pa.int32()), pa.array(offsets, pa.int64()),
                               pa.array(lengths, pa.int64())], schema=SCHEMA))

    def _take_rows(self) -> None:
        if self._rows["video_id"]:
            self._append(pa.table(self._rows, schema=SCHEMA))
            self._rows = {name: [] for name in SCHEMA.names}

    def _append(self, table: pa.Table) -> None:
        self._pieces.append(table)
        self._pending += table.num_rows
        self.n_rows += table.num_rows
        # The last batch is held back until `finish`: it carries the trailer.
        while self._pending > self.rows_per_batch:
            pending = pa.concat_tables(self._pieces).combine_chunks()
            self._writer.write_batch(pending.slice(0, self.rows_per_batch).to_batches()[0])
            rest = pending.slice(self.rows_per_batch)
            self._pieces, self._pending = [rest], rest.num_rows

    def finish(self, shards: list[str], n_missing: int, n_duplicate_ids: int, sources: dict) -> Path:
        self._take_rows()
        info = CatalogueInfo(self.n_rows, self.rows_per_batch, shards, n_missing, n_duplicate_ids, sources)
        last = pa.concat_tables([SCHEMA.empty_table(), *self._pieces]).combine_chunks()
        batch = last.to_batches()[0] if last.num_rows else pa.RecordBatch.from_pylist([], schema=SCHEMA)
        self._writer.write_batch(batch, custom_metadata={TRAILER_KEY: json.dumps(asdict(info)).encode()})
        self._writer.close()
        self._sink.close()
        with open(self.temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.temporary, self.path)
        self.finished = True
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        finally:
            self.temporary.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class _Batch:
    video_ids: pa.StringArray
    captions: pa.StringArray
    shards: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray


class Catalogue:
    """A catalogue, memory-mapped: rows are read where they lie, nothing per row is held. Batches are opened on
    first use and kept (a few Python objects per 65536 rows). Pickled by path: a spawned worker maps it again."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._open()

    def _open(self) -> None:
        try:
            self._map = pa.memory_map(str(self.path), "r")
            self._reader = pa.ipc.open_file(self._map)
            if not self._reader.schema.equals(SCHEMA):
                raise CatalogueError(f"{self.path}: columns {self._reader.schema.names}, not a catalogue's")
            if self._reader.num_record_batches < 1:
                raise CatalogueError(f"{self.path}: no batch")
            _, trailer = self._reader.get_batch_with_custom_metadata(self._reader.num_record_batches - 1)
            if trailer is None or TRAILER_KEY not in trailer:
                raise CatalogueError(f"{self.path}: no trailer")
            self.info = CatalogueInfo(**json.loads(trailer[TRAILER_KEY]))
        except (pa.ArrowInvalid, OSError, TypeError, ValueError) as error:
            if isinstance(error, CatalogueError):
                raise
            raise CatalogueError(f"{self.path} is not a complete catalogue: {error}") from error
        if self.info.format != FORMAT or self.info.version != VERSION:
            raise CatalogueError(f"{self.path}: format {self.info.format} {self.info.version}, not {FORMAT} {VERSION}")
        expected_batches = max(1, -(-self.info.n_rows // self.info.rows_per_batch))
        if self._reader.num_record_batches != expected_batches:
            raise CatalogueError(f"{self.path}: {self._reader.num_record_batches} batches for {self.info.n_rows} rows")
        self._batches: dict[int, _Batch] = {}

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._open()

    def __len__(self) -> int:
        return self.info.n_rows

    @property
    def shards(self) -> list[str]:
        return self.info.shards

    def batch(self, number: int) -> _Batch:
        cached = self._batches.get(number)
        if cached is None:
            batch = self._reader.get_batch(number)
            cached = _Batch(batch.column(0), batch.column(1), *(batch.column(i).to_numpy(zero_copy_only=True)
                                                                 for i in (2, 3, 4)))
            self._batches[number] = cached
        return cached

    def _locate(self, row: int) -> tuple[_Batch, int]:
        if not 0 <= row < self.info.n_rows:
            raise IndexError(f"row {row} of a catalogue of {self.info.n_rows}")
        number, local = divmod(row, self.info.rows_per_batch)
        return self.batch(number), local

    def video_id(self, row: int) -> str:
        batch, local = self._locate(row)
        return batch.video_ids[local].as_py()

    def caption(self, row: int) -> str:
        batch, local = self._locate(row)
        return batch.captions[local].as_py()

    def location(self, row: int) -> tuple[int, int, int]:
        """(shard number, -1 when the id is not in the index; byte offset; framed length, -1 when not known)."""
        batch, local = self._locate(row)
        return int(batch.shards[local]), int(batch.offsets[local]), int(batch.lengths[local])

    def column(self, name: str) -> Iterator[np.ndarray]:
        """A numeric column batch by batch (views on the map), for scans that need it whole."""
        position = SCHEMA.names.index(name)
        for number in range(self._reader.num_record_batches):
            yield self._reader.get_batch(number).column(position).to_numpy(zero_copy_only=True)


# ----------------------------------------------------------------------------------------------- sources


def fingerprint(path: str) -> dict:
    """What tells a changed file: size and modification time (local), size and ETag (S3)."""
    if is_s3_url(path):
        head = head_s3_object(path)
        return {"path": path, "size": head["ContentLength"], "etag": head["ETag"]}
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _same_source(recorded: dict, current: dict) -> bool:
    return all(recorded.get(key) == current[key] for key in current if key != "path")


def beside_path(labels_path: str) -> Path:
    """Where a store's own catalogue lies: `<labels stem>.catalogue.arrow` beside the labels."""
    labels = Path(labels_path)
    return labels.with_name(labels.stem + CATALOGUE_SUFFIX)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "t2vlp" / "catalogues")


def cache_path(labels_path: str, index_path: str, cache_dir: str | os.PathLike | None) -> Path:
    """The catalogue of a store whose folder cannot be written (read-only, or on S3), in the cache folder: named
    by the labels file and a hash of where both files are."""
    where = "\n".join(p if is_s3_url(p) else os.path.abspath(p) for p in (labels_path, index_path))
    digest = hashlib.sha256(where.encode()).hexdigest()[:16]
    stem = Path(split_s3_url(labels_path)[1] if is_s3_url(labels_path) else labels_path).stem
    return Path(cache_dir or default_cache_dir()) / f"{stem}-{digest}{CATALOGUE_SUFFIX}"


def candidate_paths(labels_path: str, index_path: str, cache_dir: str | os.PathLike | None) -> list[Path]:
    beside = [] if is_s3_url(labels_path) else [beside_path(labels_path)]
    return [*beside, cache_path(labels_path, index_path, cache_dir)]


def open_valid(path: Path, labels_path: str, index_path: str, quiet: bool = False) -> Catalogue | None:
    """The catalogue at `path` when it is complete and made from these labels and this index as they are now."""
    if not path.is_file():
        return None
    say = logger.debug if quiet else logger.info
    try:
        catalogue = Catalogue(path)
    except CatalogueError as error:
        say("%s is not used: %s", path, error)
        return None
    recorded = catalogue.info.sources
    for name, source in (("labels", labels_path), ("index", index_file(index_path))):
        current = fingerprint(source)
        if name not in recorded or not _same_source(recorded[name], current) or not _same_place(
                recorded[name], current, path):
            say("%s was made from another %s than %s (or it changed since): not used", path, name, source)
            return None
    return catalogue


def _same_place(recorded: dict, current: dict, catalogue_path: Path) -> bool:
    """The same file: for a catalogue beside its store, the same name relative to it (a store moved whole keeps
    its catalogue); in the cache, the same absolute path or URL."""
    if is_s3_url(current["path"]) or "relative" not in recorded:
        return recorded.get("path") == current["path"]
    return recorded["relative"] == os.path.relpath(current["path"], catalogue_path.parent)


def sources_of(labels_path: str, index_path: str, catalogue_path: Path) -> dict:
    sources = {}
    for name, source in (("labels", labels_path), ("index", index_file(index_path))):
        sources[name] = fingerprint(source)
        if not is_s3_url(source):
            sources[name]["relative"] = os.path.relpath(sources[name]["path"], catalogue_path.parent)
    return sources


# ----------------------------------------------------------------------------------------------- finding, building


def find_catalogue(labels_path: str | os.PathLike, index_path: str | os.PathLike,
                   cache_dir: str | os.PathLike | None = None, quiet: bool = False) -> Catalogue | None:
    """A valid catalogue of this store: beside the labels, else in the cache folder; None when there is none."""
    labels_path, index_path = str(labels_path), str(index_path)
    for path in candidate_paths(labels_path, index_path, cache_dir):
        catalogue = open_valid(path, labels_path, index_path, quiet)
        if catalogue is not None:
            return catalogue
    return None


def ensure_catalogue(labels_path: str | os.PathLike, index_path: str | os.PathLike,
                     cache_dir: str | os.PathLike | None = None) -> Catalogue:
    """The store's valid catalogue, derived first when there is none (beside the labels when that folder can be
    written, else in the cache folder), under a lock: a second process asking meanwhile waits and uses it."""
    labels_path, index_path = str(labels_path), str(index_path)
    found = find_catalogue(labels_path, index_path, cache_dir)
    if found is not None:
        return found
    target = writable_target(labels_path, index_path, cache_dir)
    with CatalogueLock(target):
        found = find_catalogue(labels_path, index_path, cache_dir)  # another process built it while we waited
        if found is not None:
            return found
        remove_temporaries(target)
        return build_catalogue(labels_path, index_path, target)


def wait_for_catalogue(labels_path: str | os.PathLike, index_path: str | os.PathLike,
                       cache_dir: str | os.PathLike | None = None, poll_s: float = 2.0) -> Catalogue:
    """The catalogue another process (the node's first rank) is building: polled until it is complete."""
    started = time.monotonic()
    reported = started
    while True:
        found = find_catalogue(labels_path, index_path, cache_dir, quiet=True)
        if found is not None:
            return found
        if time.monotonic() - reported > 60:
            reported = time.monotonic()
            logger.info("waiting for the catalogue of %s (%.0f s so far)", labels_path, reported - started)
        time.sleep(poll_s)


def writable_target(labels_path: str, index_path: str, cache_dir: str | os.PathLike | None) -> Path:
    if not is_s3_url(labels_path):
        beside = beside_path(labels_path)
        if _can_create_in(beside.parent):
            return beside
    target = cache_path(labels_path, index_path, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _can_create_in(folder: Path) -> bool:
    """Tried, not asked (os.access): a read-only mount, an immutable folder or a root-squashed share answer
    only to a real attempt."""
    try:
        fd, name = tempfile.mkstemp(prefix=".t2vlp-write-test.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


class CatalogueLock:
    """An exclusive `flock` on `<catalogue>.lock`, waited for: one process builds, the others wait for it. The
    kernel releases it when its holder dies, however it dies."""

    def __init__(self, catalogue_path: Path) -> None:
        self.path = catalogue_path.with_name(catalogue_path.name + ".lock")

    def __enter__(self) -> CatalogueLock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is building %s: waiting for it", self.path.with_suffix(""))
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def build_catalogue(labels_path: str, index_path: str, target: Path) -> Catalogue:
    """Derive the catalogue of a store from its labels and index: the labels parsed as a stream (never whole),
    each id looked up in the index (the first line of a repeated id wins; an id not in it gets shard -1)."""
    started = time.monotonic()
    index_path = index_file(index_path)
    sources = sources_of(labels_path, index_path, target)  # before reading: a change meanwhile invalidates it
    logger.info("building the catalogue of %s and %s in %s", labels_path, index_path, target)
    index = read_index_columns(index_path)
    n_duplicates = len(index.video_ids) - pc.count_distinct(index.video_ids).as_py()
    labels_temp = unique_temporary(target)
    try:
        _write_labels_table(labels_path, labels_temp)
        with pa.memory_map(str(labels_temp)) as mapped, CatalogueWriter(target) as writer:
            labels = pa.ipc.open_file(mapped).read_all()
            rows = pc.index_in(labels.column("video_id"), value_set=index.video_ids)
            n_missing = rows.null_count
            start = 0
            for batch in labels.to_batches():
                found = rows.slice(start, batch.num_rows)
                start += batch.num_rows
                known = pc.fill_null(found, -1).to_numpy().astype(np.int64)
                present = known >= 0
                shards = np.where(present, index.shards[np.maximum(known, 0)], -1)
                offsets = np.where(present, index.offsets[np.maximum(known, 0)], 0)
                writer.add_columns(batch.column(0), batch.column(1), shards, offsets, np.full(len(known), -1))
            writer.finish(index.recorded_shards, n_missing, n_duplicates, sources)
    finally:
        labels_temp.unlink(missing_ok=True)
    catalogue = Catalogue(target)
    logger.info("catalogue of %d labels (%d not in the index; %d repeated index lines, the first of each used) "
                "built in %.1f s: %s", len(catalogue), n_missing, n_duplicates, time.monotonic() - started, target)
    return catalogue


# ----------------------------------------------------------------------------------------------- labels


def _write_labels_table(labels_path: str, path: Path) -> None:
    """The labels' ids and captions, streamed into an Arrow file (so the whole file is never held as objects)."""
    schema = pa.schema([("video_id", pa.string()), ("caption", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        ids, captions = [], []
        for video_id, caption in iter_labels(labels_path):
            ids.append(video_id)
            captions.append(caption)
            if len(ids) >= LABEL_BATCH:
                writer.write_batch(pa.record_batch([ids, captions], schema=schema))
                ids, captions = [], []
        if ids:
            writer.write_batch(pa.record_batch([ids, captions], schema=schema))
