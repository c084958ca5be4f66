"""Text-video retrieval evaluation (docs/method.md §7a): encode the split, score with meanP, optionally rerank the top-K
with the fusion encoder, rank, report."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from dataloaders.collate import collate_clips, is_empty_batch
from dataloaders.retrieval_split import TokenizedTexts
from dataloaders.video import normalize_video
from engine.evaluation.dual_softmax import dual_softmax_scores
from engine.evaluation.metrics import (
    best_positive_ranks,
    chance_retrieval_metrics,
    format_retrieval_table,
    metrics_from_ranks,
)
from engine.evaluation.qb_norm import DEFAULT_BETA, DEFAULT_K, qb_norm_scores
from engine.evaluation.rerank import rerank_scores
from engine.precision import autocast_context
from modules.similarity import meanp_logits

logger = logging.getLogger("t2vlp.eval")


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """In order, `None` samples dropped (`collate_clips`), a private generator (the global RNG is left alone)."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_clips,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
    )


def encoded_video_batches(
    model: torch.nn.Module, videos: Dataset, *, batch_size: int, device: torch.device, precision: str,
    num_workers: int = 0, description: str = "encoding videos", show_progress: bool = True,
) -> Iterator[tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor] | tuple[dict[str, Any], None, None, None]]:
    """(batch, video_mask, frames, tubes) for each batch of an evaluation dataset of videos, encoded under autocast
    (call under no_grad); a batch whose videos were all undecodable gives (batch, None, None, None). Every batch
    carries `n_skipped`."""
    model.eval()
    for batch in tqdm(eval_loader(videos, batch_size, num_workers, device), desc=description,
                      disable=not show_progress, leave=False):
        if is_empty_batch(batch):
            yield batch, None, None, None
            continue
        video = normalize_video(batch["video"].to(device, non_blocking=True))
        video_mask = batch["video_mask"].to(device)
        with autocast_context(device, precision):
            frames, tubes = model.encode_video(video, video_mask)
        yield batch, video_mask, frames, tubes


@torch.no_grad()
def encode_split(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    num_workers: int = 0,
    show_progress: bool = True,
    keep_fusion_inputs: bool = False,
) -> dict[str, Any]:
    """Encode an evaluation split (a dataset with `caption_dataset()` / `video_dataset()`, see
    dataloaders/raw_video_text.py): every video once, every caption once.

    Returns EOT features "text" [N_t, D], "frames" [N_v, T, D], "video_mask" [N_v, T], "caption_video" [N_t] (the
    row of each caption's video), "video_ids", "indices" (each caption's index in the split), "n_skipped" (videos
    that could not be decoded: they and their captions are left out) and "n_captions_left_out". With
    `keep_fusion_inputs` also the fusion encoder's inputs: "tubes" [N_v, K, D], "text_tokens" [N_t, L, D],
    "input_ids" and "attention_mask" [N_t, L]. All tensors on `device`.
    """
    videos: dict[str, list] = {"frames": [], "video_mask": [], "tubes": [], "video_ids": [], "rows": []}
    skipped = 0
    for batch, video_mask, frames, tubes in encoded_video_batches(
            model, dataset.video_dataset(), batch_size=batch_size, device=device, precision=precision,
            num_workers=num_workers, show_progress=show_progress):
        skipped += batch["n_skipped"]
        if frames is None:
            continue
        videos["frames"].append(frames.float())
        videos["video_mask"].append(video_mask)
        if keep_fusion_inputs:
            videos["tubes"].append(tubes.float())
        videos["video_ids"].extend(batch["video_id"])
        videos["rows"].extend(int(i) for i in batch["index"])
    if not videos["rows"]:
        raise RuntimeError(f"no decodable video in the evaluation split ({skipped} skipped)")
    split = dataset.caption_dataset().split
    kept_row = {split_row: row for row, split_row in enumerate(videos["rows"])}
    kept_captions = [i for i, video in enumerate(split.caption_video) if video in kept_row]
    texts: dict[str, list] = {"text": [], "text_tokens": [], "input_ids": [], "attention_mask": []}
    captions = Subset(dataset.caption_dataset(), kept_captions)
    for batch in tqdm(eval_loader(captions, batch_size, num_workers, device), desc="encoding captions",
                      disable=not show_progress, leave=False):
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with autocast_context(device, precision):
            eot, tokens = model.encode_text(input_ids, attention_mask)
        texts["text"].append(eot.float())
        if keep_fusion_inputs:
            texts["text_tokens"].append(tokens.float())
            texts["input_ids"].append(input_ids)
            texts["attention_mask"].append(attention_mask)
    encoded = {
        "text": torch.cat(texts["text"]),
        "frames": torch.cat(videos["frames"]),
        "video_mask": torch.cat(videos["video_mask"]),
        "caption_video": torch.tensor([kept_row[split.caption_video[i]] for i in kept_captions], device=device),
        "video_ids": videos["video_ids"],
        "indices": kept_captions,
        "n_skipped": skipped,
        "n_captions_left_out": len(split.captions) - len(kept_captions),
        "dropped_texts": dict(split.dropped),
    }
    if keep_fusion_inputs:
        encoded["tubes"] = torch.cat(videos["tubes"])
        encoded.update({key: torch.cat(values) for key, values in texts.items() if key != "text"})
    return encoded


