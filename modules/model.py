"""T2VLP: CLIP towers + tube tokens + local alignment, with the original's state-dict layout (docs/method.md §10.1)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from modules.alignment import local_alignment_loss, text_side_centers
from modules.answer_head import AnswerClassifier
from modules.backbones import backbone_settings, describe, resolve_backbone
from modules.checkpoint import (
    CheckpointError,
    check_init_coverage,
    clip_weights_of,
    init_state_from_clip,
    load_state_dict_checked,
    read_clip_state_dict,
    read_model_checkpoint,
)
from modules.clip import CLIPConfig, VisionTransformer, build_text_parts, encode_text_tokens, init_text_parts
from modules.errors import ModelConfigError
from modules.fusion import (
    MATCH_NORMS,
    bilinear_match_logits,
    build_fusion_parts,
    check_fusion_sizes,
    fusion_attention_mask,
    fusion_inputs,
    normalize_text_heads,
    run_fusion,
)
from modules.similarity import meanp_logits, symmetric_contrastive_loss
from modules.tube import encode_tubes, tube_sequences

logger = logging.getLogger("t2vlp.model")

Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class T2VLPConfig:
    """What T2VLP adds to CLIP. Defaults are the original's (for ViT-B/16: split before block 10)."""

    num_centers: int = 8
    split_layer: int | None = None  # first joint-attention block; None = vision_layers - 2
    tube_layers: int = 2
    detach_tube_input: bool = False  # True in stage 2 and downstream (docs/method.md §11.5)
    with_fusion: bool = False  # stage 2 and downstream: the fusion encoder, its heads and visual_linear
    fusion_layers: int = 6  # fusion blocks executed (all are kept in the state dict)
    head_dropout: float = 0.2  # token and match heads: 0.2 stage 2 / retrieval, 0.5 captioning / QA
    match_norm: str = "group"  # VTM text head: "group" as the original (docs/method.md §6.4) or "pair"
    num_answers: int = 0  # QA classifier head over an answer vocabulary (0: none)

    def resolved(self, clip: CLIPConfig) -> T2VLPConfig:
        split = clip.vision_layers - 2 if self.split_layer is None else self.split_layer
        if not 0 <= split <= clip.vision_layers:
            raise ModelConfigError(f"split_layer {split} is outside the {clip.vision_layers} blocks of this CLIP")
        if not 1 <= self.tube_layers <= clip.vision_layers:
            raise ModelConfigError(f"tube_layers {self.tube_layers} must be in 1..{clip.vision_layers}")
        if self.num_centers < 1:
            raise ModelConfigError(f"num_centers must be positive, got {self.num_centers}")
        if self.match_norm not in MATCH_NORMS:
            raise ModelConfigError(f"match_norm must be one of {MATCH_NORMS}, got {self.match_norm!r}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ModelConfigError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.with_fusion:
            check_fusion_sizes(clip, self.fusion_layers)
        if self.num_answers and not self.with_fusion:
            raise ModelConfigError("the QA classifier head (num_answers > 0) needs the fusion encoder (with_fusion=True)")
        return replace(self, split_layer=split)


class ClipWithTubes(nn.Module):
    """Everything under the `clip.` prefix of the original state dict."""

    def __init__(self, clip: CLIPConfig, config: T2VLPConfig) -> None:
        super().__init__()
        self.visual = self._vision_tower(clip, clip.vision_layers)
        for name, part in build_text_parts(clip).items():
            setattr(self, name, part)
        init_text_parts(self, clip)
        self.local_visual = self._vision_tower(clip, config.tube_layers)
        self.fusion_center = nn.Parameter(
            torch.randn(1, 1, config.num_centers, clip.vision_width) * clip.vision_width**-0.5
        )
        self.fusion_proj_center = nn.Linear(clip.vision_width, clip.embed_dim)
        self.lm_head = nn.Linear(clip.transformer_width, clip.embed_dim)  # unused; kept for checkpoint compatibility
        if config.with_fusion:
            for name, part in build_fusion_parts(clip).items():
                setattr(self, name, part)
        for unused in (
            self.local_visual.conv1,
            self.local_visual.ln_pre,
            self.lm_head,
        ):
            unused.requires_grad_(False)
        self.local_visual.class_embedding.requires_grad_(False)
        self.local_visual.positional_embedding.requires_grad_(False)

    @staticmethod
    def _vision_tower(clip: CLIPConfig, layers: int) -> VisionTransformer:
        return VisionTransformer(
            clip.image_resolution,
            clip.vision_patch_size,
            clip.vision_width,
            layers,
            clip.vision_heads,
            clip.embed_dim,
            clip.quick_gelu,
        )

    @property
    def centers(self) -> torch.Tensor:
        return self.fusion_center.reshape(-1, self.fusion_center.shape[-1])


# Weights a new stage or task initialises itself (not from CLIP): a checkpoint may lack them.
SELF_INITIALISED = ("clip.lm_head.", "clip.fusion_proj_embedding", "clip.fusion_logit_bias", "clip.fusion_match_matrix",
                    "clip.fusion_unmatch_matrix", "visual_linear.", "answer_head.", "clip.fusion_center",
                    "clip.fusion_proj_center.")


def _require_complete(model: nn.Module, init_state: dict, init_model: str | os.PathLike) -> None:
    """Without a CLIP file the checkpoint must hold every weight that would come from CLIP."""
    lacking = [key for key in model.state_dict() if key not in init_state and not key.startswith(SELF_INITIALISED)]
    if lacking:
        raise CheckpointError(_needs_clip(init_model, f"{len(lacking)} weights that come from CLIP (e.g. "
                                                      f"{', '.join(lacking[:3])})"))


def _needs_clip(init_model: str | os.PathLike, what: str) -> str:
    return (f"--init_model {init_model} lacks {what} and no CLIP file was found: fetch it with 'python "
            f"CLIP-modules/fetch_clip.py' or pass --visual_pretrain_path")


class T2VLP(nn.Module):
    """The one model of every stage and task. Public API in docs/architecture.md §2; outputs are fp32."""

    def __init__(self, clip_config: CLIPConfig, config: T2VLPConfig | None = None) -> None:
        super().__init__()
        self.clip_config = clip_config
        self.config = (config or T2VLPConfig()).resolved(clip_config)
        self.clip = ClipWithTubes(clip_config, self.config)
        if self.config.with_fusion:  # unused top-level layer of the original's stage-2 model, kept for its keys
            self.visual_linear = nn.Linear(clip_config.embed_dim, clip_config.embed_dim)
            self.visual_linear.requires_grad_(False)
        if self.config.num_answers:
            self.answer_head = AnswerClassifier(self.config.num_answers, clip_config.embed_dim)
        self._bert_style_init()
        self.init_keys: frozenset[str] = frozenset()  # the keys `from_pretrained` read from `init_model`
        self.answers: list[str] | None = None  # the classifier's answers in label order, when it has one
        # What the weights were trained on before (task and dataset of each run, oldest first); None: not known (a
        # checkpoint of the original code, or one of ours written before checkpoints recorded it)
        self.trained_on: list[dict] | None = []

    def _bert_style_init(self) -> None:
        """docs/method.md §10.3 step 4: Linear and Embedding weights N(0, 0.02), zero biases (before loading)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(
        cls,
        clip_path: str | os.PathLike | None,
        init_model: str | os.PathLike | None = None,
        config: T2VLPConfig | None = None,
        trust_checkpoint: bool = False,
        clip_model: str | None = None,
        recorded: dict | None = None,
    ) -> T2VLP:
        """Sizes from the CLIP checkpoint, CLIP initialisation (docs/method.md §10.3), then `init_model` on top
        (`trust_checkpoint`: see `read_model_checkpoint`). The backbone (modules/backbones.py) is `clip_model`
        (open_clip's architecture name), else the one `recorded` (a resumed run's) or `init_model` records, else
        OpenAI's layout with QuickGELU. Without `clip_path`, a complete `init_model` (a downstream checkpoint)
        supplies the CLIP weights itself."""
        init_state, init_settings = (read_model_checkpoint(init_model, trust=trust_checkpoint) if init_model
                                     else (None, {}))
        clip_from_init = clip_path is None
        if clip_from_init:
            if init_state is None:
                raise CheckpointError("no CLIP file and no --init_model: nothing to build the model from")
            clip_path = init_model
            clip_state = clip_weights_of(init_state)
            if "visual.conv1.weight" not in clip_state:
                raise CheckpointError(_needs_clip(init_model, "the CLIP towers"))
        else:
            clip_state = read_clip_state_dict(clip_path)
        try:
            weights = CLIPConfig.from_state_dict(clip_state)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{clip_path} is not a CLIP model in OpenAI's layout "
                                  f"({str(error).strip(chr(39))})") from None
        recorded_in = "the run being resumed" if recorded is not None else init_model
        clip_config = resolve_backbone(weights, clip_model,
                                       recorded if recorded is not None else init_settings, clip_path, recorded_in)
        model = cls(clip_config, config)
        if init_state is not None:
            check_init_coverage(model, init_state, init_model)
        state = init_state_from_clip(
            clip_state, init_state, clip_config.vision_layers, model.config.tube_layers,
            with_fusion=model.config.with_fusion,
        )
        if clip_from_init:
            _require_complete(model, init_state, init_model)
        load_state_dict_checked(model, state)
        model.init_keys = frozenset(init_state or ())
        if init_model:
            history = init_settings.get("trained_on")
            model.trained_on = [dict(run) for run in history] if isinstance(history, list) else None
        logger.info(
            "built T2VLP from %s%s on %s: %s, %s",
            clip_path,
            f" + {init_model}" if init_model else "",
            describe(clip_config),
            clip_config,
            model.config,
        )
        return model

    def model_settings(self) -> dict:
        """What this model's checkpoints record of it (the backbone; the classifier's answers; what it was trained
        on), so that a later stage or predict.py rebuilds the same network and reads its outputs the same way, and
        an evaluation can say whether it is zero-shot."""
        return {**backbone_settings(self.clip_config), **({"answers": list(self.answers)} if self.answers else {}),
                "trained_on": self.trained_on}

    @property
    def image_resolution(self) -> int:
        return self.clip_config.image_resolution

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask [B, L] -> (EOT feature [B, D], all token states [B, L, D]), fp32."""
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, L]"
            )
        if input_ids.shape[1] > self.clip_config.context_length:
            raise ValueError(
                f"text length {input_ids.shape[1]} exceeds the CLIP context length {self.clip_config.context_length}"
            )
        tokens = encode_text_tokens(self.clip, input_ids).float()
        eot = tokens[torch.arange(tokens.shape[0], device=tokens.device), input_ids.argmax(dim=-1)]
        return eot, tokens

    def encode_video(
        self, video: torch.Tensor, video_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised video [B, T, 3, H, W], mask [B, T] -> (frame features [B, T, D], tubes [B, K, D]), fp32.

        `video_mask` is not used inside the encoder: as in the original, padded frames take part in the joint
        attention and the tube head mean (docs/method.md §11.2); it matters for meanP pooling.
        """
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"expected video [B, T, 3, H, W], got {tuple(video.shape)}")
        batch, num_frames = video.shape[:2]
        if tuple(video_mask.shape) != (batch, num_frames):
            raise ValueError(
                f"video_mask {tuple(video_mask.shape)} does not match video [B, T] = {(batch, num_frames)}"
            )
        frames, middle = self.clip.visual.forward_frames(
            video.reshape(batch * num_frames, *video.shape[2:]), num_frames, self.config.split_layer
        )
        if self.config.detach_tube_input:
            middle = middle.detach()
        sequences = tube_sequences(middle, num_frames, self.clip.centers.to(middle.dtype))
        tubes = encode_tubes(self.clip.local_visual, sequences, self.config.num_centers)
        return frames.reshape(batch, num_frames, -1).float(), tubes.float()

    def text_side_centers(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        projected = self.clip.fusion_proj_center(self.clip.centers)
        return text_side_centers(projected, text_tokens, attention_mask)

    def alignment_loss(
        self, text_tokens: torch.Tensor, attention_mask: torch.Tensor, tubes: torch.Tensor
    ) -> torch.Tensor:
        return local_alignment_loss(self.text_side_centers(text_tokens, attention_mask), tubes)

    def similarity(
        self, text_eot: torch.Tensor, frames: torch.Tensor, video_mask: torch.Tensor
    ) -> torch.Tensor:
        """meanP logits [Bt, Bv] scaled by exp(logit_scale)."""
        return meanp_logits(text_eot, frames, video_mask, self.clip.logit_scale)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        gather: Gather | None = None,
    ) -> dict[str, torch.Tensor]:
        """Stage-1 losses (docs/method.md §5): contrastive over the gathered batch + local alignment."""
        text_eot, text_tokens = self.encode_text(input_ids, attention_mask)
        frames, tubes = self.encode_video(video, video_mask)
        if gather is not None:
            text_eot, frames, video_mask = gather(text_eot), gather(frames), gather(video_mask)
        sim_loss = symmetric_contrastive_loss(self.similarity(text_eot, frames, video_mask))
        align_loss = self.alignment_loss(text_tokens, attention_mask, tubes)
        return {
            "loss": sim_loss + align_loss,
            "sim_loss": sim_loss.detach(),
            "align_loss": align_loss.detach(),
        }

    # ------------------------------------------------------------------------------------------ fusion API

    def _require_fusion(self) -> None:
        if not self.config.with_fusion:
            raise RuntimeError("this model has no fusion encoder: build it with T2VLPConfig(with_fusion=True)")

    def fuse(
        self,
        frames: torch.Tensor,
        video_mask: torch.Tensor,
        tubes: torch.Tensor,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        causal_text: bool = False,
        answer_slot: bool = False,
    ) -> torch.Tensor:
        """Fusion states [B, 1 + T + K + L (+1), D], fp32 (docs/method.md §6.2, §6.4, §7c).

        Layout: video-sep (masked mean of the frame features), frames, tubes, text states, and with
        `answer_slot` a zero vector. Keys: frames by `video_mask`, text by `attention_mask`, tubes always; the
        video-sep follows frame 0, or is always valid with `answer_slot`. `causal_text` applies the prefix mask:
        visual rows blind to text, text causal.
        """
        self._require_fusion()
        sequence, key_valid = fusion_inputs(frames, video_mask, tubes, text_tokens, attention_mask, answer_slot)
        visual_length = 1 + frames.shape[1] + tubes.shape[1]
        attn_mask = fusion_attention_mask(key_valid, visual_length, causal_text)
        return run_fusion(self.clip, sequence, attn_mask, self.config.fusion_layers).float()

    def match_logits(
        self,
        frames: torch.Tensor,
        video_mask: torch.Tensor,
        tubes: torch.Tensor,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        group_size: int | None = None,
    ) -> torch.Tensor:
        """[unmatch, match] logits [B, 2] of each (video, text) pair (docs/method.md §6.4 VTM), fp32.

        Bidirectional fusion; the video head is the state at position 0, the text head the state at the last
        valid text position. Text heads are normalised per feature over each group of `group_size` consecutive
        pairs (default: the whole call), as the original did, or per pair with `match_norm="pair"`.
        """
        states = self.fuse(frames, video_mask, tubes, text_tokens, attention_mask)
        last_text = 1 + frames.shape[1] + tubes.shape[1] + attention_mask.long().sum(dim=1) - 1
        rows = torch.arange(states.shape[0], device=states.device)
        with torch.autocast(device_type=states.device.type, enabled=False):
            video_head = states[:, 0]
            video_head = video_head / video_head.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            text_head = normalize_text_heads(states[rows, last_text], group_size, self.config.match_norm)
            return bilinear_match_logits(
                self.clip, video_head, text_head, self.config.head_dropout, self.training
            )

    def token_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Tied vocabulary head [..., D] -> [..., vocab]: dropout(h) · P · Eᵀ + b (docs/method.md §6.4), fp32."""
        self._require_fusion()
        clip = self.clip
        hidden = F.dropout(states, self.config.head_dropout, self.training)
        projected = hidden @ clip.fusion_proj_embedding.to(hidden.dtype)
        logits = projected @ clip.token_embedding.weight.to(projected.dtype).t()
        return logits.float() + clip.fusion_logit_bias.float()

    def answer_logits(self, answer_states: torch.Tensor, head: str = "classifier") -> torch.Tensor:
        """QA logits from the fusion states at the answer slot [..., D] (docs/method.md §7c): "first_token" is the tied
        vocabulary head (the original's protocol: the label is the answer's first BPE id); "classifier" the answer
        vocabulary head (`modules/answer_head.py`). Dropout at the head's rate in train mode; fp32."""
        if head == "first_token":
            return self.token_logits(answer_states)
        if head != "classifier":
            raise ValueError(f"head must be 'classifier' or 'first_token', got {head!r}")
        if not self.config.num_answers:
            raise RuntimeError("this model has no answer classifier: build it with T2VLPConfig(num_answers=N)")
        hidden = F.dropout(answer_states, self.config.head_dropout, self.training)
        return self.answer_head(hidden @ self.clip.fusion_proj_embedding.to(hidden.dtype))

    def init_answer_head(self, answer_pieces: list[list[int]]) -> None:
        """Start the answer classifier from the tied token head (see `AnswerClassifier.init_from_token_head`)."""
        self.answer_head.init_from_token_head(self.clip.token_embedding.weight, self.clip.fusion_logit_bias,
                                              answer_pieces)
