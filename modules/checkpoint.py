"""Reading CLIP and T2VLP checkpoints, initialising from CLIP, writing original-format files (docs/method.md §10)."""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from modules.clip import CLIP, Attention, CLIPConfig
from modules.errors import InputError

logger = logging.getLogger("t2vlp.model")

# Entries of OpenAI's TorchScript state dict that are metadata, not parameters.
CLIP_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint file that cannot be used, with the reason and the path."""


def read_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """CLIP weights in OpenAI's key layout: a TorchScript archive (e.g. `ViT-B-16.pt`), a plain state dict file
    (e.g. open_clip's `open_clip_pytorch_model.bin`) or a `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"CLIP checkpoint not found: {path} (fetch ViT-B/16 with CLIP-modules/fetch_clip.py)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():
            # "torch.jit.load is deprecated" (a Future- or DeprecationWarning by version): OpenAI ships TorchScript
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except (RuntimeError, ValueError, zipfile.BadZipFile):
        state = _torch_load(path)
    state = _unwrap_state_dict(state, path)
    return {k: v for k, v in state.items() if k not in CLIP_METADATA_KEYS}


def read_model_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a T2VLP checkpoint (see `read_model_checkpoint`)."""
    return read_model_checkpoint(path, trust)[0]


def read_model_checkpoint(path: str | os.PathLike, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, recorded model settings) of a T2VLP checkpoint (original or ours): a state dict, or
    `{"model_state_dict": ..., "model_settings": ...}` around one (the original's loader reads only
    `model_state_dict`); a `restore.bin` of this project gives its model weights. Files are loaded with
    `weights_only=True` (tensors and plain containers: nothing in them can run code); a restore.bin of an earlier
    version of this project, which needs an unrestricted load, is read only with `trust` (--trust_checkpoint).
    The settings are {} for a checkpoint that records none (the original's)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    try:
        state = _torch_load(path)
    except CheckpointError:
        if not path.name.startswith("restore.bin"):
            raise
        if not trust:
            raise CheckpointError(f"{path} is a restore.bin of an earlier version of this project, which only an "
                                  f"unrestricted load (one that can run code) reads: rerun once with "
                                  f"--trust_checkpoint if the file is yours") from None
        logger.warning("%s: loaded without restrictions (--trust_checkpoint)", path)
        state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, Mapping) and "optim_state_dict" in state:
        logger.info("%s is a restore.bin: taking its model weights only (to resume a run, use --resume_model)", path)
    return _unwrap_state_dict(state, path), _recorded_settings(state)


def clip_weights_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP part of a T2VLP state dict (its `clip.*` keys), in a CLIP file's key layout."""
    return {key[len("clip."):]: value for key, value in state.items() if key.startswith("clip.")}


def read_model_settings(path: str | os.PathLike) -> dict:
    """The model settings a checkpoint of this project records ({} for any other file), read without loading its
    tensors (memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a file of ours in the current format: it records nothing
        return {}
    return _recorded_settings(state)


def _recorded_settings(state: object) -> dict:
    settings = state.get("model_settings") if isinstance(state, Mapping) else None
    return dict(settings) if isinstance(settings, Mapping) else {}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({error})") from error


# Keys a model may lack in its --init_model because the stage that produces them is the one being started:
# the fusion encoder's heads and visual_linear (stage 2 from a stage-1 checkpoint; docs/method.md §10.3), and the fusion
# blocks / positional table, which come from the CLIP file.
NEW_IN_STAGE2 = (
    "clip.fusion_proj_embedding", "clip.fusion_logit_bias", "clip.fusion_match_matrix", "clip.fusion_unmatch_matrix",
    "visual_linear.", "clip.fusion_transformer.", "clip.fusion_positional_embedding",
)


def check_init_coverage(model: nn.Module, init_state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse an --init_model that supplies none of the model's weights; summarise what it supplies, at WARNING
    when weights that no new stage explains are missing (they keep the CLIP or random initialisation)."""
    own = model.state_dict()
    supplied = [key for key in init_state if key in own]
    if not supplied:
        example = ", ".join(list(init_state)[:3])
        raise CheckpointError(
            f"--init_model {path} supplies none of the model's {len(own)} weights (its keys look like {example}): "
            f"it is not a T2VLP checkpoint; a CLIP file goes to --visual_pretrain_path"
        )
    absent = [key for key in own if key not in init_state]
    unexplained = [key for key in absent if not key.startswith(NEW_IN_STAGE2)]
    unused = [key for key in init_state if key not in own]
    summary = (f"--init_model {path}: {len(supplied)} of {len(own)} weights loaded, {len(absent)} not in it, "
               f"{len(unused)} in it unused")
    if unexplained:
        logger.warning("%s; %d missing weights keep their CLIP/random initialisation: %s%s", summary,
                       len(unexplained), ", ".join(unexplained[:8]), " ..." if len(unexplained) > 8 else "")
    else:
        logger.info(summary)


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means "not a checkpoint we can read"
        raise CheckpointError(
            f"{path} is neither a TorchScript archive nor a torch-saved state dict ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for wrapper in ("model_state_dict", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            if key in CLIP_METADATA_KEYS:
                continue
            raise CheckpointError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        state[key.removeprefix("module.")] = value
    return state


def init_state_from_clip(
    clip_state: Mapping[str, torch.Tensor],
    init_state: Mapping[str, torch.Tensor] | None,
    vision_layers: int,
    tube_layers: int,
    with_fusion: bool = False,
) -> dict[str, torch.Tensor]:
    """Steps 1-3 of docs/method.md §10.3: the initial state dict of the model.

    Starts from `init_state`; adds every CLIP key under `clip.` where absent; with `with_fusion` also the
    fusion encoder's blocks and positional table from the *original* CLIP text tower (`transformer.*`,
    `positional_embedding` of `clip_state`, not a stage-1-tuned tower), where absent; then fills the tube
    encoder (`clip.local_visual.*`) from the image tower: its non-block parts from `visual.*`, its blocks from
    the last `tube_layers` ViT blocks (blocks 10 and 11 of ViT-B/16). Present keys always win.
    """
    state = dict(init_state or {})
    for key, value in clip_state.items():
        state.setdefault("clip." + key, value)
        if with_fusion and key.startswith("transformer."):
            state.setdefault("clip.fusion_" + key, value)
    if with_fusion and "positional_embedding" in clip_state:
        state.setdefault("clip.fusion_positional_embedding", clip_state["positional_embedding"])
    first_copied = vision_layers - tube_layers
    for key in list(state):
        if not key.startswith("clip.visual."):
            continue
        rest = key[len("clip.visual.") :]
        if not rest.startswith("transformer."):
            state.setdefault("clip.local_visual." + rest, state[key])
            continue
        block, _, param = rest[len("transformer.resblocks.") :].partition(".")
        if int(block) >= first_copied:
            target = f"clip.local_visual.transformer.resblocks.{int(block) - first_copied}.{param}"
            state.setdefault(target, state[key])
    return state


def load_state_dict_checked(
    model: nn.Module, state: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """Load leniently: missing keys keep their init, unexpected keys are ignored, both are logged;
    tensors are cast to the model's dtypes; any shape mismatch is an error naming every offending key."""
    own = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and value.shape != own[key].shape
    ]
    if mismatched:
        raise CheckpointError("shape mismatch between checkpoint and model:\n  " + "\n  ".join(mismatched))
    cast = {key: value.to(own[key].dtype) for key, value in state.items() if key in own}
    result = model.load_state_dict(cast, strict=False)
    unexpected = sorted(key for key in state if key not in own)
    missing = sorted(result.missing_keys)
    if missing:
        logger.info(
            "weights not found in the checkpoint, kept at their initialisation: %s", ", ".join(missing)
        )
    if unexpected:
        logger.info("weights in the checkpoint that the model does not use: %s", ", ".join(unexpected))
    return missing, unexpected


def half_precision_keys(module: nn.Module) -> set[str]:
    """Keys CLIP's `convert_weights` stores in fp16 (docs/method.md §2.5): Conv/Linear weights and biases,
    packed attention projections, and the `proj`/`text_projection` matrices."""
    keys = set()
    for name, child in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(child, nn.Conv2d | nn.Linear):
            keys.update(prefix + p for p, _ in child.named_parameters(recurse=False))
        elif isinstance(child, Attention):
            keys.update((prefix + "in_proj_weight", prefix + "in_proj_bias"))
        for param_name, _ in child.named_parameters(recurse=False):
            if param_name in ("proj", "text_projection"):
                keys.add(prefix + param_name)
    return keys


def original_format_state_dict(
    module: nn.Module, half_module: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with the dtypes the original code stores: fp16 for the tensors of
    `half_precision_keys(half_module)` (default: the whole module), fp32 for the rest."""
    half_module = module if half_module is None else half_module
    prefix = next((f"{n}." for n, m in module.named_modules() if m is half_module and n), "")
    half = {prefix + key for key in half_precision_keys(half_module)}
    return {
        key: value.detach().to("cpu", torch.float16 if key in half else torch.float32).clone()
        for key, value in module.state_dict().items()
    }


def write_random_clip_checkpoint(path: str | os.PathLike, config: CLIPConfig, seed: int = 0) -> Path:
    """Write a randomly initialised CLIP in OpenAI's state-dict layout and dtypes (with the metadata
    entries OpenAI's archives carry). Used for the demo and tests: real weights are the user's to fetch."""
    torch.manual_seed(seed)
    clip = CLIP(config)
    state = original_format_state_dict(clip)
    state["input_resolution"] = torch.tensor(config.image_resolution)
    state["context_length"] = torch.tensor(config.context_length)
    state["vocab_size"] = torch.tensor(config.vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path
