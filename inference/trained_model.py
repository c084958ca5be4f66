"""A trained model from its checkpoint alone, for using it (predict.py) rather than training it.

Sizes come from the checkpoint (`clip.*` keys: CLIP sizes, tube depth, centers; fusion keys; the answer
classifier). The settings a model must be run with but that a state dict cannot hold (backbone, fusion blocks
executed, match-head normalisation, frame sampling, text length, answers) come, in this order, from explicit
arguments, from what the checkpoint records (`model_settings`, written by this project), from the `run.json` of
the run that wrote it (`<run>/ckpt/pytorch_model.bin.N` -> `<run>/run.json`), and from the original recipe's
defaults, which are then named in one line. `--visual_pretrain_path` is only needed for a checkpoint without the
CLIP keys.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modules.backbones import resolve_backbone
from modules.checkpoint import (
    CheckpointError,
    clip_weights_of,
    init_state_from_clip,
    load_state_dict_checked,
    read_clip_state_dict,
    read_model_checkpoint,
)
from modules.clip import CLIPConfig
from modules.errors import InputError
from modules.model import T2VLP, T2VLPConfig

logger = logging.getLogger("t2vlp.predict")

# What the original recipes used (docs/method.md §8); a run.json beside the checkpoint overrides them.
DEFAULT_SETTINGS: dict[str, Any] = {
    "fusion_layers": 6, "match_norm": "group", "max_frames": 12, "feature_framerate": 1, "slice_framepos": 2,
    "max_words": 32, "split_layer": None,
}
FUSION_KEY = "clip.fusion_transformer.resblocks.0.attn.in_proj_weight"
ANSWER_KEY = "answer_head.answer_embedding"


@dataclass
class TrainedModel:
    model: T2VLP
    checkpoint: Path
    settings: dict[str, Any] = field(default_factory=dict)
    task: str | None = None  # the task that wrote the checkpoint, when it says
    answers: list[str] | None = None  # the answer classifier's answers in label order, when the checkpoint has them

    @property
    def has_fusion(self) -> bool:
        return self.model.config.with_fusion

    def require_fusion(self, what: str) -> None:
        if not self.has_fusion:
            raise InputError(f"{self.checkpoint} has no fusion encoder (a stage-1 checkpoint?): {what} needs a "
                             f"stage-2 or downstream checkpoint")

    def warn_unless_fine_tuned(self, task: str, what: str) -> None:
        """One line when the checkpoint records that another task wrote it (e.g. stage-2 pre-training used to
        caption): its output does not come from a head trained for `what`."""
        if self.task is not None and self.task != task:
            logger.warning("%s was written by the '%s' %s, not fine-tuned for %s: its output does not come from a "
                           "fine-tuned model", self.checkpoint, self.task,
                           "pre-training" if self.task in ("clip", "fusion") else "task", what)


def run_settings(checkpoint: Path) -> dict[str, Any]:
    """The flags recorded in the run.json of the run that saved `checkpoint` ({} when there is none)."""
    for candidate in (checkpoint.parent.parent / "run.json", checkpoint.parent / "run.json"):
        if candidate.is_file():
            entries = json.loads(candidate.read_text(encoding="utf-8"))
            finished = [e for e in entries if not str(e.get("outcome", "")).startswith("bad input")]
            if finished:
                return dict(finished[-1].get("flags", {}))
    return {}


def load_trained_model(
    checkpoint: str | Path, *, clip_path: str | Path | None = None, clip_model: str | None = None,
    overrides: dict[str, Any] | None = None, device: torch.device | None = None,
) -> TrainedModel:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InputError(f"checkpoint {checkpoint} does not exist")
    try:
        state, model_settings = read_model_checkpoint(checkpoint)
    except CheckpointError:
        if _is_clip_file(checkpoint):
            raise InputError(_clip_not_t2vlp(checkpoint)) from None
        raise
    if "visual.conv1.weight" in state:
        raise InputError(_clip_not_t2vlp(checkpoint))
    recorded = {**run_settings(checkpoint), **model_settings}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    settings = {**DEFAULT_SETTINGS, **{k: v for k, v in recorded.items() if k in DEFAULT_SETTINGS}, **given}
    if "clip.visual.conv1.weight" in state:
        clip_state = clip_weights_of(state)
    elif clip_path is not None:
        clip_state = read_clip_state_dict(clip_path)
    else:
        raise InputError(f"{checkpoint} has no CLIP weights (clip.visual.*): give --visual_pretrain_path")
    try:
        weights = CLIPConfig.from_state_dict(clip_state)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{checkpoint}: not a T2VLP checkpoint ({error})") from error
    clip_config = resolve_backbone(weights, clip_model, model_settings, checkpoint, checkpoint)
    config = T2VLPConfig(
        num_centers=state["clip.fusion_center"].shape[2] if "clip.fusion_center" in state else 8,
        split_layer=settings["split_layer"], tube_layers=_count_tube_layers(state),
        detach_tube_input=True, with_fusion=FUSION_KEY in state, fusion_layers=settings["fusion_layers"],
        match_norm=settings["match_norm"],
        num_answers=state[ANSWER_KEY].shape[0] if ANSWER_KEY in state else 0,
    )
    relevant = [k for k in DEFAULT_SETTINGS if config.with_fusion or k not in ("fusion_layers", "match_norm")]
    assumed = [k for k in relevant if k not in recorded and k not in given]
    assumption = (f"{checkpoint} records no {', '.join(assumed)} (no run.json beside it either: a checkpoint of "
                  f"the original code?); assumed the original recipe's: "
                  f"{', '.join(f'{k} {settings[k]}' for k in assumed)}") if assumed else ""
    try:
        model = T2VLP(clip_config, config)
    except ValueError as error:  # settings that do not fit the checkpoint's sizes, e.g. --fusion_layers
        raise InputError(f"{checkpoint}: {error}" + (f" ({assumption}; give the flags it was trained with)"
                                                     if assumption else "")) from error
    full_state = init_state_from_clip(clip_state, state, clip_config.vision_layers, config.tube_layers,
                                      with_fusion=config.with_fusion)
    missing, _ = load_state_dict_checked(model, full_state)
    important = [key for key in missing if not key.startswith(("clip.lm_head", "visual_linear"))]
    if important:
        raise CheckpointError(f"{checkpoint} lacks {len(important)} weights of the model it describes, e.g. "
                              f"{important[:3]}")
    model.eval().to(device or torch.device("cpu"))
    logger.info("loaded %s (%s; settings %s%s)", checkpoint, "with fusion encoder" if config.with_fusion else
                "stage 1", settings, f", answers {config.num_answers}" if config.num_answers else "")
    if assumption:
        logger.warning(assumption)
    answers = model_settings.get("answers")
    return TrainedModel(model, checkpoint, settings, task=recorded.get("task"),
                        answers=list(answers) if isinstance(answers, list) else None)


def _is_clip_file(path: Path) -> bool:
    try:
        return "visual.conv1.weight" in read_clip_state_dict(path)
    except CheckpointError:
        return False


def _clip_not_t2vlp(path: Path) -> str:
    return (f"{path} is a CLIP file, not a T2VLP checkpoint: predict.py uses a model trained by this project or the "
            f"original (stage 1 or later); train one from it with CLIP_PATH={path} bash start_clip.sh")


def _count_tube_layers(state: dict[str, torch.Tensor]) -> int:
    prefix = "clip.local_visual.transformer.resblocks."
    blocks = {key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)}
    return len(blocks) or 2
