"""Two real processes (torchrun, gloo, CPU) must produce the gradients of one process on the whole batch."""

import gc
import weakref
from pathlib import Path

import pytest
import torch

from engine import distributed
from engine.precision import resolve_precision
from tests import dist_contrastive_helper as helper
from tests.torchrun import ROOT, run_torchrun

pytestmark = pytest.mark.integration

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def torchrun_outputs(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("dist")
    run_torchrun(ROOT / "tests" / "dist_contrastive_helper.py", str(out_dir), nproc=WORLD_SIZE, timeout=180)
    return out_dir


def one_process_reference(case: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    rows_rank0, rows_rank1, with_local_loss, _ = helper.CASES[case]
    model = helper.build_model()
    video, text = helper.global_batch(rows_rank0 + rows_rank1)
    video_emb, text_emb, logit_scale = model(video, text)
    loss = helper.contrastive_loss(video_emb, text_emb, logit_scale)
    if with_local_loss:
        loss = loss + helper.local_loss(video_emb, text_emb)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}, video_emb.detach(), loss.detach()


@pytest.mark.parametrize("case", ["even", "uneven"])
def test_two_processes_match_one_process_on_the_whole_batch(torchrun_outputs, case):
    expected_grads, expected_video, expected_loss = one_process_reference(case)
    for rank in range(WORLD_SIZE):
        saved = torch.load(torchrun_outputs / f"{case}_rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(saved["gathered_video"], expected_video, atol=1e-6, rtol=0)
        assert set(saved["grads"]) == {"video.weight", "video.bias", "text.weight", "text.bias", "logit_scale"}
        for name, grad in saved["grads"].items():
            assert expected_grads[name].abs().max() > 1e-3  # a real gradient, not a trivial zero
            torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=0, msg=f"{case}: {name}")
        if case == "uneven":  # every rank computes the same global contrastive loss
            torch.testing.assert_close(saved["loss"], expected_loss, atol=1e-9, rtol=0)


def test_original_local_slice_gather_scales_encoder_gradients_by_one_over_world_size(torchrun_outputs):
    expected_grads, _, _ = one_process_reference("original_local_slice")
    saved = torch.load(torchrun_outputs / "original_local_slice_rank0.pt", weights_only=True)["grads"]
    for name in ("video.weight", "text.bias"):
        torch.testing.assert_close(saved[name], expected_grads[name] / WORLD_SIZE, atol=1e-6, rtol=0)
    torch.testing.assert_close(saved["logit_scale"], expected_grads["logit_scale"], atol=1e-6, rtol=0)


def test_collectives(torchrun_outputs):
    for rank in range(WORLD_SIZE):
        results = torch.load(torchrun_outputs / f"collectives_rank{rank}.pt", weights_only=False)
        assert results["sums"] == [3.0, 1.0]
        assert results["sum"] == 3.0
        assert results["broadcast"] == {"from_rank": 0}
        assert results["objects"] == ["rank0", "rank1"]
        assert torch.equal(results["variable"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert results["is_main"] == (rank == 0)


def test_single_process_mode_is_the_identity(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed(device_type="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device.type, info.is_main) == (0, 1, 0, "cpu", True)
    tensor = torch.ones(3, requires_grad=True)
    assert distributed.all_gather_with_grad(tensor) is tensor
    assert distributed.all_reduce_sums([torch.tensor(2.5), 1.0]) == [2.5, 1.0]
    assert distributed.broadcast_object("x") == "x"
    assert distributed.is_main()
    distributed.barrier()


def test_cleanup_tears_down_cyclic_training_objects_before_leaving_the_group(monkeypatch):
    """DDP wrappers live in reference cycles; gloo aborts the process when they outlive the group (see cleanup)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    class CyclicWrapper:
        def __init__(self) -> None:
            self.hook = lambda: self

    wrapper = CyclicWrapper()
    alive = weakref.ref(wrapper)
    gc.disable()  # as if the automatic collector had not run yet
    try:
        del wrapper
        assert alive() is not None
        distributed.cleanup()
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_single_process_on_cuda(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed()
    assert info.device == torch.device("cuda", 0)
    assert resolve_precision("auto", info.device) == "bf16"


def test_collective_timeout_defaults_to_an_hour_and_follows_the_environment(monkeypatch):
    from datetime import timedelta

    from engine.distributed import collective_timeout

    monkeypatch.delenv("T2VLP_DIST_TIMEOUT_MINUTES", raising=False)
    assert collective_timeout() == timedelta(minutes=60)
    monkeypatch.setenv("T2VLP_DIST_TIMEOUT_MINUTES", "5")
    assert collective_timeout() == timedelta(minutes=5)
