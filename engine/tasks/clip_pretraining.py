"""Stage 1 (docs/method.md §5): symmetric video-text contrastive loss over the all-gathered batch + local alignment, on
WebVid TFRecords (or MSR-VTT videos), evaluated by meanP retrieval on MSR-VTT 1k-A (`--val_csv`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.data import build_eval_dataset, build_train_dataset
from engine.evaluation import EvalContext
from engine.evaluation.retrieval import evaluate_retrieval, log_retrieval_rows
from engine.tasks.base import EvaluateFn, StepContext, Task
from engine.tasks.registry import PreparedRun, RunContext, TaskDefinition, register_task

NAME = "clip"
NEW_PARAM_PATTERNS = ("fusion", "local")  # the tube encoder, its centers and the alignment projections


def contrastive_objective(model: nn.Module, batch: dict[str, Any], context: StepContext) -> dict[str, torch.Tensor]:
    return model(batch["input_ids"], batch["attention_mask"], batch["video"], batch["video_mask"],
                 gather=context.gather)


def clip_pretraining_task(evaluate: EvaluateFn | None = None) -> Task:
    return Task(NAME, contrastive_objective, NEW_PARAM_PATTERNS, evaluate=evaluate)


def make_clip_evaluator(dataset: Any, settings: EvalContext) -> EvaluateFn:
    """meanP retrieval rows of the evaluation split in metrics.jsonl and log.txt."""

    def evaluate(model: nn.Module, step: int, epoch: int) -> dict[str, Any]:
        result = evaluate_retrieval(model, dataset, batch_size=settings.batch_size, device=settings.device,
                                    precision=settings.precision, num_workers=settings.num_workers)
        return log_retrieval_rows(settings.run, [result], step, epoch, extra=dict(settings.extra))[0]

    return evaluate


def prepare(context: RunContext, model: nn.Module) -> PreparedRun:
    args, image_size = context.args, model.image_resolution
    eval_dataset = build_eval_dataset(args, image_size)
    evaluate = make_clip_evaluator(eval_dataset, context.eval_context()) if eval_dataset is not None else None
    return PreparedRun(clip_pretraining_task(evaluate), lambda: build_train_dataset(args, image_size,
                                                                                 context.webvid_train))


DEFINITION = register_task(TaskDefinition(
    name=NAME, prepare=prepare, new_param_patterns=NEW_PARAM_PATTERNS,
    defaults={"eval_steps": 500, "save_steps": 0, "new_params_lr": 1e-5},  # the original script's (docs/method.md §8)
    pretraining=True,
))
