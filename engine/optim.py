"""Freeze rule, parameter groups, AdamW and the original warmup_cosine schedule (docs/method.md §5.3).

The original used BertAdam (no bias correction, per-tensor clipping inside the optimiser). We use torch's AdamW
with the same betas/eps and decoupled decay, and clip the global gradient norm in the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

CLIP_PREFIX = "clip."
MAX_LOGIT_SCALE = math.log(100.0)

# Parameters that always train under the freeze rule (names relative to `clip.`, matched as prefixes).
_ALWAYS_TRAINABLE_PREFIXES = ("ln_final.", "text_projection", "logit_scale", "visual.ln_post.", "visual.proj")
_BLOCK_PREFIXES = ("visual.transformer.resblocks.", "transformer.resblocks.")
_NEW_NAME_PARTS = ("fusion", "local")

def _stays_trainable(clip_name: str, freeze_layer_num: int) -> bool:
    if clip_name.startswith(_ALWAYS_TRAINABLE_PREFIXES):
        return True
    if clip_name.startswith(_BLOCK_PREFIXES):
        layer = int(clip_name.split(".resblocks.")[1].split(".")[0])
        if layer >= freeze_layer_num:
            return True
    return any(part in clip_name for part in _NEW_NAME_PARTS)


def apply_freeze_rule(model: nn.Module, freeze_layer_num: int) -> list[str]:
    """CLIP4Clip's `--freeze_layer_num` rule (as extended by T2VLP); returns the names it froze.

    With freeze_layer_num > -1, a `clip.*` parameter keeps requires_grad iff it is ln_final, text_projection,
    logit_scale, visual.ln_post, visual.proj, a block `visual.transformer.resblocks.N` / `transformer.resblocks.N`
    with N >= freeze_layer_num, or its name contains "fusion" or "local". Everything else under `clip.` is
    frozen; so 0 still freezes visual.conv1, the class and positional embeddings, ln_pre, token_embedding, the
    text positional embedding and lm_head. -1 freezes nothing. Parameters outside `clip.` are never touched.
    """
    frozen = []
    if freeze_layer_num <= -1:
        return frozen
    for name, param in model.named_parameters():
        if not name.startswith(CLIP_PREFIX):
            continue
        if not _stays_trainable(name[len(CLIP_PREFIX):], freeze_layer_num):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_param_groups(model: nn.Module, lr: float, coef_lr: float, new_params_lr: float, weight_decay: float,
                       new_param_patterns: Sequence[str] = ("fusion", "local")) -> list[dict]:
    """Up to six AdamW groups: {decay, no_decay} x {backbone, new, other}; frozen params and empty groups skipped.

    backbone: `clip.*` not matching `new_param_patterns` -> lr * coef_lr.
    new:      `clip.*` whose name contains one of `new_param_patterns` -> new_params_lr (fixed, not scaled by
              --lr; the original hard-coded it per script).
    other:    parameters outside `clip.` -> lr.
    no_decay: names containing "bias" (weight_decay 0). As in the original, LayerNorm weights, embeddings and
              logit_scale are decayed (docs/method.md §11.14).
    Each group carries "name" and the parameter names ("params" holds (name, param) pairs, which torch keeps as
    "param_names" in the optimiser state).
    """
    rates = {"backbone": lr * coef_lr, "new": new_params_lr, "other": lr}
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(CLIP_PREFIX):
            kind = "new" if any(p in name for p in new_param_patterns) else "backbone"
        else:
            kind = "other"
        decay = "no_decay" if "bias" in name else "decay"
        key = f"{kind}_{decay}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "lr": rates[kind],
                           "weight_decay": 0.0 if decay == "no_decay" else weight_decay}
        groups[key]["params"].append((name, param))
    order = [f"{kind}_{decay}" for kind in rates for decay in ("decay", "no_decay")]
    return [groups[key] for key in order if key in groups]


def build_optimizer(model: nn.Module, lr: float, coef_lr: float, new_params_lr: float, weight_decay: float,
                    new_param_patterns: Sequence[str] = ("fusion", "local"),
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98, eps 1e-6, decoupled decay per group) over `build_param_groups`.

    `fused` (one kernel for all parameters instead of a few per tensor list) defaults to on when every trainable
    parameter is on a GPU; the CPU keeps the default implementation, whose numbers the CPU tests pin down. Both
    compute the same update up to float rounding (tested)."""
    groups = build_param_groups(model, lr, coef_lr, new_params_lr, weight_decay, new_param_patterns)
    if not groups:
        raise ValueError("no trainable parameters")
    if fused is None:
        fused = all(param.is_cuda for group in groups for _, param in group["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)


def warmup_cosine(progress: float, warmup: float) -> float:
    """The original schedule factor: progress/warmup below `warmup`, else 0.5 * (1 + cos(pi * progress)).

    The cosine is not shifted by the warmup (0.976 right after warmup 0.1, docs/method.md §11.15). Progress is clamped to
    [0, 1] so the factor never rises again after the end (the original did on resume).
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _schedule_factor(step: int, total_steps: int, warmup: float) -> float:
    return warmup_cosine(step / total_steps, warmup)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_proportion: float) -> LambdaLR:
    """LambdaLR of warmup_cosine(step / total_steps). Call scheduler.step() after each optimiser step; like the
    original, the first update runs at factor 0."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return LambdaLR(optimizer, partial(_schedule_factor, total_steps=total_steps, warmup=warmup_proportion))


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp every `logit_scale` parameter to <= ln(100), as the original did after each optimiser step."""
    for name, param in model.named_parameters():
        if name == "logit_scale" or name.endswith(".logit_scale"):
            param.clamp_(max=MAX_LOGIT_SCALE)
