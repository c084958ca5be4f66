"""Video question answering (METHOD §7c): answer cross-entropy at the fusion encoder's answer slot + contrastive loss
between the video and `question + " " + answer`, and its evaluation: accuracy over the exact split, overall and
per answer type, next to the always-the-most-frequent-training-answer baseline.

Evaluation runs on every process, each on its own contiguous share of the questions (no sampler padding), and
rank 0 combines the predictions: each question is counted exactly once whatever the number of processes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from dataloaders.video_qa import IGNORE_LABEL, QADataset
from engine import distributed
from engine.evaluation.retrieval import autocast_context, encoded_video_batches
from engine.optim import NEW_PARAM_PATTERNS_BY_TASK
from engine.selection import BestCheckpoint
from engine.tasks.base import EvaluateFn, StepContext, Task, global_mean_scale
from modules.similarity import symmetric_contrastive_loss

logger = logging.getLogger("t2vlp.qa")


def answer_logits_of(model: nn.Module, batch: dict[str, Any], head: str, video_mask: torch.Tensor,
                     frames: torch.Tensor, tubes: torch.Tensor) -> torch.Tensor:
    """Logits at the answer slot of `[v_sep, frames, tubes, question, answer slot]` (bidirectional, key padding)."""
    _, question = model.encode_text(batch["input_ids"], batch["attention_mask"])
    states = model.fuse(frames, video_mask, tubes, question, batch["attention_mask"], answer_slot=True)
    return model.answer_logits(states[:, -1], head)


def qa_objective(head: str, qa_weight: float = 1.0, sim_weight: float = 1.0):
    """`L = CE(answer) + L_sim` (METHOD §7c). The answer loss is the mean over the global batch's questions that
    have a label (a training answer outside the classifier's vocabulary has none); no alignment loss, no VTM."""

    def objective(model: nn.Module, batch: dict[str, Any], context: StepContext) -> dict[str, torch.Tensor]:
        video_mask = batch["video_mask"]
        frames, tubes = model.encode_video(batch["video"], video_mask)
        terms: dict[str, torch.Tensor] = {}
        loss = frames.new_zeros(())
        if qa_weight:
            logits = answer_logits_of(model, batch, head, video_mask, frames, tubes)
            labels = batch["label"]
            labelled = labels != IGNORE_LABEL
            loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="sum")
            scale = global_mean_scale(labelled.sum(), context)
            terms["qa_loss"] = loss_sum * scale
            terms["qa_acc"] = 100.0 * ((logits.argmax(dim=-1) == labels) & labelled).sum().float() * scale
            loss = loss + qa_weight * terms["qa_loss"]
        if sim_weight:
            qa_text, _ = model.encode_text(batch["qa_input_ids"], batch["qa_attention_mask"])
            sim = model.similarity(context.gather(qa_text), context.gather(frames), context.gather(video_mask))
            terms["sim_loss"] = symmetric_contrastive_loss(sim)
            loss = loss + sim_weight * terms["sim_loss"]
        return {"loss": loss, **{key: value.detach() for key, value in terms.items()}}

    return objective


def qa_task(head: str, qa_weight: float = 1.0, sim_weight: float = 1.0, evaluate: EvaluateFn | None = None) -> Task:
    return Task("qa", qa_objective(head, qa_weight, sim_weight), NEW_PARAM_PATTERNS_BY_TASK["qa"],
                find_unused_parameters=True, evaluate=evaluate, evaluate_on_all_ranks=True)


