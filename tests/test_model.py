"""The model core: CLIP parity, checkpoint layout and loading, and the properties the method implies."""

from __future__ import annotations

import logging
import re
import warnings

import open_clip
import pytest
import torch
from open_clip.model import CLIP as OpenClipCLIP
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from modules.checkpoint import (
    CheckpointError,
    init_state_from_clip,
    load_state_dict_checked,
    original_format_state_dict,
    read_clip_state_dict,
    write_random_clip_checkpoint,
)
from modules.clip import CLIP, CLIPConfig
from modules.model import T2VLP, T2VLPConfig
from tests.model_helpers import TINY_CLIP, random_text, random_video


def open_clip_reference(config: CLIPConfig) -> OpenClipCLIP:
    """open_clip's OpenAI-architecture CLIP (QuickGELU, fp32) with the given sizes."""
    return OpenClipCLIP(
        config.embed_dim,
        vision_cfg=CLIPVisionCfg(
            layers=config.vision_layers,
            width=config.vision_width,
            patch_size=config.vision_patch_size,
            image_size=config.image_resolution,
        ),
        text_cfg=CLIPTextCfg(
            context_length=config.context_length,
            vocab_size=config.vocab_size,
            width=config.transformer_width,
            heads=config.transformer_heads,
            layers=config.transformer_layers,
        ),
        quick_gelu=True,
    ).eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory):
    return write_random_clip_checkpoint(tmp_path_factory.mktemp("clip") / "tiny.pt", TINY_CLIP, seed=1)


@pytest.fixture()
def tiny_model(tiny_clip_path) -> T2VLP:
    torch.manual_seed(0)
    return T2VLP.from_pretrained(tiny_clip_path).eval()


# 1. numerical parity with open_clip at full ViT-B/16 shapes ------------------------------------------------


@pytest.mark.slow
def test_clip_towers_match_open_clip_at_vit_b16_shapes():
    torch.manual_seed(0)
    config = CLIPConfig()  # ViT-B/16
    ours = CLIP(config).eval()
    state = ours.state_dict()
    reference = open_clip_reference(config)
    result = reference.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == []

    images = torch.randn(1, 3, 224, 224)
    text = open_clip.tokenize(["a red circle moves to the left", "two dogs play in the snow"])
    with torch.no_grad():
        image_error = relative_error(ours.encode_image(images), reference.encode_image(images))
        text_error = relative_error(ours.encode_text(text), reference.encode_text(text))
    assert image_error <= 1e-4
    assert text_error <= 1e-4


def test_t2vlp_single_frame_video_is_plain_clip(tiny_model):
    """T = 1: joint attention over one frame is per-frame attention, so frame features are CLIP's."""
    reference = open_clip_reference(TINY_CLIP)
    clip_keys = {k.removeprefix("clip."): v for k, v in tiny_model.state_dict().items()}
    reference.load_state_dict(clip_keys, strict=False)
    video = random_video(2, 1, 32)
    ids, mask = random_text(2, 16, [5, 9])
    with torch.no_grad():
        frames, _ = tiny_model.encode_video(video, torch.ones(2, 1))
        eot, _ = tiny_model.encode_text(ids, mask)
        assert relative_error(frames[:, 0], reference.encode_image(video[:, 0])) <= 1e-5
        padded = torch.zeros(2, 77, dtype=torch.long)
        padded[:, :16] = ids
        assert relative_error(eot, reference.encode_text(padded)) <= 1e-5


# 2. a real TorchScript archive in OpenAI's key layout -------------------------------------------------------


