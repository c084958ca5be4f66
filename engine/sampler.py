"""Samplers for map-style datasets: a resumable training sampler, its block-mode variant for object storage, and an
exactly-once evaluation sampler."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from dataloaders.blocks import BlockLayout


class ResumableDistributedSampler(Sampler[int]):
    """torch's DistributedSampler split, plus resuming in the middle of an epoch.

    Each epoch draws one permutation of range(dataset_len) from (seed + epoch), the same on every rank.
    Remainder when dataset_len is not divisible by num_replicas:
      drop_last=True  -> the last dataset_len % num_replicas samples of the permutation are dropped: every sample
                         is seen at most once per epoch (use this for training);
      drop_last=False -> the permutation is padded by repeating its start, as torch's DistributedSampler does.
    Rank r takes positions r, r + num_replicas, r + 2 * num_replicas, ... of that list, so after every rank has
    taken k samples, the consumed samples are exactly the first k * num_replicas of the list. Resuming therefore
    only needs a count of samples consumed in the epoch, which is what `skip`/`set_start` take.

    Usage: per epoch call `set_epoch(epoch)` (resets the start to 0), then, on resume only, `set_start(...)` or
    `skip(...)`, then create the DataLoader iterator. `len(sampler)` is what is left of this rank's shard;
    `num_samples` is the full per-rank epoch length (use it for the schedule's total steps).
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        if dataset_len < 1:
            raise ValueError("dataset is empty")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(f"drop_last with {dataset_len} samples < {num_replicas} replicas leaves nothing")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # samples of the epoch list already consumed by all ranks together
        self.total_size = self._fit_to_replicas(dataset_len)
        self.num_samples = self.total_size // num_replicas

    def _fit_to_replicas(self, length: int) -> int:
        if self.drop_last:
            return length - length % self.num_replicas
        return -(-length // self.num_replicas) * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of `epoch` and start from its beginning."""
        self.epoch = epoch
        self.start = 0

    def skip(self, n_samples: int) -> None:
        """Resume after `n_samples` samples of this epoch consumed by ALL ranks together (e.g. optimiser steps
        done in the epoch x global batch size). Works with a different world size than the interrupted run."""
        if not 0 <= n_samples <= self.total_size:
            raise ValueError(f"cannot skip {n_samples} of {self.total_size} samples")
        self.start = n_samples

    def set_start(self, batch_index: int, batch_size: int) -> None:
        """Resume at batch `batch_index` (0-based) when every rank loads `batch_size` samples per batch."""
        self.skip(batch_index * batch_size * self.num_replicas)

    def epoch_indices(self) -> torch.Tensor:
        """The whole epoch order (all ranks), after dropping or padding the remainder: an int64 tensor (8 bytes a
        sample, never a Python list: at 10^7 samples a list costs about ten times that, in every rank)."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator)
        else:
            order = torch.arange(self.dataset_len)
        return _fit(order, self.total_size)

    def rank_indices(self) -> torch.Tensor:
        """What is left of this rank's share of the epoch: its own copy, so the whole order is freed."""
        full = self.epoch_indices()
        remaining = full[self.start:]
        # A start from a run with another world size may not be a multiple of num_replicas.
        remaining = _fit(remaining, self._fit_to_replicas(len(remaining)), pad_from=full)
        return remaining[self.rank::self.num_replicas].clone()

    def __iter__(self) -> Iterator[int]:
        return map(int, self.rank_indices().numpy())

    def __len__(self) -> int:
        return self._fit_to_replicas(self.total_size - self.start) // self.num_replicas


def _fit(order: torch.Tensor, size: int, pad_from: torch.Tensor | None = None) -> torch.Tensor:
    """Truncate `order` to `size`, or pad it by cycling through `pad_from` (default `order`)."""
    if len(order) >= size:
        return order[:size]
    source = pad_from if pad_from is not None else order
    missing = size - len(order)
    repeats = -(-missing // len(source))
    return torch.cat([order, source.repeat(repeats)[:missing]])


def eval_shard(dataset_len: int, num_replicas: int, rank: int) -> range:
    """Contiguous block of indices for `rank`: every index exactly once over all ranks, block sizes differ by at
    most one, and concatenating the blocks in rank order restores range(dataset_len)."""
    base, extra = divmod(dataset_len, num_replicas)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class BlockSampler(Sampler[int]):
    """Block mode (docs/data.md §2.2): the store read by the block, for object storage.

    Each epoch draws a permutation of the layout's blocks from (seed + epoch), the same on every rank, and cuts it
    into groups of `buffer_blocks` blocks; a group's samples are shuffled together (a shuffle buffer of that many
    blocks, from (seed, epoch, group)). The groups, one after the other, are the epoch's global order; rank r takes
    its r-th contiguous part (the last len % num_replicas samples are dropped), so a block is read by one rank
    (two, where a part ends inside it). Within a rank the part is cut into one contiguous stretch per DataLoader
    worker and its batches are dealt out in turn, so that worker k, which the DataLoader gives batches k,
    k + W, ..., reads its own blocks. Resuming needs the number of samples consumed by all ranks, with the same
    number of ranks and workers and the same batch (the order depends on them).
    """

    def __init__(self, layout: BlockLayout, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 buffer_blocks: int = 8, num_workers: int = 0, batch_size: int = 1) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        if buffer_blocks < 1 or batch_size < 1:
            raise ValueError("buffer_blocks and batch_size must be at least 1")
        self.layout = layout
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.buffer_blocks = buffer_blocks
        self.num_workers = max(1, num_workers)
        self.batch_size = batch_size
        self.num_samples = layout.n_samples // num_replicas
        if self.num_samples < 1:
            raise ValueError(f"{layout.n_samples} readable samples cannot be shared by {num_replicas} processes")
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start = 0  # samples of this rank's order already consumed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def skip(self, n_samples: int) -> None:
        """Resume after `n_samples` samples of this epoch consumed by all ranks together."""
        if not 0 <= n_samples <= self.total_size or n_samples % self.num_replicas:
            raise ValueError(f"cannot skip {n_samples} of {self.total_size} samples over {self.num_replicas} ranks")
        self.start = n_samples // self.num_replicas

    def set_start(self, batch_index: int, batch_size: int) -> None:
        self.skip(batch_index * batch_size * self.num_replicas)

    def rank_positions(self) -> np.ndarray:
        """This rank's whole order for the epoch, as positions of the layout (int64)."""
        layout = self.layout
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        blocks = torch.randperm(layout.n_blocks, generator=generator).numpy()
        sizes = np.diff(layout.starts)[blocks]
        group_ends = np.cumsum(np.add.reduceat(sizes, np.arange(0, len(blocks), self.buffer_blocks)))
        begin, end = self.rank * self.num_samples, (self.rank + 1) * self.num_samples
        first, last = np.searchsorted(group_ends, [begin, end - 1], side="right")
        pieces = []
        for group in range(int(first), int(last) + 1):
            members = blocks[group * self.buffer_blocks:(group + 1) * self.buffer_blocks]
            positions = np.concatenate([np.arange(layout.starts[b], layout.starts[b + 1]) for b in members])
            pieces.append(np.random.default_rng([self.seed, self.epoch, group]).permutation(positions))
        group_begin = int(group_ends[first - 1]) if first > 0 else 0
        part = np.concatenate(pieces)[begin - group_begin:end - group_begin]
        return self._dealt_to_workers(part)

    def _dealt_to_workers(self, part: np.ndarray) -> np.ndarray:
        if self.num_workers == 1:
            return part
        stretches = np.array_split(np.arange(len(part)), self.num_workers)
        worker = np.concatenate([np.full(len(s), w) for w, s in enumerate(stretches)])
        batch = np.concatenate([np.arange(len(s)) // self.batch_size for s in stretches])
        return part[np.lexsort((np.arange(len(part)), worker, batch))]

    def __iter__(self) -> Iterator[int]:
        return map(int, self.layout.rows(self.rank_positions()[self.start:]))

    def __len__(self) -> int:
        return self.num_samples - self.start
