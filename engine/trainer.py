"""The training loop shared by every stage and task: DDP, autocast over fp32 master weights, gradient
accumulation, clipping, skipping of non-finite steps, periodic evaluation, checkpoints and exact resume."""

from __future__ import annotations

import enum
import itertools
import logging
import math
import signal
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from dataloaders.collate import batch_to_device, collate_clips, is_empty_batch
from dataloaders.video import normalize_video
from engine import distributed
from engine.checkpointing import (
    CheckpointWriteError,
    capture_rng_state,
    describe_changes,
    prune_model_checkpoints,
    read_restore_for_resume,
    remove_stale_temporary_files,
    restore_rng_state,
    resume_setting_changes,
    save_model_checkpoint,
    save_restore,
    write_failure_reason,
)
from engine.optim import apply_freeze_rule, build_optimizer, build_scheduler, clamp_logit_scale
from engine.precision import autocast_context
from engine.run_logging import RunLogger, read_metrics
from engine.sampler import BlockSampler, ResumableDistributedSampler
from engine.tasks.base import ObjectiveModule, StepContext, Task
from modules.errors import InputError

logger = logging.getLogger("t2vlp.train")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stops, the last saved checkpoint is intact."""


class TrainingDataError(RuntimeError):
    """The training data stopped being readable (a store deleted or unreachable mid-run): the run stops rather
    than "finish" on nothing; the last saved checkpoint is intact."""


@dataclass
class TrainSettings:
    epochs: int
    micro_batch_size: int  # per process, per forward
    accumulation_steps: int
    lr: float
    coef_lr: float
    new_params_lr: float
    weight_decay: float
    warmup_proportion: float
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    seed: int = 42
    num_workers: int = 0
    n_display: int = 50
    eval_steps: int = 0
    save_steps: int = 0
    max_steps: int = 0
    max_bad_steps: int = 20
    max_empty_batches: int = 20  # consecutive micro-batches without one readable video that stop the run
    keep_checkpoints: int = 1  # newest model checkpoints kept (and the best); 0 keeps all
    allow_changed_settings: bool = False  # resume even if fixed settings changed (the new ones take effect)


def training_sampler(dataset: Dataset, settings: TrainSettings, dist_info: distributed.DistInfo
                     ) -> ResumableDistributedSampler | BlockSampler:
    """The training order: over samples, or, for a dataset read by the block (`block_layout`), over blocks."""
    layout = getattr(dataset, "block_layout", None)
    if layout is not None:
        return BlockSampler(layout, dist_info.world_size, dist_info.rank, settings.seed, dataset.block_buffer,
                            settings.num_workers, settings.micro_batch_size)
    return ResumableDistributedSampler(len(dataset), dist_info.world_size, dist_info.rank, shuffle=True,
                                       seed=settings.seed, drop_last=dist_info.world_size > 1)


def check_block_resume(state: dict, settings: TrainSettings, world_size: int) -> None:
    """Block mode's order depends on the processes and the workers: resuming in the middle of an epoch with
    others would repeat and leave out samples, so it is refused (at an epoch's end any number will do)."""
    saved_workers = state.get("settings", {}).get("num_workers")
    if state.get("world_size") != world_size or saved_workers != settings.num_workers:
        raise InputError(f"block mode: this run stopped in the middle of an epoch with {state.get('world_size')} "
                         f"processes and --num_thread_reader {saved_workers}; resume it with the same (now "
                         f"{world_size} and {settings.num_workers}), since the epoch's order depends on them")


class Outcome(enum.Enum):
    """How a stretch of training ended (an epoch, or `Trainer.fit`)."""

    EPOCH_END = "the epoch's data is used up"
    MAX_STEPS = "--max_steps reached"
    SIGNAL = "stopped by a signal after saving restore.bin"
    ALREADY_FINISHED = "the run was already finished: nothing trained"


@dataclass
class WindowSummary:
    """One accumulation window, reduced over ranks: means of the loss terms, and the step's decisions."""

    values: dict[str, float]
    finite: bool
    logit_scale: float
    stop_requested: bool
    upcoming_flags: list[tuple[float, float]]


@dataclass
class Progress:
    """Where the run is; saved in restore.bin."""

    epoch: int = 0
    samples_in_epoch: int = 0  # samples of the epoch consumed by all processes together (for resume)
    global_step: int = 0  # optimiser steps taken
    bad_steps: int = 0  # consecutive skipped steps
    skipped_videos: int = 0  # over all ranks
    pending_evaluation: bool = False  # saved right before an epoch-end / final evaluation


class StopRequest:
    """SIGINT/SIGTERM ask the loop to save restore.bin at the next step boundary and exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %d received: saving restore.bin at the next step boundary, then stopping", signum)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        settings: TrainSettings,
        run: RunLogger,
        dist_info: distributed.DistInfo,
        output_dir: str,
        task: Task,
        freeze_layer_num: int = 0,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        """`task` supplies the objective, the fixed-LR parameter patterns and the evaluation. `run_config` holds the
        flags that shape the model and data (compared on resume like the fixed settings)."""
        self.settings = settings
        self.run_config = dict(run_config or {})
        self.run = run
        self.dist = dist_info
        self.device = dist_info.device
        self.output_dir = output_dir
        self.task = task
        if dist_info.is_main:
            for path in remove_stale_temporary_files(output_dir):
                logger.info("removed %s, left by an interrupted save", path)
        self.model = model.to(self.device)
        frozen = apply_freeze_rule(self.model, freeze_layer_num)
        logger.info("--freeze_layer_num %d froze %d parameter tensors", freeze_layer_num, len(frozen))
        self.train_dataset = train_dataset
        self.sampler = training_sampler(train_dataset, settings, dist_info)
        self.batches_per_epoch = self.sampler.num_samples // settings.micro_batch_size
        self.steps_per_epoch = self.batches_per_epoch // settings.accumulation_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training set ({len(train_dataset)} items) is smaller than one global batch "
                f"({settings.micro_batch_size * settings.accumulation_steps * dist_info.world_size})"
            )
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.optimizer = build_optimizer(
            self.model, settings.lr, settings.coef_lr, settings.new_params_lr, settings.weight_decay,
            new_param_patterns=self.task.new_param_patterns,
        )
        log_param_groups(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, settings.warmup_proportion)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        objective_module = ObjectiveModule(self.model, self.task.objective)
        self.ddp = (
            DistributedDataParallel(
                objective_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.task.find_unused_parameters,
            )
            if dist_info.world_size > 1
            else objective_module
        )
        self.progress = Progress()
        self.resumed = False
        self._resumed_from = -1
        self._last_evaluated_step = -1
        self._last_checkpoint_step = -1
        self._last_saved_step = -1  # restore.bin written by this run
        self._empty_in_a_row = 0  # micro-batches without a readable video, across epochs

    # ---------------------------------------------------------------- state

    def state_dict(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything restore.bin holds; `rng_states` has one entry per rank."""
        return {
            "global_step": self.progress.global_step,
            "model_state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optim_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "progress": asdict(self.progress),
            "rng_state": rng_states,
            "world_size": self.dist.world_size,
            "settings": asdict(self.settings),
            "run_config": self.run_config,
            "model_settings": self._model_settings(),
        }

    def _model_settings(self) -> dict[str, Any]:
        """What a checkpoint records of the settings that shape the model's results: the run configuration
        (task, text length, frames, frame rate, fusion blocks, match normalisation, ...) and what the model says
        of itself (T2VLP: the backbone, the answer vocabulary), so that the file alone gives the same results."""
        settings = getattr(self.model, "model_settings", None)
        return {**self.run_config, **(settings() if callable(settings) else {})}

    def resume_if_possible(self, path: str | None = None, trust: bool = False) -> bool:
        """Resume from `path` (an explicit --resume_model: it must exist), else from `<output_dir>/restore.bin` when
        present; return whether the run resumed. What may change on resume is decided in engine.checkpointing;
        `trust` reads a restore.bin of an earlier version (--trust_checkpoint)."""
        state = read_restore_for_resume(self.output_dir, path, trust=trust)
        if state is None:
            return False
        changes = resume_setting_changes(state, asdict(self.settings), self.dist.world_size, self.run_config,
                                         source=path or str(Path(self.output_dir) / "restore.bin"))
        self.model.load_state_dict(state["model_state_dict"])
        self.optimizer.load_state_dict(state["optim_state_dict"])
        self.scheduler.load_state_dict(state["scheduler_state_dict"])
        self.scaler.load_state_dict(state["scaler_state_dict"])
        self.progress = Progress(**state["progress"])
        self._resumed_from = self.progress.global_step
        if changes:
            logger.warning("resuming with changed settings (--allow_changed_settings): %s", describe_changes(changes))
            self._apply_learning_rates()
        for key in ("epochs", "max_steps"):
            before = state.get("settings", {}).get(key)
            if before is not None and before != getattr(self.settings, key):
                logger.warning("--%s changed on resume: %s -> %s (the schedule follows the new total of %d steps)",
                               key, before, getattr(self.settings, key), self.total_steps)
        rng_states = state["rng_state"]
        if isinstance(self.sampler, BlockSampler) and self.progress.samples_in_epoch:
            check_block_resume(state, self.settings, self.dist.world_size)
        if state.get("world_size") != self.dist.world_size:
            logger.warning("resuming a run saved with %s processes on %d", state.get("world_size"), self.dist.world_size)
        restore_rng_state(rng_states[self.dist.rank % len(rng_states)])
        logger.info(
            "resumed from restore.bin: epoch %d, %d samples into the epoch, step %d",
            self.progress.epoch, self.progress.samples_in_epoch, self.progress.global_step,
        )
        self.resumed = True
        return True

    def _apply_learning_rates(self) -> None:
        """Make the groups' base rates and weight decay those of the current settings (after a changed resume)."""
        settings = self.settings
        rates = {"backbone": settings.lr * settings.coef_lr, "new": settings.new_params_lr, "other": settings.lr}
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for index, group in enumerate(self.optimizer.param_groups):
            rate = rates[group_kind(group)]
            group["initial_lr"] = rate
            self.scheduler.base_lrs[index] = rate
            group["lr"] = rate * factor
            if group["weight_decay"]:
                group["weight_decay"] = settings.weight_decay

    def save(self, with_checkpoint: bool) -> None:
        """restore.bin always, `ckpt/pytorch_model.bin.<step>` when asked; rank 0 writes, all ranks wait. A write
        that fails (a full disk) stops the run with a `CheckpointWriteError` on every rank; what was saved before
        is intact."""
        rng_states = distributed.all_gather_object(capture_rng_state())  # collective: every rank takes part
        failure = None
        if self.dist.is_main:
            try:
                self._write_state(self.state_dict(rng_states), with_checkpoint)
            except (OSError, RuntimeError) as error:
                failure = self._write_failure(error)
        failure = distributed.broadcast_object(failure)
        if failure is not None:
            raise CheckpointWriteError(failure)
        if with_checkpoint:
            self._last_checkpoint_step = self.progress.global_step
        self._last_saved_step = self.progress.global_step
        distributed.barrier()

    def _write_state(self, state: dict[str, Any], with_checkpoint: bool) -> None:
        if with_checkpoint:
            path = save_model_checkpoint(self.output_dir, self.progress.global_step, state["model_state_dict"],
                                         extra={"model_settings": state["model_settings"]})
            logger.info("saved %s", path)
            if self.settings.keep_checkpoints:
                prune_model_checkpoints(self.output_dir, self.settings.keep_checkpoints)
        save_restore(self.output_dir, state)

    def _write_failure(self, error: BaseException) -> str:
        logger.error("saving at step %d failed", self.progress.global_step, exc_info=error)
        return (f"could not save step {self.progress.global_step} in {self.output_dir}: "
                f"{write_failure_reason(error)}; {self._saved_so_far()}; free space (or fix the folder) and rerun "
                f"the same command to resume")

    def _saved_so_far(self) -> str:
        """What a stopped run leaves to resume from, for its one-line message."""
        if self._last_saved_step >= 0:
            return f"restore.bin of step {self._last_saved_step} is intact"
        if (Path(self.output_dir) / "restore.bin").is_file():
            return f"restore.bin of step {self._resumed_from} (from before this run) is intact"
        return "nothing saved yet"

    # ---------------------------------------------------------------- loop

    def fit(self) -> Outcome:
        """Train to the end of the last epoch or to `max_steps` (both end the run with a checkpoint and an
        evaluation), or until a stop signal (restore.bin saved: `Outcome.SIGNAL`)."""
        settings, progress = self.settings, self.progress
        if self.resumed and progress.pending_evaluation and not self._evaluated_at(progress.global_step):
            logger.info("the evaluation after step %d did not finish before the run stopped: evaluating now",
                        progress.global_step)
            self._evaluate()
        if self._finished():
            logger.info("this run is already finished at step %d (epoch %d of %d%s): nothing to train; its last "
                        "checkpoint is in %s", progress.global_step, progress.epoch, settings.epochs,
                        f", --max_steps {settings.max_steps}" if settings.max_steps else "",
                        Path(self.output_dir) / "ckpt")
            return Outcome.ALREADY_FINISHED
        logger.info(
            "training: %d epochs x %d optimiser steps (global batch %d = %d processes x %d x %d accumulation); %s",
            settings.epochs, self.steps_per_epoch,
            self.dist.world_size * settings.micro_batch_size * settings.accumulation_steps,
            self.dist.world_size, settings.micro_batch_size, settings.accumulation_steps, self._end_of_run(),
        )
        outcome = Outcome.EPOCH_END
        with StopRequest() as stop:
            while not self._finished():
                outcome = self.train_epoch(stop)
                if outcome is Outcome.SIGNAL:
                    return outcome
                if outcome is Outcome.EPOCH_END or self._epoch_complete():
                    self.progress.epoch += 1
                    self.progress.samples_in_epoch = 0
                self._save_and_evaluate()
        if outcome is Outcome.MAX_STEPS:
            logger.info("reached --max_steps %d: the run is finished (checkpoint %s)", settings.max_steps,
                        Path(self.output_dir) / "ckpt" / f"pytorch_model.bin.{self.progress.global_step}")
        else:
            logger.info("finished the last of %d epochs at step %d%s", settings.epochs, self.progress.global_step,
                        f", before --max_steps {settings.max_steps}: the epochs ended the run" if settings.max_steps
                        else "")
        return outcome

    def _end_of_run(self) -> str:
        """Which limit will end the run: the epochs, or --max_steps when it comes first."""
        epochs_end = self.steps_per_epoch * self.settings.epochs
        max_steps = self.settings.max_steps
        if max_steps and max_steps <= epochs_end:
            return f"the run ends at --max_steps {max_steps}"
        if max_steps:
            return (f"the run ends after epoch {self.settings.epochs}, at step {epochs_end}, before --max_steps "
                    f"{max_steps} (raise --epochs to reach it)")
        return f"the run ends after epoch {self.settings.epochs}, at step {epochs_end}"

    def train_epoch(self, stop: StopRequest) -> Outcome:
        """Train from the saved position to the end of the epoch (`Outcome.EPOCH_END`), to `max_steps`, or to a
        stop signal (restore.bin saved). One optimiser step per accumulation window; a save or evaluation when
        their step counts come round."""
        settings = self.settings
        micro_batches = AgreedMicroBatches(iter(self._loader()), self._batch_flags)
        window: list[dict[str, torch.Tensor]] = []
        used = 0  # micro-batches of this epoch with a readable video on every rank
        while (item := micro_batches.next(settings.accumulation_steps - len(window))) is not None:
            batch, (skipped, empty_ranks) = item
            self.progress.samples_in_epoch += settings.micro_batch_size * self.dist.world_size
            self.progress.skipped_videos += int(skipped)  # all ranks
            if empty_ranks > 0:
                logger.warning("a micro-batch with no decodable video on some rank was skipped on every rank")
                self._empty_in_a_row += 1
                if self._empty_in_a_row >= settings.max_empty_batches:
                    raise TrainingDataError(self._unreadable_data(f"{self._empty_in_a_row} micro-batches in a row "
                                                                  f"had no readable video"))
                continue
            self._empty_in_a_row, used = 0, used + 1
            window.append(self._forward_backward(batch, micro=len(window)))
            if len(window) < settings.accumulation_steps:
                continue
            upcoming = micro_batches.fetch(settings.accumulation_steps)
            summary = self._window_summary(window, stop, upcoming)
            micro_batches.agree(upcoming, summary.upcoming_flags)
            window = []
            if self._optimizer_step(summary):
                self._save_and_evaluate_on_schedule()
            if settings.max_steps and self.progress.global_step >= settings.max_steps:
                self.optimizer.zero_grad(set_to_none=True)
                return Outcome.MAX_STEPS
            if summary.stop_requested:
                return self._stop_for_signal()
        self.optimizer.zero_grad(set_to_none=True)  # an incomplete last accumulation window is dropped
        if distributed.all_reduce_sum(float(stop.requested)) > 0:  # once per epoch: before its checkpoint/eval
            return self._stop_for_signal()
        if used == 0 and self._empty_in_a_row:
            raise TrainingDataError(self._unreadable_data(f"no micro-batch of epoch {self.progress.epoch + 1} had "
                                                          f"a readable video"))
        return Outcome.EPOCH_END

    def _unreadable_data(self, what: str) -> str:
        source = getattr(self.train_dataset, "index_path", None)
        return (f"{what} ({self.progress.skipped_videos} videos skipped so far{f', reading {source}' if source else ''}"
                f"; the reasons are in log.txt): the training data stopped being readable (moved, deleted or "
                f"unreachable?), stopped: {self._saved_so_far()} in {self.output_dir}; make it readable and rerun "
                f"the same command to resume (--max_empty_batches {self.settings.max_empty_batches})")

    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.progress.epoch)
        if hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(self.progress.epoch)
        self.sampler.skip(self.progress.samples_in_epoch)
        # The loader's own Generator: creating its iterator must not draw from the global RNG, which dropout
        # uses, or a resumed run (a new iterator mid-epoch) would drop out differently from an uninterrupted one.
        generator = torch.Generator().manual_seed(self.settings.seed + self.progress.epoch)
        return DataLoader(
            self.train_dataset,
            batch_size=self.settings.micro_batch_size,
            sampler=self.sampler,
            num_workers=self.settings.num_workers,
            collate_fn=collate_clips,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
            generator=generator,
        )

    def _finished(self) -> bool:
        max_steps = self.settings.max_steps
        return self.progress.epoch >= self.settings.epochs or bool(max_steps and self.progress.global_step >= max_steps)

    def _epoch_complete(self) -> bool:
        per_epoch = self.batches_per_epoch * self.settings.micro_batch_size * self.dist.world_size
        return self.progress.samples_in_epoch >= per_epoch

    def _save_and_evaluate(self) -> None:
        """Checkpoint, then evaluate: a failing evaluation loses no training, and a resume redoes a lost one."""
        self.progress.pending_evaluation = True
        if self._last_checkpoint_step != self.progress.global_step:  # not already saved at --save_steps
            self.save(with_checkpoint=True)
        if self._last_evaluated_step != self.progress.global_step:  # not already done at --eval_steps
            self._evaluate()
        self.progress.pending_evaluation = False

    def _save_and_evaluate_on_schedule(self) -> None:
        step = self.progress.global_step
        if self.settings.save_steps and step % self.settings.save_steps == 0:
            self.save(with_checkpoint=True)
        if self.settings.eval_steps and step % self.settings.eval_steps == 0:
            self._evaluate()

    def _evaluated_at(self, step: int) -> bool:
        if self.task.evaluate is None:
            return True
        return any(row.get("step") == step for row in read_metrics(Path(self.output_dir) / "metrics.jsonl"))

    @staticmethod
    def _batch_flags(batches: list[dict[str, Any]]) -> list[tuple[float, float]]:
        """(skipped videos, ranks whose micro-batch is empty) of each micro-batch, summed over ranks."""
        return pair_up(distributed.all_reduce_sums(batch_flag_values(batches)))

    def _stop_for_signal(self) -> Outcome:
        self.save(with_checkpoint=False)
        logger.info("stopped at step %d by a signal; rerun the same command to resume", self.progress.global_step)
        return Outcome.SIGNAL

    def _forward_backward(self, batch: dict[str, Any], micro: int) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch, without waiting for the device; returns its detached loss terms.
        A non-finite loss back-propagates like any other; `_window_summary` then finds it and the whole step is
        skipped, its gradients dropped. DDP synchronises gradients on the window's last micro-batch only."""
        last_in_window = micro + 1 == self.settings.accumulation_steps
        syncing = last_in_window or not isinstance(self.ddp, DistributedDataParallel)
        with nullcontext() if syncing else self.ddp.no_sync():
            losses = self._forward(batch, micro)
            self.scaler.scale(losses["loss"] / self.settings.accumulation_steps).backward()
        return {k: v.detach().float() for k, v in losses.items()}

    def _forward(self, batch: dict[str, Any], micro: int = 0) -> dict[str, torch.Tensor]:
        """The task's objective on one micro-batch: tensors moved to the device, uint8 video normalised there."""
        on_device = batch_to_device(batch, self.device)
        on_device["video"] = normalize_video(on_device["video"])
        context = StepContext(
            seed=self.settings.seed, step=self.progress.global_step, micro=micro, epoch=self.progress.epoch
        )
        with autocast_context(self.device, self.settings.precision):
            return self.ddp(on_device, context)

    def _window_summary(self, pending: list[dict[str, torch.Tensor]], stop: StopRequest,
                        upcoming: list[dict[str, Any]]) -> WindowSummary:
        """What one optimiser step needs from every rank, in one collective: whether every loss of the window was
        finite, the mean of each logged term, whether a stop was requested, and the `_batch_flags` of the
        micro-batches fetched for the next window."""
        keys = list(pending[0])
        means = [sum(p[key] for p in pending) / len(pending) for key in keys]
        device = pending[0]["loss"].device
        non_finite = sum((~torch.isfinite(p["loss"])).float() for p in pending)
        logit_scale = getattr(getattr(self.model, "clip", None), "logit_scale", None)
        scale = logit_scale.detach().float().exp() if logit_scale is not None else torch.tensor(math.nan)
        host = [float(stop.requested), *batch_flag_values(upcoming)]
        packed = torch.cat([torch.stack([*means, non_finite, scale.to(device)]).double(),
                            torch.tensor(host, dtype=torch.float64).to(device, non_blocking=True)])
        sums = distributed.all_reduce_sum_tensor(packed).tolist()
        world = self.dist.world_size
        values = {key: total / world for key, total in zip(keys, sums)}
        n_non_finite, scale_sum, n_stop, *flags = sums[len(keys):]
        return WindowSummary(values, n_non_finite == 0, scale_sum / world, n_stop > 0, pair_up(flags))

    def _optimizer_step(self, summary: WindowSummary) -> bool:
        """The optimiser step of one window, or its skipping when a loss was not finite; returns whether it
        stepped."""
        settings, progress = self.settings, self.progress
        if not summary.finite:
            self.optimizer.zero_grad(set_to_none=True)
            progress.bad_steps += 1
            logger.warning(
                "non-finite loss at step %d: step skipped (%d in a row, limit %d)",
                progress.global_step + 1, progress.bad_steps, settings.max_bad_steps,
            )
            if progress.bad_steps >= settings.max_bad_steps:
                raise NonFiniteLossError(
                    f"{progress.bad_steps} consecutive non-finite losses up to step {progress.global_step + 1} "
                    f"(--max_bad_steps {settings.max_bad_steps}), stopped: {self._saved_so_far()} "
                    f"in {self.output_dir}; lower --lr or try --precision fp32, and rerun (it resumes from "
                    f"restore.bin when there is one)"
                )
            return False
        progress.bad_steps = 0
        if settings.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(self.model)
        progress.global_step += 1
        self._log_step(summary)
        return True

    def _log_step(self, summary: WindowSummary) -> None:
        step = self.progress.global_step
        values = dict(summary.values)
        for group in self.optimizer.param_groups:  # e.g. lr_backbone, lr_new
            values[f"lr_{group_kind(group)}"] = group["lr"]
        values["logit_scale"] = summary.logit_scale  # the scale this step's loss used
        self.run.scalars(values, step, prefix="train/")
        if step % self.settings.n_display == 0 or step == 1:
            logger.info(
                "epoch %d step %d/%d  %s  skipped videos %d",
                self.progress.epoch + 1, step, self.total_steps,
                "  ".join(f"{k} {v:.4g}" for k, v in values.items()), self.progress.skipped_videos,
            )

    def _evaluate(self) -> None:
        self._last_evaluated_step = self.progress.global_step
        if self.task.evaluate is None:
            return
        if self.dist.is_main or self.task.evaluate_on_all_ranks:
            self.task.evaluate(self.model, self.progress.global_step, self.progress.epoch)
            self.model.train()
        distributed.barrier()


