"""One stage-1 forward/backward through the real Trainer path (DDP + gathered contrastive loss + alignment).

Usage: torchrun --nproc_per_node=N tests/dist_stage1_helper.py OUT_DIR CLIP_PATH   (repository on PYTHONPATH)
Rank r takes rows r, r + N, ... of a fixed global batch (as the training sampler deals them) and writes
OUT_DIR/rank<r>.pt with the mean loss over ranks and every parameter gradient after DDP's reduction.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from engine import distributed
from engine.run_logging import RunLogger
from engine.tasks.clip_pretraining import clip_pretraining_task
from engine.trainer import Trainer, TrainSettings
from modules.model import T2VLP

GLOBAL_BATCH = 4
FRAMES = 3


def global_batch(resolution: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    ids = torch.zeros(GLOBAL_BATCH, 10, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate((4, 10, 6, 8)):
        ids[row, :length] = torch.randint(1, 49000, (length,), generator=generator)
        ids[row, 0], ids[row, length - 1] = 49406, 49407
        mask[row, :length] = 1
    video = torch.randint(0, 256, (GLOBAL_BATCH, FRAMES, 3, resolution, resolution), generator=generator)
    video_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "video": video.to(torch.uint8), "video_mask": video_mask}


def loss_and_gradients(clip_path: str, output_dir: Path) -> tuple[float, dict[str, torch.Tensor]]:
    dist_info = distributed.init_distributed()
    torch.manual_seed(0)
    model = T2VLP.from_pretrained(clip_path)
    batch = global_batch(model.image_resolution)
    local = {k: v[dist_info.rank :: dist_info.world_size] for k, v in batch.items()}
    local.update(n_skipped=0, batch_size=GLOBAL_BATCH // dist_info.world_size)
    settings = TrainSettings(
        epochs=1, micro_batch_size=local["batch_size"], accumulation_steps=1, lr=1e-3, coef_lr=1.0,
        new_params_lr=1e-3, weight_decay=0.2, warmup_proportion=0.1,
    )
    run = RunLogger(output_dir / f"logs{dist_info.world_size}", dist_info.is_main, tensorboard=False)
    trainer = Trainer(model, range(GLOBAL_BATCH), settings, run, dist_info, str(output_dir), clip_pretraining_task(),
                      freeze_layer_num=-1)
    pending = [trainer._forward_backward(local, micro=0)]
    summary = trainer._window_summary(pending, SimpleNamespace(requested=False), [])  # the trainer's one collective
    assert summary.finite and not summary.stop_requested
    loss = summary.values["loss"]
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    run.close()
    return loss, grads


if __name__ == "__main__":
    out_dir, clip = Path(sys.argv[1]), sys.argv[2]
    loss, grads = loss_and_gradients(clip, out_dir)
    torch.save({"loss": loss, "grads": grads}, out_dir / f"rank{distributed.get_rank()}.pt")
    distributed.cleanup()
