"""open_clip backbones: features equal to open_clip's own forward, the backbone recorded in every checkpoint and
rebuilt without flags by later stages and predict.py, unsupported architectures and wrong weights refused."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

import main_task_clip
import main_task_fusion
from inference.trained_model import load_trained_model
from inference.video_index import encode_videos
from modules.backbones import backbone_config, layout_problems
from modules.checkpoint import read_model_settings
from modules.errors import ModelConfigError
from modules.model import T2VLP, T2VLPConfig
from tests.stage1_helpers import stage1_argv, stage2_argv

ROOT = Path(__file__).resolve().parents[1]
# A tiny open_clip architecture in OpenAI's layout with GELU (as open_clip's ViT-B-16), registered with open_clip.
TINY_GELU = "t2vlp-test-tiny-gelu"
TINY_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 2}}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


@pytest.fixture(scope="module")
def tiny_gelu_weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("open_clip")
    (folder / f"{TINY_GELU}.json").write_text(json.dumps(TINY_CONFIG), encoding="utf-8")
    open_clip.add_model_config(folder / f"{TINY_GELU}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_GELU, pretrained=None)
    path = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path


def open_clip_model(name: str, weights: Path) -> nn.Module:
    model = open_clip.create_model(name, pretrained=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def compare_with_open_clip(name: str, weights: Path, clip_model: str | None) -> tuple[float, float]:
    """(image, text) relative errors of T2VLP's one-frame video feature and EOT feature against open_clip's
    encode_image / encode_text on the same weights."""
    reference = open_clip_model(name, weights)
    ours = T2VLP.from_pretrained(weights, clip_model=clip_model).eval()
    size = ours.image_resolution
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = open_clip.tokenize(["a man rides a red bicycle down the hill"])
    with torch.no_grad():
        frames, _ = ours.encode_video(image[:, None], torch.ones(1, 1, dtype=torch.long))
        text, _ = ours.encode_text(ids, (ids > 0).long())
        return (relative_error(frames[:, 0], reference.encode_image(image)),
                relative_error(text, reference.encode_text(ids)))


def test_tiny_open_clip_models_match_open_clip_s_forward(tiny_gelu_weights):
    assert compare_with_open_clip(TINY_GELU, tiny_gelu_weights, TINY_GELU) < (1e-4, 1e-4)
    # Without the name the weights run with OpenAI's QuickGELU: a different network.
    image_error, text_error = compare_with_open_clip(TINY_GELU, tiny_gelu_weights, None)
    assert image_error > 1e-3 and text_error > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-16-quickgelu"])
def test_vit_b16_open_clip_models_match_open_clip_s_forward(name, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), weights)
    assert compare_with_open_clip(name, weights, name) < (1e-4, 1e-4)


def test_safetensors_weights_load_alike(tiny_gelu_weights, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(tiny_gelu_weights, weights_only=True)
    save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / "model.safetensors")
    a = T2VLP.from_pretrained(tiny_gelu_weights, clip_model=TINY_GELU)
    b = T2VLP.from_pretrained(tmp_path / "model.safetensors", clip_model=TINY_GELU)
    ours_a, ours_b = a.state_dict(), b.state_dict()
    assert all(torch.equal(ours_a[f"clip.{key}"], ours_b[f"clip.{key}"]) for key in state)


def test_layouts_other_than_openai_s_vit_are_refused_naming_what_is_supported():
    assert layout_problems(open_clip.get_model_config("ViT-L-14")) == []
    large = backbone_config("ViT-L-14")
    assert (large.vision_width, large.vision_layers, large.vision_patch_size, large.embed_dim, large.quick_gelu) == (
        1024, 24, 14, 768, False)
    assert backbone_config("ViT-L-14-quickgelu").quick_gelu
    for name, reason in [("ViT-B-16-SigLIP", "timm_model_name"), ("ViT-H-14", "vision heads 80 wide"),
                         ("coca_ViT-B-32", "multimodal_cfg"), ("EVA02-B-16", "custom_text"),
                         ("no-such-model", "no architecture of that name")]:
        with pytest.raises(ModelConfigError, match=reason) as raised:
            backbone_config(name)
        assert "ViT-B-16-quickgelu" in str(raised.value) and "\n" not in str(raised.value)


def test_a_tiny_vit_l14_shaped_model_builds_and_encodes():
    """ViT-L/14's layout (patch 14, text width = embedding 768 at full size) at a tiny width: the tube tokens and
    the fusion encoder follow the towers' widths."""
    config = {"embed_dim": 48, "quick_gelu": True,
              "vision_cfg": {"image_size": 28, "layers": 3, "width": 64, "patch_size": 14},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 1, "layers": 2}}
    assert layout_problems(config) == []
    from modules.clip import CLIPConfig

    clip = CLIPConfig(embed_dim=48, image_resolution=28, vision_layers=3, vision_width=64, vision_patch_size=14,
                      transformer_width=48, transformer_layers=2)
    model = T2VLP(clip, T2VLPConfig(with_fusion=True, fusion_layers=2)).eval()
    video = torch.randn(2, 3, 3, 28, 28)
    with torch.no_grad():
        frames, tubes = model.encode_video(video, torch.ones(2, 3, dtype=torch.long))
    assert frames.shape == (2, 3, 48) and tubes.shape == (2, 8, 48)


