"""The fusion encoder (stage 2 and every downstream task, docs/method.md §6.1-6.4, §7).

A CLIP-text-shaped transformer over `[video-sep, T frame features, K tube tokens, L text states (, answer slot)]`
plus a learned positional table, and its heads: the tied token head (MLM, prefix LM, captioning, QA) and the
bilinear match/unmatch head (video-text matching, rerank). Its parameters live under `clip.` with the original
names (`fusion_transformer`, `fusion_positional_embedding`, `fusion_proj_embedding`, `fusion_logit_bias`,
`fusion_match_matrix`, `fusion_unmatch_matrix`); `T2VLP` exposes `fuse`, `match_logits` and `token_logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.clip import CLIPConfig, Transformer
from modules.errors import ModelConfigError

MATCH_NORMS = ("group", "pair")


def check_fusion_sizes(clip: CLIPConfig, fusion_layers: int) -> None:
    """The original's fusion encoder only works when the joint embedding and the text width agree."""
    if clip.embed_dim != clip.transformer_width:
        raise ModelConfigError(
            f"the fusion encoder needs embed_dim == transformer_width (the text tower's width), got "
            f"{clip.embed_dim} and {clip.transformer_width}: its inputs are projected features (embed_dim) and "
            f"its blocks and tied token head are copies of the text tower (transformer_width)"
        )
    if not 1 <= fusion_layers <= clip.transformer_layers:
        raise ModelConfigError(
            f"fusion_layers {fusion_layers} must be in 1..{clip.transformer_layers} (the text tower's blocks)"
        )


def build_fusion_parts(clip: CLIPConfig) -> dict[str, nn.Module | nn.Parameter]:
    """The stage-2 modules and parameters kept under `clip.` (docs/method.md §10.1), with the original's init."""
    width, dim = clip.transformer_width, clip.embed_dim
    return {
        "fusion_transformer": Transformer(width, clip.transformer_layers, clip.transformer_heads, clip.quick_gelu),
        "fusion_positional_embedding": nn.Parameter(torch.empty(clip.context_length, width).normal_(std=0.01)),
        "fusion_proj_embedding": nn.Parameter(torch.randn(dim, dim) * dim**-0.5),
        "fusion_logit_bias": nn.Parameter(torch.zeros(clip.vocab_size)),
        "fusion_match_matrix": nn.Parameter(torch.randn(dim, dim) * dim**-0.5),
        "fusion_unmatch_matrix": nn.Parameter(torch.randn(dim, dim) * dim**-0.5),
    }


def fusion_attention_mask(key_valid: torch.Tensor, visual_length: int, causal_text: bool) -> torch.Tensor:
    """Boolean attention mask [B, 1, n, n] (True = may attend) from key validity [B, n].

    Bidirectional: every row sees every valid key. Prefix (`causal_text`, docs/method.md §6.4): rows of the visual
    part (the first `visual_length` positions) see only valid visual keys; text rows see every valid visual key
    and the text keys at or before their own position.
    """
    batch, length = key_valid.shape
    allowed = key_valid[:, None, :].expand(batch, length, length)
    if causal_text:
        positions = torch.arange(length, device=key_valid.device)
        rows, cols = positions[:, None], positions[None, :]
        visual_col = cols < visual_length
        text_rows_causal = (rows >= visual_length) & (cols <= rows)
        allowed = allowed & (visual_col | text_rows_causal)
    # one memory layout for both kinds: compiled blocks specialise on their inputs' strides
    return allowed.contiguous()[:, None]


def fusion_inputs(
    frames: torch.Tensor,
    video_mask: torch.Tensor,
    tubes: torch.Tensor,
    text_tokens: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_slot: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence of docs/method.md §6.2 (and §7c with `answer_slot`) [B, n, D] and its key validity [B, n]."""
    batch = frames.shape[0]
    if not (tubes.shape[0] == text_tokens.shape[0] == attention_mask.shape[0] == video_mask.shape[0] == batch):
        raise ValueError(
            f"batch sizes differ: frames {tuple(frames.shape)}, video_mask {tuple(video_mask.shape)}, tubes "
            f"{tuple(tubes.shape)}, text_tokens {tuple(text_tokens.shape)}, attention_mask {tuple(attention_mask.shape)}"
        )
    frame_valid = video_mask.bool()
    weights = frame_valid.to(frames.dtype).unsqueeze(-1)
    video_sep = (frames * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    parts = [video_sep[:, None], frames, tubes.to(frames.dtype), text_tokens.to(frames.dtype)]
    sep_valid = torch.ones_like(frame_valid[:, :1]) if answer_slot else frame_valid[:, :1]
    valid = [sep_valid, frame_valid, torch.ones_like(frame_valid[:, :1]).expand(-1, tubes.shape[1]),
             attention_mask.bool()]
    if answer_slot:
        parts.append(frames.new_zeros(batch, 1, frames.shape[-1]))
        valid.append(torch.ones_like(frame_valid[:, :1]))
    return torch.cat(parts, dim=1), torch.cat(valid, dim=1)


def run_fusion(clip: nn.Module, sequence: torch.Tensor, attn_mask: torch.Tensor, layers: int) -> torch.Tensor:
    """Positional table + the first `layers` fusion blocks (no final LayerNorm, docs/method.md §6.1)."""
    length = sequence.shape[1]
    table = clip.fusion_positional_embedding
    if length > table.shape[0]:
        raise ValueError(
            f"the fusion sequence has {length} positions but the positional table only {table.shape[0]}: "
            f"use fewer text tokens (--max_words) or frames"
        )
    x = sequence + table[:length].to(sequence.dtype)
    for block in clip.fusion_transformer.resblocks[:layers]:
        x = block(x, attn_mask=attn_mask)
    return x


def normalize_text_heads(text: torch.Tensor, group_size: int | None, norm: str) -> torch.Tensor:
    """Text head vectors [N, D] normalised as the match head expects.

    "group" (the original, docs/method.md §6.4): each feature is divided by its norm over the pairs of its group of
    `group_size` consecutive rows (all N rows when None). "pair": each vector is L2-normalised on its own.
    """
    if norm == "pair":
        return text / text.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if norm != "group":
        raise ValueError(f"match normalisation must be one of {MATCH_NORMS}, got {norm!r}")
    count, dim = text.shape
    size = count if group_size is None else group_size
    if size < 1 or count % size:
        raise ValueError(f"group_size {group_size} does not divide the {count} pairs of the call")
    grouped = text.reshape(count // size, size, dim)
    return (grouped / grouped.norm(dim=1, keepdim=True).clamp(min=1e-12)).reshape(count, dim)


def bilinear_match_logits(
    clip: nn.Module, video_head: torch.Tensor, text_head: torch.Tensor, dropout: float, training: bool
) -> torch.Tensor:
    """[unmatch, match] logits [N, 2] of normalised heads; each product draws its own dropout (docs/method.md §11.9)."""

    def drop(x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, dropout, training)

    match = ((drop(video_head) @ clip.fusion_match_matrix.float()) * drop(text_head)).sum(dim=-1)
    unmatch = ((drop(video_head) @ clip.fusion_unmatch_matrix.float()) * drop(text_head)).sum(dim=-1)
    return torch.stack([unmatch, match], dim=-1)
