"""Masked-LM and prefix-LM targets of a caption (docs/method.md §6.3-6.4), drawn per sample.

Every draw comes from a Generator seeded by (seed, epoch, sample index), so masks do not depend on the number of
ranks or DataLoader workers, and a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # label of positions that are not MLM targets (cross_entropy's ignore_index)
MASK_ID = 0  # masked words are replaced by id 0 in the text tower's input, as in the original
_STREAM = 7  # keeps these draws independent of the frame-order Generator seeded by (seed, epoch, index)


def language_model_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_ratio: float, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """MLM input/labels and the prefix-LM start of one caption ([L] ids with SOT ... EOT and padding).

    MLM: each word token (text positions 1 .. len-2; SOT and EOT never) is masked independently with
    probability `mask_ratio`; when none is drawn the first word is masked (a caption with no word has no
    target). `mlm_input_ids` has masked positions set to 0, `mlm_labels` holds their ids and -100 elsewhere.
    Prefix LM: `plm_start` is drawn uniformly from {0, ..., len-2}; the positions plm_start .. len-2 are
    scored, each predicting the next token (EOT included).
    """
    length = int(attention_mask.sum())
    if length < 2:
        raise ValueError(f"a caption needs at least SOT and EOT, got {length} valid token(s)")
    words = np.arange(1, length - 1)
    chosen = words[rng.random(len(words)) < mask_ratio]
    if len(words) and not len(chosen):
        chosen = words[:1]
    masked = torch.zeros_like(input_ids, dtype=torch.bool)
    masked[torch.from_numpy(chosen)] = True
    return {
        "mlm_input_ids": input_ids.masked_fill(masked, MASK_ID),
        "mlm_labels": torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
        "plm_start": torch.tensor(int(rng.integers(0, length - 1)), dtype=torch.long),
    }


def sample_targets(sample: dict[str, Any], mask_ratio: float, seed: int, epoch: int) -> dict[str, Any]:
    """`sample` (docs/architecture.md §2.3) plus its LM targets, drawn from (seed, epoch, sample["index"])."""
    rng = np.random.default_rng([seed, epoch, int(sample["index"]), _STREAM])
    return {**sample, **language_model_targets(sample["input_ids"], sample["attention_mask"], mask_ratio, rng)}


class WithLanguageModelTargets(Dataset):
    """Any video-text dataset whose samples also carry `mlm_input_ids`, `mlm_labels` and `plm_start`."""

    def __init__(self, dataset: Dataset, mask_ratio: float = 0.15, seed: int = 42) -> None:
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        self.dataset = dataset
        self.mask_ratio = mask_ratio
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.dataset[index]
        if sample is None:
            return None
        return sample_targets(sample, self.mask_ratio, self.seed, self.epoch)

    def __getattr__(self, name: str) -> Any:  # e.g. n_skipped, caption(): the wrapped dataset's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
