import math

import pytest
import torch
from torch import nn

from engine.optim import (
    apply_freeze_rule,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    clamp_logit_scale,
    warmup_cosine,
)
from engine.tasks.fusion_pretraining import FUSION_PARAM_PATTERNS

PARAM_NAMES = [
    "clip.visual.conv1.weight",
    "clip.visual.class_embedding",
    "clip.visual.positional_embedding",
    "clip.visual.ln_pre.weight",
    "clip.visual.ln_pre.bias",
    "clip.visual.transformer.resblocks.0.attn.in_proj_weight",
    "clip.visual.transformer.resblocks.0.attn.in_proj_bias",
    "clip.visual.transformer.resblocks.11.mlp.c_fc.weight",
    "clip.visual.ln_post.weight",
    "clip.visual.ln_post.bias",
    "clip.visual.proj",
    "clip.transformer.resblocks.0.ln_1.weight",
    "clip.transformer.resblocks.3.ln_1.bias",
    "clip.token_embedding.weight",
    "clip.positional_embedding",
    "clip.ln_final.weight",
    "clip.ln_final.bias",
    "clip.text_projection",
    "clip.logit_scale",
    "clip.local_visual.conv1.weight",
    "clip.local_visual.transformer.resblocks.0.attn.in_proj_weight",
    "clip.local_visual.proj",
    "clip.fusion_center",
    "clip.fusion_proj_center.weight",
    "clip.fusion_proj_center.bias",
    "clip.lm_head.weight",
    "clip.lm_head.bias",
    "visual_linear.weight",
    "visual_linear.bias",
]
FROZEN_AT_0 = {
    "clip.visual.conv1.weight",
    "clip.visual.class_embedding",
    "clip.visual.positional_embedding",
    "clip.visual.ln_pre.weight",
    "clip.visual.ln_pre.bias",
    "clip.token_embedding.weight",
    "clip.positional_embedding",
    "clip.lm_head.weight",
    "clip.lm_head.bias",
}


def fake_model(names=PARAM_NAMES) -> nn.Module:
    """An nn.Module whose named_parameters() are exactly `names` (nested submodules built from the dots)."""
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(torch.ones(2)))
    return root


def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def test_fake_model_has_the_intended_names():
    assert sorted(name for name, _ in fake_model().named_parameters()) == sorted(PARAM_NAMES)


def test_freeze_rule_zero_keeps_clip4clip_semantics():
    model = fake_model()
    frozen = apply_freeze_rule(model, 0)
    assert set(frozen) == FROZEN_AT_0
    assert frozen_names(model) == FROZEN_AT_0


def test_freeze_rule_freezes_blocks_below_the_threshold():
    model = fake_model()
    apply_freeze_rule(model, 4)
    assert frozen_names(model) == FROZEN_AT_0 | {
        "clip.visual.transformer.resblocks.0.attn.in_proj_weight",
        "clip.visual.transformer.resblocks.0.attn.in_proj_bias",
        "clip.transformer.resblocks.0.ln_1.weight",
        "clip.transformer.resblocks.3.ln_1.bias",
    }
    model = fake_model()
    apply_freeze_rule(model, 12)
    assert "clip.visual.transformer.resblocks.11.mlp.c_fc.weight" in frozen_names(model)
    # tube-encoder blocks contain "local": never frozen
    assert "clip.local_visual.transformer.resblocks.0.attn.in_proj_weight" not in frozen_names(model)


def test_freeze_rule_minus_one_freezes_nothing():
    model = fake_model()
    assert apply_freeze_rule(model, -1) == []
    assert frozen_names(model) == set()


def group_map(groups):
    return {g["name"]: g for g in groups}


def names_of(group):
    return sorted(name for name, _ in group["params"])


def test_stage1_param_groups():
    model = fake_model()
    apply_freeze_rule(model, 0)
    groups = group_map(build_param_groups(model, lr=1e-4, coef_lr=1e-3, new_params_lr=1e-5, weight_decay=0.2))
    assert list(groups) == ["backbone_decay", "backbone_no_decay", "new_decay", "new_no_decay",
                            "other_decay", "other_no_decay"]
    assert names_of(groups["backbone_decay"]) == [
        "clip.ln_final.weight",
        "clip.logit_scale",
        "clip.text_projection",
        "clip.transformer.resblocks.0.ln_1.weight",
        "clip.visual.ln_post.weight",
        "clip.visual.proj",
        "clip.visual.transformer.resblocks.0.attn.in_proj_weight",
        "clip.visual.transformer.resblocks.11.mlp.c_fc.weight",
    ]
    assert names_of(groups["backbone_no_decay"]) == [
        "clip.ln_final.bias",
        "clip.transformer.resblocks.3.ln_1.bias",
        "clip.visual.ln_post.bias",
        "clip.visual.transformer.resblocks.0.attn.in_proj_bias",
    ]
    assert names_of(groups["new_decay"]) == [
        "clip.fusion_center",
        "clip.fusion_proj_center.weight",
        "clip.local_visual.conv1.weight",
        "clip.local_visual.proj",
        "clip.local_visual.transformer.resblocks.0.attn.in_proj_weight",
    ]
    assert names_of(groups["new_no_decay"]) == ["clip.fusion_proj_center.bias"]
    assert names_of(groups["other_decay"]) == ["visual_linear.weight"]
    assert names_of(groups["other_no_decay"]) == ["visual_linear.bias"]
    lrs = {name: (g["lr"], g["weight_decay"]) for name, g in groups.items()}
    assert lrs["backbone_decay"] == (pytest.approx(1e-7), 0.2)
    assert lrs["backbone_no_decay"] == (pytest.approx(1e-7), 0.0)
    assert lrs["new_decay"] == (1e-5, 0.2)
    assert lrs["new_no_decay"] == (1e-5, 0.0)
    assert lrs["other_decay"] == (1e-4, 0.2)
    assert lrs["other_no_decay"] == (1e-4, 0.0)
    all_grouped = sum((names_of(g) for g in groups.values()), [])
    assert sorted(all_grouped) == sorted(set(PARAM_NAMES) - FROZEN_AT_0)


