"""Stage-1 pre-training of T2VLP: video-text contrastive + local alignment (METHOD §5).

One process:   python main_task_clip.py --do_train --output_dir runs/x ...
Several:       torchrun --nproc_per_node=8 main_task_clip.py --do_train ...   (flags as in the original README)

`--batch_size` is the global batch over all processes. Rerunning a command whose `--output_dir` holds a
`restore.bin` resumes exactly where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from engine import distributed
from engine.args import resolve_precision
from engine.data import build_eval_dataset, build_train_dataset
from engine.entry import build_model, run_main, train_or_evaluate
from engine.evaluation.retrieval import evaluate_retrieval, evaluated_checkpoint, log_retrieval_rows
from engine.run_logging import RunLogger
from engine.tasks.clip_pretraining import clip_pretraining_task


def make_evaluator(args: argparse.Namespace, dataset, run: RunLogger, device: torch.device, precision: str):
    def evaluate(model: torch.nn.Module, step: int, epoch: int) -> dict[str, Any]:
        result = evaluate_retrieval(
            model, dataset, batch_size=args.batch_size_val, device=device, precision=precision,
            num_workers=args.num_thread_reader,
        )
        return log_retrieval_rows(run, [result], step, epoch, extra=evaluated_checkpoint(args))[0]

    return evaluate


def run_stage1(args: argparse.Namespace, dist_info: distributed.DistInfo, run: RunLogger) -> int:
    precision = resolve_precision(args.precision, dist_info.device)
    model = build_model(args)
    image_size = model.image_resolution
    eval_dataset = build_eval_dataset(args, image_size)
    evaluate = make_evaluator(args, eval_dataset, run, dist_info.device, precision) if eval_dataset else None
    return train_or_evaluate(args, dist_info, run, model, lambda: build_train_dataset(args, image_size),
                             clip_pretraining_task(evaluate), precision)


def main(argv: list[str] | None = None) -> int:
    return run_main("clip", run_stage1, argv)


if __name__ == "__main__":
    sys.exit(main())
