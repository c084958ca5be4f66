"""Model selection: which evaluated step scored best, and where its checkpoint is (`<output_dir>/best_checkpoint.json`).

The file survives a resume (the run reads it back) and `--keep_checkpoints` never deletes the checkpoint it names.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from engine.checkpointing import BEST_CHECKPOINT_NAME, checkpoint_path

logger = logging.getLogger("t2vlp.selection")


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
