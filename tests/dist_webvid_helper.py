"""Stage-1 training from WebVid TFRecords under torchrun, recording which samples each process/worker loads.

Usage: torchrun --nproc_per_node=2 tests/dist_webvid_helper.py OUT_DIR CLIP_PATH LABELS_JSON INDEX
Every DataLoader worker appends "epoch index" lines to OUT_DIR/seen_rank<r>_pid<pid>.txt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from dataloaders.webvid import WebVidDataset
from engine import distributed
from engine.run_logging import RunLogger
from engine.tasks.clip_pretraining import clip_pretraining_task
from engine.trainer import Outcome, Trainer, TrainSettings
from modules.model import T2VLP


class RecordingWebVid(WebVidDataset):
    def __init__(self, *args, record_dir: Path, rank: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record_dir, self.rank = record_dir, rank

    def __getitem__(self, index: int):
        with open(self.record_dir / f"seen_rank{self.rank}_pid{os.getpid()}.txt", "a") as handle:
            handle.write(f"{self.epoch} {index}\n")
        return super().__getitem__(index)


def train(out_dir: Path, clip: str, labels: str, index: str, dist_info: distributed.DistInfo) -> None:
    torch.manual_seed(0)
    model = T2VLP.from_pretrained(clip)
    dataset = RecordingWebVid(
        labels, index, max_words=16, max_frames=3, image_size=model.image_resolution, record_dir=out_dir,
        rank=dist_info.rank,
    )
    settings = TrainSettings(
        epochs=2, micro_batch_size=4, accumulation_steps=1, lr=1e-3, coef_lr=1.0, new_params_lr=1e-3,
        weight_decay=0.2, warmup_proportion=0.1, num_workers=2,
    )
    run = RunLogger(out_dir / "run", dist_info.is_main, tensorboard=False, rank=dist_info.rank)
    trainer = Trainer(model, dataset, settings, run, dist_info, str(out_dir / "run"), clip_pretraining_task(),
                      freeze_layer_num=0)
    assert trainer.fit() is Outcome.EPOCH_END
    progress = trainer.progress
    assert progress.epoch == 2 and progress.global_step == 2 * len(dataset) // 8, progress
    run.close()


def main() -> None:
    out_dir, clip, labels, index = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    train(out_dir, clip, labels, index, distributed.init_distributed())
    distributed.cleanup()  # after train() returned: the trainer must be out of scope


if __name__ == "__main__":
    main()
