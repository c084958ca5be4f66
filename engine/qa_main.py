"""The one implementation behind video_qa/main_task_qa_msrvtt.py and main_task_qa_msvd.py: fine-tune a stage-2 (or
QA) checkpoint for video question answering and evaluate it (METHOD §7c).

Training evaluates `--eval_split` (default test, as the original) before training and after each epoch, selecting
the best accuracy's checkpoint (`best_checkpoint.json`); `--do_eval` evaluates `--init_model` once.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from dataloaders.video_qa import (
    IGNORE_LABEL,
    MSRVTT_QA_EXCLUDED_VIDEOS,
    majority_answer,
    qa_dataset,
    read_ans2label,
)
from engine import distributed
from engine.args import resolve_precision
from engine.data import build_checked, check_eval_videos
from engine.entry import build_model, evaluate_before_training, run_main, train_or_evaluate
from engine.evaluation.retrieval import evaluated_checkpoint
from engine.run_logging import RunLogger
from engine.selection import BestCheckpoint
from engine.tasks.video_qa import make_qa_evaluator, qa_task
from modules.errors import InputError
from modules.tokenization import ClipTokenizer

logger = logging.getLogger("t2vlp")

QA_DATASETS = ("msrvtt", "msvd")
ANSWER_HEAD_KEY = "answer_head.answer_embedding"


def _required_file(value: str | None, flag: str) -> Path:
    if not value:
        raise InputError(f"{flag} is required")
    path = Path(value)
    if not path.is_file():
        raise InputError(f"{flag} {value} does not exist")
    return path


def run_qa(dataset: str, args: argparse.Namespace, dist_info: distributed.DistInfo, run: RunLogger) -> int:
    if dataset not in QA_DATASETS:
        raise ValueError(f"dataset must be one of {QA_DATASETS}, got {dataset!r}")
    precision = resolve_precision(args.precision, dist_info.device)
    ans2label = read_ans2label(_required_file(args.qa_anslabel_json, f"--{dataset}_qa_anslabel_json"))
    classifier = args.qa_head == "classifier"
    model = build_model(args, num_answers=len(ans2label) if classifier else 0)
    if classifier and ANSWER_HEAD_KEY not in model.init_keys:
        tokenizer = ClipTokenizer()
        answers = sorted(ans2label, key=ans2label.get)
        model.init_answer_head([tokenizer.bpe_ids(answer) for answer in answers])
        logger.info("answer classifier over %d answers started from the token head (not in --init_model)", len(answers))
    features = args.qa_features_path or args.features_path
    mapping = args.youtube_mapping if dataset == "msvd" else None
    excluded = MSRVTT_QA_EXCLUDED_VIDEOS if dataset == "msrvtt" else frozenset()
    options = dict(ans2label=ans2label, head=args.qa_head, youtube_mapping=mapping, excluded=excluded,
                   max_words=args.max_words, feature_framerate=args.feature_framerate, max_frames=args.max_frames,
                   image_size=model.image_resolution, seed=args.seed, slice_framepos=args.slice_framepos,
                   pad_mode="repeat", frame_store=args.frame_store)
    flag = f"--{dataset}_qa_{{}}_json"

    def split(name: str, frame_order: int):
        path = _required_file(getattr(args, f"qa_{name}_json"), flag.format(name))
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
        _report_unlabelled(train_items)
    best = BestCheckpoint(args.output_dir, f"{args.eval_split} accuracy") if args.do_train else None
    evaluate = make_qa_evaluator(
        evaluation, args.eval_split, run, args.output_dir, dist_info.device, precision, majority=majority,
        batch_size=args.batch_size_val, num_workers=args.num_thread_reader, best=best,
        extra={"dataset": f"{dataset}_qa", **evaluated_checkpoint(args)},
    )
    task = qa_task(args.qa_head, args.qa_weight, args.sim_weight, evaluate)
    evaluate_before_training(args, dist_info, evaluate, model, all_ranks=True)
    return train_or_evaluate(args, dist_info, run, model, lambda: train_items, task, precision)


def _report_unlabelled(train) -> None:
    unlabelled = sum(1 for item in train.items if train.label(item.answer) == IGNORE_LABEL)
    if unlabelled:
        logger.info("%d of %d training questions have an answer outside the %s head's vocabulary: they train only "
                    "the contrastive loss", unlabelled, len(train.items), train.head)


def main(dataset: str, argv: Sequence[str] | None = None) -> int:
    return run_main("qa", partial(run_qa, dataset), argv)
