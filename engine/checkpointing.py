"""Checkpoint files (METHOD §10.4, ARCHITECTURE §2): atomic writes, model checkpoints, restore.bin, RNG state."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modules.errors import InputError

logger = logging.getLogger("t2vlp.checkpointing")

RESTORE_NAME = "restore.bin"
PREVIOUS_RESTORE_NAME = "restore.bin.prev"
CHECKPOINT_DIR = "ckpt"
CHECKPOINT_PREFIX = "pytorch_model.bin."
BEST_CHECKPOINT_NAME = "best_checkpoint.json"


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save `obj` so that `path` holds either the old file or the complete new one, never a partial one.

    Writes a temp file in the same folder, fsyncs it, renames it over `path` and fsyncs the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def best_checkpoint_step(output_dir: str | os.PathLike) -> int | None:
    """The step that model selection (`engine.selection`) recorded as best, if any."""
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
) -> dict[str, Any] | None:
    """The dict saved by save_restore, or None when there is none.

    Reads `path` if given (e.g. --resume_model), else `<output_dir>/restore.bin`. Loaded with
    weights_only=False because it holds RNG states and optimiser/scheduler state: only load your own files.
    """
    if path is None:
        if output_dir is None:
            raise ValueError("give output_dir or path")
        path = Path(output_dir) / RESTORE_NAME
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any failure to read it means the same thing to the user
        previous = path.with_name(PREVIOUS_RESTORE_NAME)
        hint = (f"resume from the previous one with --resume_model {previous}, or " if previous.is_file()
                and previous != path else "")
        raise InputError(
            f"{path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            f"it is truncated or corrupt: {hint}delete it to start the run over"
        ) from error
    return state


def capture_rng_state() -> dict[str, Any]:
    """States of python `random`, numpy's global RNG, torch CPU and every CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of capture_rng_state. CUDA states are restored only when the device count matches."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