@pytest.mark.slow
def test_stage1_from_open_clip_weights_is_rebuilt_by_stage2_and_predict_without_the_flag(
        tiny_gelu_weights, small_demo, tmp_path, caplog):
    stage1 = tmp_path / "stage1"
    argv = stage1_argv(small_demo, tiny_gelu_weights, stage1, "--epochs=1", "--max_steps=2",
                       f"--clip_model={TINY_GELU}")
    assert main_task_clip.main(argv) == 0
    checkpoint = stage1 / "ckpt" / "pytorch_model.bin.2"
    assert read_model_settings(checkpoint).items() >= {"clip_model": TINY_GELU, "quick_gelu": False}.items()
    saved = torch.load(checkpoint, weights_only=True)
    assert set(saved) == {"global_step", "model_state_dict", "model_settings"}
    # The original's loader takes `model_state_dict` when present: every weight is there, unchanged.
    explicit = T2VLP.from_pretrained(tiny_gelu_weights, init_model=checkpoint, clip_model=TINY_GELU,
                                     config=T2VLPConfig(split_layer=2, detach_tube_input=True)).eval()
    assert all(torch.equal(saved["model_state_dict"][key], value) for key, value in explicit.state_dict().items())

    # predict.py's loader rebuilds GELU from the checkpoint alone; its index features are the explicit model's.
    trained = load_trained_model(checkpoint, overrides={"max_frames": 3, "split_layer": 2})
    assert trained.model.clip_config.clip_model == TINY_GELU and not trained.model.clip_config.quick_gelu
    videos = sorted(small_demo["videos_dir"].glob("*.mp4"))[:3]
    options = dict(batch_size=2, num_workers=0, device=torch.device("cpu"), precision="fp32")
    indexed, rows, _ = encode_videos(trained, videos, **options)
    trained.model = explicit
    direct, _, _ = encode_videos(trained, videos, **options)
    assert rows == [0, 1, 2]
    np.testing.assert_allclose(indexed["clip_features"], direct["clip_features"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelConfigError, match="contradicts"):
        load_trained_model(checkpoint, clip_model="ViT-B-16-quickgelu")

    # Stage 2 from it, without --clip_model: the fusion encoder copies the text tower with GELU too.
    stage2 = tmp_path / "stage2"
    assert main_task_fusion.main(stage2_argv(small_demo, tiny_gelu_weights, checkpoint, stage2, "--epochs=1",
                                             "--max_steps=1", "--rerank_top_k=0")) == 0
    assert read_model_settings(stage2 / "ckpt" / "pytorch_model.bin.1").items() >= {
        "clip_model": TINY_GELU, "quick_gelu": False, "task": "fusion"}.items()
    rebuilt = T2VLP.from_pretrained(tiny_gelu_weights, init_model=stage2 / "ckpt" / "pytorch_model.bin.1",
                                    config=T2VLPConfig(with_fusion=True, fusion_layers=2))
    activations = {type(block.mlp.gelu) for block in rebuilt.clip.fusion_transformer.resblocks}
    activations |= {type(block.mlp.gelu) for block in rebuilt.clip.local_visual.transformer.resblocks}
    assert activations == {nn.GELU}


@pytest.mark.integration
@pytest.mark.parametrize("clip_model, message", [
    ("ViT-B-16-SigLIP", "is not OpenAI's ViT layout"),
    ("ViT-B-16", "does not hold ViT-B-16 weights: embed_dim 32 (the config says 512)"),
])
def test_an_unsupported_architecture_or_other_weights_are_one_line(clip_model, message, tiny_gelu_weights,
                                                                   small_demo, tmp_path):
    argv = stage1_argv(small_demo, tiny_gelu_weights, tmp_path / "run", f"--clip_model={clip_model}")
    result = subprocess.run([sys.executable, "main_task_clip.py", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_restore_bin_rebuilds_its_backbone(tiny_gelu_weights, small_demo, tmp_path, caplog):
    output = tmp_path / "run"
    assert main_task_clip.main(stage1_argv(small_demo, tiny_gelu_weights, output, "--epochs=1", "--max_steps=1",
                                           f"--clip_model={TINY_GELU}")) == 0
    assert read_model_settings(output / "restore.bin").items() >= {"clip_model": TINY_GELU,
                                                                    "quick_gelu": False}.items()
    with caplog.at_level(logging.INFO, logger="t2vlp"):
        # The same command without the flag resumes the same network (and finds the run finished).
        assert main_task_clip.main(stage1_argv(small_demo, tiny_gelu_weights, output, "--epochs=1",
                                               "--max_steps=1")) == 0
    assert f"open_clip's {TINY_GELU} (GELU)" in caplog.text
