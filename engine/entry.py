"""What every entry script does around its task: seeding, the process group, run logging, training settings."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from engine import distributed
from engine.args import (
    check_model_limits,
    local_batch_sizes,
    parse_args,
    report_ignored_flags,
    resolve_clip_path,
)
from engine.run_logging import RunLogger, record_run_outcome, record_run_start
from engine.tasks.base import Task
from engine.trainer import Trainer, TrainSettings
from modules.clip import compile_blocks, set_grad_checkpointing
from modules.errors import InputError
from modules.model import T2VLP, T2VLPConfig

logger = logging.getLogger("t2vlp")

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after saving restore.bin; rerun to resume

# run(args, dist_info, run_logger) -> exit code (None: 0); it returns before the process group is left.
RunFn = Callable[[argparse.Namespace, distributed.DistInfo, RunLogger], int | None]


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
        keep_checkpoints=args.keep_checkpoints, allow_changed_settings=args.allow_changed_settings,
    )


# Flags that shape the model or the data: restore.bin fixes them (see Trainer.resume_if_possible).
RUN_CONFIG_FLAGS = (
    "max_words", "max_frames", "num_centers", "split_layer", "tube_layers", "freeze_layer_num", "slice_framepos",
    "train_frame_order", "feature_framerate", "expand_msrvtt_sentences", "fusion_layers", "head_dropout",
    "match_norm", "train_encoders", "mask_ratio", "mlm_weight", "plm_weight", "vtm_weight", "align_weight",
    "sim_weight", "caption_weight", "qa_weight", "qa_head",
)


def run_config(args: argparse.Namespace) -> dict[str, object]:
    """The model- and data-shaping flags of this task, as restore.bin records them."""
    config = {"task": args.task}
    config.update({name: getattr(args, name) for name in RUN_CONFIG_FLAGS if hasattr(args, name)})
    if args.task != "fusion":
        config.pop("mask_ratio", None)  # read by stage 2 only
    return config


def build_model(args: argparse.Namespace, **config_overrides: object) -> T2VLP:
    """The task's T2VLP from the command line: sizes from `--visual_pretrain_path`, then `--init_model`.

    Stage 1 ("clip") keeps the tube input in the graph; every later task has the fusion encoder and detaches the
    tube input unless `--train_encoders` (METHOD §11.5)."""
    config = T2VLPConfig(num_centers=args.num_centers, split_layer=args.split_layer, tube_layers=args.tube_layers)
    if args.task != "clip":
        config = replace(
            config, detach_tube_input=not args.train_encoders, with_fusion=True, fusion_layers=args.fusion_layers,
            head_dropout=args.head_dropout, match_norm=args.match_norm,
        )
    config = replace(config, **config_overrides)
    model = T2VLP.from_pretrained(resolve_clip_path(args), init_model=args.init_model, config=config)
    answer_slot = 1 if args.task == "qa" else 0
    fusion_extra_tokens = 1 + args.max_frames + model.config.num_centers + answer_slot if config.with_fusion else None
    check_model_limits(args, context_length=model.clip_config.context_length,
                       fusion_extra_tokens=fusion_extra_tokens)
    if args.grad_checkpointing:
        logger.info("gradient checkpointing on %d transformer blocks", set_grad_checkpointing(model))
    if args.compile:
        logger.info("torch.compile on %d transformer blocks", compile_blocks(model))
    return model


def train_or_evaluate(
    args: argparse.Namespace,
    dist_info: distributed.DistInfo,
    run: RunLogger,
    model: torch.nn.Module,
    train_dataset: Callable[[], Dataset],
    task: Task,
    precision: str,
) -> int:
    """`--do_train`: train `task` (resuming from restore.bin when there is one); else `--do_eval`: evaluate the
    model once with the task's evaluation. Returns the exit code."""
    if args.do_train:
        trainer = Trainer(
            model, train_dataset(), train_settings(args, dist_info.world_size, precision), run, dist_info,
            args.output_dir, freeze_layer_num=args.freeze_layer_num, task=task, run_config=run_config(args),
        )
        trainer.resume_if_possible(args.resume_model)
        trainer.fit()
        return EXIT_STOPPED if trainer.stopped_by_signal else EXIT_OK
    if task.evaluate is None:
        raise InputError("--do_eval needs an evaluation split: give --val_csv (and --features_path)")
    if dist_info.is_main or task.evaluate_on_all_ranks:
        task.evaluate(model.to(dist_info.device), 0, 0)
    return EXIT_OK


def evaluate_before_training(
    args: argparse.Namespace, dist_info: distributed.DistInfo, evaluate: Callable | None, model: torch.nn.Module,
    all_ranks: bool = False,
) -> None:
    """Step-0 evaluation of the starting checkpoint on rank 0, or on every rank for an evaluation that shares the
    work: with --do_train and --eval_before_training, when there is an evaluation, and not when resuming (the run
    already has it)."""
    if not (args.do_train and args.eval_before_training) or evaluate is None:
        return
    if (Path(args.output_dir) / "restore.bin").is_file() or args.resume_model:
        return
    if dist_info.is_main or all_ranks:
        logger.info("evaluating the starting checkpoint before training (step 0)")
        evaluate(model.to(dist_info.device), 0, 0)
        model.train()
    distributed.barrier()


def run_main(task: str, run: RunFn, argv: Sequence[str] | None = None) -> int:
    """Parse the flags of `task`, join the process group, log to `--output_dir`, run, leave the group.

    Exit codes: 0 finished, 2 bad input (an `InputError`: one line on stderr, the traceback in log.txt, or shown
    with --debug), 75 stopped by a signal after saving restore.bin. Other exceptions propagate with their traceback.
    """
    args = parse_args(argv, task=task)
    dist_info = distributed.init_distributed()
    run_logger = RunLogger(args.output_dir, dist_info.is_main, tensorboard=args.tensorboard, rank=dist_info.rank)
    try:
        report_ignored_flags(args)
        logger.info("command line: %s", " ".join(sys.argv))
        if dist_info.is_main:
            record_run_start(args, dist_info)
        set_seed(args.seed)
        code = run(args, dist_info, run_logger)  # returns before cleanup, so the trainer is out of scope there
        code = EXIT_OK if code is None else code
        if dist_info.is_main:
            record_run_outcome(args.output_dir, "stopped by a signal" if code == EXIT_STOPPED else "finished")
        return code
    except InputError as error:
        if dist_info.is_main:
            record_run_outcome(args.output_dir, f"bad input: {error}")
        if args.debug:
            raise
        run_logger.traceback_to_file(error)
        script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else f"main_task_{task}.py"
        print(f"{script}: error: {error}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        run_logger.close()
        distributed.cleanup()
