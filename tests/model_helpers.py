"""Tiny model configurations and inputs shared by the model tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from modules.clip import CLIPConfig

TINY_CLIP = CLIPConfig(
    embed_dim=32,
    image_resolution=32,
    vision_layers=4,
    vision_width=64,
    vision_patch_size=8,
    context_length=77,
    vocab_size=49408,
    transformer_width=64,
    transformer_layers=2,
)

# The fusion encoder needs the text width to equal the joint embedding (as ViT-B/16's 512 and 512).
TINY_FUSION_CLIP = replace(TINY_CLIP, transformer_width=32)


def random_text(
    batch: int, length: int, valid: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """SOT, random word ids, EOT, zero padding; `valid[i]` real tokens in row i."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, count in enumerate(valid):
        ids[row, :count] = torch.randint(1, 49000, (count,), generator=generator)
        ids[row, 0], ids[row, count - 1] = 49406, 49407
        mask[row, :count] = 1
    return ids, mask


def random_video(batch: int, frames: int, resolution: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        batch, frames, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)
    )
