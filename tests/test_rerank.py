"""The top-K rerank of docs/method.md §7a on hand-made matrices, and hard-negative sampling."""

from __future__ import annotations

import pytest
import torch

from engine.evaluation.rerank import rerank_scores
from modules.fusion_objectives import sample_hard_negatives


def fixed_probability(table: torch.Tensor):
    """match_probability from a [Q, C] table of pair probabilities."""
    calls = []

    def probability(rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        calls.append((rows.clone(), candidates.clone()))
        return table[rows[:, None], candidates]

    return probability, calls


def test_candidates_rank_above_the_rest_in_the_order_of_the_formula():
    sim = torch.tensor([[90.0, 80.0, 70.0, 95.0, -20.0]])
    probability = torch.tensor([[0.1, 0.9, 0.5, 0.2, 1.0]], dtype=torch.float64)
    match, calls = fixed_probability(probability)
    reranked = rerank_scores(sim, top_k=3, match_probability=match)
    # candidates: columns 3, 0, 1 (scores 95, 90, 80); softmax over them, times p, times 1000, plus 1000
    top = torch.tensor([95.0, 90.0, 80.0], dtype=torch.float64)
    weights = torch.softmax(top, dim=0)
    expected = {3: 1000 + 1000 * 0.2 * weights[0], 0: 1000 + 1000 * 0.1 * weights[1], 1: 1000 + 1000 * 0.9 * weights[2]}
    for column, value in expected.items():
        assert reranked[0, column].item() == pytest.approx(value.item(), rel=1e-12)
    assert reranked[0, 2].item() == 70.0 and reranked[0, 4].item() == -20.0  # others keep their score
    assert reranked[0, [0, 1, 3]].min() > reranked[0, [2, 4]].max()
    # 0.2 * e^95 beats 0.1 * e^90 and 0.9 * e^80: the formula, not p alone, orders the candidates
    assert reranked[0].argsort(descending=True).tolist()[:3] == [3, 0, 1]
    assert calls[0][1].tolist() == [[3, 0, 1]]


def test_close_scores_let_the_match_probability_decide():
    sim = torch.tensor([[10.0, 10.0, 10.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    probability = torch.tensor([[0.2, 0.9, 0.5, 0.99], [0.9, 0.1, 0.8, 0.2]])
    match, _ = fixed_probability(probability)
    reranked = rerank_scores(sim, top_k=3, match_probability=match, queries_per_call=1)
    assert reranked[0].argsort(descending=True).tolist() == [1, 2, 0, 3]
    # row 1: candidates 3, 2, 1 -> p * softmax([4, 3, 2]) = 0.2*.665, 0.8*.245, 0.1*.090: column 2 first
    assert reranked[1].argsort(descending=True).tolist() == [2, 3, 1, 0]


def test_k_at_least_the_number_of_candidates_rescores_everything():
    sim = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.4, 0.3]])
    probability = torch.tensor([[0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    match, calls = fixed_probability(probability)
    reranked = rerank_scores(sim, top_k=32, match_probability=match)
    assert (reranked >= 1000).all()
    expected = 1000 + 1000 * probability.double() * torch.softmax(sim.double(), dim=1)
    torch.testing.assert_close(reranked, expected)
    assert calls[0][1].shape == (2, 3)


def test_hard_negatives_are_never_the_positive_and_follow_the_softmax():
    generator = torch.Generator().manual_seed(0)
    sim = torch.randn(7, 7, generator=generator) * 3
    sim[2, 2] = 500.0  # even a positive holding all the softmax mass is never drawn
    sim[:, 4] += 200.0  # video 4 is every other text's hardest negative
    counts = torch.zeros(7)
    for seed in range(300):
        negative_video, negative_text = sample_hard_negatives(sim, torch.Generator().manual_seed(seed))
        assert (negative_video != torch.arange(7)).all() and (negative_text != torch.arange(7)).all()
        counts[negative_video[0]] += 1
    assert counts[4] == 300
    same = sample_hard_negatives(sim, torch.Generator().manual_seed(3))
    again = sample_hard_negatives(sim, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(same, again))
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.Generator())
