"""CLIP image and text towers with OpenAI's parameter names (docs/method.md §2, §3.1).

Blocks keep `attn.in_proj_weight`, `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj`, `ln_1`, `ln_2`, so OpenAI and
original T2VLP state dicts load without a key map. Attention runs through `scaled_dot_product_attention`.
The image tower can let its last blocks attend across all frames of a clip ("joint attention").
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class CLIPConfig:
    """Sizes of a CLIP model (`from_state_dict` infers them from a checkpoint) and its activation: QuickGELU as
    OpenAI's, or GELU as most open_clip architectures (`clip_model`: the open_clip name, modules/backbones.py)."""

    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_layers: int = 12
    quick_gelu: bool = True
    clip_model: str | None = None

    @property
    def vision_heads(self) -> int:
        return max(1, self.vision_width // 64)

    @property
    def transformer_heads(self) -> int:
        return max(1, self.transformer_width // 64)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "") -> CLIPConfig:
        """Infer the sizes from an OpenAI-layout CLIP state dict (keys optionally under `prefix`)."""

        def get(name: str) -> torch.Tensor:
            key = prefix + name
            if key not in state_dict:
                raise KeyError(f"not an OpenAI CLIP ViT state dict: key '{key}' is missing")
            return state_dict[key]

        conv = get("visual.conv1.weight")
        positions = get("visual.positional_embedding").shape[0]
        grid = round((positions - 1) ** 0.5)
        if grid * grid + 1 != positions:
            raise ValueError(f"visual.positional_embedding has {positions} rows, not 1 + a square grid")
        vision_layers = _count_blocks(state_dict, prefix + "visual.transformer.resblocks.")
        text_layers = _count_blocks(state_dict, prefix + "transformer.resblocks.")
        return cls(
            embed_dim=get("text_projection").shape[1],
            image_resolution=conv.shape[-1] * grid,
            vision_layers=vision_layers,
            vision_width=conv.shape[0],
            vision_patch_size=conv.shape[-1],
            context_length=get("positional_embedding").shape[0],
            vocab_size=get("token_embedding.weight").shape[0],
            transformer_width=get("ln_final.weight").shape[0],
            transformer_layers=text_layers,
        )


def _count_blocks(state_dict: dict[str, torch.Tensor], block_prefix: str) -> int:
    indices = {
        int(key[len(block_prefix) :].split(".")[0])
        for key in state_dict
        if key.startswith(block_prefix) and key.endswith("attn.in_proj_weight")
    }
    if not indices:
        raise KeyError(f"no '{block_prefix}N.attn.in_proj_weight' keys: not an OpenAI CLIP state dict")
    return max(indices) + 1


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as OpenAI CLIP does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names, computed with SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dim() == 3:  # [B, n, n] -> broadcast over heads
            attn_mask = attn_mask.unsqueeze(1)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(qkv.dtype)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))` with QuickGELU (or exact GELU).

    With `checkpointed` (see `set_grad_checkpointing`) its activations are recomputed in the backward pass instead
    of kept, whenever it runs with gradients."""

    checkpointed: bool = False

    def __init__(self, width: int, heads: int, quick_gelu: bool = True) -> None:
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self._residual_forward, x, attn_mask, is_causal, use_reentrant=False)
        return self._residual_forward(x, attn_mask, is_causal)

    def _residual_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


def transformer_blocks(model: nn.Module) -> list[ResidualAttentionBlock]:
    """Every transformer block of `model` (ViT, text tower, tube encoder, fusion encoder)."""
    return [module for module in model.modules() if isinstance(module, ResidualAttentionBlock)]


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Recompute every transformer block's activations in the backward pass (ViT, text tower, tube encoder,
    fusion encoder): the same gradients for about a third more compute and far less activation memory.
    Returns the number of blocks switched."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.checkpointed = enabled
    return len(blocks)


BLOCK_RECOMPILE_LIMIT = 32


def compile_blocks(model: nn.Module, **compile_options: object) -> int:
    """`torch.compile` each transformer block in place (regional compilation: every block of a tower has the same
    code, so one compilation serves them all, and the state-dict keys do not change). Returns the number of blocks."""
    blocks = transformer_blocks(model)
    # All blocks share one code object, whose cache gets an entry per tower shape, grad mode, batch-size change and
    # mask kind (a stage-2 run with in-loop evaluation: 7). Past dynamo's limit (default 8) further variants would
    # silently run eagerly, so leave room.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(**compile_options)
    return len(blocks)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = True) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)])

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return x


class VisionTransformer(nn.Module):
    """OpenAI's ViT. `forward_frames` adds joint attention across the frames of a clip from `split_layer` on."""

    def __init__(
        self, resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
        quick_gelu: bool = True,
    ):
        super().__init__()
        if resolution % patch_size:
            raise ValueError(
                f"image resolution {resolution} is not a multiple of the patch size {patch_size}"
            )
        self.input_resolution = resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((resolution // patch_size) ** 2 + 1, width)
        )
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> token sequences [N, 1 + grid², width] after `ln_pre`."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2:] != (self.input_resolution, self.input_resolution):
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} does not match the model's resolution "
                f"{self.input_resolution}x{self.input_resolution}"
            )
        x = self.conv1(images.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def project(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        return self.ln_post(cls_tokens) @ self.proj

    def forward_frames(
        self, frames: torch.Tensor, num_frames: int, split_layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames [B·T, 3, H, W] (the T frames of a clip contiguous) -> (frame features [B·T, D],
        the residual stream before block `split_layer` [B·T, N, W]).

        Blocks before `split_layer` run per frame; the rest run on each clip's T·N tokens at once.
        With T = 1 this is plain CLIP.
        """
        x = self.embed(frames)
        blocks = self.transformer.resblocks
        for block in blocks[:split_layer]:
            x = block(x)
        middle = x
        clips, tokens, width = x.shape[0] // num_frames, x.shape[1], x.shape[2]
        x = x.reshape(clips, num_frames * tokens, width)
        for block in blocks[split_layer:]:
            x = block(x)
        x = x.reshape(clips * num_frames, tokens, width)
        return self.project(x[:, 0]), middle


def build_text_parts(config: CLIPConfig) -> dict[str, nn.Module | nn.Parameter]:
    """The modules and parameters OpenAI keeps at the top level of CLIP for the text tower."""
    width = config.transformer_width
    return {
        "transformer": Transformer(width, config.transformer_layers, config.transformer_heads, config.quick_gelu),
        "token_embedding": nn.Embedding(config.vocab_size, width),
        "positional_embedding": nn.Parameter(torch.empty(config.context_length, width)),
        "ln_final": LayerNorm(width),
        "text_projection": nn.Parameter(torch.empty(width, config.embed_dim)),
        "logit_scale": nn.Parameter(torch.tensor(math.log(1 / 0.07))),
    }


def init_text_parts(module: nn.Module, config: CLIPConfig) -> None:
    """OpenAI's initialisation of the text tower (`CLIP.initialize_parameters`)."""
    nn.init.normal_(module.token_embedding.weight, std=0.02)
    nn.init.normal_(module.positional_embedding, std=0.01)
    width, layers = config.transformer_width, config.transformer_layers
    proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    for block in module.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(module.text_projection, std=width**-0.5)


def encode_text_tokens(module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Causal text tower: ids [B, L] -> all token states after `ln_final` and the projection [B, L, D]."""
    length = input_ids.shape[1]
    x = module.token_embedding(input_ids) + module.positional_embedding[:length].to(
        module.token_embedding.weight.dtype
    )
    x = module.transformer(x, is_causal=True)
    return module.ln_final(x) @ module.text_projection


class CLIP(nn.Module):
    """Plain OpenAI CLIP (ViT), for writing and reading CLIP checkpoints; T2VLP builds on the same parts."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(
            config.image_resolution,
            config.vision_patch_size,
            config.vision_width,
            config.vision_layers,
            config.vision_heads,
            config.embed_dim,
            config.quick_gelu,
        )
        for name, part in build_text_parts(config).items():
            setattr(self, name, part)
        init_text_parts(self, config)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        features, _ = self.visual.forward_frames(images, num_frames=1, split_layer=self.config.vision_layers)
        return features

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = encode_text_tokens(self, input_ids)
        return tokens[torch.arange(tokens.shape[0]), input_ids.argmax(dim=-1)]
