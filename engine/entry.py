"""What every entry script does around its task: flags, seeding, the process group, run logging, the model, then
training or evaluation through the task's definition (engine/tasks/)."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dataloaders.files import FolderInUseError, FolderLock
from engine import distributed
from engine.args import (
    DEFAULT_DATATYPE,
    check_model_limits,
    local_batch_sizes,
    parse_args,
    report_ignored_flags,
    resolve_clip_path,
)
from engine.checkpointing import RESTORE_NAME, CheckpointWriteError
from engine.data import build_webvid_dataset, training_source
from engine.precision import resolve_precision
from engine.run_logging import RunLogger, record_run_outcome, record_run_start
from engine.tasks.base import Task
from engine.tasks.registry import RunContext, TaskDefinition, task_definition
from engine.trainer import NonFiniteLossError, Outcome, Trainer, TrainingDataError, TrainSettings
from modules.checkpoint import read_model_settings
from modules.clip import compile_blocks, set_grad_checkpointing
from modules.errors import InputError
from modules.model import T2VLP, T2VLPConfig

logger = logging.getLogger("t2vlp")

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3  # too many consecutive non-finite losses
EXIT_DATA_UNREADABLE = 65  # sysexits' EX_DATAERR: the training data stopped being readable mid-run
EXIT_WRITE_FAILED = 74  # sysexits' EX_IOERR: a checkpoint or restore.bin could not be written (a full disk?)
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after saving restore.bin; rerun to resume

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
        max_empty_batches=args.max_empty_batches,
        keep_checkpoints=args.keep_checkpoints, allow_changed_settings=args.allow_changed_settings,
    )


# Flags of every stage and task that shape the model or the data: restore.bin fixes them (engine.checkpointing).
RUN_CONFIG_FLAGS = (
    "max_words", "max_frames", "num_centers", "split_layer", "tube_layers", "freeze_layer_num", "slice_framepos",
    "train_frame_order", "feature_framerate", "expand_msrvtt_sentences", "fusion_layers", "clip_model",
)
FUSION_RUN_CONFIG_FLAGS = ("head_dropout", "match_norm", "train_encoders")


def run_config(args: argparse.Namespace) -> dict[str, object]:
    """The model- and data-shaping flags of this task, as restore.bin records them."""
    definition = task_definition(args.task)
    names = [*RUN_CONFIG_FLAGS, *(FUSION_RUN_CONFIG_FLAGS if definition.with_fusion else ()),
             *definition.run_config_flags, *(f"{loss}_weight" for loss in definition.loss_weights)]
    return {"task": args.task, **{name: getattr(args, name) for name in names}}


def build_model(args: argparse.Namespace, **config_overrides: object) -> T2VLP:
    """The task's T2VLP from the command line: sizes from `--visual_pretrain_path`, then `--init_model`.

    Stage 1 keeps the tube input in the graph; every task with the fusion encoder detaches the tube input unless
    `--train_encoders` (docs/method.md §11.5)."""
    definition = task_definition(args.task)
    config = T2VLPConfig(num_centers=args.num_centers, split_layer=args.split_layer, tube_layers=args.tube_layers)
    if definition.with_fusion:
        config = replace(
            config, detach_tube_input=not args.train_encoders, with_fusion=True, fusion_layers=args.fusion_layers,
            head_dropout=args.head_dropout, match_norm=args.match_norm,
        )
    config = replace(config, **config_overrides)
    model = T2VLP.from_pretrained(resolve_clip_path(args), init_model=args.init_model, config=config,
                                  trust_checkpoint=args.trust_checkpoint, clip_model=args.clip_model,
                                  recorded=resumed_model_settings(args))
    args.clip_model = model.clip_config.clip_model  # as resolved (the flag, --init_model or restore.bin): run_config
    fusion_extra_tokens = (1 + args.max_frames + model.config.num_centers + definition.extra_fusion_positions
                           if config.with_fusion else None)
    check_model_limits(args, context_length=model.clip_config.context_length,
                       fusion_extra_tokens=fusion_extra_tokens)
    if args.grad_checkpointing:
        logger.info("gradient checkpointing on %d transformer blocks", set_grad_checkpointing(model))
    if args.compile:
        logger.info("torch.compile on %d transformer blocks", compile_blocks(model))
    return model


def resumed_model_settings(args: argparse.Namespace) -> dict | None:
    """The model settings the restore.bin this run will resume from records (None when it does not resume or
    the file records none), so that a resumed run rebuilds its network without flags."""
    restore = args.resume_model or (Path(args.output_dir) / RESTORE_NAME if args.do_train else None)
    return (read_model_settings(restore) or None) if restore and Path(restore).is_file() else None


def run_task(definition: TaskDefinition, context: RunContext) -> int:
    """The skeleton every stage and task shares: the model, the task's own pieces (`prepare`), a step-0
    evaluation, then training (resuming from restore.bin when there is one) or one evaluation. The exit code."""
    args, dist_info = context.args, context.dist_info
    default_datatype = definition.defaults.get("datatype", DEFAULT_DATATYPE)
    if context.dataset and args.datatype not in (default_datatype, context.dataset, f"{context.dataset}_qa"):
        logger.warning("--datatype %s is ignored: this script runs on %s", args.datatype, context.dataset)
    if args.do_train and definition.pretraining:  # a training set with nothing to train on stops the run here
        context = replace(context, webvid_train=build_webvid_dataset(args))
    model = build_model(args, **(definition.model_options(context) if definition.model_options else {}))
    context = replace(context, trained_before=model.trained_on)
    if args.do_train and model.trained_on is not None:  # its checkpoints add this run to what they were trained on
        model.trained_on = [*model.trained_on, training_run_record(args, definition, context.dataset)]
    prepared = definition.prepare(context, model)
    train_dataset = prepared.train_dataset() if args.do_train else None  # a bad training set stops the run here
    evaluate_before_training(args, dist_info, prepared.task, model)
    if not args.do_train:
        evaluate_once(dist_info, prepared.task, model)
        return EXIT_OK
    trainer = Trainer(
        model, train_dataset, train_settings(args, dist_info.world_size, context.precision), context.run,
        dist_info, args.output_dir, prepared.task, freeze_layer_num=args.freeze_layer_num,
        run_config=run_config(args),
    )
    trainer.resume_if_possible(args.resume_model, trust=args.trust_checkpoint)
    outcome = trainer.fit()
    if outcome is Outcome.SIGNAL:
        return EXIT_STOPPED
    if prepared.after_training is not None and dist_info.is_main:
        prepared.after_training(model.to(dist_info.device))
    return EXIT_OK


def training_run_record(args: argparse.Namespace, definition: TaskDefinition, dataset: str | None
                        ) -> dict[str, str]:
    """What a checkpoint records of the run that trained it: the task and the dataset whose training split it
    read (a task script's dataset; pre-training on MSR-VTT: msrvtt; on a corpus: its labels file)."""
    if dataset is not None:
        return {"task": args.task, "dataset": dataset}
    if not definition.pretraining:
        return {"task": args.task}
    if training_source(args.data_path) == "msrvtt":
        return {"task": args.task, "dataset": "msrvtt"}
    return {"task": args.task, "corpus": str(args.data_path)}


def evaluate_once(dist_info: distributed.DistInfo, task: Task, model: torch.nn.Module) -> None:
    """`--do_eval`: the task's evaluation of the model as loaded."""
    if task.evaluate is None:
        raise InputError("--do_eval needs an evaluation split: give --val_csv (and --features_path)")
    if dist_info.is_main or task.evaluate_on_all_ranks:
        task.evaluate(model.to(dist_info.device), 0, 0)


def evaluate_before_training(args: argparse.Namespace, dist_info: distributed.DistInfo, task: Task,
                             model: torch.nn.Module) -> None:
    """Step-0 evaluation of the starting checkpoint on rank 0 (every rank for an evaluation that shares the work):
    with --do_train and --eval_before_training (tasks with the fusion encoder), when there is an evaluation, and
    not when resuming (the run already has it)."""
    if not (args.do_train and getattr(args, "eval_before_training", False)) or task.evaluate is None:
        return
    if (Path(args.output_dir) / "restore.bin").is_file() or args.resume_model:
        return
    if dist_info.is_main or task.evaluate_on_all_ranks:
        logger.info("evaluating the starting checkpoint before training (step 0)")
        task.evaluate(model.to(dist_info.device), 0, 0)
        model.train()
    distributed.barrier()


def run_main(task: str, argv: Sequence[str] | None = None, dataset: str | None = None) -> int:
    """Parse the flags of `task` (on `dataset`, for the task scripts), join the process group, take the output
    folder (one writer per folder), log to `--output_dir`, run the task, leave the group.

    Exit codes (docs/operations.md §4): 0 finished, 2 bad input (an `InputError`, including an output
    folder another run writes into), 3 stopped by too many non-finite losses, 65 the training data stopped being
    readable, 74 a checkpoint or restore.bin that
    could not be written (a full disk), 75 stopped by a signal after saving restore.bin: one line on stderr and
    the traceback in log.txt (or shown with --debug). Other exceptions propagate with their traceback. Every way
    a run ends is recorded as the outcome of its run.json entry.
    """
    definition = task_definition(task)
    if dataset is not None and dataset not in definition.datasets:
        raise ValueError(f"{task}: dataset must be one of {definition.datasets}, got {dataset!r}")
    args = parse_args(argv, task=definition)
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else f"main_task_{task}.py"
    dist_info = distributed.init_distributed()
    lock = FolderLock(args.output_dir, what="--output_dir")
    refusal = None
    if dist_info.is_main:
        try:
            lock.acquire()
        except FolderInUseError as error:
            refusal = str(error)
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:  # another run writes into the folder: touch nothing in it
        if dist_info.is_main:
            print(f"{script}: error: {refusal}", file=sys.stderr, flush=True)
        distributed.cleanup()
        return EXIT_BAD_INPUT
    run_logger = RunLogger(args.output_dir, dist_info.is_main, tensorboard=args.tensorboard, rank=dist_info.rank)
    try:
        report_ignored_flags(args)
        logger.info("command line: %s", " ".join(sys.argv))
        if dist_info.is_main:
            record_run_start(args, dist_info)
        set_seed(args.seed)
        context = RunContext(args, dist_info, run_logger, resolve_precision(args.precision, dist_info.device), dataset)
        code = run_task(definition, context)  # returns before cleanup, so the trainer is out of scope there
        if dist_info.is_main:
            record_run_outcome(args.output_dir, "stopped by a signal" if code == EXIT_STOPPED else "finished")
        return code
    except (InputError, NonFiniteLossError, CheckpointWriteError, TrainingDataError) as error:
        if dist_info.is_main:
            record_run_outcome(args.output_dir, outcome_of(error))
        if args.debug:
            raise
        run_logger.traceback_to_file(error)
        print(f"{script}: error: {error}", file=sys.stderr, flush=True)
        return exit_code_of(error)
    except BaseException as error:
        if dist_info.is_main:
            record_run_outcome(args.output_dir, outcome_of(error))
        raise
    finally:
        run_logger.close()
        lock.release()
        distributed.cleanup()


def outcome_of(error: BaseException) -> str:
    """The run.json outcome of a run that ended with `error`."""
    if isinstance(error, InputError):
        return f"bad input: {error}"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (a second signal: nothing saved at the stop)"
    return f"error: {type(error).__name__}: {error}"


def exit_code_of(error: BaseException) -> int:
    if isinstance(error, NonFiniteLossError):
        return EXIT_NON_FINITE
    if isinstance(error, CheckpointWriteError):
        return EXIT_WRITE_FAILED
    if isinstance(error, TrainingDataError):
        return EXIT_DATA_UNREADABLE
    return EXIT_BAD_INPUT
