"""Stage 2 (docs/method.md §6): the fusion encoder on a stage-1 checkpoint: MLM + prefix LM + video-text matching with hard
negatives + local alignment, and its evaluation (meanP and reranked retrieval, MLM and VTM accuracy on the held-out
split)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dataloaders.lm_targets import WithLanguageModelTargets, sample_targets
from engine.args import add_rerank_flags, rerank_flag_error
from engine.data import build_eval_dataset, build_train_dataset
from engine.evaluation import EvalContext
from engine.evaluation.retrieval import encode_split, log_retrieval_rows, retrieval_rows, similarity_matrix
from engine.precision import autocast_context
from engine.tasks.base import EvaluateFn, StepContext, Task, global_mean_scale
from engine.tasks.registry import PreparedRun, RunContext, TaskDefinition, register_task
from modules.fusion_objectives import (
    MatchingTerms,
    TextParts,
    VideoParts,
    masked_lm_terms,
    prefix_lm_terms,
    sample_hard_negatives,
    video_text_matching_terms,
)

logger = logging.getLogger("t2vlp.fusion")

NAME = "fusion"
# The fusion encoder and its heads: the fixed-rate group of stage 2 and of every downstream task (docs/method.md §6.6, §7).
FUSION_PARAM_PATTERNS = (
    "fusion_positional_embedding", "fusion_proj_embedding", "fusion_logit_bias", "fusion_match_matrix",
    "fusion_unmatch_matrix", "fusion_transformer",
)


@dataclass(frozen=True)
class FusionLossWeights:
    mlm: float = 1.0
    plm: float = 1.0
    vtm: float = 1.0
    align: float = 1.0


def hard_negative_indices(
    model: nn.Module, all_eot: torch.Tensor, all_video: VideoParts, local_rows: slice, context: StepContext,
    similarity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives for this rank's `local_rows` of the all-gathered batch (docs/method.md §6.4), drawn from
    `similarity` of the gathered batch when the caller has it, else from its meanP similarity. Every rank draws
    for all rows with the step's Generator and keeps its own, so the draw does not depend on the number of
    processes. Returns (negative video per local text, negative text per local video), indices into the
    gathered batch."""
    if similarity is None:
        with torch.no_grad():
            similarity = model.similarity(all_eot, all_video.frames, all_video.video_mask)
    negative_video, negative_text = sample_hard_negatives(similarity.detach(), context.generator())
    return negative_video[local_rows], negative_text[local_rows]


def matching_with_hard_negatives(
    model: nn.Module, video: VideoParts, text: TextParts, text_eot: torch.Tensor, context: StepContext, *,
    similarity: torch.Tensor | None = None, detach_inputs: bool = True,
) -> MatchingTerms:
    """VTM with hard negatives (docs/method.md §6.4): the local batch's fusion inputs are all-gathered (without
    gradient), hard negatives drawn (`hard_negative_indices`) and the 3B local pairs scored. With `detach_inputs`
    (the original, stage 2 and retrieval) only the fusion encoder and its match heads get gradients."""
    all_eot, offset = context.gather_rows(text_eot.detach())
    all_video = VideoParts(*(context.gather_rows(part.detach())[0] for part in video))
    all_text = TextParts(*(context.gather_rows(part.detach())[0] for part in text))
    local_rows = slice(offset, offset + text_eot.shape[0])
    negative_video, negative_text = hard_negative_indices(model, all_eot, all_video, local_rows, context, similarity)
    if detach_inputs:
        video, text = video.detach(), text.detach()
    return video_text_matching_terms(model, video, text, all_video, all_text, negative_video, negative_text)


