"""Dual softmax (DSL) at inference (Cheng et al. 2021, "Improving Video-Text Retrieval by Multi-Stream Corpus
Alignment and Dual Softmax Loss"): each score is multiplied by a prior, the softmax of the same candidate's
scores over all *queries*, which down-weights candidates that every query likes ("hubs").

It uses the whole test split at once, i.e. information from other queries, so it is not comparable with plain
per-query retrieval: this project reports it only on request (`--dsl`) and always labelled.
"""

from __future__ import annotations

import torch


def dual_softmax_scores(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`scores` [Q, C] (query rows) -> scores * softmax(scores / temperature over the queries), in float64.

    `scores` are first-stage logits (already scaled by exp(logit_scale) ~ 100), so temperature 1 is the usual
    setting."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores = torch.as_tensor(scores).double().cpu()
    return scores * torch.softmax(scores / temperature, dim=0)
