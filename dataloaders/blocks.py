"""Reading a clip store by the block, for object storage and slow network filesystems (docs/data.md §2.2): the
samples of a catalogue in shard-and-offset order are cut into blocks of at most K records that lie next to each
other in one shard; a block is fetched with one ranged read (one GET on S3) and its records are parsed from it.
The epoch order over blocks is the sampler's (engine/sampler.py, `BlockSampler`). Free of torch.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dataloaders.catalogue import Catalogue
from dataloaders.tfrecord_io import (
    FOOTER_SIZE,
    HEADER_SIZE,
    RecordCorruptError,
    RecordReader,
    check_payload,
    parse_header,
)

OFFSET_BITS = 40  # a record's key: shard << 40 | offset (shards of up to 1 TB, 2^23 shards)


@dataclass
class BlockLayout:
    """Blocks over the catalogue's rows that have a record, in (shard, offset) order.

    `order[p]` is the row at position p (None: position p is row p, as in a store the converter wrote, whose
    labels follow its shards); block b holds positions starts[b] to starts[b + 1] - 1, all in shard `shards[b]`,
    and its records lie in bytes [begins[b], ends[b]) of that shard (ends[b] -1: to the shard's end)."""

    order: np.ndarray | None
    starts: np.ndarray  # int64 [n_blocks + 1]
    shards: np.ndarray  # int32 [n_blocks]
    begins: np.ndarray  # int64 [n_blocks]
    ends: np.ndarray  # int64 [n_blocks]
    records_per_block: int

    @property
    def n_blocks(self) -> int:
        return len(self.shards)

    @property
    def n_samples(self) -> int:
        return int(self.starts[-1])

    def rows(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.order is None else self.order[positions]

    def __post_init__(self) -> None:
        self._keys = (self.shards.astype(np.int64) << OFFSET_BITS) | self.begins

    def block_of(self, shard: int, offset: int) -> int:
        """The block whose byte range holds the record at `offset` of `shard`."""
        return int(np.searchsorted(self._keys, (shard << OFFSET_BITS) | offset, side="right")) - 1


def block_layout(catalogue: Catalogue, records_per_block: int) -> BlockLayout:
    """The blocks of a catalogue. One whose rows are already in (shard, offset) order, all with a record (the
    converter's), is read as a stream: memory for the blocks alone. Another is sorted: 8 bytes a sample, in each
    rank that uses it."""
    if records_per_block < 1:
        raise ValueError(f"records per block must be at least 1, got {records_per_block}")
    shard_changes = _shard_changes_if_in_order(catalogue)
    if shard_changes is None:
        return _sorted_layout(catalogue, records_per_block)
    n = len(catalogue)
    starts = _block_starts(shard_changes, n, records_per_block)
    first, last = starts[:-1], starts[1:] - 1
    shards, begins = _gather(catalogue, "shard", first), _gather(catalogue, "offset", first)
    last_offsets, last_lengths = _gather(catalogue, "offset", last), _gather(catalogue, "length", last)
    ends = np.where(last_lengths >= 0, last_offsets + last_lengths, -1)
    for block in np.flatnonzero(last_lengths < 0):  # up to the next record of the shard, or to its end
        row = int(last[block]) + 1
        while row < n and catalogue.location(row)[:2] == (int(shards[block]), int(last_offsets[block])):
            row += 1  # rows that share the record (one clip, several captions)
        if row < n and catalogue.location(row)[0] == shards[block]:
            ends[block] = catalogue.location(row)[1]
    return BlockLayout(None, starts, shards.astype(np.int32), begins.astype(np.int64), ends.astype(np.int64),
                       records_per_block)


def _shard_changes_if_in_order(catalogue: Catalogue) -> np.ndarray | None:
    """The rows where the shard changes, when every row has a record and the rows are in (shard, offset) order;
    else None. One pass over two columns, a batch at a time."""
    changes, previous, row = [], None, 0
    for shards, offsets in zip(catalogue.column("shard"), catalogue.column("offset")):
        if len(shards) == 0:
            continue
        if shards.min() < 0:
            return None
        keys = (shards.astype(np.int64) << OFFSET_BITS) | offsets
        if np.any(keys[1:] < keys[:-1]) or (previous is not None and keys[0] < previous[1]):
            return None
        new = np.flatnonzero(shards[1:] != shards[:-1]) + 1
        if previous is None or shards[0] != previous[0]:
            new = np.concatenate([[0], new])
        changes.append(new + row)
        previous, row = (shards[-1], keys[-1]), row + len(shards)
    return np.concatenate(changes).astype(np.int64) if changes else np.zeros(0, np.int64)


def _block_starts(shard_changes: np.ndarray, n: int, records_per_block: int) -> np.ndarray:
    runs = zip(shard_changes, [*shard_changes[1:], n])
    starts = [np.arange(start, end, records_per_block) for start, end in runs]
    return np.append(np.concatenate(starts) if starts else np.zeros(0, np.int64), n).astype(np.int64)


def _gather(catalogue: Catalogue, name: str, rows: np.ndarray) -> np.ndarray:
    """A column's values at ascending `rows`, batch by batch."""
    out, per_batch = np.zeros(len(rows), np.int64), catalogue.info.rows_per_batch
    for number, values in enumerate(catalogue.column(name)):
        lo, hi = np.searchsorted(rows, [number * per_batch, number * per_batch + len(values)])
        out[lo:hi] = values[rows[lo:hi] - number * per_batch]
    return out


def _sorted_layout(catalogue: Catalogue, records_per_block: int) -> BlockLayout:
    shards = np.concatenate(list(catalogue.column("shard")))
    offsets = np.concatenate(list(catalogue.column("offset")))
    lengths = np.concatenate(list(catalogue.column("length")))
    keys = (shards.astype(np.int64) << OFFSET_BITS) | offsets
    order = np.flatnonzero(shards >= 0)
    order = order[np.argsort(keys[order], kind="stable")]
    sorted_shards, sorted_offsets, sorted_lengths = shards[order], offsets[order], lengths[order]
    del shards, offsets, lengths, keys
    n = len(order)
    new_shard = np.ones(n, dtype=bool)
    new_shard[1:] = sorted_shards[1:] != sorted_shards[:-1]
    starts = _block_starts(np.flatnonzero(new_shard), n, records_per_block)
    first, last = starts[:-1], starts[1:] - 1
    ends = np.full(len(first), -1, dtype=np.int64)
    known = sorted_lengths[last] >= 0
    ends[known] = sorted_offsets[last][known] + sorted_lengths[last][known]
    # otherwise: up to the next record of the same shard (records sharing an offset, one clip with several
    # captions, are passed over), or to the shard's end
    sorted_keys = (sorted_shards.astype(np.int64) << OFFSET_BITS) | sorted_offsets
    key_runs = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]])) if n else \
        np.zeros(0, np.int64)
    next_run = np.append(key_runs[1:], n)[np.searchsorted(key_runs, last[~known], side="right") - 1]
    same_shard = next_run < n
    same_shard[same_shard] = sorted_shards[next_run[same_shard]] == sorted_shards[last[~known][same_shard]]
    unknown_ends = ends[~known]
    unknown_ends[same_shard] = sorted_offsets[next_run[same_shard]]
    ends[~known] = unknown_ends
    return BlockLayout(order, starts, sorted_shards[first].astype(np.int32), sorted_offsets[first].astype(np.int64),
                       ends, records_per_block)


