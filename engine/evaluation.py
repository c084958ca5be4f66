"""Text-video retrieval evaluation (METHOD §7a): encode the split, score with meanP, optionally rerank the top-K
with the fusion encoder, rank, report."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataloaders.collate import collate_clips, is_empty_batch
from dataloaders.video import normalize_video
from engine.metrics import chance_retrieval_metrics, format_retrieval_table, retrieval_metrics
from engine.rerank import rerank_scores

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
    keep_fusion_inputs: bool = False,
) -> dict[str, Any]:
    """Encode every (text, video) item: EOT features [N, D], frame features [N, T, D], masks, video ids.

    With `keep_fusion_inputs` also what the fusion encoder takes: tube tokens [N, K, D], text token states
    [N, L, D], token ids and attention masks [N, L] (on `device`).
    Items whose video cannot be decoded are dropped (both text and video) and counted in `n_skipped`.
    """
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_clips,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
    )
    texts, frames, masks, video_ids, indices, skipped = [], [], [], [], [], 0
    fusion_parts: dict[str, list[torch.Tensor]] = {"tubes": [], "text_tokens": [], "input_ids": [], "attention_mask": []}
    model.eval()
    for batch in tqdm(loader, desc="encoding", disable=not show_progress, leave=False):
        skipped += batch["n_skipped"]
        if is_empty_batch(batch):
            continue
        video = normalize_video(batch["video"].to(device, non_blocking=True))
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with autocast_context(device, precision):
            eot, text_tokens = model.encode_text(input_ids, attention_mask)
            frame_features, tubes = model.encode_video(video, batch["video_mask"].to(device))
        if keep_fusion_inputs:
            for key, value in (("tubes", tubes), ("text_tokens", text_tokens), ("input_ids", input_ids),
                               ("attention_mask", attention_mask)):
                fusion_parts[key].append(value)
        texts.append(eot.float())
        frames.append(frame_features.float())
        masks.append(batch["video_mask"].to(device))
        video_ids.extend(batch["video_id"])
        indices.extend(int(i) for i in batch["index"])
    if not texts:
        raise RuntimeError(f"no decodable item in the evaluation split ({skipped} skipped)")
    encoded = {
        "text": torch.cat(texts), "frames": torch.cat(frames), "video_mask": torch.cat(masks),
        "video_ids": video_ids, "indices": indices, "n_skipped": skipped,
    }
    if keep_fusion_inputs:
        encoded.update({key: torch.cat(values) for key, values in fusion_parts.items()})
    return encoded


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
    return retrieval_rows(model, encode_split(model, dataset, **encode_options))[0]


def retrieval_rows(
    model: torch.nn.Module,
    encoded: dict[str, Any],
    *,
    rerank_top_k: int = 0,
    rerank_batch_pairs: int = 2048,
    precision: str = "fp32",
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """meanP (and rerank) results of an encoded single-sentence split (text i pairs with video i)."""
    if len(set(encoded["video_ids"])) != len(encoded["video_ids"]):
        raise NotImplementedError("multi-sentence retrieval evaluation (several captions per video) is not supported yet")
    sim = similarity_matrix(model, encoded)
    if encoded["n_skipped"]:
        logger.warning("evaluation: %d item(s) skipped because their video could not be decoded", encoded["n_skipped"])
    rows = [_retrieval_result("meanP", sim, sim.T, encoded)]
    if rerank_top_k > 0:
        t2v, v2t = rerank_both_directions(
            model, encoded, torch.from_numpy(sim), rerank_top_k, rerank_batch_pairs, precision, show_progress
        )
        rows.append({**_retrieval_result("rerank", t2v, v2t, encoded), "top_k": rerank_top_k})
    return rows


def _retrieval_result(scoring: str, t2v: Any, v2t: Any, encoded: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": "retrieval",
        "scoring": scoring,
        "n_texts": int(t2v.shape[0]),
        "n_videos": int(t2v.shape[1]),
        "n_skipped": int(encoded["n_skipped"]),
        "t2v": retrieval_metrics(t2v),
        "v2t": retrieval_metrics(v2t),
        "chance": chance_retrieval_metrics(t2v.shape[1]),
    }


@torch.no_grad()
def rerank_both_directions(
    model: torch.nn.Module,
    encoded: dict[str, Any],
    sim: torch.Tensor,
    top_k: int,
    batch_pairs: int,
    precision: str,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reranked text->video [N_t, N_v] and video->text [N_v, N_t] matrices (METHOD §7a). Each query's K
    candidates form one normalisation group of `match_logits`, as in the original; many queries share a call."""
    model.eval()
    device = encoded["frames"].device
    k = min(top_k, sim.shape[1], sim.shape[0])
    queries_per_call = max(1, batch_pairs // k)

    def probability(video_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        videos, texts = video_rows.reshape(-1).to(device), text_rows.reshape(-1).to(device)
        with autocast_context(device, precision):
            logits = model.match_logits(
                encoded["frames"][videos], encoded["video_mask"][videos], encoded["tubes"][videos],
                encoded["text_tokens"][texts], encoded["attention_mask"][texts], group_size=video_rows.shape[1],
            )
        return logits.float().softmax(dim=-1)[:, 1].reshape(video_rows.shape)

    def text_to_video(texts: torch.Tensor, videos: torch.Tensor) -> torch.Tensor:
        return probability(videos, texts[:, None].expand_as(videos))

    def video_to_text(videos: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        return probability(videos[:, None].expand_as(texts), texts)

    t2v = rerank_scores(sim, top_k, text_to_video, queries_per_call, show_progress, "rerank text->video")
    v2t = rerank_scores(sim.t(), top_k, video_to_text, queries_per_call, show_progress, "rerank video->text")
    return t2v, v2t


def retrieval_table(result: dict[str, Any]) -> str:
    return format_retrieval_table(result["t2v"], result["v2t"], chance=result.get("chance"))


def log_retrieval_rows(run: Any, rows: list[dict[str, Any]], step: int, epoch: int, split: str = "test",
                       extra: dict[str, Any] | None = None) -> list[dict]:
    """Append each result to metrics.jsonl (with split/step/epoch and `extra`, e.g. the checkpoint evaluated),
    TensorBoard and log.txt; returns the records."""
    records = []
    for result in rows:
        record = {"split": split, "step": step, "epoch": epoch, **result, **(extra or {})}
        run.log_metrics(record)
        tag = "" if result["scoring"] == "meanP" else f"{result['scoring']}_"
        run.scalars({f"{tag}t2v_{k}": v for k, v in result["t2v"].items()}, step, prefix="eval/")
        run.scalars({f"{tag}v2t_{k}": v for k, v in result["v2t"].items()}, step, prefix="eval/")
        scoring = result["scoring"] + (f", top {result['top_k']}" if "top_k" in result else "")
        logger.info(
            "retrieval (%s) at step %d, epoch %d: %d texts x %d videos%s\n%s",
            scoring, step, epoch, result["n_texts"], result["n_videos"],
            f", {result['n_skipped']} skipped" if result["n_skipped"] else "", retrieval_table(result),
        )
        records.append(record)
    return records


def evaluated_checkpoint(args: Any) -> dict[str, Any]:
    """`{"checkpoint": path}` for a `--do_eval` run (what its metrics rows evaluated), else nothing."""
    if args.do_train:
        return {}
    return {"checkpoint": str(Path(args.init_model).resolve()) if args.init_model else None}
