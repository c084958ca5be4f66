"""Evaluation of every task: retrieval (meanP, fusion rerank, DSL), ranking metrics, caption metrics; and the
settings every evaluator shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.run_logging import RunLogger


@dataclass(frozen=True)
class EvalContext:
    """What every evaluator shares: where results go, the device and precision, the batches, extra row fields."""

    run: RunLogger
    output_dir: str
    device: torch.device
    precision: str
    batch_size: int
    num_workers: int
    extra: Mapping[str, Any] = field(default_factory=dict)  # added to every metrics row (dataset, checkpoint)