def fusion_pretraining_objective(weights: FusionLossWeights, detach_encoders: bool = True):
    """The stage-2 objective; with `detach_encoders` (the original) the CLIP towers' outputs are detached, so
    only the fusion encoder, its heads and (through the alignment loss) the tube encoder and centers learn."""

    def objective(model: nn.Module, batch: dict[str, Any], context: StepContext) -> dict[str, torch.Tensor]:
        attention_mask, video_mask = batch["attention_mask"], batch["video_mask"]
        frames, tubes = model.encode_video(batch["video"], video_mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_encoders):  # its outputs are detached
            text_eot, tokens = model.encode_text(batch["input_ids"], attention_mask)
        fusion_tubes = tubes
        if detach_encoders:
            frames, text_eot, tokens, fusion_tubes = frames.detach(), text_eot.detach(), tokens.detach(), tubes.detach()
        video, text = VideoParts(frames, video_mask, fusion_tubes), TextParts(tokens, attention_mask)
        terms: dict[str, torch.Tensor] = {}
        loss = frames.new_zeros(())
        if weights.mlm:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_encoders):
                _, masked_tokens = model.encode_text(batch["mlm_input_ids"], attention_mask)
            mlm = masked_lm_terms(model, video, TextParts(masked_tokens, attention_mask), batch["mlm_labels"])
            scale = global_mean_scale(mlm.count, context)
            terms["mlm_loss"] = mlm.loss_sum * scale
            terms["mlm_acc"] = 100.0 * mlm.correct.float() * scale
            loss = loss + weights.mlm * terms["mlm_loss"]
        if weights.plm:
            plm = prefix_lm_terms(model, video, text, batch["input_ids"], batch["plm_start"])
            terms["plm_loss"] = plm.loss_sum * global_mean_scale(plm.count, context)
            loss = loss + weights.plm * terms["plm_loss"]
        if weights.vtm:
            vtm = matching_with_hard_negatives(model, video, text, text_eot, context,
                                               detach_inputs=detach_encoders)
            terms["vtm_loss"] = vtm.loss
            terms["vtm_acc"] = 100.0 * vtm.correct.float() / vtm.count
            loss = loss + weights.vtm * vtm.loss
        if weights.align:
            terms["align_loss"] = model.alignment_loss(tokens.detach() if detach_encoders else tokens,
                                                       attention_mask, tubes)
            loss = loss + weights.align * terms["align_loss"]
        return {"loss": loss, **{key: value.detach() for key, value in terms.items()}}

    return objective