class AgreedMicroBatches:
    """An epoch's micro-batches, each with its (skipped videos, ranks with an empty micro-batch) summed over the
    ranks, so that every rank drops an empty one together before its forward. The counts of a window's
    micro-batches travel in the collective of the step before (`fetch` + `agree`); at the epoch's start, or when
    empty micro-batches used up that look-ahead, `next` fetches and agrees on them in a collective of their own.
    A micro-batch is consumed when `next` returns it, so a save never counts one fetched ahead (resume is exact)."""

    def __init__(self, batches: Iterator[dict[str, Any]],
                 agree_on: Callable[[list[dict[str, Any]]], list[tuple[float, float]]]) -> None:
        self._batches = batches
        self._agree_on = agree_on
        self._ready: deque = deque()

    def fetch(self, count: int) -> list[dict[str, Any]]:
        """Up to `count` micro-batches from the loader, to be agreed on (`agree`)."""
        return list(itertools.islice(self._batches, count))

    def agree(self, batches: list[dict[str, Any]], flags: list[tuple[float, float]]) -> None:
        self._ready.extend(zip(batches, flags))

    def next(self, wanted: int) -> tuple[dict[str, Any], tuple[float, float]] | None:
        """The next agreed micro-batch (fetching up to `wanted` when none is ready), or None at the epoch's end."""
        if not self._ready:
            upcoming = self.fetch(wanted)
            if not upcoming:
                return None
            self.agree(upcoming, self._agree_on(upcoming))
        return self._ready.popleft()


def batch_flag_values(batches: list[dict[str, Any]]) -> list[float]:
    """[skipped videos, 1 if empty, ...] of each micro-batch, flat, for a collective (see `pair_up`)."""
    return [float(value) for batch in batches for value in (batch["n_skipped"], is_empty_batch(batch))]


def pair_up(values: list[float]) -> list[tuple[float, float]]:
    """[a0, b0, a1, b1, ...] -> [(a0, b0), (a1, b1), ...]."""
    return list(zip(values[0::2], values[1::2]))


def group_kind(group: dict[str, Any]) -> str:
    """"backbone", "new" or "other" from an optimiser group named like "new_no_decay"."""
    return group["name"].split("_")[0]


def log_param_groups(optimizer: torch.optim.Optimizer) -> None:
    """One line per optimiser group: its rate, decay, size and a few member names."""
    for group in optimizer.param_groups:
        names = group.get("param_names", [])
        count = sum(p.numel() for p in group["params"])
        shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
        logger.info(
            "LR group %-17s lr %.3g  weight decay %.3g  %d tensors, %d parameters: %s",
            group["name"], group["lr"], group["weight_decay"], len(group["params"]), count, shown,
        )
