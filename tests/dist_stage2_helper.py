"""Stage-2 forward/backward through the real Trainer path on N processes, and hard negatives of uneven batches.

Usage: torchrun --nproc_per_node=N tests/dist_stage2_helper.py OUT_DIR CLIP_PATH   (repository on PYTHONPATH)
Then the same for the retrieval objective (OUT_DIR/retrieval_rank<r>.pt).
Rank r takes the r-th contiguous block of a fixed global batch (so the gathered batch is in the global order) and
writes OUT_DIR/rank<r>.pt with the mean losses over ranks, every gradient after DDP's reduction, and the hard
negatives it drew for an uneven split (rank 0: 3 rows, rank 1: 2 rows of a 5-row batch).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from dataloaders.lm_targets import sample_targets
from engine import distributed
from engine.run_logging import RunLogger
from engine.tasks.base import StepContext
from engine.tasks.fusion_pretraining import FusionLossWeights, fusion_pretraining_task, hard_negative_indices
from engine.tasks.retrieval import RetrievalLossWeights, retrieval_task
from engine.trainer import Trainer, TrainSettings
from modules.fusion_objectives import VideoParts
from modules.model import T2VLP, T2VLPConfig
from tests.dist_stage1_helper import GLOBAL_BATCH, global_batch

UNEVEN_SIZES = (3, 2)


def stage2_batch(resolution: int) -> dict[str, torch.Tensor]:
    batch = global_batch(resolution)
    samples = [sample_targets({"input_ids": ids, "attention_mask": mask, "index": i}, 0.5, seed=5, epoch=0)
               for i, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"]))]
    for key in ("mlm_input_ids", "mlm_labels", "plm_start"):
        batch[key] = torch.stack([s[key] for s in samples])
    return batch


def build_model(clip_path: str) -> T2VLP:
    torch.manual_seed(0)
    # per-pair VTM normalisation (the original's per-call one depends on the local batch) and no dropout
    config = T2VLPConfig(with_fusion=True, fusion_layers=2, match_norm="pair", head_dropout=0.0,
                         detach_tube_input=True)
    return T2VLP.from_pretrained(clip_path, config=config)


def loss_and_gradients(clip_path: str, output_dir: Path, task: str = "fusion") -> tuple[dict[str, float],
                                                                                       dict[str, torch.Tensor]]:
    dist_info = distributed.init_distributed()
    model = build_model(clip_path)
    batch = stage2_batch(model.image_resolution)
    per_rank = GLOBAL_BATCH // dist_info.world_size
    rows = slice(dist_info.rank * per_rank, (dist_info.rank + 1) * per_rank)
    local = {k: v[rows] for k, v in batch.items()}
    local.update(n_skipped=0, batch_size=per_rank)
    settings = TrainSettings(
        epochs=1, micro_batch_size=per_rank, accumulation_steps=1, lr=1e-3, coef_lr=1.0, new_params_lr=1e-3,
        weight_decay=0.2, warmup_proportion=0.1, seed=3,
    )
    run = RunLogger(output_dir / f"logs{task}{dist_info.world_size}", dist_info.is_main, tensorboard=False)
    objective = (fusion_pretraining_task(FusionLossWeights()) if task == "fusion"
                 else retrieval_task(RetrievalLossWeights()))
    trainer = Trainer(model, range(GLOBAL_BATCH), settings, run, dist_info, str(output_dir), objective,
                      freeze_layer_num=0)
    pending = [trainer._forward_backward(local, micro=0)]
    summary = trainer._window_summary(pending, SimpleNamespace(requested=False), [])  # the trainer's one collective
    assert summary.finite and not summary.stop_requested
    losses = summary.values
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    run.close()
    return losses, grads


def uneven_negatives(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Hard negatives drawn for this rank's rows of a 5-row batch split unevenly over the ranks."""
    generator = torch.Generator().manual_seed(21)
    eot, frames = torch.randn(5, 16, generator=generator), torch.randn(5, 3, 16, generator=generator)
    mask = torch.ones(5, 3, dtype=torch.long)
    sizes = UNEVEN_SIZES if world_size == 2 else (5,)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])

    class Similarity(torch.nn.Module):
        logit_scale = torch.tensor(3.0)

        def similarity(self, text, video, video_mask):
            from modules.similarity import meanp_logits

            return meanp_logits(text, video, video_mask, self.logit_scale)

    context = StepContext(seed=1, step=7, micro=0, epoch=0)
    all_eot, offset = context.gather_rows(eot[rows])
    all_frames, all_mask = context.gather_rows(frames[rows])[0], context.gather_rows(mask[rows])[0]
    all_video = VideoParts(all_frames, all_mask, tubes=all_frames)  # the similarity reads no tubes
    local_rows = slice(offset, offset + sizes[rank])
    return (*hard_negative_indices(Similarity(), all_eot, all_video, local_rows, context), offset)


if __name__ == "__main__":
    out_dir, clip = Path(sys.argv[1]), sys.argv[2]
    losses, grads = loss_and_gradients(clip, out_dir)
    negatives = uneven_negatives(distributed.get_rank(), distributed.get_world_size())
    torch.save({"losses": losses, "grads": grads, "negatives": negatives},
               out_dir / f"rank{distributed.get_rank()}.pt")
    losses, grads = loss_and_gradients(clip, out_dir, task="retrieval")
    torch.save({"losses": losses, "grads": grads}, out_dir / f"retrieval_rank{distributed.get_rank()}.pt")
    distributed.cleanup()