def rank_share(count: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of `count` items (sizes differ by at most one; no padding, no overlap)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@torch.no_grad()
def predict_answers(model: nn.Module, dataset: QADataset, head: str, *, batch_size: int, device: torch.device,
                    precision: str, num_workers: int = 0, indices: range | None = None,
                    show_progress: bool = True) -> tuple[dict[int, tuple[int, float]], int]:
    """({question index: (predicted class or token id, its probability)}, videos that could not be decoded) for
    `indices` of the dataset (default: all)."""
    subset = Subset(dataset, indices if indices is not None else range(len(dataset)))
    predictions: dict[int, tuple[int, float]] = {}
    skipped = 0
    for batch, video_mask, frames, tubes in encoded_video_batches(
            model, subset, batch_size=batch_size, device=device, precision=precision, num_workers=num_workers,
            description="answering", show_progress=show_progress):
        skipped += batch["n_skipped"]
        if frames is None:
            continue
        inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
        with autocast_context(device, precision):
            logits = answer_logits_of(model, inputs, head, video_mask, frames, tubes)
        probabilities = torch.softmax(logits.float(), dim=-1)
        best, choice = probabilities.max(dim=-1)
        for index, label, probability in zip(batch["index"].tolist(), choice.tolist(), best.tolist()):
            predictions[index] = (label, probability)
    return predictions, skipped


def answer_text(dataset: QADataset, label: int, label2ans: dict[int, str]) -> str:
    return label2ans.get(label, "") if dataset.head == "classifier" else dataset.tokenizer.decode([label])


def qa_record(dataset: QADataset, predictions: dict[int, tuple[int, float]], label2ans: dict[int, str],
              majority: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy (percent) over the answered questions, per answer type, out-of-vocabulary share, majority baseline;
    and one prediction row per question. A question is right when its label is the prediction: the class of the
    answer (an answer outside the vocabulary has none, so it is always wrong) or, for `first_token`, its first
    BPE id."""
    rows, correct_by_type, count_by_type = [], Counter(), Counter()
    correct = out_of_vocab = majority_hits = 0
    for index in sorted(predictions):
        item = dataset.items[index]
        label, probability = predictions[index]
        gold = dataset.label(item.answer)
        right = gold != IGNORE_LABEL and label == gold
        correct += right
        out_of_vocab += item.answer not in dataset.ans2label
        majority_hits += item.answer == majority
        if item.answer_type:
            count_by_type[item.answer_type] += 1
            correct_by_type[item.answer_type] += right
        rows.append({"index": index, "video_id": item.video_id, "question": item.question, "answer": item.answer,
                     "prediction": answer_text(dataset, label, label2ans), "score": round(probability, 6),
                     "correct": bool(right)})
    n = len(rows)
    record = {"accuracy": 100.0 * correct / n, "n": n, "head": dataset.head,
              "out_of_vocab": 100.0 * out_of_vocab / n, "majority_baseline": 100.0 * majority_hits / n,
              "majority_answer": majority}
    if count_by_type:
        record["by_type"] = {kind: {"accuracy": 100.0 * correct_by_type[kind] / count, "n": count}
                             for kind, count in sorted(count_by_type.items())}
    return record, rows


def make_qa_evaluator(
    dataset: QADataset, split_name: str, run: Any, output_dir: str | Path, device: torch.device, precision: str, *,
    majority: str, batch_size: int, num_workers: int, best: BestCheckpoint | None = None,
    extra: dict[str, Any] | None = None,
) -> EvaluateFn:
    """Every rank predicts its share; rank 0 combines, logs the {"task": "qa", ...} row and writes
    `predictions_<split>_step<N>.jsonl`; with `best`, model selection by accuracy. Call it on every rank."""
    label2ans = {label: answer for answer, label in dataset.ans2label.items()}

    def evaluate(model: nn.Module, step: int, epoch: int) -> dict[str, Any] | None:
        share = rank_share(len(dataset), distributed.get_rank(), distributed.get_world_size())
        local, skipped = predict_answers(model, dataset, dataset.head, batch_size=batch_size, device=device,
                                         precision=precision, num_workers=num_workers, indices=share,
                                         show_progress=distributed.is_main())
        gathered = distributed.all_gather_object((local, skipped))
        if not distributed.is_main():
            return None
        predictions = {}
        for part, _ in gathered:
            if set(part) & set(predictions):
                raise RuntimeError("a question was answered by two processes")
            predictions.update(part)
        skipped = sum(count for _, count in gathered)
        if not predictions:
            raise RuntimeError(f"no question of the {split_name} split could be answered ({skipped} skipped)")
        result, rows = qa_record(dataset, predictions, label2ans, majority)
        record = {"task": "qa", "split": split_name, "step": step, "epoch": epoch, **result,
                  "n_skipped": skipped, **(extra or {})}
        run.log_metrics(record)
        run.scalars({"accuracy": record["accuracy"]}, step, prefix=f"eval_{split_name}/")
        path = Path(output_dir) / f"predictions_{split_name}_step{step}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        by_type = "  ".join(f"{kind} {value['accuracy']:.2f} (n={value['n']})"
                            for kind, value in record.get("by_type", {}).items())
        logger.info("QA (%s head) on %s at step %d, epoch %d: accuracy %.2f%% of %d questions (always answering "
                    "%r: %.2f%%; answers outside the vocabulary: %.2f%%)%s%s\npredictions: %s", dataset.head,
                    split_name, step, epoch, record["accuracy"], record["n"], majority, record["majority_baseline"],
                    record["out_of_vocab"], f", {skipped} questions skipped (video not decodable)" if skipped else "",
                    f"\n  by answer type: {by_type}" if by_type else "", path)
        if best is not None and step > 0:
            best.update(record["accuracy"], step, epoch)
        return record

    return evaluate
