"""Checkpoints (docs/method.md §10.4, docs/architecture.md §2): atomic writes, model checkpoints, restore.bin and RNG state, what
may change when a run resumes, and model selection (`best_checkpoint.json`)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataloaders.files import temporary_beside
from modules.errors import InputError

logger = logging.getLogger("t2vlp.checkpointing")

RESTORE_NAME = "restore.bin"
PREVIOUS_RESTORE_NAME = "restore.bin.prev"
CHECKPOINT_DIR = "ckpt"
CHECKPOINT_PREFIX = "pytorch_model.bin."
BEST_CHECKPOINT_NAME = "best_checkpoint.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint or restore.bin could not be written (a full disk, a quota, a read-only folder); the message
    says what was last saved and what to do. Files written before are intact (saves are atomic)."""


def write_failure_reason(error: BaseException) -> str:
    """The OS error behind a failed save (torch wraps it in a RuntimeError of its zip writer), as one phrase."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return f"{seen.strerror or os.strerror(seen.errno)} (errno {seen.errno})"
        seen = seen.__cause__ or seen.__context__
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{type(error).__name__}: {text}"


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save `obj` so that `path` holds either the old file or the complete new one, never a partial one.

    Writes a temp file in the same folder, fsyncs it, renames it over `path` and fsyncs the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fp32_cpu(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        key: (t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu())
        for key, t in state_dict.items()
    }


def checkpoint_path(output_dir: str | os.PathLike, global_step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{global_step}"


def save_model_checkpoint(
    output_dir: str | os.PathLike,
    global_step: int,
    model_state_dict: Mapping[str, torch.Tensor],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `<output_dir>/ckpt/pytorch_model.bin.<global_step>` = {"global_step", "model_state_dict", **extra}.

    Floating tensors are stored as fp32 on CPU. Pass the DDP-unwrapped state dict (original key layout).
    """
    payload = {
        **(extra or {}),
        "global_step": int(global_step),
        "model_state_dict": _fp32_cpu(model_state_dict),
    }
    return save_atomic(payload, checkpoint_path(output_dir, global_step))


class BestCheckpoint:
    """Tracks the best value of one metric (higher is better; the earlier step wins a tie)."""

    def __init__(self, output_dir: str | os.PathLike, metric: str) -> None:
        self.output_dir = Path(output_dir)
        self.metric = metric
        self.path = self.output_dir / BEST_CHECKPOINT_NAME
        self.best: dict[str, Any] | None = None
        if self.path.is_file():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("metric") == metric:
                self.best = saved

    def update(self, value: float, step: int, epoch: int) -> bool:
        """Record `value` at `step`; returns whether it is the new best (then the file is rewritten)."""
        if self.best is not None and value <= self.best["value"]:
            logger.info("model selection: %s %.4g at step %d; the best is still %.4g at step %d (%s)", self.metric,
                        value, step, self.best["value"], self.best["step"], self.best["checkpoint"] or "no checkpoint")
            return False
        checkpoint = checkpoint_path(self.output_dir, step)
        self.best = {
            "metric": self.metric, "value": value, "step": step, "epoch": epoch,
            "checkpoint": str(checkpoint.resolve()) if checkpoint.is_file() else None,
        }
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.best, indent=1) + "\n", encoding="utf-8")
        temporary.replace(self.path)
        where = self.best["checkpoint"] or f"no checkpoint was saved at step {step} (see --save_steps)"
        logger.info("model selection: new best %s %.4g at step %d (epoch %d): %s", self.metric, value, step, epoch, where)
        return True


