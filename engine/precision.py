"""The precision a run computes in: autocast over fp32 master weights (bf16 by default on CUDA, fp32 on CPU)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA (fp16 where bf16 is unsupported), 'fp32' elsewhere; other values unchanged."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast for bf16/fp16 over fp32 weights; nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
