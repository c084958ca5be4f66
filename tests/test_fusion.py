"""The fusion encoder: layout, masks, heads against a direct computation of docs/method.md §6.4, keys and initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.checkpoint import (
    init_state_from_clip,
    load_state_dict_checked,
    original_format_state_dict,
    read_clip_state_dict,
    write_random_clip_checkpoint,
)
from modules.clip import CLIPConfig
from modules.fusion import fusion_attention_mask
from modules.model import T2VLP, T2VLPConfig
from tests.model_helpers import TINY_CLIP, TINY_FUSION_CLIP, random_text, random_video
from tests.test_model import expected_stage1_shapes

K, T, L, D = 8, 3, 7, TINY_FUSION_CLIP.embed_dim


@pytest.fixture(scope="module")
def fusion_clip_path(tmp_path_factory):
    return write_random_clip_checkpoint(tmp_path_factory.mktemp("clip") / "fusion.pt", TINY_FUSION_CLIP, seed=3)


def fusion_model(clip_path, **config) -> T2VLP:
    torch.manual_seed(0)
    settings = {"with_fusion": True, "fusion_layers": 2, **config}
    return T2VLP.from_pretrained(clip_path, config=T2VLPConfig(**settings)).eval()


def random_inputs(batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, T, D, generator=generator)
    video_mask = torch.ones(batch, T, dtype=torch.long)
    video_mask[0, 2:] = 0
    video_mask[1, 0] = 0  # frame 0 padded: the video-sep is a key only with the answer slot
    tubes = torch.randn(batch, K, D, generator=generator)
    tokens = torch.randn(batch, L, D, generator=generator)
    attention_mask = torch.zeros(batch, L, dtype=torch.long)
    for row in range(batch):
        attention_mask[row, : 3 + row % (L - 2)] = 1
    return frames, video_mask, tubes, tokens, attention_mask


# ------------------------------------------------------------------------------------------------ a reference


def reference_fuse(model: T2VLP, frames, video_mask, tubes, tokens, attention_mask, causal_text=False,
                   answer_slot=False):
    """docs/method.md §6.2/§6.4 written out directly: explicit per-head softmax attention with an additive mask."""
    clip = model.clip
    batch = frames.shape[0]
    weights = video_mask.float()[..., None]
    video_sep = (frames * weights).sum(1) / weights.sum(1).clamp(min=1)
    parts = [video_sep[:, None], frames, tubes, tokens]
    valid = [torch.ones(batch, 1) if answer_slot else video_mask[:, :1].float(), video_mask.float(),
             torch.ones(batch, K), attention_mask.float()]
    if answer_slot:
        parts.append(torch.zeros(batch, 1, D))
        valid.append(torch.ones(batch, 1))
    x = torch.cat(parts, 1)
    valid = torch.cat(valid, 1)
    n = x.shape[1]
    x = x + clip.fusion_positional_embedding[:n]
    additive = torch.zeros(batch, n, n)
    additive[valid[:, None, :].expand(batch, n, n) == 0] = -math.inf
    if causal_text:
        visual = 1 + T + K
        for i in range(n):
            for j in range(n):
                if (i < visual and j >= visual) or (i >= visual and j >= visual and j > i):
                    additive[:, i, j] = -math.inf
    for block in clip.fusion_transformer.resblocks[: model.config.fusion_layers]:
        attn = block.attn
        h = F.layer_norm(x, (D,), block.ln_1.weight, block.ln_1.bias, 1e-5)
        q, k, v = (h @ attn.in_proj_weight.t() + attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, n, attn.heads, D // attn.heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // attn.heads) + additive[:, None]
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, D)
        x = x + attn.out_proj(out)
        h = F.layer_norm(x, (D,), block.ln_2.weight, block.ln_2.bias, 1e-5)
        hidden = block.mlp.c_fc(h)
        x = x + block.mlp.c_proj(hidden * torch.sigmoid(1.702 * hidden))
    return x


def reference_match(model: T2VLP, states, attention_mask, groups: list[slice] | None, per_pair: bool):
    """(unmatch, match): v normalised per vector; t per feature over each group of pairs, or per vector."""
    clip = model.clip
    v = states[:, 0] / states[:, 0].norm(dim=-1, keepdim=True)
    last = 1 + T + K + attention_mask.sum(1) - 1
    t = states[torch.arange(states.shape[0]), last]
    if per_pair:
        t_hat = t / t.norm(dim=-1, keepdim=True)
    else:
        t_hat = torch.empty_like(t)
        for group in groups or [slice(0, t.shape[0])]:
            stacked = t[group].T  # [D, n]: the original divides each feature by its norm over the pairs
            t_hat[group] = (stacked / stacked.norm(dim=-1, keepdim=True)).T
    match = torch.diagonal(v @ clip.fusion_match_matrix @ t_hat.T)
    unmatch = torch.diagonal(v @ clip.fusion_unmatch_matrix @ t_hat.T)
    return torch.stack([unmatch, match], -1)


# ------------------------------------------------------------------------------------------------ masks


def test_prefix_mask_visual_rows_are_blind_to_text_and_text_is_causal():
    visual, text = 5, 4
    key_valid = torch.tensor([[True, True, False, True, True, True, True, True, False]])
    allowed = fusion_attention_mask(key_valid, visual, causal_text=True)[0, 0]
    assert not allowed[:visual, visual:].any()  # visual rows never see text
    for row in range(visual, visual + text):
        for col in range(visual, visual + text):
            assert bool(allowed[row, col]) == (col <= row and bool(key_valid[0, col]))
    assert torch.equal(allowed[visual:, :visual], key_valid[0, :visual].expand(text, visual))


@pytest.mark.parametrize("causal", [False, True])
def test_no_row_attends_a_padding_key(causal):
    generator = torch.Generator().manual_seed(1)
    key_valid = torch.rand(6, 15, generator=generator) > 0.3
    key_valid[:, 5] = True  # a tube: always valid
    allowed = fusion_attention_mask(key_valid, visual_length=8, causal_text=causal)[:, 0]
    assert not (allowed & ~key_valid[:, None, :]).any()
    assert allowed.any(dim=-1).all()  # no row is left with nothing to attend


def test_padding_and_padded_frames_do_not_change_valid_states(fusion_clip_path):
    model = fusion_model(fusion_clip_path)
    frames, video_mask, tubes, tokens, attention_mask = random_inputs(3)
    for causal in (False, True):
        states = model.fuse(frames, video_mask, tubes, tokens, attention_mask, causal_text=causal)
        garbage_tokens = torch.where(attention_mask.bool()[..., None], tokens, torch.randn_like(tokens) * 50)
        garbage_frames = torch.where(video_mask.bool()[..., None], frames, torch.randn_like(frames) * 50)
        again = model.fuse(garbage_frames, video_mask, tubes, garbage_tokens, attention_mask, causal_text=causal)
        valid = torch.cat([video_mask[:, :1], video_mask, torch.ones(3, K, dtype=torch.long), attention_mask], 1)
        torch.testing.assert_close(again[valid.bool()], states[valid.bool()])


# ------------------------------------------------------------------------------------------------ the API


@pytest.mark.parametrize("causal_text,answer_slot", [(False, False), (True, False), (False, True)])
def test_fuse_matches_a_direct_computation(fusion_clip_path, causal_text, answer_slot):
    model = fusion_model(fusion_clip_path)
    inputs = random_inputs(4)
    with torch.no_grad():
        ours = model.fuse(*inputs, causal_text=causal_text, answer_slot=answer_slot)
        expected = reference_fuse(model, *inputs, causal_text=causal_text, answer_slot=answer_slot)
    assert ours.shape == (4, 1 + T + K + L + answer_slot, D) and ours.dtype == torch.float32
    valid = torch.cat([torch.ones(4, 1) if answer_slot else inputs[1][:, :1].float(), inputs[1].float(),
                       torch.ones(4, K), inputs[4].float()] + ([torch.ones(4, 1)] if answer_slot else []), 1).bool()
    torch.testing.assert_close(ours[valid], expected[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["group", "pair"])
def test_match_logits_match_a_direct_computation(fusion_clip_path, norm):
    model = fusion_model(fusion_clip_path, match_norm=norm)
    inputs = random_inputs(6)
    with torch.no_grad():
        ours = model.match_logits(*inputs)
        states = reference_fuse(model, *inputs)
        expected = reference_match(model, states, inputs[4], None, per_pair=norm == "pair")
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_group_size_equals_separate_calls(fusion_clip_path):
    model = fusion_model(fusion_clip_path)
    inputs = random_inputs(6)
    with torch.no_grad():
        grouped = model.match_logits(*inputs, group_size=3)
        separate = torch.cat([model.match_logits(*(x[:3] for x in inputs)),
                              model.match_logits(*(x[3:] for x in inputs))])
        whole = model.match_logits(*inputs)
        expected = reference_match(model, reference_fuse(model, *inputs), inputs[4], [slice(0, 3), slice(3, 6)],
                                   per_pair=False)
    torch.testing.assert_close(grouped, separate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(grouped, whole)  # the original's normalisation depends on the group
    with pytest.raises(ValueError, match="does not divide"):
        model.match_logits(*inputs, group_size=4)


def test_per_pair_normalisation_does_not_depend_on_the_other_pairs(fusion_clip_path):
    model = fusion_model(fusion_clip_path, match_norm="pair")
    inputs = random_inputs(6)
    with torch.no_grad():
        torch.testing.assert_close(model.match_logits(*inputs)[:2], model.match_logits(*(x[:2] for x in inputs)),
                                   rtol=1e-5, atol=1e-6)


def test_token_logits_are_the_tied_head(fusion_clip_path):
    model = fusion_model(fusion_clip_path)
    with torch.no_grad():
        model.clip.fusion_logit_bias.normal_()
        states = torch.randn(2, 5, D)
        expected = states @ model.clip.fusion_proj_embedding @ model.clip.token_embedding.weight.T
        torch.testing.assert_close(model.token_logits(states), expected + model.clip.fusion_logit_bias)
    model.train()  # dropout only in train mode, at the configured rate
    assert not torch.allclose(model.token_logits(states), expected + model.clip.fusion_logit_bias)


def test_a_stage1_model_has_no_fusion_api(fusion_clip_path):
    model = T2VLP.from_pretrained(fusion_clip_path)
    with pytest.raises(RuntimeError, match="with_fusion=True"):
        model.fuse(*random_inputs(2))


def test_fusion_needs_matching_widths_and_enough_blocks():
    with pytest.raises(ValueError, match="embed_dim == transformer_width"):
        T2VLP(TINY_CLIP, T2VLPConfig(with_fusion=True, fusion_layers=1))
    with pytest.raises(ValueError, match="fusion_layers 3 must be in 1..2"):
        T2VLP(TINY_FUSION_CLIP, T2VLPConfig(with_fusion=True, fusion_layers=3))


# ------------------------------------------------------------------------------------------------ keys and init


STAGE2_ADDED = {
    "fusion_positional_embedding": (77, 512),
    "fusion_proj_embedding": (512, 512),
    "fusion_logit_bias": (49408,),
    "fusion_match_matrix": (512, 512),
    "fusion_unmatch_matrix": (512, 512),
}


def test_stage2_state_dict_matches_the_original_layout():
    with torch.device("meta"):
        model = T2VLP(CLIPConfig(), T2VLPConfig(with_fusion=True))
    expected = expected_stage1_shapes()
    block_shapes = {k.removeprefix("clip.transformer."): v for k, v in expected.items()
                    if k.startswith("clip.transformer.resblocks.")}
    expected.update({f"clip.fusion_transformer.{k}": v for k, v in block_shapes.items()})
    expected.update({f"clip.{k}": v for k, v in STAGE2_ADDED.items()})
    expected.update({"visual_linear.weight": (512, 512), "visual_linear.bias": (512,)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(k.startswith("clip.fusion_transformer.resblocks.11.") for k in expected) == 12


def test_a_stage1_checkpoint_initialises_stage2_with_the_expected_missing_keys(fusion_clip_path, tmp_path):
    stage1 = T2VLP.from_pretrained(fusion_clip_path)
    with torch.no_grad():  # a stage-1-tuned text tower, different from CLIP's
        for param in stage1.clip.transformer.parameters():
            param.add_(0.5)
    path = tmp_path / "pytorch_model.bin.10"
    torch.save({"global_step": 10, "model_state_dict": original_format_state_dict(stage1, stage1.clip)}, path)

    clip_state = read_clip_state_dict(fusion_clip_path)
    state = init_state_from_clip(clip_state, torch.load(path)["model_state_dict"], TINY_FUSION_CLIP.vision_layers, 2,
                                 with_fusion=True)
    model = T2VLP(TINY_FUSION_CLIP, T2VLPConfig(with_fusion=True, fusion_layers=2))
    missing, unexpected = load_state_dict_checked(model, state)
    assert missing == ["clip.fusion_logit_bias", "clip.fusion_match_matrix", "clip.fusion_proj_embedding",
                       "clip.fusion_unmatch_matrix", "visual_linear.bias", "visual_linear.weight"]
    assert unexpected == []
    # the fusion encoder comes from the ORIGINAL CLIP text tower, not the stage-1-tuned one
    key = "transformer.resblocks.1.mlp.c_fc.weight"
    torch.testing.assert_close(model.clip.fusion_transformer.resblocks[1].mlp.c_fc.weight, clip_state[key].float())
    assert not torch.allclose(model.clip.transformer.resblocks[1].mlp.c_fc.weight, clip_state[key].float())
    torch.testing.assert_close(model.clip.fusion_positional_embedding, clip_state["positional_embedding"].float())
    assert torch.count_nonzero(model.clip.fusion_logit_bias) == 0
    assert abs(model.clip.fusion_match_matrix.std().item() - D**-0.5) < 0.3 * D**-0.5


def test_lm_head_follows_the_original_shape_for_any_text_width(tmp_path):
    """The original builds lm_head as Linear(transformer_width, embed_dim); TINY_CLIP has width 64, embed 32."""
    model = T2VLP(TINY_CLIP)
    assert tuple(model.clip.lm_head.weight.shape) == (TINY_CLIP.embed_dim, TINY_CLIP.transformer_width)
    clip_path = write_random_clip_checkpoint(tmp_path / "clip.pt", TINY_CLIP, seed=2)
    original = {key: value.clone() for key, value in original_format_state_dict(model, model.clip).items()}
    original["clip.lm_head.weight"] = torch.randn(TINY_CLIP.embed_dim, TINY_CLIP.transformer_width).half()
    torch.save({"model_state_dict": original}, tmp_path / "original.bin")
    loaded = T2VLP.from_pretrained(clip_path, init_model=tmp_path / "original.bin")
    torch.testing.assert_close(loaded.clip.lm_head.weight, original["clip.lm_head.weight"].float())


def test_stage2_round_trip_through_an_original_format_file(fusion_clip_path, tmp_path):
    model = fusion_model(fusion_clip_path)
    state = original_format_state_dict(model, model.clip)
    assert state["clip.fusion_transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    for fp32 in ("clip.fusion_proj_embedding", "clip.fusion_match_matrix", "clip.fusion_logit_bias",
                 "clip.fusion_positional_embedding", "visual_linear.weight"):
        assert state[fp32].dtype == torch.float32, fp32
    torch.save({"model_state_dict": state}, tmp_path / "stage2.bin")
    reloaded = T2VLP.from_pretrained(
        fusion_clip_path, init_model=tmp_path / "stage2.bin",
        config=T2VLPConfig(with_fusion=True, fusion_layers=2),
    ).eval()
    ids, mask = random_text(2, 8, [4, 8])
    video = random_video(2, T, TINY_FUSION_CLIP.image_resolution)
    with torch.no_grad():
        frames, tubes = model.encode_video(video, torch.ones(2, T))
        _, tokens = model.encode_text(ids, mask)
        ours = model.match_logits(frames, torch.ones(2, T), tubes, tokens, mask)
        theirs = reloaded.match_logits(frames, torch.ones(2, T), tubes, tokens, mask)
    torch.testing.assert_close(theirs, ours, rtol=5e-3, atol=5e-3)
