"""The QA classifier over an answer vocabulary (docs/differences.md §11; docs/method.md §7c for the original's head).

On the fusion state `h` at the answer slot: `logits = dropout(h) · P · Aᵀ + b`, where `P` is the tied token head's
`fusion_proj_embedding` and `A` holds one vector per answer of `train_ans2label.json`. `A` starts as the mean token
embedding of each answer's word pieces and `b` as the mean of their token-head biases, so an untrained classifier
is the stage-2 token head restricted to the answers (multi-piece answers included, which the original's
first-piece protocol cannot express). Its parameters live at the top level of the state dict (`answer_head.*`),
outside `clip.`, so they train at `--lr` like the original's other task layers.
"""

from __future__ import annotations

import torch
from torch import nn


class AnswerClassifier(nn.Module):
    def __init__(self, num_answers: int, dim: int) -> None:
        super().__init__()
        if num_answers < 1:
            raise ValueError(f"the answer vocabulary is empty ({num_answers} answers)")
        self.answer_embedding = nn.Parameter(torch.zeros(num_answers, dim))
        self.answer_bias = nn.Parameter(torch.zeros(num_answers))

    @torch.no_grad()
    def init_from_token_head(self, token_embedding: torch.Tensor, logit_bias: torch.Tensor,
                             answer_pieces: list[list[int]]) -> None:
        """Each answer's row = the mean embedding of its word pieces, its bias = the mean of their biases."""
        if len(answer_pieces) != self.answer_embedding.shape[0]:
            raise ValueError(f"{len(answer_pieces)} answers for a classifier of {self.answer_embedding.shape[0]}")
        for row, pieces in enumerate(answer_pieces):
            if not pieces:
                raise ValueError(f"answer {row} has no word piece")
            index = torch.tensor(pieces, device=token_embedding.device)
            self.answer_embedding[row] = token_embedding[index].float().mean(dim=0)
            self.answer_bias[row] = logit_bias[index].float().mean()

    def forward(self, projected: torch.Tensor) -> torch.Tensor:
        """`projected` = dropout(h) · P [..., D] -> answer logits [..., num_answers] (fp32)."""
        return projected.float() @ self.answer_embedding.float().t() + self.answer_bias.float()