def fusion_pretraining_task(
    weights: FusionLossWeights, detach_encoders: bool = True, evaluate: EvaluateFn | None = None
) -> Task:
    return Task(NAME, fusion_pretraining_objective(weights, detach_encoders), FUSION_PARAM_PATTERNS,
                find_unused_parameters=True, evaluate=evaluate)


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_fusion_heads(
    model: nn.Module,
    encoded: dict[str, Any],
    *,
    mask_ratio: float,
    seed: int,
    batch_size: int,
    precision: str,
) -> dict[str, Any]:
    """MLM and VTM accuracy (percent) on an encoded held-out split (`encode_split(keep_fusion_inputs=True)`).

    MLM: each caption masked as in training, from a Generator seeded by (seed, 0, item index), so every
    evaluation uses the same masks; accuracy over all masked tokens. VTM: every pair plus one hard-negative video
    per text and one hard-negative text per video, drawn from the meanP similarity of the split with a
    Generator seeded by `seed`, scored in chunks of `batch_size` pairs (each chunk's 3 x chunk sequences one
    normalisation group, as in training). `vtm_acc` is the balanced accuracy, the mean of the accuracy on
    matching pairs and on non-matching pairs, so chance is 50% whatever the 1:2 ratio; `vtm_pairwise_acc` is how
    often a matching pair scores a higher match margin than each of its two hard negatives (what the rerank
    relies on; chance 50%, independent of the head's decision threshold). The same two figures against random
    negatives (uniform over the other pairs, same Generator seed) follow as `vtm_random_acc` and
    `vtm_random_pairwise_acc`: hard negatives are the pairs the dual encoder confuses, random ones mostly differ
    in plain content, so the two together tell a head that has learned nothing from one that has learned
    matching but not the fine distinctions.
    """
    model.eval()
    device = encoded["frames"].device
    count = encoded["text"].shape[0]
    if count < 2:
        raise ValueError("MLM/VTM evaluation needs at least 2 items")
    pair_video = encoded["caption_video"]
    if len(set(pair_video.tolist())) != count:
        raise ValueError("MLM/VTM evaluation needs a split with one caption per video (e.g. MSR-VTT 1k-A)")
    targets = [
        sample_targets({"input_ids": ids, "attention_mask": mask, "index": index}, mask_ratio, seed, epoch=0)
        for ids, mask, index in zip(encoded["input_ids"].cpu(), encoded["attention_mask"].cpu(), encoded["indices"])
    ]
    mlm_ids = torch.stack([t["mlm_input_ids"] for t in targets]).to(device)
    mlm_labels = torch.stack([t["mlm_labels"] for t in targets]).to(device)
    all_video = VideoParts(encoded["frames"], encoded["video_mask"], encoded["tubes"]).take(pair_video)
    all_text = TextParts(encoded["text_tokens"], encoded["attention_mask"])
    mlm_correct = mlm_total = 0
    for start in range(0, count, batch_size):
        rows = torch.arange(start, min(start + batch_size, count), device=device)
        video, text = all_video.take(rows), all_text.take(rows)
        with autocast_context(device, precision):
            _, masked_tokens = model.encode_text(mlm_ids[rows], text.attention_mask)
            mlm = masked_lm_terms(model, video, TextParts(masked_tokens, text.attention_mask), mlm_labels[rows])
        mlm_correct += int(mlm.correct)
        mlm_total += int(mlm.count)
    sim = torch.from_numpy(similarity_matrix(model, encoded))[:, pair_video.cpu()]  # pair i = caption i, its video
    hard = _matching_accuracy(model, all_video, all_text, sim, seed, batch_size, precision)
    uniform = _matching_accuracy(model, all_video, all_text, torch.zeros_like(sim), seed, batch_size, precision)
    vocab = model.clip_config.vocab_size
    return {
        "mlm_acc": 100.0 * mlm_correct / max(mlm_total, 1),
        "vtm_acc": hard["balanced"],
        "n": count,
        "n_masked_tokens": mlm_total,
        "vtm_acc_match": hard["match"],
        "vtm_acc_unmatch": hard["unmatch"],
        "vtm_pairwise_acc": hard["pairwise"],
        "vtm_random_acc": uniform["balanced"],
        "vtm_random_pairwise_acc": uniform["pairwise"],
        "chance": {"mlm_acc": 100.0 / vocab, "vtm_acc": 50.0, "vtm_pairwise_acc": 50.0},
    }


def _matching_accuracy(
    model: nn.Module, all_video: VideoParts, all_text: TextParts, similarity: torch.Tensor, seed: int,
    batch_size: int, precision: str,
) -> dict[str, float]:
    """VTM accuracies (percent) of every pair against one negative video and one negative text per pair drawn
    from `similarity` (`sample_hard_negatives`; a constant matrix draws uniformly among the other pairs)."""
    device = all_video.frames.device
    count = similarity.shape[0]
    negative_video, negative_text = sample_hard_negatives(similarity, torch.Generator().manual_seed(seed))
    match_correct = unmatch_correct = pairwise_correct = 0
    for start in range(0, count, batch_size):
        rows = torch.arange(start, min(start + batch_size, count), device=device)
        with autocast_context(device, precision):
            vtm = video_text_matching_terms(model, all_video.take(rows), all_text.take(rows), all_video, all_text,
                                            negative_video[rows.cpu()], negative_text[rows.cpu()])
        predicted_match = vtm.logits.argmax(dim=-1) == 1
        match_correct += int(predicted_match[: len(rows)].sum())
        unmatch_correct += int((~predicted_match[len(rows):]).sum())
        margin = (vtm.logits[:, 1] - vtm.logits[:, 0]).reshape(3, len(rows))  # matching, negative video, negative text
        pairwise_correct += int((margin[0] > margin[1]).sum() + (margin[0] > margin[2]).sum())
    match, unmatch = 100.0 * match_correct / count, 100.0 * unmatch_correct / (2 * count)
    return {"match": match, "unmatch": unmatch, "balanced": 0.5 * (match + unmatch),
            "pairwise": 100.0 * pairwise_correct / (2 * count)}