@torch.no_grad()
def similarity_matrix(model: torch.nn.Module, encoded: dict[str, Any], chunk: int = 1024) -> np.ndarray:
    """meanP logits [N_texts, N_videos] computed in row chunks (fp32)."""
    rows = [
        model.similarity(encoded["text"][start : start + chunk], encoded["frames"], encoded["video_mask"]).cpu()
        for start in range(0, encoded["text"].shape[0], chunk)
    ]
    return torch.cat(rows).numpy()


@torch.no_grad()
def cosine_matrix(text: torch.Tensor, encoded: dict[str, Any], chunk: int = 1024) -> torch.Tensor:
    """meanP cosine similarities [N_text, N_v] of text EOT features against the encoded split's videos (the logits
    without the exp(logit_scale) factor), on the CPU."""
    unscaled = torch.zeros((), device=encoded["frames"].device)  # exp(0) = 1
    return torch.cat([meanp_logits(text[start: start + chunk], encoded["frames"], encoded["video_mask"], unscaled).cpu()
                      for start in range(0, text.shape[0], chunk)])


@torch.no_grad()
def encode_texts(model: torch.nn.Module, texts: Sequence[str], tokenizer: Any, max_words: int, *, batch_size: int,
                 device: torch.device, precision: str, show_progress: bool = True) -> torch.Tensor:
    """EOT features [N, D] of `texts`, tokenised as an evaluation split's captions."""
    model.eval()
    features = []
    for batch in tqdm(eval_loader(TokenizedTexts(texts, tokenizer, max_words), batch_size, 0, device),
                      desc="encoding the query bank", disable=not show_progress, leave=False):
        with autocast_context(device, precision):
            eot, _ = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        features.append(eot.float())
    return torch.cat(features)


@dataclass(frozen=True)
class QueryBank:
    """QB-Norm's query bank: its texts, where they come from, the normalisation's settings and, once encoded by
    the model being evaluated, the texts' EOT features."""

    texts: Sequence[str]
    source: str
    beta: float = DEFAULT_BETA
    k: int = DEFAULT_K
    features: torch.Tensor | None = None  # [B, D]


def evaluate_retrieval(model: torch.nn.Module, dataset: Any, **encode_options: Any) -> dict[str, Any]:
    """meanP retrieval metrics of an evaluation split. `encode_options` are `encode_split`'s keyword arguments
    (batch_size, device, precision, ...)."""
    return retrieval_rows(model, encode_split(model, dataset, **encode_options))[0]


def retrieval_rows(
    model: torch.nn.Module,
    encoded: dict[str, Any],
    *,
    rerank_top_k: int = 0,
    rerank_batch_pairs: int = 2048,
    precision: str = "fp32",
    show_progress: bool = False,
    dsl: bool = False,
    dsl_temperature: float = 1.0,
    query_bank: QueryBank | None = None,
) -> list[dict[str, Any]]:
    """One result per scoring of an encoded split: meanP; with `rerank_top_k` the fusion rerank of each query's
    top-K; with `dsl` the same again on dual-softmax first-stage scores (labelled "dsl", "base" meanP/rerank); with
    `query_bank` QB-Norm on the meanP cosines, text->video only (labelled "qbnorm", "base" meanP, with the bank's
    source and size; its bank holds texts, so there is no video->text row: "v2t" is null).

    Text->video ranks each caption against every video (its own is correct); video->text ranks every caption
    for each video, and a video's rank is the best rank over its captions (`best_positive_ranks`). With one
    caption per video both reduce to the usual diagonal ranks."""
    sim = torch.from_numpy(similarity_matrix(model, encoded))
    if encoded["n_skipped"]:
        logger.warning("evaluation: %d video(s) skipped because they could not be decoded (%d caption(s) left out)",
                       encoded["n_skipped"], encoded.get("n_captions_left_out", 0))
    first_stage = {"meanP": (sim, sim.t())}
    if dsl:
        first_stage["dsl"] = (dual_softmax_scores(sim, dsl_temperature), dual_softmax_scores(sim.t(), dsl_temperature))
    rows = []
    for name, (t2v, v2t) in first_stage.items():
        rows.append(_retrieval_result(name, t2v, v2t, encoded, base="meanP" if name == "dsl" else None))
    if rerank_top_k > 0:
        for name, (t2v, v2t) in first_stage.items():
            reranked = rerank_both_directions(model, encoded, t2v, v2t, rerank_top_k, rerank_batch_pairs, precision,
                                              show_progress)
            scoring = "rerank" if name == "meanP" else "dsl"
            rows.append({**_retrieval_result(scoring, *reranked, encoded, base="rerank" if name == "dsl" else None),
                         "top_k": rerank_top_k})
    if query_bank is not None:
        if query_bank.features is None:
            raise ValueError("the query bank is not encoded: QueryBank(..., features=encode_texts(...))")
        normalised = qb_norm_scores(cosine_matrix(encoded["text"], encoded),
                                    cosine_matrix(query_bank.features, encoded), query_bank.beta, query_bank.k)
        rows.append({**_retrieval_result("qbnorm", normalised, None, encoded, base="meanP"),
                     "bank": {"source": query_bank.source, "size": len(query_bank.texts)},
                     "beta": query_bank.beta, "k": query_bank.k})
    return rows


