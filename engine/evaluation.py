"""Text-video retrieval evaluation (meanP, METHOD §7a step 1): encode the split, score, rank, report."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataloaders.collate import collate_clips, is_empty_batch
from dataloaders.video import normalize_video
from engine.metrics import chance_retrieval_metrics, format_retrieval_table, retrieval_metrics

logger = logging.getLogger("t2vlp.eval")


def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16 over fp32 weights; nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def encode_split(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    num_workers: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Encode every (text, video) item: EOT features [N, D], frame features [N, T, D], masks, video ids.

    Items whose video cannot be decoded are dropped (both text and video) and counted in `n_skipped`.
    """
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_clips,
        pin_memory=device.type == "cuda",
    )
    texts, frames, masks, video_ids, indices, skipped = [], [], [], [], [], 0
    model.eval()
    for batch in tqdm(loader, desc="encoding", disable=not show_progress, leave=False):
        skipped += batch["n_skipped"]
        if is_empty_batch(batch):
            continue
        video = normalize_video(batch["video"].to(device, non_blocking=True))
        with autocast_context(device, precision):
            eot, _ = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            frame_features, _ = model.encode_video(video, batch["video_mask"].to(device))
        texts.append(eot.float())
        frames.append(frame_features.float())
        masks.append(batch["video_mask"].to(device))
        video_ids.extend(batch["video_id"])
        indices.extend(int(i) for i in batch["index"])
    if not texts:
        raise RuntimeError(f"no decodable item in the evaluation split ({skipped} skipped)")
    return {
        "text": torch.cat(texts), "frames": torch.cat(frames), "video_mask": torch.cat(masks),
        "video_ids": video_ids, "indices": indices, "n_skipped": skipped,
    }


@torch.no_grad()
def similarity_matrix(model: torch.nn.Module, encoded: dict[str, Any], chunk: int = 1024) -> np.ndarray:
    """meanP logits [N_texts, N_videos] computed in row chunks (fp32)."""
    rows = [
        model.similarity(encoded["text"][start : start + chunk], encoded["frames"], encoded["video_mask"]).cpu()
        for start in range(0, encoded["text"].shape[0], chunk)
    ]
    return torch.cat(rows).numpy()


def evaluate_retrieval(model: torch.nn.Module, dataset: Dataset, **encode_options: Any) -> dict[str, Any]:
    """Single-sentence retrieval (one caption per video, e.g. MSR-VTT 1k-A): t2v and v2t metrics, meanP.

    `encode_options` are `encode_split`'s keyword arguments (batch_size, device, precision, ...)."""
    encoded = encode_split(model, dataset, **encode_options)
    if len(set(encoded["video_ids"])) != len(encoded["video_ids"]):
        raise NotImplementedError("multi-sentence retrieval evaluation (several captions per video) is not supported yet")
    sim = similarity_matrix(model, encoded)
    if encoded["n_skipped"]:
        logger.warning("evaluation: %d item(s) skipped because their video could not be decoded", encoded["n_skipped"])
    return {
        "task": "retrieval",
        "scoring": "meanP",
        "n_texts": int(sim.shape[0]),
        "n_videos": int(sim.shape[1]),
        "n_skipped": int(encoded["n_skipped"]),
        "t2v": retrieval_metrics(sim),
        "v2t": retrieval_metrics(sim.T),
        "chance": chance_retrieval_metrics(sim.shape[1]),
    }


def retrieval_table(result: dict[str, Any]) -> str:
    return format_retrieval_table(result["t2v"], result["v2t"], chance=result.get("chance"))
