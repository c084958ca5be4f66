"""Stage 1 (METHOD §5): symmetric video-text contrastive loss over the all-gathered batch + local alignment."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.optim import NEW_PARAM_PATTERNS_BY_TASK
from engine.tasks.base import EvaluateFn, StepContext, Task


def contrastive_objective(model: nn.Module, batch: dict[str, Any], context: StepContext) -> dict[str, torch.Tensor]:
    return model(batch["input_ids"], batch["attention_mask"], batch["video"], batch["video_mask"],
                 gather=context.gather)


def clip_pretraining_task(evaluate: EvaluateFn | None = None) -> Task:
    return Task("clip", contrastive_objective, NEW_PARAM_PATTERNS_BY_TASK["clip"], evaluate=evaluate)
