"""Which image-text backbone a model starts from (docs/training.md §0.1): OpenAI's CLIP ViTs (the default: sizes
from the weights, QuickGELU) or an open_clip architecture of the same layout, named with `--clip_model`, whose
settings come from open_clip's own model configs. A checkpoint records its backbone (in `model_settings`), so later
stages and predict.py rebuild the same network without the flag."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

import open_clip

from modules.clip import CLIPConfig
from modules.errors import ModelConfigError

# open_clip config entries an OpenAI-layout ViT may hold; anything else (timm or Hugging Face towers, attentional
# poolers, custom text towers, other norms or pooling) is another layout.
TOP_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
HEAD_WIDTH = 64  # OpenAI's towers have width / 64 heads
SIZE_FIELDS = tuple(f.name for f in fields(CLIPConfig) if f.name not in ("quick_gelu", "clip_model"))


def layout_problems(config: Mapping[str, Any]) -> list[str]:
    """Why an open_clip model config is not OpenAI's ViT layout ([] when it is)."""
    problems = [f"'{key}'" for key in sorted(set(config) - TOP_KEYS)]
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    problems += [f"vision '{key}'" for key in sorted(set(vision) - VISION_KEYS)]
    problems += [f"text '{key}'" for key in sorted(set(text) - TEXT_KEYS)]
    if vision.get("head_width", HEAD_WIDTH) != HEAD_WIDTH:
        problems.append(f"vision heads {vision['head_width']} wide")
    text_heads = text.get("heads", 8)  # open_clip's default
    if "width" in text and text_heads != max(1, text["width"] // HEAD_WIDTH):
        problems.append(f"text heads {text['width'] // text_heads} wide")
    problems += [f"{tower} MLP ratio {cfg['mlp_ratio']}" for tower, cfg in (("vision", vision), ("text", text))
                 if cfg.get("mlp_ratio", 4) != 4]
    if not isinstance(vision.get("image_size"), int) or not isinstance(vision.get("patch_size"), int):
        problems.append("a non-square image or patch size")
    return problems


def supported_architectures() -> list[str]:
    return [name for name in open_clip.list_models() if not layout_problems(open_clip.get_model_config(name))]


def backbone_config(name: str) -> CLIPConfig:
    """The CLIP sizes and activation of open_clip's architecture `name`; one-line error if it is unknown or not
    OpenAI's ViT layout."""
    config = open_clip.get_model_config(name)
    if config is None:
        raise ModelConfigError(f"--clip_model {name}: open_clip has no architecture of that name (supported: "
                               f"{', '.join(supported_architectures())})")
    problems = layout_problems(config)
    if problems:
        raise ModelConfigError(f"--clip_model {name} is not OpenAI's ViT layout ({', '.join(problems)}); "
                               f"supported: {', '.join(supported_architectures())}")
    vision, text = config["vision_cfg"], config["text_cfg"]
    return CLIPConfig(
        embed_dim=config["embed_dim"], image_resolution=vision["image_size"], vision_layers=vision["layers"],
        vision_width=vision["width"], vision_patch_size=vision["patch_size"],
        context_length=text.get("context_length", 77), vocab_size=text.get("vocab_size", 49408),
        transformer_width=text["width"], transformer_layers=text["layers"],
        quick_gelu=bool(config.get("quick_gelu", False)), clip_model=name,
    )


def describe(config: CLIPConfig) -> str:
    activation = "QuickGELU" if config.quick_gelu else "GELU"
    return f"open_clip's {config.clip_model} ({activation})" if config.clip_model else f"OpenAI's layout ({activation})"


def resolve_backbone(weights: CLIPConfig, requested: str | None, recorded: Mapping[str, Any] | None,
                     weights_path: str | os.PathLike, recorded_in: str | os.PathLike | None = None) -> CLIPConfig:
    """The backbone to build: `requested` (--clip_model) or the one a checkpoint `recorded`, checked against the
    sizes of the weights; OpenAI's layout with QuickGELU when neither names one. A request that builds another
    network than the recorded one is refused."""
    recorded = dict(recorded or {})
    recorded_config = (backbone_config(recorded["clip_model"]) if recorded.get("clip_model")
                       else replace(weights, quick_gelu=bool(recorded.get("quick_gelu", True))))
    if requested is None:
        chosen = recorded_config
    else:
        chosen = backbone_config(requested)
        if recorded and chosen.quick_gelu != recorded_config.quick_gelu:
            raise ModelConfigError(f"--clip_model {requested} contradicts {recorded_in}, which was trained from "
                                   f"{describe(recorded_config)}: omit --clip_model to rebuild that network")
    differing = [f"{name} {getattr(weights, name)} (the config says {getattr(chosen, name)})"
                 for name in SIZE_FIELDS if getattr(weights, name) != getattr(chosen, name)]
    if differing:
        raise ModelConfigError(f"{weights_path} does not hold {chosen.clip_model} weights: {', '.join(differing)}")
    return replace(chosen, **{name: getattr(weights, name) for name in SIZE_FIELDS})


def backbone_settings(config: CLIPConfig) -> dict[str, Any]:
    """What a checkpoint records of its backbone (plain values: checkpoints load with weights_only)."""
    return {"clip_model": config.clip_model, "quick_gelu": config.quick_gelu}
