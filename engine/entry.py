"""What every entry script does around its task: seeding, the process group, run logging, training settings."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch

from engine import distributed
from engine.args import local_batch_sizes, parse_args, report_ignored_flags
from engine.run_logging import RunLogger
from engine.trainer import TrainSettings

logger = logging.getLogger("t2vlp")

# run(args, dist_info, run_logger): the task's work; it returns before the process group is left.
RunFn = Callable[[argparse.Namespace, distributed.DistInfo, RunLogger], None]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_settings(args: argparse.Namespace, world_size: int, precision: str) -> TrainSettings:
    """TrainSettings from the command line (global `--batch_size` split over processes and accumulation)."""
    _, micro_batch = local_batch_sizes(args.batch_size, world_size, args.gradient_accumulation_steps)
    return TrainSettings(
        epochs=args.epochs, micro_batch_size=micro_batch, accumulation_steps=args.gradient_accumulation_steps,
        lr=args.lr, coef_lr=args.coef_lr, new_params_lr=args.new_params_lr, weight_decay=args.weight_decay,
        warmup_proportion=args.warmup_proportion, max_grad_norm=args.max_grad_norm, precision=precision,
        seed=args.seed, num_workers=args.num_thread_reader, n_display=args.n_display, eval_steps=args.eval_steps,
        save_steps=args.save_steps, max_steps=args.max_steps, max_bad_steps=args.max_bad_steps,
        keep_checkpoints=args.keep_checkpoints,
    )


def run_main(task: str, run: RunFn, argv: Sequence[str] | None = None) -> int:
    """Parse the flags of `task`, join the process group, log to `--output_dir`, run, leave the group."""
    args = parse_args(argv, task=task)
    dist_info = distributed.init_distributed()
    run_logger = RunLogger(args.output_dir, dist_info.is_main, tensorboard=args.tensorboard)
    try:
        report_ignored_flags(args)
        logger.info("command line: %s", " ".join(sys.argv))
        set_seed(args.seed)
        run(args, dist_info, run_logger)  # returns before cleanup, so the trainer is out of scope there
        return 0
    finally:
        run_logger.close()
        distributed.cleanup()
