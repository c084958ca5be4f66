"""Retrieve-then-rerank (docs/method.md §7a steps 2-3): the top-K candidates of each query re-scored by the fusion
encoder's match head.

For a query q with first-stage scores S[q] and its K best candidates c_1..c_K, candidate c_j gets
`1000 + 1000 · p_j · softmax_j(S[q, c_1..c_K])`, where p_j is the match probability of the pair; every other
candidate keeps S[q, c]. First-stage logits are at most exp(logit_scale) <= 100, so the K candidates always
rank above the rest, and among them the order follows p × softmax(S).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

RERANK_OFFSET = 1000.0

# match_probability(query indices [m], candidate indices [m, K]) -> match probabilities [m, K]
MatchProbability = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rerank_scores(
    sim: torch.Tensor,
    top_k: int,
    match_probability: MatchProbability,
    queries_per_call: int = 64,
    show_progress: bool = False,
    description: str = "rerank",
) -> torch.Tensor:
    """Reranked copy of `sim` [Q, C] in float64. `top_k` >= C re-scores every candidate."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    sim = torch.as_tensor(sim).double().cpu()
    k = min(top_k, sim.shape[1])
    top_scores, top_index = sim.topk(k, dim=1)
    reranked = sim.clone()
    starts = range(0, sim.shape[0], max(1, queries_per_call))
    for start in tqdm(starts, desc=description, disable=not show_progress, leave=False):
        rows = torch.arange(start, min(start + queries_per_call, sim.shape[0]))
        probability = match_probability(rows, top_index[rows]).double().cpu()
        if probability.shape != (len(rows), k):
            raise ValueError(f"match_probability returned {tuple(probability.shape)}, expected {(len(rows), k)}")
        new_scores = RERANK_OFFSET + RERANK_OFFSET * probability * torch.softmax(top_scores[rows], dim=1)
        reranked[rows] = reranked[rows].scatter(1, top_index[rows], new_scores)
    return reranked
