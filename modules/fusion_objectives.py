"""The fusion encoder's training objectives (docs/method.md §6.4): masked LM, prefix LM, video-text matching with hard
negatives. Each is written once here on top of `T2VLP.fuse` / `match_logits` / `token_logits`; stage 2 and the
downstream tasks combine them.

MLM and prefix LM return sums and counts rather than means, so that the caller can divide by the token count of
the whole global batch: N processes then compute exactly the loss of one process on the global batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class VideoParts(NamedTuple):
    frames: torch.Tensor  # [B, T, D]
    video_mask: torch.Tensor  # [B, T]
    tubes: torch.Tensor  # [B, K, D]

    def take(self, rows: torch.Tensor) -> VideoParts:
        return VideoParts(*(part[rows] for part in self))

    def detach(self) -> VideoParts:
        return VideoParts(*(part.detach() for part in self))


class TextParts(NamedTuple):
    tokens: torch.Tensor  # [B, L, D] text tower states
    attention_mask: torch.Tensor  # [B, L]

    def take(self, rows: torch.Tensor) -> TextParts:
        return TextParts(*(part[rows] for part in self))

    def detach(self) -> TextParts:
        return TextParts(*(part.detach() for part in self))


class TokenTerms(NamedTuple):
    """Cross-entropy summed over the scored tokens, their count and how many the arg-max got right."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    correct: torch.Tensor


def _token_terms(model, states: torch.Tensor, targets: torch.Tensor) -> TokenTerms:
    logits = model.token_logits(states)
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return TokenTerms(loss_sum, torch.tensor(targets.numel(), device=targets.device), correct)


def masked_lm_terms(model, video: VideoParts, masked_text: TextParts, mlm_labels: torch.Tensor) -> TokenTerms:
    """MLM (bidirectional): masked text states are replaced by zero vectors (they keep only their position and
    stay valid keys); each masked position predicts its original id through the tied head."""
    is_masked = mlm_labels != IGNORE_INDEX
    text = masked_text.tokens.masked_fill(is_masked[..., None], 0.0)
    states = model.fuse(*video, text, masked_text.attention_mask)
    start = 1 + video.frames.shape[1] + video.tubes.shape[1]
    text_states = states[:, start : start + text.shape[1]]
    return _token_terms(model, text_states[is_masked], mlm_labels[is_masked])


def prefix_scored_positions(attention_mask: torch.Tensor, plm_start: torch.Tensor) -> torch.Tensor:
    """[B, L-1] bool: text positions p with plm_start <= p <= len-2, each predicting the token at p+1."""
    positions = torch.arange(attention_mask.shape[1] - 1, device=attention_mask.device)[None]
    lengths = attention_mask.long().sum(dim=1, keepdim=True)
    return (positions >= plm_start[:, None]) & (positions <= lengths - 2)


def prefix_lm_terms(
    model, video: VideoParts, text: TextParts, input_ids: torch.Tensor, plm_start: torch.Tensor
) -> TokenTerms:
    """Prefix LM: fusion under the prefix mask (visual blind to text, text causal); the positions from each
    sample's `plm_start` to its last word predict the next token (EOT included)."""
    states = model.fuse(*video, *text, causal_text=True)
    start = 1 + video.frames.shape[1] + video.tubes.shape[1]
    text_states = states[:, start : start + text.tokens.shape[1]]
    scored = prefix_scored_positions(text.attention_mask, plm_start)
    return _token_terms(model, text_states[:, :-1][scored], input_ids[:, 1:][scored])


def sample_hard_negatives(
    sim: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per row of a square text x video similarity [N, N] (diagonal = positives).

    Returns (video index for each text, text index for each video), each drawn from the row's softmax with the
    positive excluded. Computed in float64 on the CPU with `generator`, so every rank draws the same indices
    from the same all-gathered matrix. A row whose mass sits entirely on the positive draws uniformly.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"hard negatives need a square similarity matrix, got {tuple(sim.shape)}")
    if sim.shape[0] < 2:
        raise ValueError("hard negatives need at least 2 pairs in the (global) batch")
    if not torch.isfinite(sim).all():
        raise ValueError("the similarity matrix for hard-negative sampling holds non-finite values")

    def draw(scores: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(scores.double(), dim=1)
        probabilities.fill_diagonal_(0.0)
        empty = probabilities.sum(dim=1) == 0
        if empty.any():
            probabilities[empty] = 1.0 - torch.eye(scores.shape[0], dtype=torch.float64)[empty]
        return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)

    sim = sim.detach().cpu()
    return draw(sim), draw(sim.t())


class MatchingTerms(NamedTuple):
    loss: torch.Tensor  # mean cross entropy over the 3B pairs
    correct: torch.Tensor
    count: int
    logits: torch.Tensor  # [3B, 2]: B matching pairs, then B with a negative video, then B with a negative text


def video_text_matching_terms(
    model,
    video: VideoParts,
    text: TextParts,
    all_video: VideoParts,
    all_text: TextParts,
    negative_video: torch.Tensor,
    negative_text: torch.Tensor,
) -> MatchingTerms:
    """VTM with hard negatives: for each local pair i, (video i, text i) labelled match, (video
    negative_video[i], text i) and (video i, text negative_text[i]) labelled unmatch, indices into the
    all-gathered `all_video` / `all_text`. The 3B pairs form one `match_logits` call (one normalisation group,
    as the original's training)."""
    negative_video = negative_video.to(video.frames.device)
    negative_text = negative_text.to(video.frames.device)
    videos = [video, all_video.take(negative_video), video]
    texts = [text, text, all_text.take(negative_text)]
    frames, video_mask, tubes = (torch.cat(parts) for parts in zip(*videos))
    tokens, attention_mask = (torch.cat(parts) for parts in zip(*texts))
    logits = model.match_logits(frames, video_mask, tubes, tokens, attention_mask)
    batch = video.frames.shape[0]
    labels = torch.zeros(3 * batch, dtype=torch.long, device=logits.device)
    labels[:batch] = 1
    correct = (logits.argmax(dim=-1) == labels).sum()
    return MatchingTerms(F.cross_entropy(logits, labels), correct, 3 * batch, logits.detach())
