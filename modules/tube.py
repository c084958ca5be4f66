"""Tube tokens ("focus", docs/method.md §3.2-3.3).

Learnable semantic centers soft-pool each frame's patch tokens (taken before the joint-attention blocks);
each center's per-frame vectors, behind a clip-level head token, pass through a small transformer over
time. There is no temporal position anywhere: frames are an unordered set here.
"""

from __future__ import annotations

import torch

from modules.clip import VisionTransformer


def pool_patches_by_centers(patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Patches [B, T, P, W], centers [K, W] -> frame-center vectors [B, T, K, W].

    Affinities are raw dot products (no 1/sqrt(d), no normalisation) with a softmax over the patches of a
    frame, computed in fp32 as the original does.
    """
    with torch.autocast(device_type=patches.device.type, enabled=False):
        patches32 = patches.float()
        affinity = torch.einsum("kw,btpw->btkp", centers.float(), patches32).softmax(dim=-1)
        return affinity @ patches32


def tube_sequences(middle: torch.Tensor, num_frames: int, centers: torch.Tensor) -> torch.Tensor:
    """Residual stream before the joint blocks [B·T, 1 + P, W] -> per-center sequences [B·K, 1 + T, W].

    Sequence k of clip b is `[h_b, G_b1k, ..., G_bTk]`, with `h_b` the mean over frames of the CLS tokens.
    """
    tokens, width = middle.shape[1], middle.shape[2]
    stream = middle.reshape(-1, num_frames, tokens, width)
    clips, num_centers = stream.shape[0], centers.shape[0]
    frame_centers = pool_patches_by_centers(stream[:, :, 1:], centers).to(middle.dtype)  # [B, T, K, W]
    head = stream[:, :, 0].mean(dim=1)  # [B, W]
    head = head[:, None, None, :].expand(clips, num_centers, 1, width)
    sequences = torch.cat([head, frame_centers.permute(0, 2, 1, 3)], dim=2)  # [B, K, 1 + T, W]
    return sequences.reshape(clips * num_centers, num_frames + 1, width)


def encode_tubes(local_visual: VisionTransformer, sequences: torch.Tensor, num_centers: int) -> torch.Tensor:
    """Tube encoder over [B·K, 1 + T, W] -> tube tokens [B, K, D] read out at the head position."""
    x = local_visual.transformer(sequences)
    tubes = local_visual.project(x[:, 0])
    return tubes.reshape(-1, num_centers, tubes.shape[-1])