def test_torchscript_archive_loads_through_from_pretrained(tmp_path):
    torch.manual_seed(3)
    reference = open_clip_reference(TINY_CLIP)
    traced = torch.jit.trace_module(
        reference,
        {"encode_image": torch.randn(2, 3, 32, 32), "encode_text": torch.randint(0, 49408, (2, 77))},
    )
    archive = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.jit.save is deprecated" (Future- or DeprecationWarning by version)
        torch.jit.save(traced, str(archive))

    model = T2VLP.from_pretrained(archive).eval()
    assert model.clip_config == TINY_CLIP
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        frames, _ = model.encode_video(images[:, None], torch.ones(3, 1))
        assert relative_error(frames[:, 0], reference.encode_image(images)) <= 1e-5
    torch.testing.assert_close(
        model.state_dict()["clip.local_visual.transformer.resblocks.0.mlp.c_fc.weight"],
        reference.state_dict()["visual.transformer.resblocks.2.mlp.c_fc.weight"],
    )


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="neither a TorchScript archive nor a torch-saved state dict"):
        read_clip_state_dict(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        read_clip_state_dict(tmp_path / "missing.pt")
    torch.save({"model_state_dict": {"x": torch.zeros(2)}}, tmp_path / "not_clip.pt")
    with pytest.raises(CheckpointError, match="not_clip.pt is not a CLIP model in OpenAI's layout .*visual.conv1.weight"):
        T2VLP.from_pretrained(tmp_path / "not_clip.pt")


# 3. the stage-1 key set of docs/method.md §10.1 --------------------------------------------------------------------


def expected_stage1_shapes() -> dict[str, tuple[int, ...]]:
    """docs/method.md §10.1 for ViT-B/16, written out from the table (not from the model)."""

    def blocks(prefix: str, count: int, width: int) -> dict[str, tuple[int, ...]]:
        shapes = {
            "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width),
            "attn.out_proj.bias": (width,),
            "ln_1.weight": (width,),
            "ln_1.bias": (width,),
            "mlp.c_fc.weight": (4 * width, width),
            "mlp.c_fc.bias": (4 * width,),
            "mlp.c_proj.weight": (width, 4 * width),
            "mlp.c_proj.bias": (width,),
            "ln_2.weight": (width,),
            "ln_2.bias": (width,),
        }
        return {f"{prefix}.resblocks.{i}.{k}": v for i in range(count) for k, v in shapes.items()}

    expected = {}
    for tower in ("visual", "local_visual"):
        expected.update(
            {
                f"{tower}.conv1.weight": (768, 3, 16, 16),
                f"{tower}.class_embedding": (768,),
                f"{tower}.positional_embedding": (197, 768),
                f"{tower}.ln_pre.weight": (768,),
                f"{tower}.ln_pre.bias": (768,),
                f"{tower}.ln_post.weight": (768,),
                f"{tower}.ln_post.bias": (768,),
                f"{tower}.proj": (768, 512),
            }
        )
    expected.update(blocks("visual.transformer", 12, 768))
    expected.update(blocks("local_visual.transformer", 2, 768))
    expected.update(blocks("transformer", 12, 512))
    expected.update(
        {
            "token_embedding.weight": (49408, 512),
            "positional_embedding": (77, 512),
            "ln_final.weight": (512,),
            "ln_final.bias": (512,),
            "text_projection": (512, 512),
            "logit_scale": (),
            "fusion_center": (1, 1, 8, 768),
            "fusion_proj_center.weight": (512, 768),
            "fusion_proj_center.bias": (512,),
            "lm_head.weight": (512, 512),
            "lm_head.bias": (512,),
        }
    )
    return {"clip." + k: v for k, v in expected.items()}


def test_stage1_state_dict_matches_the_original_layout():
    with torch.device("meta"):
        model = T2VLP(CLIPConfig())
    assert model.config.split_layer == 10 and model.config.tube_layers == 2 and model.config.num_centers == 8
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected_stage1_shapes()


def test_clip_initialisation_and_missing_keys(tiny_clip_path, caplog):
    clip_state = read_clip_state_dict(tiny_clip_path)
    state = init_state_from_clip(clip_state, None, TINY_CLIP.vision_layers, tube_layers=2)
    # local_visual blocks 0/1 are copies of the last two ViT blocks, its ln_post/proj of the ViT's
    torch.testing.assert_close(
        state["clip.local_visual.transformer.resblocks.1.attn.in_proj_weight"],
        clip_state["visual.transformer.resblocks.3.attn.in_proj_weight"],
    )
    torch.testing.assert_close(state["clip.local_visual.proj"], clip_state["visual.proj"])
    model = T2VLP(TINY_CLIP)
    with caplog.at_level(logging.INFO, logger="t2vlp.model"):
        missing, unexpected = load_state_dict_checked(model, state)
    assert missing == [
        "clip.fusion_center",
        "clip.fusion_proj_center.bias",
        "clip.fusion_proj_center.weight",
        "clip.lm_head.bias",
        "clip.lm_head.weight",
    ]
    assert unexpected == []
    assert "kept at their initialisation" in caplog.text
    state["clip.visual.proj"] = torch.zeros(3, 3)
    with pytest.raises(
        CheckpointError, match=re.escape("clip.visual.proj: checkpoint (3, 3) vs model (64, 32)")
    ):
        load_state_dict_checked(model, state)


# 4. round trip through an original-format file --------------------------------------------------------------


def test_original_format_round_trip(tiny_model, tiny_clip_path, tmp_path):
    state = original_format_state_dict(tiny_model, half_module=tiny_model.clip)
    assert state["clip.visual.conv1.weight"].dtype == torch.float16
    assert state["clip.visual.transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    assert state["clip.local_visual.proj"].dtype == torch.float16
    assert state["clip.text_projection"].dtype == torch.float16
    assert state["clip.fusion_proj_center.weight"].dtype == torch.float16
    assert state["clip.lm_head.weight"].dtype == torch.float16
    for fp32_key in (
        "clip.visual.ln_pre.weight",
        "clip.fusion_center",
        "clip.logit_scale",
        "clip.token_embedding.weight",
        "clip.visual.class_embedding",
    ):
        assert state[fp32_key].dtype == torch.float32, fp32_key
    path = tmp_path / "pytorch_model.bin.3"
    torch.save({"global_step": 3, "model_state_dict": state}, path)

    reloaded = T2VLP.from_pretrained(tiny_clip_path, init_model=path).eval()
    missing, unexpected = load_state_dict_checked(reloaded, state)
    assert missing == [] and unexpected == []
    ids, mask = random_text(2, 12, [4, 12])
    video, video_mask = random_video(2, 3, 32), torch.ones(2, 3)
    with torch.no_grad():
        for ours, theirs in zip(
            tiny_model.encode_video(video, video_mask), reloaded.encode_video(video, video_mask)
        ):
            assert relative_error(theirs, ours) < 5e-3
        for ours, theirs in zip(tiny_model.encode_text(ids, mask), reloaded.encode_text(ids, mask)):
            assert relative_error(theirs, ours) < 5e-3
    assert all(v.dtype == torch.float32 for v in reloaded.state_dict().values())


# 5. properties the method implies ---------------------------------------------------------------------------


def test_tubes_and_pooled_frames_ignore_frame_order(tiny_model):
    video, video_mask = random_video(2, 5, 32, seed=4), torch.ones(2, 5)
    order = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        frames, tubes = tiny_model.encode_video(video, video_mask)
        frames_shuffled, tubes_shuffled = tiny_model.encode_video(video[:, order], video_mask)
    torch.testing.assert_close(tubes_shuffled, tubes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(frames_shuffled, frames[:, order], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(frames_shuffled.mean(1), frames.mean(1), rtol=1e-4, atol=1e-5)


def test_clip_outputs_do_not_depend_on_the_rest_of_the_batch(tiny_model):
    video, video_mask = random_video(3, 4, 32, seed=5), torch.ones(3, 4)
    ids, mask = random_text(3, 10, [3, 10, 6])
    with torch.no_grad():
        frames, tubes = tiny_model.encode_video(video, video_mask)
        frames_alone, tubes_alone = tiny_model.encode_video(video[1:2], video_mask[1:2])
        eot, tokens = tiny_model.encode_text(ids, mask)
        eot_alone, tokens_alone = tiny_model.encode_text(ids[1:2], mask[1:2])
    torch.testing.assert_close(frames_alone, frames[1:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tubes_alone, tubes[1:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eot_alone, eot[1:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tokens_alone, tokens[1:2], rtol=1e-4, atol=1e-5)


def test_padded_text_does_not_move_the_text_side_centers(tiny_model):
    ids, mask = random_text(2, 12, [5, 7], seed=6)
    noisy = ids.clone()
    noisy[mask == 0] = torch.randint(1, 49000, (int((mask == 0).sum()),))
    with torch.no_grad():
        _, tokens = tiny_model.encode_text(ids, mask)
        _, noisy_tokens = tiny_model.encode_text(noisy, mask)
        assert not torch.allclose(tokens[mask == 0], noisy_tokens[mask == 0])
        centers = tiny_model.text_side_centers(tokens, mask)
        noisy_centers = tiny_model.text_side_centers(noisy_tokens, mask)
        # even arbitrary states at padded positions are ignored
        scrambled = tokens.clone()
        scrambled[mask == 0] = 1e3
        scrambled_centers = tiny_model.text_side_centers(scrambled, mask)
    torch.testing.assert_close(noisy_centers, centers)
    torch.testing.assert_close(scrambled_centers, centers)


def test_alignment_loss_reaches_every_tube_parameter(tiny_model):
    tiny_model.train()
    ids, mask = random_text(2, 8, [5, 8])
    video = random_video(2, 3, 32)
    _, tokens = tiny_model.encode_text(ids, mask)
    _, tubes = tiny_model.encode_video(video, torch.ones(2, 3))
    tiny_model.alignment_loss(tokens, mask, tubes).backward()
    tube_path = [
        name
        for name, _ in tiny_model.named_parameters()
        if name.startswith(
            (
                "clip.fusion_",
                "clip.local_visual.transformer",
                "clip.local_visual.ln_post",
                "clip.local_visual.proj",
                "clip.visual.transformer.resblocks.0.",
                "clip.visual.transformer.resblocks.1.",
                "clip.visual.conv1",
                "clip.transformer.resblocks",
            )
        )
    ]
    assert len(tube_path) > 60
    params = dict(tiny_model.named_parameters())
    without_gradient = [n for n in tube_path if params[n].grad is None or params[n].grad.abs().sum() == 0]
    assert without_gradient == []
    # blocks from the split on see no alignment gradient: the tubes read the stream before them
    assert params["clip.visual.transformer.resblocks.3.mlp.c_fc.weight"].grad is None


def test_detached_tube_input_stops_gradient_into_the_vit(tiny_clip_path):
    model = T2VLP.from_pretrained(tiny_clip_path, config=T2VLPConfig(detach_tube_input=True))
    _, tubes = model.encode_video(random_video(1, 2, 32), torch.ones(1, 2))
    tubes.sum().backward()
    assert model.clip.visual.conv1.weight.grad is None
    assert model.clip.local_visual.transformer.resblocks[0].attn.in_proj_weight.grad is not None


def test_stage1_forward_losses(tiny_model):
    ids, mask = random_text(3, 10, [4, 10, 7])
    out = tiny_model(ids, mask, random_video(3, 4, 32), torch.ones(3, 4))
    assert set(out) == {"loss", "sim_loss", "align_loss"}
    torch.testing.assert_close(out["loss"].detach(), out["sim_loss"] + out["align_loss"])
    assert out["sim_loss"] > 0 and out["align_loss"] > 0


# bad input -------------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors(tiny_model):
    ids, mask = random_text(2, 8, [4, 8])
    with pytest.raises(ValueError, match=r"expected video \[B, T, 3, H, W\]"):
        tiny_model.encode_video(torch.zeros(2, 3, 32, 32), torch.ones(2, 1))
    with pytest.raises(ValueError, match="does not match the model's resolution 32x32"):
        tiny_model.encode_video(torch.zeros(1, 2, 3, 48, 48), torch.ones(1, 2))
    with pytest.raises(ValueError, match="video_mask"):
        tiny_model.encode_video(torch.zeros(1, 2, 3, 32, 32), torch.ones(1, 3))
    with pytest.raises(ValueError, match="exceeds the CLIP context length 77"):
        tiny_model.encode_text(torch.zeros(1, 78, dtype=torch.long), torch.ones(1, 78))
    with pytest.raises(ValueError, match="must both be"):
        tiny_model.encode_text(ids, mask[:, :5])
    with pytest.raises(ValueError, match="split_layer 9 is outside"):
        T2VLP(TINY_CLIP, T2VLPConfig(split_layer=9))