class BlockReader:
    """Record payloads read through whole blocks: a block is fetched once (one ranged read) and kept while the
    `capacity` blocks read after it are not all new (the sampler's shuffle buffer plus one). Per process: a
    forked DataLoader worker starts with none."""

    def __init__(self, layout: BlockLayout, shard_path: Callable[[int], str], capacity: int,
                 reader: RecordReader) -> None:
        self.layout = layout
        self.shard_path = shard_path
        self.capacity = max(1, capacity)
        self.reader = reader  # its open sources, and whether CRCs are checked
        self.n_fetched = 0
        self._pid = os.getpid()
        self._blocks: OrderedDict[int, bytes] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_blocks": OrderedDict()}

    def payload(self, shard: int, offset: int) -> bytes:
        """The payload of the record at `offset` of `shard`; framing and (with verify_crc) CRCs checked."""
        block = self.layout.block_of(shard, offset)
        data = self._block(block)
        start = offset - int(self.layout.begins[block])
        path = self.shard_path(shard)
        verify_crc = self.reader.verify_crc
        length = parse_header(data[start:start + HEADER_SIZE], verify_crc=verify_crc, source=path, offset=offset)
        end = start + HEADER_SIZE + length + FOOTER_SIZE
        if end > len(data):
            raise RecordCorruptError(f"{path}: truncated record at byte offset {offset}")
        payload = data[start + HEADER_SIZE:start + HEADER_SIZE + length]
        check_payload(payload, data[end - FOOTER_SIZE:end], verify_crc=verify_crc, source=path, offset=offset)
        return payload

    def _block(self, block: int) -> bytes:
        if self._pid != os.getpid():  # forked: the parent's blocks are not this process's to count
            self._blocks, self._pid, self.n_fetched = OrderedDict(), os.getpid(), 0
        data = self._blocks.get(block)
        if data is not None:
            self._blocks.move_to_end(block)
            return data
        source = self.reader.source(self.shard_path(int(self.layout.shards[block])))
        begin, end = int(self.layout.begins[block]), int(self.layout.ends[block])
        data = source.read_at(begin, None if end < 0 else end - begin)
        self.n_fetched += 1
        self._blocks[block] = data
        if len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
        return data