def make_fusion_evaluator(dataset: Any, settings: EvalContext, *, rerank_top_k: int, rerank_batch_size: int,
                          mask_ratio: float, seed: int) -> EvaluateFn:
    """Stage-2 evaluation: meanP and reranked retrieval rows, then the fusion row (MLM / VTM accuracy)."""
    run, extra = settings.run, dict(settings.extra)

    def evaluate(model: nn.Module, step: int, epoch: int) -> dict[str, Any]:
        encoded = encode_split(model, dataset, batch_size=settings.batch_size, device=settings.device,
                               precision=settings.precision, num_workers=settings.num_workers,
                               keep_fusion_inputs=True)
        rows = retrieval_rows(model, encoded, rerank_top_k=rerank_top_k, rerank_batch_pairs=rerank_batch_size,
                              precision=settings.precision, show_progress=True)
        log_retrieval_rows(run, rows, step, epoch, extra=extra)
        heads = evaluate_fusion_heads(model, encoded, mask_ratio=mask_ratio, seed=seed,
                                      batch_size=settings.batch_size, precision=settings.precision)
        record = {"task": "fusion", "split": "test", "step": step, "epoch": epoch, **heads, **extra}
        run.log_metrics(record)
        run.scalars({"mlm_acc": heads["mlm_acc"], "vtm_acc": heads["vtm_acc"]}, step, prefix="eval/")
        logger.info(
            "fusion heads at step %d, epoch %d on %d held-out pairs: MLM accuracy %.2f%% (%d masked tokens; chance "
            "%.3f%%), VTM balanced accuracy %.2f%% (matching %.2f%%, hard negatives %.2f%%; chance 50%%), matching pair "
            "above its hard negatives %.2f%% (chance 50%%); against random negatives: balanced %.2f%%, pairwise "
            "%.2f%%",
            step, epoch, heads["n"], heads["mlm_acc"], heads["n_masked_tokens"], heads["chance"]["mlm_acc"],
            heads["vtm_acc"], heads["vtm_acc_match"], heads["vtm_acc_unmatch"], heads["vtm_pairwise_acc"],
            heads["vtm_random_acc"], heads["vtm_random_pairwise_acc"],
        )
        return record

    return evaluate


# ----------------------------------------------------------------------------------------------- the task


def prepare(context: RunContext, model: nn.Module) -> PreparedRun:
    """The fusion encoder's blocks and positional table start from the original CLIP text tower (read from
    `--visual_pretrain_path`, default ./CLIP-modules/ViT-B-16.pt, the path the original hard-coded)."""
    args, image_size = context.args, model.image_resolution
    eval_dataset = build_eval_dataset(args, image_size)
    evaluate = None
    if eval_dataset is not None:
        evaluate = make_fusion_evaluator(eval_dataset, context.eval_context(), rerank_top_k=args.rerank_top_k,
                                         rerank_batch_size=args.rerank_batch_size, mask_ratio=args.mask_ratio,
                                         seed=args.seed)
    weights = FusionLossWeights(args.mlm_weight, args.plm_weight, args.vtm_weight, args.align_weight)
    task = fusion_pretraining_task(weights, detach_encoders=not args.train_encoders, evaluate=evaluate)
    return PreparedRun(task, lambda: WithLanguageModelTargets(build_train_dataset(args, image_size, context.webvid_train),
                                                              args.mask_ratio,
                                                              args.seed))


def check_flags(args: argparse.Namespace) -> str | None:
    if not 0 <= args.mask_ratio <= 1:
        return "--mask_ratio must be in [0, 1]"
    return rerank_flag_error(args)


DEFINITION = register_task(TaskDefinition(
    name=NAME, prepare=prepare, new_param_patterns=FUSION_PARAM_PATTERNS,
    defaults={"eval_steps": 1000, "save_steps": 2000, "new_params_lr": 1e-5},  # the original script's (docs/method.md §8)
    head_dropout=0.2, loss_weights=("mlm", "plm", "vtm", "align"), add_flags=add_rerank_flags,
    pretraining=True,
    check_flags=check_flags, run_config_flags=("mask_ratio",), reads_compat_flags=frozenset({"mask_ratio"}),
))
