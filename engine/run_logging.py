"""Run outputs: the human log (log.txt + console), metrics.jsonl and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("t2vlp.run_logging")


class RunLogger:
    """Configures the root logger for a run and writes its metric files.

    Rank 0 (`is_main`) logs INFO and above to the console and to `<output_dir>/log.txt` and writes
    `metrics.jsonl` and TensorBoard scalars (`<output_dir>/tensorboard`). Other ranks only print warnings and
    errors to the console, prefixed with their rank, and write no files.
    """

    def __init__(self, output_dir: str | os.PathLike, is_main: bool, tensorboard: bool = True,
                 rank: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._handlers: list[logging.Handler] = []
        self._writer = None
        if is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._configure_logging(rank)
        if is_main and tensorboard:
            self._writer = _open_tensorboard(self.output_dir / "tensorboard")

    def _configure_logging(self, rank: int) -> None:
        root = logging.getLogger()
        if self.is_main:
            console = logging.StreamHandler(sys.stdout)
            console.setLevel(logging.INFO)
            console.setFormatter(logging.Formatter(LOG_FORMAT))
            log_file = logging.FileHandler(self.output_dir / "log.txt", encoding="utf-8")
            log_file.setFormatter(logging.Formatter(LOG_FORMAT))
            self._handlers = [console, log_file]
        else:
            console = logging.StreamHandler(sys.stderr)
            console.setLevel(logging.WARNING)
            console.setFormatter(logging.Formatter(f"[rank {rank}] {LOG_FORMAT}"))
            self._handlers = [console]
        for handler in self._handlers:
            root.addHandler(handler)
        root.setLevel(logging.INFO)

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append `record` as one JSON line to metrics.jsonl and make it durable (rank 0 only).

        Numpy/torch scalars become numbers; NaN and infinities become null (JSON has no such values).
        """
        if not self.is_main:
            return
        line = json.dumps(_jsonable(record, decimals=6), allow_nan=False)  # 57.99999999999999 -> 58.0
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def traceback_to_file(self, error: BaseException) -> None:
        """The full traceback of `error` in log.txt only (the console gets the entry script's one line)."""
        for handler in self._handlers:
            if isinstance(handler, logging.FileHandler):
                record = logging.LogRecord("t2vlp", logging.ERROR, __file__, 0, "stopped by bad input: %s",
                                           (error,), (type(error), error, error.__traceback__))
                handler.handle(record)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One TensorBoard scalar (rank 0 with TensorBoard enabled, otherwise nothing)."""
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for tag, value in values.items():
            self.scalar(prefix + tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
            handler.close()
        self._handlers = []


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (none when it does not exist); a line cut short by a kill is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _open_tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard is an optional dependency at run time
        logger.warning("TensorBoard is unavailable (%s); scalars go to log.txt and metrics.jsonl only", exc)
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _jsonable(value: Any, decimals: int | None = None) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v, decimals) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, decimals) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy / torch scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, float) and decimals is not None:
        return round(value, decimals)  # metrics only: flags such as --lr 1e-8 keep their value
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------- run.json

RUN_RECORD = "run.json"


def _git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def environment_record(args: Any, dist_info: Any) -> dict[str, Any]:
    """Everything needed to tell one run from another: flags, code, software, devices, batch layout."""
    import platform

    import torch

    flags = {key: value for key, value in vars(args).items() if key != "ignored_flags"}
    world = dist_info.world_size
    per_process = args.batch_size // world if args.batch_size % world == 0 else None
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if torch.cuda.is_available() else [platform.processor() or platform.machine()])
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "flags": _jsonable(flags),
        "git": _git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(dist_info.device),
        "device_names": devices,
        "world_size": world,
        "global_batch": args.batch_size,
        "per_process_batch": per_process,
    }


def record_run_start(args: Any, dist_info: Any) -> dict[str, Any]:
    """Append this invocation to `<output_dir>/run.json` (a list: the first run, then each resume or rerun,
    with the flags that changed since the previous entry). Rank 0 only."""
    path = Path(args.output_dir) / RUN_RECORD
    entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    entry = environment_record(args, dist_info)
    in_effect = [e for e in entries if not str(e.get("outcome", "")).startswith("bad input")]
    if in_effect:
        previous = in_effect[-1]["flags"]
        entry["changed_flags"] = {key: {"before": previous.get(key), "now": value}
                                  for key, value in entry["flags"].items() if previous.get(key) != value}
    entry["outcome"] = "running"
    entries.append(entry)
    _write_run_record(path, entries)
    return entry


def record_run_outcome(output_dir: str | os.PathLike, outcome: str) -> None:
    """Set the outcome of the newest run.json entry: "finished", "stopped by a signal", "bad input: ..."; the
    flags of a "bad input" entry never took effect, and the next entry's changes are counted from the one before."""
    path = Path(output_dir) / RUN_RECORD
    if not path.is_file():
        return
    entries = json.loads(path.read_text(encoding="utf-8"))
    if entries:
        entries[-1]["outcome"] = outcome
        _write_run_record(path, entries)


def _write_run_record(path: Path, entries: list[dict[str, Any]]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    os.replace(temporary, path)
