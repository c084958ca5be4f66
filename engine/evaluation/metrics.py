"""Retrieval metrics: R@1/5/10 (percent), median and mean rank (1-based)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

METRIC_KEYS = ("R1", "R5", "R10", "MdR", "MnR")
_ROW_CHUNK = 1024


def correct_ranks(sim: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor | None = None,
                  nan_policy: str = "raise") -> np.ndarray:
    """1-based rank of the correct candidate of each row of `sim` [N_q, N_c].

    `gt[i]` is the column of row i's correct candidate (default: the diagonal, which needs N_q <= N_c).
    rank = 1 + #(candidates scoring strictly higher) + #(OTHER candidates scoring exactly the same): a tie puts the
    correct item last among its equals, so ties never help the model (CLIP4Clip counted them as hits).
    NaN: with nan_policy "raise" (default) any NaN score is a ValueError, since NaN similarities mean a broken
    model and would make the numbers meaningless; with "last" a NaN candidate ranks below every number and a
    row whose correct score is NaN gets rank N_c. -inf/+inf are ordinary scores.
    """
    if nan_policy not in ("raise", "last"):
        raise ValueError(f"nan_policy must be 'raise' or 'last', got {nan_policy!r}")
    scores = _as_numpy_scores(sim)
    if scores.ndim != 2:
        raise ValueError(f"similarity must be 2-D [queries, candidates], got shape {scores.shape}")
    n_queries, n_candidates = scores.shape
    columns = _gt_columns(gt, n_queries, n_candidates)
    if nan_policy == "raise" and np.isnan(scores).any():
        raise ValueError(f"similarity matrix contains {int(np.isnan(scores).sum())} NaN scores")
    ranks = np.empty(n_queries, dtype=np.int64)
    for start in range(0, n_queries, _ROW_CHUNK):
        rows = slice(start, min(start + _ROW_CHUNK, n_queries))
        block = scores[rows]
        correct = block[np.arange(block.shape[0]), columns[rows]][:, None]
        higher = (block > correct).sum(axis=1)
        equal_others = (block == correct).sum(axis=1) - 1
        rank = 1 + higher + equal_others
        ranks[rows] = np.where(np.isnan(correct[:, 0]), n_candidates, rank)
    return ranks


def best_positive_ranks(sim: np.ndarray | torch.Tensor, row_groups: np.ndarray | torch.Tensor,
                        column_groups: np.ndarray | torch.Tensor, nan_policy: str = "raise") -> np.ndarray:
    """1-based rank of the best-ranked correct candidate of each row of `sim` [N_q, N_c], for queries with
    several correct candidates: column c is correct for row r when `column_groups[c] == row_groups[r]`.

    rank = 1 + #(wrong candidates scoring strictly higher than the row's best correct score) + #(wrong candidates
    scoring exactly the same): ties never help the model. With one correct column per row this is `correct_ranks`.
    Multi-sentence retrieval uses it both ways: text->video (row = caption, group = its video; one correct column)
    and video->text (row = video; every caption of the video is correct, so a video's rank is the best rank over
    its captions). NaN: as `correct_ranks`. A row without a correct column is a ValueError.
    """
    if nan_policy not in ("raise", "last"):
        raise ValueError(f"nan_policy must be 'raise' or 'last', got {nan_policy!r}")
    scores = _as_numpy_scores(sim)
    if scores.ndim != 2:
        raise ValueError(f"similarity must be 2-D [queries, candidates], got shape {scores.shape}")
    rows_of, columns_of = _as_int_array(row_groups), _as_int_array(column_groups)
    if rows_of.shape[0] != scores.shape[0] or columns_of.shape[0] != scores.shape[1]:
        raise ValueError(f"groups of {rows_of.shape[0]} rows x {columns_of.shape[0]} columns for a "
                         f"{scores.shape[0]} x {scores.shape[1]} matrix")
    if nan_policy == "raise" and np.isnan(scores).any():
        raise ValueError(f"similarity matrix contains {int(np.isnan(scores).sum())} NaN scores")
    n_queries, n_candidates = scores.shape
    ranks = np.empty(n_queries, dtype=np.int64)
    for start in range(0, n_queries, _ROW_CHUNK):
        rows = slice(start, min(start + _ROW_CHUNK, n_queries))
        block = np.where(np.isnan(scores[rows]), -np.inf, scores[rows]) if nan_policy == "last" else scores[rows]
        correct = rows_of[rows][:, None] == columns_of[None, :]
        if not correct.any(axis=1).all():
            missing = start + int(np.flatnonzero(~correct.any(axis=1))[0])
            raise ValueError(f"row {missing} has no correct candidate")
        best = np.where(correct, block, -np.inf).max(axis=1, keepdims=True)
        wrong = ~correct
        rank = 1 + ((block > best) & wrong).sum(axis=1) + ((block == best) & wrong).sum(axis=1)
        all_nan = np.where(correct, np.isnan(scores[rows]), True).all(axis=1)
        ranks[rows] = np.where(all_nan, n_candidates, rank)
    return ranks


def _as_int_array(values: np.ndarray | torch.Tensor) -> np.ndarray:
    array = values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return array.astype(np.int64).reshape(-1)


def _as_numpy_scores(sim: np.ndarray | torch.Tensor) -> np.ndarray:
    if not isinstance(sim, torch.Tensor):
        return np.asarray(sim)
    sim = sim.detach().cpu()
    if sim.dtype not in (torch.float32, torch.float64):
        sim = sim.float()  # numpy has no bfloat16; fp32 represents every fp16/bf16 value exactly
    return sim.numpy()


def _gt_columns(gt: np.ndarray | torch.Tensor | None, n_queries: int, n_candidates: int) -> np.ndarray:
    if gt is None:
        if n_queries > n_candidates:
            raise ValueError(f"diagonal ground truth needs queries <= candidates, got {n_queries} > {n_candidates}")
        return np.arange(n_queries)
    columns = gt.cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
    columns = columns.astype(np.int64).reshape(-1)
    if columns.shape[0] != n_queries:
        raise ValueError(f"gt has {columns.shape[0]} entries for {n_queries} query rows")
    if n_queries and (columns.min() < 0 or columns.max() >= n_candidates):
        raise ValueError(f"gt columns must lie in [0, {n_candidates})")
    return columns


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """R1/R5/R10 (% of rows with rank <= k), MdR (median), MnR (mean) of 1-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no query rows to evaluate")
    return {
        "R1": 100.0 * float(np.mean(ranks <= 1)),
        "R5": 100.0 * float(np.mean(ranks <= 5)),
        "R10": 100.0 * float(np.mean(ranks <= 10)),
        "MdR": float(np.median(ranks)),
        "MnR": float(np.mean(ranks)),
    }


