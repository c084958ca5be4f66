"""Text-video retrieval fine-tuning (METHOD §7a): contrastive + VTM with hard negatives (on detached inputs) +
local alignment, and its evaluation (meanP, fusion rerank, DSL on request) with model selection."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.evaluation.retrieval import encode_split, log_retrieval_rows, retrieval_rows
from engine.optim import NEW_PARAM_PATTERNS_BY_TASK
from engine.selection import BestCheckpoint
from engine.tasks.base import EvaluateFn, StepContext, Task
from engine.tasks.fusion_pretraining import matching_with_hard_negatives
from modules.fusion_objectives import TextParts, VideoParts
from modules.similarity import symmetric_contrastive_loss

logger = logging.getLogger("t2vlp.retrieval")

SELECTION_METRIC = "t2v R1"


@dataclass(frozen=True)
class RetrievalLossWeights:
    sim: float = 1.0
    vtm: float = 1.0
    align: float = 1.0


def retrieval_objective(weights: RetrievalLossWeights):
    """`L = L_sim + L_vtm + L_align` (METHOD §7a). The contrastive loss runs over the all-gathered batch and
    trains the backbone; VTM reads detached copies of the fusion inputs and draws its hard negatives from the same
    contrastive matrix; the alignment loss has gradients to the text states and the tubes."""

    def objective(model: nn.Module, batch: dict[str, Any], context: StepContext) -> dict[str, torch.Tensor]:
        attention_mask, video_mask = batch["attention_mask"], batch["video_mask"]
        text_eot, tokens = model.encode_text(batch["input_ids"], attention_mask)
        frames, tubes = model.encode_video(batch["video"], video_mask)
        sim = model.similarity(context.gather(text_eot), context.gather(frames), context.gather(video_mask))
        terms = {"sim_loss": symmetric_contrastive_loss(sim)}
        if weights.vtm:
            vtm = matching_with_hard_negatives(model, VideoParts(frames, video_mask, tubes),
                                               TextParts(tokens, attention_mask), text_eot, context, similarity=sim)
            terms["vtm_loss"] = vtm.loss
            terms["vtm_acc"] = 100.0 * vtm.correct.float() / vtm.count
        if weights.align:
            terms["align_loss"] = model.alignment_loss(tokens, attention_mask, tubes)
        loss = weights.sim * terms["sim_loss"] + weights.vtm * terms.get("vtm_loss", 0.0) \
            + weights.align * terms.get("align_loss", 0.0)
        return {"loss": loss, **{key: value.detach() for key, value in terms.items()}}

    return objective


def retrieval_task(weights: RetrievalLossWeights, evaluate: EvaluateFn | None = None) -> Task:
    return Task("retrieval", retrieval_objective(weights), NEW_PARAM_PATTERNS_BY_TASK["retrieval"],
                find_unused_parameters=True, evaluate=evaluate)


def selection_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row model selection reads: the rerank when there is one (METHOD §7a), else meanP."""
    by_scoring = {row["scoring"]: row for row in rows if row["scoring"] in ("meanP", "rerank")}
    return by_scoring.get("rerank", by_scoring["meanP"])


def make_retrieval_evaluator(
    dataset: Any, run: Any, device: torch.device, precision: str, *, batch_size: int, num_workers: int,
    rerank_top_k: int, rerank_batch_size: int, dsl: bool = False, dsl_temperature: float = 1.0,
    best: BestCheckpoint | None = None, extra: dict[str, Any] | None = None,
) -> EvaluateFn:
    """Evaluate the split: meanP, rerank and (with `dsl`) DSL rows in metrics.jsonl and log.txt; with `best`, model
    selection by text->video R@1 of the rerank (meanP when `rerank_top_k` is 0)."""

    def evaluate(model: nn.Module, step: int, epoch: int) -> dict[str, Any]:
        encoded = encode_split(model, dataset, batch_size=batch_size, device=device, precision=precision,
                               num_workers=num_workers, keep_fusion_inputs=rerank_top_k > 0)
        rows = retrieval_rows(model, encoded, rerank_top_k=rerank_top_k, rerank_batch_pairs=rerank_batch_size,
                              precision=precision, show_progress=True, dsl=dsl, dsl_temperature=dsl_temperature)
        records = log_retrieval_rows(run, rows, step, epoch, extra=extra)
        selected = selection_row(records)
        if best is not None and step > 0:  # selection among this run's checkpoints, not the starting one
            best.update(selected["t2v"]["R1"], step, epoch)
        return selected

    return evaluate


def best_checkpoint_for(output_dir: str, rerank_top_k: int) -> BestCheckpoint:
    return BestCheckpoint(output_dir, f"{'rerank' if rerank_top_k > 0 else 'meanP'} {SELECTION_METRIC}")
