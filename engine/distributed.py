"""Process-group setup and the collectives the training loop needs.

Launch with `torchrun --nproc_per_node=N script.py ...` (NCCL on CUDA, gloo on CPU) or plain `python script.py`
(one process, no process group; every collective below is then the identity).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str | None = None) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group.

    `device_type` "cuda" or "cpu" forces the device (default: CUDA when available). Without torchrun's variables
    this is one process with no process group.
    """
    use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if launched and not dist.is_initialized():
        # Set-up has a short timeout of its own: a group that cannot form (a peer of a restarted group that never
        # comes) fails fast, so torchrun can start the next round, instead of waiting out the collective timeout.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=setup_timeout(), store=_attempt_store(rank, world_size))
        barrier()  # every rank has joined
        dist.set_timeout(collective_timeout())
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _attempt_store(rank: int, world_size: int) -> dist.Store | None:
    """Under torchrun's elastic agent, the store of this restart attempt: the agent keeps one store server for
    every attempt, so without a prefix of their own the workers of a restarted group may read the addresses of
    the group before them (dead processes) and fail to connect. None outside the agent (env:// as usual)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=setup_timeout()))
    return dist.PrefixStore(f"t2vlp/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt-{attempt}", store)


def setup_timeout() -> timedelta:
    """How long joining the process group may take: `T2VLP_DIST_SETUP_TIMEOUT_SECONDS`, default 120."""
    return timedelta(seconds=float(os.environ.get("T2VLP_DIST_SETUP_TIMEOUT_SECONDS", "120")))


def collective_timeout() -> timedelta:
    """How long a collective may wait: the other ranks sit in a barrier while rank 0 evaluates (retrieval rerank,
    caption decoding of a whole test split), which can take longer than torch's default (10 minutes for NCCL).
    `T2VLP_DIST_TIMEOUT_MINUTES` overrides the default of 60."""
    return timedelta(minutes=float(os.environ.get("T2VLP_DIST_TIMEOUT_MINUTES", "60")))


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0 (and in one-process mode)."""
    return get_rank() == 0


def barrier() -> None:
    if not _active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group. Call it after the training objects have gone out of scope.

    DDP wrappers sit in reference cycles; left to the interpreter's final collection they are torn down after
    the process group, and gloo then aborts the process at exit ("terminate called without an active
    exception", about one run in ten on 2 CPU cores). Collecting them here, while the group is alive, avoids
    that. The barrier keeps one rank from tearing down while another still talks."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def _gather_sizes(local_size: int, device: torch.device) -> list[int]:
    size = torch.tensor([local_size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's `tensor` (rows may differ per rank) in rank order."""
    max_rows = max(max(sizes), 1)
    padded = tensor.new_zeros((max_rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([chunk[:rows] for chunk, rows in zip(gathered, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        sizes = _gather_sizes(tensor.shape[0], tensor.device)
        rank = dist.get_rank()
        ctx.local_rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        return _gather_padded(tensor.contiguous(), sizes)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.local_rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` [b_r, ...] from every rank in rank order -> [sum b_r, ...]; ranks may differ in b_r.

    Backward returns this rank's rows of the SUM over ranks of the incoming gradient. Why that is the right
    scaling: every rank computes the same global loss L from the gathered rows, so every rank receives the same
    gradient G = dL/d(gathered). Rank r's parameters reach L only through its own rows G[r], so with the sum
    rank r ends with N * G[r] * d(rows_r)/d(theta); DDP then averages over the N ranks:
        (1/N) * sum_r N * G[r] * d(rows_r)/d(theta) = sum_r G[r] * d(rows_r)/d(theta) = dL/d(theta),
    the gradient of ONE process on the whole batch. Parameters used after the gather (logit_scale) get dL/ds on
    every rank, which DDP's average leaves unchanged. Losses computed on local rows only (mean over b) combine
    under DDP's average into the global mean when all ranks have the same b. (The original returned only
    G[r], i.e. 1/N of the true contrastive gradient: docs/method.md §11.11.)

    Every rank must run backward through the result (the all-reduce is a collective): decide to skip a step
    (e.g. a non-finite loss) on all ranks together. Without a process group this is the identity.
    """
    if not _active():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Like all_gather_with_grad without autograd: for evaluation embeddings of uneven shards."""
    if not _active():
        return tensor
    sizes = _gather_sizes(tensor.shape[0], tensor.device)
    return _gather_padded(tensor.contiguous(), sizes)


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's rows concatenated in rank order, index of this rank's first row); no autograd.

    Ranks may hold different numbers of rows. Without a process group: (tensor, 0)."""
    if not _active():
        return tensor, 0
    sizes = _gather_sizes(tensor.shape[0], tensor.device)
    return _gather_padded(tensor.contiguous(), sizes), sum(sizes[: dist.get_rank()])


@torch.no_grad()
def all_reduce_sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks, left on its device (no host synchronisation); a copy, without autograd."""
    if not _active():
        return tensor.detach()
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_sum(value: float | torch.Tensor) -> float:
    """Sum of a scalar over ranks, as a Python float (e.g. counts of skipped samples)."""
    return all_reduce_sums([value])[0]


def all_reduce_sums(values: Sequence[float | torch.Tensor]) -> list[float]:
    """Sums of several scalars over ranks in one collective, as Python floats."""
    if not _active():
        return [float(value) for value in values]
    tensor = torch.tensor([float(value) for value in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (e.g. per-rank RNG states for restore.bin)."""
    if not _active():
        return [obj]
    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (picklable objects)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]
