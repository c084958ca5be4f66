"""Local alignment ("align", docs/method.md §4): text-side centers against tube tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_side_centers(
    projected_centers: torch.Tensor, text_tokens: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Centers [K, D] attend over the valid text token states [B, L, D] -> text-side centers [B, K, D].

    Weights are raw dot products with a softmax over the valid tokens (SOT and EOT included), in fp32.
    """
    with torch.autocast(device_type=text_tokens.device.type, enabled=False):
        tokens32 = text_tokens.float()
        weights = torch.einsum("kd,bld->bkl", projected_centers.float(), tokens32)
        valid = attention_mask.bool()[:, None, :]
        weights = weights.masked_fill(~valid, float("-inf")).softmax(dim=-1)
        return weights @ tokens32


def local_alignment_loss(text_centers: torch.Tensor, tubes: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all B·K·D elements, no normalisation of either side."""
    return F.mse_loss(text_centers.float(), tubes.float())
