"""Batching of dataset samples that may be `None` (a video that could not be decoded)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate


def clip_sample(
    input_ids: list[int], attention_mask: list[int], video: torch.Tensor, video_mask: torch.Tensor, video_id: str,
    index: int,
) -> dict[str, Any]:
    """One dataset sample in the shape every video-text dataset returns (docs/architecture.md §2.3)."""
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        "video": video,
        "video_mask": video_mask,
        "video_id": video_id,
        "index": index,
    }


def collate_clips(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Drop `None` samples and collate the rest with torch's `default_collate`.

    Tensors are stacked, ints become a LongTensor, str fields stay lists. Every result carries
    `n_skipped` (how many samples were `None`) and `batch_size` (how many remain). When every sample was
    `None` the result is only `{"n_skipped": k, "batch_size": 0}`: test it with `is_empty_batch` and skip the
    step (still adding `n_skipped` to the skip count).
    """
    kept = [sample for sample in batch if sample is not None]
    n_skipped = len(batch) - len(kept)
    if not kept:
        return {"n_skipped": n_skipped, "batch_size": 0}
    collated = default_collate(kept)
    collated["n_skipped"] = n_skipped
    collated["batch_size"] = len(kept)
    return collated


def is_empty_batch(batch: dict[str, Any]) -> bool:
    """True for the result of `collate_clips` on a batch whose samples were all `None`."""
    return batch["batch_size"] == 0


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (copied without waiting when they are pinned); other fields as they are."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}
