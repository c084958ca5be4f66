"""Samplers for map-style datasets: a resumable training sampler and an exactly-once evaluation sampler."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


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


