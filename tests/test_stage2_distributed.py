"""Two torchrun processes (gloo) compute the stage-2 and the retrieval losses and gradients of one process on the
global batch, and draw the same hard negatives, never the positive, for unevenly split batches."""

from __future__ import annotations

import pytest
import torch

from modules.checkpoint import write_random_clip_checkpoint
from tests import dist_stage2_helper
from tests.model_helpers import TINY_FUSION_CLIP
from tests.torchrun import ROOT, run_torchrun

pytestmark = pytest.mark.integration


def assert_same_as_one_process(expected_losses: dict, expected_grads: dict, rank_files: list) -> None:
    for path in rank_files:
        saved = torch.load(path, weights_only=True)
        for key, value in expected_losses.items():
            assert abs(saved["losses"][key] - value) <= 1e-5 * max(abs(value), 1e-6), key
        assert saved["grads"].keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            error = (saved["grads"][name] - grad).abs().max()
            assert error <= 1e-4 * grad.abs().max() + 1e-8, f"{name}: max error {error}"


def test_two_processes_equal_one_process(tmp_path):
    clip = write_random_clip_checkpoint(tmp_path / "clip.pt", TINY_FUSION_CLIP, seed=4)
    run_torchrun(ROOT / "tests" / "dist_stage2_helper.py", str(tmp_path), str(clip), nproc=2)

    expected_losses, expected_grads = dist_stage2_helper.loss_and_gradients(str(clip), tmp_path)
    assert {"mlm_loss", "plm_loss", "vtm_loss", "align_loss"} <= expected_losses.keys()
    fusion_grads = [name for name in expected_grads if "fusion_transformer" in name]
    assert fusion_grads and expected_grads["clip.fusion_match_matrix"].abs().max() > 0
    assert not any(name.startswith("clip.visual.transformer") for name in expected_grads)  # encoders detached
    assert_same_as_one_process(expected_losses, expected_grads, [tmp_path / f"rank{rank}.pt" for rank in (0, 1)])

    # the retrieval objective (contrastive + VTM on detached inputs + alignment), same batch, same check
    expected_losses, expected_grads = dist_stage2_helper.loss_and_gradients(str(clip), tmp_path, task="retrieval")
    assert {"sim_loss", "vtm_loss", "align_loss"} <= expected_losses.keys()
    assert expected_grads["clip.visual.transformer.resblocks.0.attn.in_proj_weight"].abs().max() > 0  # not detached
    assert_same_as_one_process(expected_losses, expected_grads,
                               [tmp_path / f"retrieval_rank{rank}.pt" for rank in (0, 1)])

    one_video, one_text, _ = dist_stage2_helper.uneven_negatives(rank=0, world_size=1)
    parts = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["negatives"] for rank in (0, 1)]
    assert [p[2] for p in parts] == [0, 3]  # each rank's first row in the gathered batch
    assert [len(p[0]) for p in parts] == list(dist_stage2_helper.UNEVEN_SIZES)
    assert torch.equal(torch.cat([p[0] for p in parts]), one_video)
    assert torch.equal(torch.cat([p[1] for p in parts]), one_text)
    assert (one_video != torch.arange(5)).all() and (one_text != torch.arange(5)).all()
