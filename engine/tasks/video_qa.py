"""Video question answering (docs/method.md §7c) on MSRVTT-QA and MSVD-QA: answer cross-entropy at the fusion encoder's answer slot + contrastive loss
between the video and `question + " " + answer`, and its evaluation: accuracy over the exact split, overall and
per answer type, next to the always-the-most-frequent-training-answer baseline.

Evaluation runs on every process, each on its own contiguous share of the questions (no sampler padding), and
rank 0 combines the predictions: each question is counted exactly once whatever the number of processes.
Training evaluates `--eval_split` (default test, as the original) before training and after each epoch, selecting
the best accuracy's checkpoint (`best_checkpoint.json`); `--do_eval` evaluates `--init_model` once. The entry
scripts are video_qa/main_task_qa_{msrvtt,msvd}.py.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from dataloaders.video_qa import (
    IGNORE_LABEL,
    MSRVTT_QA_EXCLUDED_VIDEOS,
    QADataset,
    majority_answer,
    qa_dataset,
    read_ans2label,
)
from engine import distributed
from engine.args import add_ignored_flag
from engine.checkpointing import BestCheckpoint
from engine.data import build_checked, check_eval_videos
from engine.evaluation import EvalContext
from engine.evaluation.retrieval import encoded_video_batches
from engine.precision import autocast_context
from engine.sampler import eval_shard
from engine.tasks.base import EvaluateFn, StepContext, Task, global_mean_scale
from engine.tasks.fusion_pretraining import FUSION_PARAM_PATTERNS
from engine.tasks.registry import EvalSplitFlag, PreparedRun, RunContext, TaskDefinition, register_task
from modules.errors import InputError
from modules.similarity import symmetric_contrastive_loss
from modules.tokenization import ClipTokenizer

logger = logging.getLogger("t2vlp.qa")

NAME = "qa"
DATASETS = ("msrvtt", "msvd")
ANSWER_HEAD_KEY = "answer_head.answer_embedding"


def answer_logits_of(model: nn.Module, batch: dict[str, Any], head: str, video_mask: torch.Tensor,
                     frames: torch.Tensor, tubes: torch.Tensor) -> torch.Tensor:
    """Logits at the answer slot of `[v_sep, frames, tubes, question, answer slot]` (bidirectional, key padding)."""
    _, question = model.encode_text(batch["input_ids"], batch["attention_mask"])
    states = model.fuse(frames, video_mask, tubes, question, batch["attention_mask"], answer_slot=True)
    return model.answer_logits(states[:, -1], head)


def qa_objective(head: str, qa_weight: float = 1.0, sim_weight: float = 1.0):
    """`L = CE(answer) + L_sim` (docs/method.md §7c). The answer loss is the mean over the global batch's questions that
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
    return Task(NAME, qa_objective(head, qa_weight, sim_weight), FUSION_PARAM_PATTERNS, find_unused_parameters=True,
                evaluate=evaluate, evaluate_on_all_ranks=True)


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
    dataset: QADataset, split_name: str, settings: EvalContext, *, majority: str, best: BestCheckpoint | None = None,
) -> EvaluateFn:
    """Every rank predicts its share; rank 0 combines, logs the {"task": "qa", ...} row and writes
    `predictions_<split>_step<N>.jsonl`; with `best`, model selection by accuracy. Call it on every rank."""
    label2ans = {label: answer for answer, label in dataset.ans2label.items()}
    run, extra = settings.run, dict(settings.extra)

    def evaluate(model: nn.Module, step: int, epoch: int) -> dict[str, Any] | None:
        share = eval_shard(len(dataset), distributed.get_world_size(), distributed.get_rank())
        local, skipped = predict_answers(model, dataset, dataset.head, batch_size=settings.batch_size,
                                         device=settings.device, precision=settings.precision,
                                         num_workers=settings.num_workers, indices=share,
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
                  "n_skipped": skipped, **extra}
        run.log_metrics(record)
        run.scalars({"accuracy": record["accuracy"]}, step, prefix=f"eval_{split_name}/")
        path = Path(settings.output_dir) / f"predictions_{split_name}_step{step}.jsonl"
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


# ----------------------------------------------------------------------------------------------- the task


def required_file(value: str | None, flag: str) -> Path:
    if not value:
        raise InputError(f"{flag} is required")
    path = Path(value)
    if not path.is_file():
        raise InputError(f"{flag} {value} does not exist")
    return path


def answer_vocabulary(context: RunContext) -> dict[str, int]:
    """train_ans2label.json, read from --<dataset>_qa_anslabel_json."""
    return read_ans2label(required_file(context.args.qa_anslabel_json, f"--{context.dataset}_qa_anslabel_json"))


def model_options(context: RunContext) -> dict[str, Any]:
    """The classifier head's size: one class per answer of the vocabulary."""
    return {"num_answers": len(answer_vocabulary(context)) if context.args.qa_head == "classifier" else 0}


