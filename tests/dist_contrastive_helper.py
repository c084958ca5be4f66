"""Run under torchrun (gloo, CPU): contrastive gradients through all_gather_with_grad + DDP.

Usage: torchrun --nproc_per_node=2 tests/dist_contrastive_helper.py OUT_DIR  (with the repository on PYTHONPATH)
Writes OUT_DIR/<case>_rank<r>.pt with the parameter gradients after DDP, and OUT_DIR/collectives_rank<r>.pt.
test_distributed.py imports the model and losses from here to compute the one-process reference.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine import distributed

FEATURE_DIM = 6
EMBED_DIM = 4
# case -> (rows of rank 0, rows of rank 1, add a local (per-rank mean) loss, gather function)
CASES = {
    "even": (3, 3, True, "sum"),
    "uneven": (2, 5, False, "sum"),
    "original_local_slice": (3, 3, False, "local_slice"),
}


class TinyDualEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.video = nn.Linear(FEATURE_DIM, EMBED_DIM)
        self.text = nn.Linear(FEATURE_DIM, EMBED_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, video: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.video(video), self.text(text), self.logit_scale


def build_model() -> TinyDualEncoder:
    torch.manual_seed(0)
    return TinyDualEncoder().double()


def global_batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(rows, FEATURE_DIM, generator=generator, dtype=torch.float64)
    text = torch.randn(rows, FEATURE_DIM, generator=generator, dtype=torch.float64)
    return video, text


def contrastive_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the (gathered) batch, docs/method.md §5.1."""
    logits = logit_scale.exp() * F.normalize(text, dim=-1) @ F.normalize(video, dim=-1).T
    target = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def local_loss(video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """A loss on local rows only, averaged over them (like the alignment loss)."""
    return F.mse_loss(video, text)


class _GatherLocalSlice(torch.autograd.Function):
    """The original's AllGather: backward returns only this rank's slice, without summing over ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        start = ctx.rows * dist.get_rank()
        return grad[start:start + ctx.rows]


def run_case(case: str, rank: int, out_dir: Path) -> None:
    rows_rank0, rows_rank1, with_local_loss, gather_kind = CASES[case]
    sizes = (rows_rank0, rows_rank1)
    gather = distributed.all_gather_with_grad if gather_kind == "sum" else _GatherLocalSlice.apply
    model = DistributedDataParallel(build_model())
    video, text = global_batch(sum(sizes))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    video_emb, text_emb, logit_scale = model(video[rows], text[rows])
    all_video, all_text = gather(video_emb), gather(text_emb)
    loss = contrastive_loss(all_video, all_text, logit_scale)
    if with_local_loss:
        loss = loss + local_loss(video_emb, text_emb)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
    torch.save({"grads": grads, "gathered_video": all_video.detach(), "loss": loss.detach()},
               out_dir / f"{case}_rank{rank}.pt")


def run_collectives(rank: int, out_dir: Path) -> None:
    results = {
        "sums": distributed.all_reduce_sums([float(rank + 1), torch.tensor(0.5)]),
        "sum": distributed.all_reduce_sum(torch.tensor(rank + 1.0)),
        "broadcast": distributed.broadcast_object({"from_rank": rank}),
        "objects": distributed.all_gather_object(f"rank{rank}"),
        "variable": distributed.all_gather_variable(torch.full((rank + 1, 2), float(rank))),
        "is_main": distributed.is_main(),
    }
    distributed.barrier()
    torch.save(results, out_dir / f"collectives_rank{rank}.pt")


def main() -> None:
    out_dir = Path(sys.argv[1])
    info = distributed.init_distributed(device_type="cpu")
    assert info.world_size == 2 and dist.get_backend() == "gloo"
    for case in CASES:
        run_case(case, info.rank, out_dir)
    run_collectives(info.rank, out_dir)
    distributed.cleanup()


if __name__ == "__main__":
    main()