def best_checkpoint_step(output_dir: str | os.PathLike) -> int | None:
    """The step that model selection (`BestCheckpoint`) recorded as best, if any."""
    path = Path(output_dir) / BEST_CHECKPOINT_NAME
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune_model_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` newest (by step) `ckpt/pytorch_model.bin.<step>` files, never the one model
    selection recorded as best; returns the deleted."""
    folder = checkpoint_path(output_dir, 0).parent
    steps = sorted(
        int(p.name.rsplit(".", 1)[1])
        for p in folder.glob("pytorch_model.bin.*")
        if p.name.rsplit(".", 1)[1].isdigit()
    )
    best = best_checkpoint_step(output_dir)
    doomed = [checkpoint_path(output_dir, step) for step in steps[:-keep] if step != best] if keep > 0 else []
    for path in doomed:
        path.unlink()
    return doomed


def save_restore(output_dir: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Atomically (over)write `<output_dir>/restore.bin` with everything needed to resume; the one it replaces
    becomes `restore.bin.prev`, so a bad write (or a bad disk block) never loses the run."""
    path = Path(output_dir) / RESTORE_NAME
    if path.is_file():
        previous = path.with_name(PREVIOUS_RESTORE_NAME)
        linked = previous.with_name(previous.name + ".tmp")
        linked.unlink(missing_ok=True)
        try:
            os.link(path, linked)  # no copy of gigabytes: a second name for the current file
        except OSError:
            shutil.copy2(path, linked)  # file systems without hard links
        os.replace(linked, previous)
    return save_atomic(dict(state), path)


def remove_stale_temporary_files(output_dir: str | os.PathLike) -> list[Path]:
    """Delete temp files left by interrupted atomic saves in `output_dir` and its `ckpt/` (returns them)."""
    folder = Path(output_dir)
    stale = [*folder.glob(".*.tmp"), *folder.glob("*.prev.tmp"), *(folder / CHECKPOINT_DIR).glob(".*.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_restore(
    output_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
    trust: bool = False,
) -> dict[str, Any] | None:
    """The dict saved by save_restore, or None when there is none.

    Reads `path` if given (e.g. --resume_model), else `<output_dir>/restore.bin`, with `weights_only=True`: a
    restore.bin holds tensors and plain containers only (RNG states included, see `capture_rng_state`), so a file
    from elsewhere cannot run code. One written by an earlier version (its numpy RNG state a pickled array) is
    refused with what to do, and read unrestricted only with `trust` (--trust_checkpoint).
    """
    if path is None:
        if output_dir is None:
            raise ValueError("give output_dir or path")
        path = Path(output_dir) / RESTORE_NAME
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):  # not a restriction: a damaged file
            raise _unreadable(path, error) from error
        if not trust:
            raise InputError(f"{path} needs an unrestricted load, which can run code: a restore.bin of an earlier "
                             f"version of this project is read with --trust_checkpoint (only for your own files; "
                             f"the next save writes the safe format)") from error
        logger.warning("%s: loaded without restrictions (--trust_checkpoint)", path)
        return _load_trusted(path, map_location)
    except Exception as error:  # noqa: BLE001 - any failure to read it means the same thing to the user
        raise _unreadable(path, error) from error


def _load_trusted(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: BaseException) -> InputError:
    previous = path.with_name(PREVIOUS_RESTORE_NAME)
    hint = (f"resume from the previous one with --resume_model {previous}, or " if previous.is_file()
            and previous != path else "")
    return InputError(
        f"{path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
        f"it is truncated or corrupt: {hint}delete it to start the run over"
    )


def capture_rng_state() -> dict[str, Any]:
    """States of python `random`, numpy's global RNG, torch CPU and every CUDA device, as tensors and plain values
    (what `weights_only` loading accepts)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of capture_rng_state. CUDA states are restored only when the device count matches."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple with an array: a restore.bin of an earlier version
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states is None or not torch.cuda.is_available():
        return
    if len(cuda_states) != torch.cuda.device_count():
        logger.warning(
            "saved %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
            len(cuda_states),
            torch.cuda.device_count(),
        )
        return
    torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# ----------------------------------------------------------------------------------------------- resume policy

# Settings a resumed run may change freely; every other one (and the run's model/data configuration) is fixed by
# restore.bin unless --allow_changed_settings is given. The global batch is compared, not the per-process one, so a
# run may resume on another number of processes.
MAY_CHANGE_ON_RESUME = frozenset({"epochs", "max_steps", "eval_steps", "save_steps", "n_display", "keep_checkpoints",
                                  "num_workers", "max_bad_steps", "max_empty_batches", "allow_changed_settings"})
RESTORE_KEYS = frozenset({"model_state_dict", "progress", "optim_state_dict"})


def read_restore_for_resume(output_dir: str | os.PathLike, path: str | None = None, trust: bool = False
                            ) -> dict[str, Any] | None:
    """The restore.bin a run resumes from: `path` (an explicit --resume_model: it must exist), else
    `<output_dir>/restore.bin` when present; None when there is none. Refuses a file that is no restore.bin."""
    if path is not None and not Path(path).is_file():
        raise InputError(f"--resume_model {path} does not exist (omit it to resume from "
                         f"{Path(output_dir) / RESTORE_NAME} when present)")
    state = load_restore(output_dir, path=path, trust=trust)
    if state is None:
        return None
    if not isinstance(state, dict) or not RESTORE_KEYS <= state.keys():
        raise InputError(f"{path or Path(output_dir) / RESTORE_NAME} is not a restore.bin of this project "
                         f"(a model checkpoint? pass it as --init_model)")
    return state


def resume_setting_changes(state: Mapping[str, Any], settings: Mapping[str, Any], world_size: int,
                           run_config: Mapping[str, Any], *, source: str) -> dict[str, tuple[Any, Any]]:
    """{name: (saved, now)} of the settings restore.bin fixes that differ now (the training settings other than
    MAY_CHANGE_ON_RESUME, the global batch, the run configuration). A change is refused with the list of
    differences unless `settings["allow_changed_settings"]`: then the new values take effect."""
    def fixed(values: Mapping[str, Any], processes: int) -> dict[str, Any]:
        kept = {k: v for k, v in values.items() if k not in MAY_CHANGE_ON_RESUME and k != "micro_batch_size"}
        kept["global_batch"] = values["micro_batch_size"] * values["accumulation_steps"] * processes
        return kept

    saved = state.get("settings")
    if saved is None:
        return {}
    before = {**fixed(saved, state.get("world_size", 1)), **state.get("run_config", {})}
    now = {**fixed(settings, world_size), **run_config}
    changes = {key: (before.get(key), now.get(key)) for key in sorted(now)
               if before.get(key) != now.get(key) and key in before}
    if changes and not settings.get("allow_changed_settings"):
        raise InputError(
            f"{source} was saved with other settings: {describe_changes(changes)}. Rerun with the saved values, use "
            f"another --output_dir for a new run, or pass --allow_changed_settings to resume with the new values"
        )
    return changes


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key} {before!r} -> {now!r}" for key, (before, now) in changes.items())
