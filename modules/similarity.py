"""meanP video-text similarity and the symmetric contrastive loss (docs/method.md §5.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool_frames(frames: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    """Frame features [B, T, D] -> unit clip features [B, D]: normalise, masked mean, normalise again."""
    frames = F.normalize(frames.float(), dim=-1)
    mask = video_mask.to(frames.dtype).unsqueeze(-1)
    pooled = (frames * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)


def meanp_logits(
    text_eot: torch.Tensor, frames: torch.Tensor, video_mask: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Text [Bt, D] x videos [Bv, T, D] -> logits [Bt, Bv] = exp(logit_scale) · cos(text, meanP(video))."""
    text = F.normalize(text_eot.float(), dim=-1)
    video = mean_pool_frames(frames, video_mask)
    return logit_scale.float().exp() * text @ video.t()


def symmetric_contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Half the sum of the row-wise and column-wise cross entropies with the diagonal as target."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