def test_stage2_patterns_move_centers_to_the_backbone_and_skip_empty_groups():
    names = ["clip.fusion_center", "clip.fusion_transformer.resblocks.0.ln_1.weight",
             "clip.fusion_transformer.resblocks.0.ln_1.bias", "clip.fusion_match_matrix"]
    groups = group_map(build_param_groups(fake_model(names), 1e-5, 1e-3, 1e-5, 0.2, FUSION_PARAM_PATTERNS))
    assert list(groups) == ["backbone_decay", "new_decay", "new_no_decay"]
    assert names_of(groups["backbone_decay"]) == ["clip.fusion_center"]
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-8)


def test_optimizer_settings_and_param_names():
    model = fake_model()
    apply_freeze_rule(model, 0)
    optimizer = build_optimizer(model, lr=1e-4, coef_lr=1e-3, new_params_lr=1e-5, weight_decay=0.2)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98)
    assert group["eps"] == 1e-6
    assert group["name"] == "backbone_decay"
    assert "clip.visual.transformer.resblocks.0.attn.in_proj_weight" in group["param_names"]
    assert "clip.visual.conv1.weight" not in group["param_names"]  # frozen


def test_warmup_cosine_values():
    assert warmup_cosine(0.0, 0.1) == 0.0
    assert warmup_cosine(0.05, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(0.1, 0.1) == pytest.approx(0.9755283, abs=1e-7)  # not shifted: drop at the boundary
    assert warmup_cosine(0.2, 0.1) == pytest.approx(0.9045085, abs=1e-7)
    assert warmup_cosine(0.5, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(1.5, 0.1) == pytest.approx(0.0, abs=1e-12)  # the original rose again here
    assert warmup_cosine(-0.5, 0.1) == 0.0
    assert warmup_cosine(0.3, 0.0) == pytest.approx(0.5 * (1 + math.cos(0.3 * math.pi)))


def test_scheduler_scales_every_group():
    model = fake_model()
    apply_freeze_rule(model, 0)
    optimizer = build_optimizer(model, lr=1e-4, coef_lr=1e-3, new_params_lr=1e-5, weight_decay=0.2)
    scheduler = build_scheduler(optimizer, total_steps=100, warmup_proportion=0.1)
    seen = {}
    for step in range(151):
        seen[step] = {g["name"]: g["lr"] for g in optimizer.param_groups}
        optimizer.step()
        scheduler.step()
    assert seen[0]["new_decay"] == 0.0  # like the original, the first update runs at factor 0
    assert seen[5]["new_decay"] == pytest.approx(0.5e-5)
    assert seen[10]["new_decay"] == pytest.approx(0.9755283e-5)
    assert seen[10]["backbone_decay"] == pytest.approx(0.9755283e-7)
    assert seen[10]["other_decay"] == pytest.approx(0.9755283e-4)
    assert seen[50]["new_decay"] == pytest.approx(0.5e-5)
    assert seen[100]["new_decay"] == pytest.approx(0.0, abs=1e-20)
    after_end = [seen[step]["new_decay"] for step in range(100, 151)]
    assert max(after_end) == pytest.approx(0.0, abs=1e-20)


def test_logit_scale_clamp():
    model = fake_model(["clip.logit_scale", "clip.fusion_logit_bias"])
    with torch.no_grad():
        model.clip.logit_scale.fill_(5.0)
        model.clip.fusion_logit_bias.fill_(5.0)
    clamp_logit_scale(model)
    assert torch.allclose(model.clip.logit_scale, torch.full((2,), math.log(100.0)))
    assert torch.equal(model.clip.fusion_logit_bias, torch.full((2,), 5.0))
    with torch.no_grad():
        model.clip.logit_scale.fill_(3.0)
    clamp_logit_scale(model)
    assert torch.equal(model.clip.logit_scale, torch.full((2,), 3.0))


def test_fused_adamw_makes_the_same_updates():
    """The fused AdamW (the default on GPUs) and the default implementation (the CPU's) agree step by step, per
    group learning rate and weight decay included."""
    models = [fake_model() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = []
    for model, fused in zip(models, (None, True)):
        apply_freeze_rule(model, 0)
        optimizers.append(build_optimizer(model, lr=1e-2, coef_lr=1e-1, new_params_lr=3e-2, weight_decay=0.2,
                                          fused=fused))
    assert not optimizers[0].defaults["fused"] and optimizers[1].defaults["fused"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=generator) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone() if param.requires_grad else None
            optimizer.step()
    moved = 0
    for (name, plain), fused in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6, msg=name)
        moved += bool((plain - 1).abs().max() > 1e-3)  # every parameter started at 1
    assert moved == sum(p.requires_grad for p in models[0].parameters()) > 0
