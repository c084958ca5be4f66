"""What a stage or task is, declared once in its own file under engine/tasks/, and how the entry scripts find it.

A task file passes a `TaskDefinition` to `register_task` at import: its name, its flags and their defaults, the
flags that restore.bin fixes, its parameter groups, its head dropout, and `prepare`, which builds what a run of it
needs (the `Task` the loop trains: objective and evaluation; the training data; what to do after training).
Nothing outside the file names the task: the parser, the run configuration and the runner read the definition.
Every other module of this package is a task file: `task_definition(name)` imports them, so a new file is all a
new task needs.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from engine import distributed
from engine.evaluation import EvalContext
from engine.tasks.base import Task

if TYPE_CHECKING:
    from engine.run_logging import RunLogger

INFRASTRUCTURE = {"base", "registry"}  # the modules of this package that are not task files


@dataclass(frozen=True)
class RunContext:
    """One invocation of a task: its parsed flags, processes, run logger, precision and (task scripts) dataset."""

    args: argparse.Namespace
    dist_info: distributed.DistInfo
    run: RunLogger
    precision: str
    dataset: str | None = None
    webvid_train: Any = None  # a pre-training run's WebVid training set, built (and checked) before the model
    trained_before: list[dict] | None = None  # what the starting weights were trained on (None: not known)

    @property
    def device(self) -> torch.device:
        return self.dist_info.device

    def eval_context(self) -> EvalContext:
        """The evaluators' settings from the flags; a `--do_eval` row names the checkpoint it evaluated."""
        args = self.args
        extra: dict[str, Any] = {"dataset": self.dataset} if self.dataset else {}
        if not args.do_train:
            extra["checkpoint"] = str(Path(args.init_model).resolve()) if args.init_model else None
        return EvalContext(self.run, args.output_dir, self.device, self.precision, args.batch_size_val,
                           args.num_thread_reader, extra)


@dataclass(frozen=True)
class PreparedRun:
    """What `TaskDefinition.prepare` builds: the loop's `Task`, the training set (built only to train) and what to
    do on rank 0 after a finished training run (captioning: test the selected checkpoint)."""

    task: Task
    train_dataset: Callable[[], Dataset]
    after_training: Callable[[nn.Module], None] | None = None


@dataclass(frozen=True)
class EvalSplitFlag:
    """A task with `--eval_split {val,test}`: its default for the parsed flags, and the help text."""

    default: Callable[[argparse.Namespace], str]
    help: str


@dataclass(frozen=True)
class TaskDefinition:
    """A stage or task, everything about it in one place (its file under engine/tasks/)."""

    name: str  # the name restore.bin records; also the parser's description
    prepare: Callable[[RunContext, nn.Module], PreparedRun]
    new_param_patterns: tuple[str, ...]  # parameters of the fixed-rate --new_params_lr group (substrings)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # parser defaults (cadences, --new_params_lr, ...)
    head_dropout: float | None = None  # the token and match heads' dropout; None: no fusion encoder (stage 1)
    loss_weights: tuple[str, ...] = ()  # one --<name>_weight flag each (default 1), fixed by restore.bin
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None
    check_flags: Callable[[argparse.Namespace], str | None] | None = None  # a usage error, or None
    run_config_flags: tuple[str, ...] = ()  # its own flags that shape the model or data (restore.bin fixes them)
    reads_compat_flags: frozenset[str] = frozenset()  # original flags the other tasks accept and ignore
    eval_split: EvalSplitFlag | None = None
    datasets: tuple[str, ...] = ()  # what its entry scripts pass as `dataset` (empty: none)
    model_options: Callable[[RunContext], dict[str, Any]] | None = None  # extra T2VLPConfig fields (QA: answers)
    extra_fusion_positions: int = 0  # fusion positions after the text (QA: the answer slot)
    pretraining: bool = False  # trains on a corpus (--data_path labels, --dir_path store) or MSR-VTT (stages 1, 2)

    @property
    def with_fusion(self) -> bool:
        return self.head_dropout is not None


_REGISTRY: dict[str, TaskDefinition] = {}


def register_task(definition: TaskDefinition) -> TaskDefinition:
    """Make `definition` known by its name (a task file calls this once, at import)."""
    known = _REGISTRY.get(definition.name)
    if known is not None and known is not definition:
        raise ValueError(f"a task named {definition.name!r} is already registered")
    _REGISTRY[definition.name] = definition
    return definition


def task_definition(name: str) -> TaskDefinition:
    """The registered task `name`; the task files of this package are imported first."""
    if name not in _REGISTRY:
        _import_task_files()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; expected one of {task_names()}")
    return _REGISTRY[name]


def task_names() -> tuple[str, ...]:
    _import_task_files()
    return tuple(_REGISTRY)


def _import_task_files() -> None:
    package = Path(__file__).parent
    for module in pkgutil.iter_modules([str(package)]):
        if module.name not in INFRASTRUCTURE:
            importlib.import_module(f"{__package__}.{module.name}")
