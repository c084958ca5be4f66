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

    def block_of(self, shard: int, offset: int) -> int:
        """The block whose byte range holds the record at `offset` of `shard`."""
        keys = (self.shards.astype(np.int64) << OFFSET_BITS) | self.begins
        return int(np.searchsorted(keys, (shard << OFFSET_BITS) | offset, side="right")) - 1


def block_layout(catalogue: Catalogue, records_per_block: int) -> BlockLayout:
    """The blocks of a catalogue. A catalogue whose rows are already in (shard, offset) order (the converter's)
    costs a scan of two columns; another is sorted (8 bytes a sample, held by each rank)."""
    if records_per_block < 1:
        raise ValueError(f"records per block must be at least 1, got {records_per_block}")
    shards = np.concatenate(list(catalogue.column("shard"))) if len(catalogue) else np.zeros(0, np.int32)
    offsets = np.concatenate(list(catalogue.column("offset"))) if len(catalogue) else np.zeros(0, np.int64)
    lengths = np.concatenate(list(catalogue.column("length"))) if len(catalogue) else np.zeros(0, np.int64)
    keys = (shards.astype(np.int64) << OFFSET_BITS) | offsets
    present = shards >= 0
    if present.all() and (len(keys) < 2 or bool(np.all(keys[1:] >= keys[:-1]))):
        order = None
    else:
        order = np.flatnonzero(present)
        order = order[np.argsort(keys[order], kind="stable")]
    positions = np.arange(len(keys)) if order is None else order
    sorted_shards, sorted_offsets, sorted_lengths = shards[positions], offsets[positions], lengths[positions]
    del shards, offsets, lengths, keys
    n = len(positions)
    new_shard = np.ones(n, dtype=bool)
    new_shard[1:] = sorted_shards[1:] != sorted_shards[:-1]
    run_starts = np.flatnonzero(new_shard)
    starts = np.concatenate([np.arange(s, e, records_per_block) for s, e in
                             zip(run_starts, [*run_starts[1:], n])]).astype(np.int64) if n else np.zeros(0, np.int64)
    starts = np.append(starts, n)
    first, last = starts[:-1], starts[1:] - 1
    ends = np.full(len(first), -1, dtype=np.int64)
    known = sorted_lengths[last] >= 0
    ends[known] = sorted_offsets[last][known] + sorted_lengths[last][known]
    # otherwise: up to the next record of the same shard (records sharing an offset, one clip with several
    # captions, are passed over), or to the shard's end
    sorted_keys = (sorted_shards.astype(np.int64) << OFFSET_BITS) | sorted_offsets
    run_starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]])) if n else run_starts
    next_run = np.append(run_starts[1:], n)[np.searchsorted(run_starts, last[~known], side="right") - 1]
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
