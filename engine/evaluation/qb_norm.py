"""Querybank normalisation with the dynamic inverted softmax (QB-Norm; Bogolin et al., CVPR 2022, "Cross Modal
Retrieval with Querybank Normalisation"): a gallery video that many queries of a bank retrieve (a "hub") is
down-weighted by dividing its score by its summed exponentiated scores over the bank.

The bank is made of queries that are not the test queries (here: the training split's captions, or a file the user
names); a test query is normalised only when its best video is among the videos some bank query ranks in its top
`k` (the "activation set"), otherwise its scores are kept. Scores are cosine similarities, `beta` the inverse
temperature (20 and k = 1, the paper's defaults). Like DSL it changes the ranking with information beyond the
query, so it is reported only on request and labelled, and never selects a checkpoint.
"""

from __future__ import annotations

import torch

DEFAULT_BETA = 20.0
DEFAULT_K = 1


def qb_norm_scores(test: torch.Tensor, bank: torch.Tensor, beta: float = DEFAULT_BETA, k: int = DEFAULT_K
                   ) -> torch.Tensor:
    """`test` [Q, G] cosine scores of the test queries against the gallery, `bank` [B, G] of the bank's queries
    -> [Q, G] scores (float64): for a test query whose top-1 video is in the activation set,
    exp(beta · s(q, g)) / Σ_b exp(beta · s(b, g)) (in log space); its raw score otherwise."""
    if beta <= 0 or k < 1:
        raise ValueError(f"need beta > 0 and k >= 1, got beta {beta}, k {k}")
    test, bank = torch.as_tensor(test).double().cpu(), torch.as_tensor(bank).double().cpu()
    if bank.shape[0] == 0 or bank.shape[1] != test.shape[1]:
        raise ValueError(f"the bank's scores {tuple(bank.shape)} must cover the test gallery of {test.shape[1]}")
    active = torch.zeros(test.shape[1], dtype=torch.bool)
    active[bank.topk(min(k, bank.shape[1]), dim=1).indices.reshape(-1)] = True
    normalised = active[test.argmax(dim=1)]
    scores = test.clone()
    scores[normalised] = torch.exp(beta * test[normalised] - torch.logsumexp(beta * bank, dim=0))
    return scores
