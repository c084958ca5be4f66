"""The one implementation behind video_text_retrieval/main_task_retrieval_{msrvtt,msvd,lsmdc,didemo}.py:
fine-tune a stage-2 (or downstream) checkpoint for text-video retrieval and evaluate it (METHOD §7a)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from functools import partial

from engine import distributed
from engine.args import resolve_precision
from engine.data import build_retrieval_datasets
from engine.entry import build_model, evaluate_before_training, run_main, train_or_evaluate
from engine.evaluation.retrieval import evaluated_checkpoint
from engine.run_logging import RunLogger
from engine.tasks.retrieval import (
    RetrievalLossWeights,
    best_checkpoint_for,
    make_retrieval_evaluator,
    retrieval_task,
)
from modules.errors import InputError

logger = logging.getLogger("t2vlp")


def run_retrieval(dataset: str, args: argparse.Namespace, dist_info: distributed.DistInfo, run: RunLogger) -> int:
    if args.datatype not in (dataset, "msrvtt"):  # "msrvtt" is the parser's default, which every script accepts
        logger.warning("--datatype %s is ignored: this script evaluates %s", args.datatype, dataset)
    precision = resolve_precision(args.precision, dist_info.device)
    model = build_model(args)
    train_factory, eval_dataset = build_retrieval_datasets(args, dataset, model.image_resolution)
    evaluate = None
    if eval_dataset is not None:
        evaluate = make_retrieval_evaluator(
            eval_dataset, run, dist_info.device, precision, batch_size=args.batch_size_val,
            num_workers=args.num_thread_reader, rerank_top_k=args.rerank_top_k,
            rerank_batch_size=args.rerank_batch_size, dsl=args.dsl, dsl_temperature=args.dsl_temperature,
            best=best_checkpoint_for(args.output_dir, args.rerank_top_k) if args.do_train else None,
            extra={"dataset": dataset, **evaluated_checkpoint(args)},
        )
    task = retrieval_task(RetrievalLossWeights(args.sim_weight, args.vtm_weight, args.align_weight), evaluate)

    def train_dataset():
        train = train_factory()
        if len(train) == 0:
            raise InputError(f"no {dataset} training samples (check --data_path / --train_csv / --features_path)")
        return train

    evaluate_before_training(args, dist_info, evaluate, model)
    return train_or_evaluate(args, dist_info, run, model, train_dataset, task, precision)


def main(dataset: str, argv: Sequence[str] | None = None) -> int:
    return run_main("retrieval", partial(run_retrieval, dataset), argv)