def prepare(context: RunContext, model: nn.Module) -> PreparedRun:
    args, dataset = context.args, context.dataset
    ans2label = answer_vocabulary(context)
    if args.qa_head == "classifier":
        model.answers = sorted(ans2label, key=ans2label.get)  # recorded in the checkpoints
    if args.qa_head == "classifier" and ANSWER_HEAD_KEY not in model.init_keys:
        tokenizer = ClipTokenizer()
        answers = sorted(ans2label, key=ans2label.get)
        model.init_answer_head([tokenizer.bpe_ids(answer) for answer in answers])
        logger.info("answer classifier over %d answers started from the token head (not in --init_model)", len(answers))
    features = args.qa_features_path or args.features_path
    options = dict(ans2label=ans2label, head=args.qa_head, youtube_mapping=args.youtube_mapping if dataset == "msvd"
                   else None, excluded=MSRVTT_QA_EXCLUDED_VIDEOS if dataset == "msrvtt" else frozenset(),
                   max_words=args.max_words, feature_framerate=args.feature_framerate, max_frames=args.max_frames,
                   image_size=model.image_resolution, seed=args.seed, slice_framepos=args.slice_framepos,
                   pad_mode="repeat", frame_store=args.frame_store)
    flag = f"--{dataset}_qa_{{}}_json"

    def split(name: str, frame_order: int) -> QADataset:
        path = required_file(getattr(args, f"qa_{name}_json"), flag.format(name))
        data = build_checked(lambda: qa_dataset(path, features, frame_order=frame_order, **options), str(path))
        if len(data) == 0:
            raise InputError(f"{path} has no questions")
        return data

    train_items = split("train", args.train_frame_order)
    majority = majority_answer(train_items.items)
    evaluation = split(args.eval_split, args.eval_frame_order)
    check_eval_videos(evaluation, f"{flag.format(args.eval_split)} {getattr(args, f'qa_{args.eval_split}_json')}",
                      features)
    if args.do_train:
        report_unlabelled(train_items)
    best = BestCheckpoint(args.output_dir, f"{args.eval_split} accuracy") if args.do_train else None
    settings = context.eval_context()
    settings = replace(settings, extra={**settings.extra, "dataset": f"{dataset}_qa"})
    evaluate = make_qa_evaluator(evaluation, args.eval_split, settings, majority=majority, best=best)
    return PreparedRun(qa_task(args.qa_head, args.qa_weight, args.sim_weight, evaluate), lambda: train_items)


def report_unlabelled(train: QADataset) -> None:
    unlabelled = sum(1 for item in train.items if train.label(item.answer) == IGNORE_LABEL)
    if unlabelled:
        logger.info("%d of %d training questions have an answer outside the %s head's vocabulary: they train only "
                    "the contrastive loss", unlabelled, len(train.items), train.head)


def add_flags(parser: argparse.ArgumentParser) -> None:
    ignored = parser.add_argument_group("the original QA script's flags it never read (ignored, a warning if set)")
    for name in ("webvid_train_json", "webvid_tfrecord"):
        add_ignored_flag(ignored, f"--{name}", hint="the original QA script passed it but never read it")
    for name in ("msrvtt_train_csv", "msrvtt_val_csv", "msrvtt_train_json"):
        add_ignored_flag(ignored, f"--{name}",
                         hint="the original QA script passed it but never read it (QA reads --msrvtt_qa_*_json)")
    group = parser.add_argument_group("video QA (the original's MSRVTT-QA names, or the dataset-neutral ones)")
    add = group.add_argument
    for split in ("train", "val", "test"):
        add(f"--qa_{split}_json", f"--msrvtt_qa_{split}_json", f"--msvd_qa_{split}_json", dest=f"qa_{split}_json",
            help=f"The {split} questions: ClipBERT/ALPRO JSON Lines, or MSVD-QA's original {split}_qa.json.")
    add("--qa_anslabel_json", "--msrvtt_qa_anslabel_json", "--msvd_qa_anslabel_json", dest="qa_anslabel_json",
        help="train_ans2label.json: the answer vocabulary of the classifier head (and of the out-of-vocabulary "
             "count).")
    add("--qa_features_path", "--msrvtt_features_path", "--msvd_features_path", dest="qa_features_path",
        help="The video folder (default: --features_path).")
    add("--youtube_mapping", help="MSVD-QA: youtube_mapping.txt (clip id -> vid<N>) for the original format.")
    add("--qa_head", choices=["classifier", "first_token"], default="classifier",
        help="'classifier': over the answers of --qa_anslabel_json (answers outside it count as wrong). "
             "'first_token': the original's protocol, the tied vocabulary head predicting the answer's first BPE "
             "piece (needed to evaluate the original's released QA checkpoint).")


DEFINITION = register_task(TaskDefinition(
    name=NAME, prepare=prepare, new_param_patterns=FUSION_PARAM_PATTERNS,
    # the original script's cadence, fixed rate, seed and --datatype (docs/method.md §8)
    defaults={"eval_steps": 0, "save_steps": 0, "new_params_lr": 5e-6, "seed": 2021, "datatype": "msrvtt_qa"},
    head_dropout=0.5, loss_weights=("qa", "sim"), add_flags=add_flags, run_config_flags=("qa_head",),
    eval_split=EvalSplitFlag(lambda args: "test", "The split evaluated after each epoch and by --do_eval (the "
                                                  "original: test)."),
    datasets=DATASETS, model_options=model_options, extra_fusion_positions=1,  # the answer slot
))