def retrieval_metrics(sim: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor | None = None,
                      nan_policy: str = "raise") -> dict[str, float]:
    """{R1, R5, R10, MdR, MnR} of `sim` [N_q, N_c] with ground truth `gt` (default diagonal); see correct_ranks."""
    return metrics_from_ranks(correct_ranks(sim, gt, nan_policy))


def chance_retrieval_metrics(n_candidates: int) -> dict[str, float]:
    """Expected metrics of a random ranking over `n_candidates` (rank uniform on 1..n)."""
    recall = {f"R{k}": 100.0 * min(k, n_candidates) / n_candidates for k in (1, 5, 10)}
    middle = (n_candidates + 1) / 2
    return {**recall, "MdR": middle, "MnR": middle}


def format_retrieval_table(t2v: Mapping[str, float], v2t: Mapping[str, float] | None,
                           chance: Mapping[str, float] | None = None) -> str:
    """A fixed-width text table with one row per direction (video->text left out when None) and a chance row when
    given."""
    rows = [("text->video", t2v)] + ([("video->text", v2t)] if v2t is not None else [])
    if chance is not None:
        rows.append(("chance", chance))
    header = f"{'':<12}" + "".join(f"{key:>9}" for key in METRIC_KEYS)
    lines = [header]
    for label, values in rows:
        lines.append(f"{label:<12}" + "".join(f"{values[key]:>9.2f}" for key in METRIC_KEYS))
    return "\n".join(lines)
