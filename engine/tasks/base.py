"""What a stage or task plugs into the one training loop (`engine.trainer.Trainer`).

A `Task` says how a batch becomes losses (`objective`), which parameters form the fixed-rate "new" LR group, and
how to evaluate. The loop owns everything else: DDP, autocast, accumulation, non-finite skipping, resume, stop
signals and logging.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from engine import distributed
from engine.checkpointing import BEST_CHECKPOINT_NAME, BestCheckpoint
from engine.run_logging import read_metrics
from modules.checkpoint import load_state_dict_checked, read_model_state_dict

logger = logging.getLogger("t2vlp.train")

# evaluate(model, step, epoch) -> metrics record (already logged) or None; called on rank 0 only, or on every rank
# when the task says `evaluate_on_all_ranks` (the evaluation then shares the work and rank 0 logs).
EvaluateFn = Callable[[nn.Module, int, int], dict[str, Any] | None]


@dataclass(frozen=True)
class StepContext:
    """Where the loop is when it computes a micro-batch, and the collectives an objective may use."""

    seed: int
    step: int  # optimiser steps already taken
    micro: int  # index of the micro-batch within the accumulation window
    epoch: int

    def generator(self) -> torch.Generator:
        """A CPU Generator seeded by (seed, step, micro): the same on every rank and on resume."""
        seed = int(np.random.SeedSequence([self.seed, self.step, self.micro]).generate_state(1)[0])
        return torch.Generator().manual_seed(seed)

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        """All ranks' rows, gradient-summing backward (see engine.distributed.all_gather_with_grad)."""
        return distributed.all_gather_with_grad(tensor)

    @staticmethod
    def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """All ranks' rows without autograd, and the index of this rank's first row."""
        return distributed.all_gather_rows(tensor)

    @staticmethod
    def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum_tensor(tensor)

    @staticmethod
    def world_size() -> int:
        return distributed.get_world_size()


# objective(model, batch on the device with normalised video, context) -> {"loss": ..., other detached scalars}
Objective = Callable[[nn.Module, dict[str, Any], StepContext], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Task:
    """What the training loop trains: built by a task's `prepare` for one run (engine.tasks.registry)."""

    name: str
    objective: Objective
    new_param_patterns: tuple[str, ...]  # substrings naming the fixed-LR ("new") parameters
    find_unused_parameters: bool = False  # DDP: parameters that get no gradient in some steps
    evaluate: EvaluateFn | None = None
    evaluate_on_all_ranks: bool = False


class ObjectiveModule(nn.Module):
    """The model plus its objective as one module, so DDP sees a single forward per micro-batch."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, Any], context: StepContext) -> dict[str, torch.Tensor]:
        return self.objective(self.model, batch, context)


def global_mean_scale(count: torch.Tensor, context: StepContext) -> torch.Tensor:
    """The factor that turns a sum over this rank's `count` items into its share of the global mean: after DDP's
    average over ranks, sum * factor is the sum over all ranks divided by the count over all ranks, so N processes
    match one process on the global batch. One all-reduce, no host synchronisation."""
    global_count = context.sum_over_ranks(count.float()).clamp(min=1.0)
    return context.world_size() / global_count


def test_selected_checkpoint(selection: BestCheckpoint, model: nn.Module, evaluate: EvaluateFn, *, task: str,
                             split: str, selected_on: str) -> None:
    """After a run that selected its checkpoint on `selected_on` (not the split evaluated here): evaluate `split`
    with the selected checkpoint, once (not again when metrics.jsonl already has the `task` rows of that step)."""
    best = selection.best
    if best is None:
        logger.warning("no %s (no evaluation after step 0): the %s split is not evaluated", BEST_CHECKPOINT_NAME,
                       split)
        return
    if best["checkpoint"] is None or not os.path.isfile(best["checkpoint"]):
        logger.warning("the best %s step %d has no checkpoint on disk (see --save_steps / --keep_checkpoints): the "
                       "%s split is not evaluated", selected_on, best["step"], split)
        return
    if any(row.get("task") == task and row.get("split") == split and row.get("step") == best["step"]
           for row in read_metrics(selection.output_dir / "metrics.jsonl")):
        logger.info("the %s split was already evaluated with the step-%d checkpoint", split, best["step"])
        return
    logger.info("evaluating the %s split with the checkpoint selected on %s: %s (%s %.2f)", split, selected_on,
                best["checkpoint"], best["metric"], best["value"])
    load_state_dict_checked(model, read_model_state_dict(best["checkpoint"]))
    evaluate(model, best["step"], best["epoch"])
