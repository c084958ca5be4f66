import random

import numpy as np
import pytest
import torch

from engine.checkpointing import (
    capture_rng_state,
    load_restore,
    restore_rng_state,
    save_atomic,
    save_model_checkpoint,
    save_restore,
)


def test_crash_during_save_keeps_the_previous_restore_file(tmp_path, monkeypatch):
    save_restore(tmp_path, {"global_step": 10, "weights": torch.arange(4.0)})
    real_save = torch.save

    def crash_after_partial_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip archive")
        raise RuntimeError("simulated crash (disk full / killed) in the middle of torch.save")

    monkeypatch.setattr(torch, "save", crash_after_partial_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_restore(tmp_path, {"global_step": 20, "weights": torch.zeros(4)})
    monkeypatch.setattr(torch, "save", real_save)

    restored = load_restore(tmp_path)
    assert restored["global_step"] == 10
    assert torch.equal(restored["weights"], torch.arange(4.0))
    # the temp file was removed; restore.bin.prev is a second name of the intact file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["restore.bin", "restore.bin.prev"]

    save_restore(tmp_path, {"global_step": 30})
    assert load_restore(tmp_path)["global_step"] == 30
    assert load_restore(path=tmp_path / "restore.bin.prev")["global_step"] == 10


def test_load_restore_without_a_file(tmp_path):
    assert load_restore(tmp_path) is None
    assert load_restore(path=tmp_path / "elsewhere.bin") is None
    save_atomic({"global_step": 5}, tmp_path / "elsewhere.bin")
    assert load_restore(path=tmp_path / "elsewhere.bin") == {"global_step": 5}


def test_model_checkpoint_layout_and_fp32(tmp_path):
    state = {
        "clip.visual.proj": torch.full((2, 3), 0.5, dtype=torch.float16),
        "clip.logit_scale": torch.tensor(4.6052, dtype=torch.float32),
        "step_counter": torch.tensor(7, dtype=torch.int64),
    }
    path = save_model_checkpoint(tmp_path, 1500, state, extra={"epoch": 2})
    assert path == tmp_path / "ckpt" / "pytorch_model.bin.1500"
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1500
    assert loaded["epoch"] == 2
    weights = loaded["model_state_dict"]
    assert weights["clip.visual.proj"].dtype == torch.float32
    assert torch.equal(weights["clip.visual.proj"], torch.full((2, 3), 0.5))
    assert weights["step_counter"].dtype == torch.int64


def draw_everything():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist())


def test_rng_capture_and_restore_reproduce_the_same_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw_everything()
    save_restore(tmp_path, {"rng": capture_rng_state()})
    first = [draw_everything() for _ in range(3)]
    restore_rng_state(load_restore(tmp_path)["rng"])
    second = [draw_everything() for _ in range(3)]
    assert first == second
    assert first[0] != first[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_capture_and_restore(tmp_path):
    torch.cuda.manual_seed_all(4)
    torch.rand(1, device="cuda")
    save_restore(tmp_path, {"rng": capture_rng_state()})
    first = torch.rand(5, device="cuda").tolist()
    restore_rng_state(load_restore(tmp_path)["rng"])
    assert torch.rand(5, device="cuda").tolist() == first