def _retrieval_result(scoring: str, t2v: Any, v2t: Any | None, encoded: dict[str, Any],
                      base: str | None = None) -> dict[str, Any]:
    caption_video = encoded["caption_video"].cpu()
    videos = torch.arange(t2v.shape[1])
    result = {
        "task": "retrieval",
        "scoring": scoring,
        **({"base": base} if base else {}),
        "n_texts": int(t2v.shape[0]),
        "n_videos": int(t2v.shape[1]),
        "n_skipped": int(encoded["n_skipped"]),
        "t2v": metrics_from_ranks(best_positive_ranks(t2v, caption_video, videos)),
        "v2t": None if v2t is None else metrics_from_ranks(best_positive_ranks(v2t, videos, caption_video)),
        "chance": chance_retrieval_metrics(t2v.shape[1]),
    }
    if encoded.get("dropped_texts"):  # duplicate or empty captions of the annotations, left out
        result["dropped_texts"] = encoded["dropped_texts"]
    if t2v.shape[0] != t2v.shape[1]:
        result["multi_sentence"] = True
    return result


@torch.no_grad()
def rerank_both_directions(
    model: torch.nn.Module,
    encoded: dict[str, Any],
    t2v: torch.Tensor,
    v2t: torch.Tensor,
    top_k: int,
    batch_pairs: int,
    precision: str,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reranked text->video [N_t, N_v] and video->text [N_v, N_t] matrices (docs/method.md §7a) from first-stage scores
    `t2v` and `v2t` (meanP: `sim` and `sim.T`). Each query's K candidates form one normalisation group of
    `match_logits`, as in the original; many queries share a call."""
    if "text_tokens" not in encoded:
        raise ValueError("the rerank needs the fusion inputs: encode_split(..., keep_fusion_inputs=True)")
    model.eval()
    device = encoded["frames"].device

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

    def queries_per_call(candidates: int) -> int:
        return max(1, batch_pairs // min(top_k, candidates))

    t2v = rerank_scores(t2v, top_k, text_to_video, queries_per_call(t2v.shape[1]), show_progress, "rerank text->video")
    v2t = rerank_scores(v2t, top_k, video_to_text, queries_per_call(v2t.shape[1]), show_progress, "rerank video->text")
    return t2v, v2t


def retrieval_table(result: dict[str, Any]) -> str:
    return format_retrieval_table(result["t2v"], result["v2t"], chance=result.get("chance"))


def scoring_label(result: dict[str, Any]) -> str:
    """"meanP", "rerank, top 32", "DSL on meanP", "DSL on rerank, top 32", "QB-Norm on meanP, bank of 1000 ..."."""
    top_k = f", top {result['top_k']}" if "top_k" in result else ""
    if result["scoring"] == "dsl":
        return f"DSL on {result['base']}{top_k}"
    if result["scoring"] == "qbnorm":
        return f"QB-Norm on {result['base']}, bank of {result['bank']['size']} from {result['bank']['source']}"
    return result["scoring"] + top_k


def log_retrieval_rows(run: Any, rows: list[dict[str, Any]], step: int, epoch: int, split: str = "test",
                       extra: dict[str, Any] | None = None) -> list[dict]:
    """Append each result to metrics.jsonl (with split/step/epoch and `extra`, e.g. the checkpoint evaluated),
    TensorBoard and log.txt; returns the records."""
    records = []
    for result in rows:
        record = {"split": split, "step": step, "epoch": epoch, **result, **(extra or {})}
        run.log_metrics(record)
        tag = "" if result["scoring"] == "meanP" else "_".join(filter(None, (result["scoring"], result.get("base")))) + "_"
        run.scalars({f"{tag}t2v_{k}": v for k, v in result["t2v"].items()}, step, prefix="eval/")
        if result["v2t"] is not None:
            run.scalars({f"{tag}v2t_{k}": v for k, v in result["v2t"].items()}, step, prefix="eval/")
        logger.info(
            "retrieval (%s) at step %d, epoch %d: %d texts x %d videos%s%s\n%s",
            scoring_label(result), step, epoch, result["n_texts"], result["n_videos"],
            " (several captions per video: video->text counts a video's best-ranked caption)"
            if result.get("multi_sentence") else "",
            f", {result['n_skipped']} videos skipped" if result["n_skipped"] else "", retrieval_table(result),
        )
        records.append(record)
    return records
