"""`--grad_checkpointing` and `--compile` change how a step is computed, never what it computes (CPU, fp32)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from dataloaders.video import normalize_video
from engine.evaluation.retrieval import rerank_both_directions
from engine.tasks.base import StepContext
from engine.tasks.clip_pretraining import contrastive_objective
from engine.tasks.fusion_pretraining import FusionLossWeights, fusion_pretraining_objective
from modules.checkpoint import write_random_clip_checkpoint
from modules.clip import ResidualAttentionBlock, compile_blocks, set_grad_checkpointing
from modules.model import T2VLP, T2VLPConfig
from tests.dist_stage1_helper import global_batch
from tests.dist_stage2_helper import stage2_batch
from tests.model_helpers import TINY_FUSION_CLIP

CONTEXT = StepContext(seed=3, step=0, micro=0, epoch=0)
STAGE2 = T2VLPConfig(with_fusion=True, fusion_layers=2, match_norm="pair", head_dropout=0.0)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_random_clip_checkpoint(tmp_path_factory.mktemp("clip") / "clip.pt", TINY_FUSION_CLIP, seed=4)


def build(clip_path, config: T2VLPConfig) -> T2VLP:
    torch.manual_seed(0)
    return T2VLP.from_pretrained(str(clip_path), config=config)


def objective_for(stage: str):
    if stage == "stage1":
        return contrastive_objective
    # stage 2 as the original (encoders detached) and with --train_encoders (every block in the backward pass)
    return fusion_pretraining_objective(FusionLossWeights(), detach_encoders=stage == "stage2")


def loss_and_gradients(model: T2VLP, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    batch = (global_batch if stage == "stage1" else stage2_batch)(model.image_resolution)
    batch["video"] = normalize_video(batch["video"])
    model.zero_grad(set_to_none=True)
    terms = objective_for(stage)(model, batch, CONTEXT)
    terms["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {key: value.detach() for key, value in terms.items()}, grads


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage2_train_encoders"])
def test_grad_checkpointing_gives_identical_gradients(clip_path, stage):
    config = T2VLPConfig() if stage == "stage1" else STAGE2
    plain = build(clip_path, config)
    checkpointed = copy.deepcopy(plain)
    blocks = set_grad_checkpointing(checkpointed)
    assert blocks == sum(isinstance(m, ResidualAttentionBlock) for m in plain.modules()) > 0
    expected_terms, expected = loss_and_gradients(plain, stage)
    terms, grads = loss_and_gradients(checkpointed, stage)
    assert grads.keys() == expected.keys() and len(grads) > 10
    for key in expected_terms:
        torch.testing.assert_close(terms[key], expected_terms[key], rtol=0, atol=0)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=0, msg=name)
    if stage != "stage2":  # with the encoders in the backward pass, the ViT's blocks were recomputed
        assert "clip.visual.transformer.resblocks.0.attn.in_proj_weight" in grads


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler (apt-get install -y g++)")
@pytest.mark.slow
def test_compiled_blocks_match_eager_and_keep_checkpoint_keys(clip_path):
    eager = build(clip_path, STAGE2)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) > 0
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints stay in the original's format
    for stage in ("stage1", "stage2_train_encoders"):
        expected_terms, expected = loss_and_gradients(eager, stage)
        terms, grads = loss_and_gradients(compiled, stage)
        assert grads.keys() == expected.keys()
        for key in expected_terms:
            torch.testing.assert_close(terms[key], expected_terms[key], rtol=1e-4, atol=1e-5)
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler (apt-get install -y g++)")
@pytest.mark.slow
def test_compiled_blocks_serve_training_and_evaluation_without_falling_back_to_eager(clip_path):
    """Every block of every tower shares one compiled code object, so training and evaluation, full and last
    batches, masked and causal fusion all land on it: none of them may exceed dynamo's recompile limit (past it,
    dynamo silently runs the block eagerly; here it raises)."""
    torch._dynamo.reset()  # cache entries of other tests' compiled blocks count towards the same limit
    counters.clear()
    model = build(clip_path, STAGE2)
    compile_blocks(model)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for stage in ("stage1", "stage2_train_encoders", "stage2"):
            loss_and_gradients(model, stage)
        last = {key: value[:3] for key, value in stage2_batch(model.image_resolution).items()}  # a smaller batch
        last["video"] = normalize_video(last["video"])
        objective_for("stage2")(model, last, CONTEXT)["loss"].backward()
        model.eval()
        with torch.no_grad():
            for size in (4, 3):
                batch = {key: value[:size] for key, value in global_batch(model.image_resolution).items()}
                frames, tubes = model.encode_video(normalize_video(batch["video"]), batch["video_mask"])
                _, tokens = model.encode_text(batch["input_ids"], batch["attention_mask"])
            encoded = {"frames": frames, "video_mask": batch["video_mask"], "tubes": tubes, "text_tokens": tokens,
                       "attention_mask": batch["attention_mask"]}
            sim = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
            t2v, v2t = rerank_both_directions(model, encoded, sim, sim.T, top_k=2, batch_pairs=4, precision="fp32")
    assert t2v.shape == v2t.shape == (3, 3) and torch.isfinite(t2v).all() and torch.isfinite(v2t).all()
    # 7: within even dynamo's default limit of 8 (9 while the fusion mask came in two memory layouts)
    assert counters["stats"]["unique_graphs"] <= 8
