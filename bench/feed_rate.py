"""Does data loading keep up with training? Stage-1 steps of the real trainer fed from JPEG WebVid TFRecords by its
own DataLoader, against the same steps on one device-resident batch (no loading at all).

    python bench/feed_rate.py                     # GPU: ViT-B/16 sizes, B = 32, 12 frames, bf16, cores - 2 workers
    python bench/feed_rate.py --config bf16+compile --workers 14
    python bench/feed_rate.py --store /data/webvid_tfrecords   # your own store (frozen_tfrecord.py's output)
    python bench/feed_rate.py --tiny              # CPU smoke run (tiny model, small frames)

Without `--store`, synthetic videos at WebVid's preview size (596x336, a drifting texture with grain, so JPEG sizes
are not those of flat colour) are converted with frozen_tfrecord.py into the default JPEG layout (short side 256),
and the labels list each video several times. One `Trainer` (the training loop of every stage) runs three phases:
1. the DataLoader alone, exactly as the trainer builds it (workers, pinned memory): the clips/s it can supply,
   timed after the workers' first prefetch (2 batches each), which arrives at once;
2. `--steps` optimiser steps on one collated batch already on the device (uint8 frames, normalised there as in
   training): the step rate without loading;
3. `--fed_steps` optimiser steps fed by that DataLoader from the TFRecords, and the share of their time the loop
   waited for a batch.
Step rates are measured between optimiser steps after `--warmup` untimed ones (the trainer waits for the device
once per step, so the interval between steps is the step time). The issue's target: phase 3 >= 90% of phase 2.
The DataLoader keeps up to 2 batches per worker ready, so a window that began with them all ready could hide a
shortfall of up to 2 x workers / fed_steps of the rate: the default `--fed_steps` (20 per worker) keeps that
under 10%, and phase 1 gives the sustained supply.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import frozen_tfrecord as ft  # noqa: E402
from bench.bench_stage1 import synchronize  # noqa: E402
from bench.bench_webvid import write_synthetic_videos  # noqa: E402
from bench.train_step import TINY, bench_model, check_config_name, resolve_counts  # noqa: E402
from dataloaders.clip_store import read_labels  # noqa: E402
from dataloaders.collate import batch_to_device, collate_clips  # noqa: E402
from dataloaders.webvid import WebVidDataset  # noqa: E402
from engine.data import build_checked  # noqa: E402
from engine.distributed import DistInfo  # noqa: E402
from engine.run_logging import RunLogger  # noqa: E402
from engine.tasks.clip_pretraining import clip_pretraining_task  # noqa: E402
from engine.trainer import Outcome, StopRequest, Trainer, TrainSettings  # noqa: E402
from modules.clip import CLIPConfig  # noqa: E402
from modules.errors import InputError  # noqa: E402

TARGET = 0.90  # the loader-fed step rate as a share of the device-resident one (issue 11)


class WaitClock:
    """An iterator that records when each of its `next` calls started and how long it waited."""

    def __init__(self, batches: Iterable) -> None:
        self._batches = iter(batches)
        self.waits: list[tuple[float, float]] = []

    def __iter__(self) -> WaitClock:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self.waits.append((start, time.perf_counter() - start))


class FeedTrainer(Trainer):
    """The trainer, with its DataLoader replaced by one device-resident batch while `resident_batch` is set, and
    the time its loop waits for batches recorded (`clock`)."""

    resident_batch: dict[str, Any] | None = None
    clock: WaitClock | None = None

    def _loader(self) -> WaitClock:
        if self.resident_batch is None:
            self.clock = WaitClock(super()._loader())
        else:
            self.clock = WaitClock(itertools.repeat(self.resident_batch, self.batches_per_epoch))
        return self.clock


def make_store(folder: Path, n_videos: int, samples: int, width: int, height: int, workers: int) -> tuple[Path, Path]:
    """Synthetic WebVid TFRecords (2-s videos, default JPEG layout) and a labels list of `samples` items cycling
    over the videos. Returns (labels JSON, index)."""
    write_synthetic_videos(folder / "videos", n_videos, width, height, seconds=2, fps=25)
    store = folder / "store"
    summary = ft.convert(ft.parse_args(["--video_dir", str(folder / "videos"), "--csv", str(folder / "train.csv"),
                                        "--output_dir", str(store), "--workers", str(workers), "--no_progress"]))
    if summary.n_written != n_videos:
        raise RuntimeError(f"the converter wrote {summary.n_written} of {n_videos} synthetic videos")
    video_ids, _ = read_labels(store / "frozen_train_labels.json")  # one per converted video
    labels = [{"video_id": video_ids[i % len(video_ids)], "caption": f"synthetic clip {i}"} for i in range(samples)]
    (store / "bench_labels.json").write_text(json.dumps(labels), encoding="utf-8")
    return store / "bench_labels.json", store / "path.index"


def loader_rate(trainer: Trainer, batches: int, skip: int, batch_size: int) -> float:
    """Clips/s the trainer's DataLoader supplies with nothing else running, timed after `skip` batches (pass more
    than the workers' first prefetch, which arrives at once)."""
    loader = iter(trainer._loader())
    for _ in range(skip):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - start)


def step_rate(trainer: FeedTrainer, steps: int, warmup: int, batch_size: int) -> tuple[float, float]:
    """Clips/s of `steps` optimiser steps of the trainer's own loop, after `warmup` untimed ones, and the share of
    that time the loop waited for batches."""
    stamps: list[float] = []
    hook = trainer.optimizer.register_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    trainer.progress.samples_in_epoch = 0  # every phase reads the epoch from its start
    trainer.settings.max_steps = trainer.progress.global_step + warmup + steps
    try:
        with StopRequest() as stop:
            outcome = trainer.train_epoch(stop)
        synchronize(trainer.device)
    finally:
        hook.remove()
    if outcome is not Outcome.MAX_STEPS or len(stamps) != warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} optimiser steps, the loop ended ({outcome.value}) after "
                           f"{len(stamps)}: are there enough samples?")
    window = stamps[-1] - stamps[warmup]
    waited = sum(wait for start, wait in trainer.clock.waits if stamps[warmup] <= start < stamps[-1])
    return (steps - 1) * batch_size / window, waited / window


def resident_batch(dataset: WebVidDataset, batch_size: int, device: torch.device) -> dict[str, Any]:
    return batch_to_device(collate_clips([dataset[i] for i in range(batch_size)]), device)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) - 2)  # one core for the training process, one for the rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, help="clips per step (default 32; --tiny: 4)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: usable cores - 2)")
    parser.add_argument("--config", help="model configuration as in bench/train_step.py (default bf16 on a GPU, "
                                         "fp32 with --tiny), e.g. bf16+compile")
    parser.add_argument("--steps", type=int, help="timed optimiser steps on the resident batch, and at least as "
                                                  "many batches of the DataLoader alone (default 30; --tiny: 4)")
    parser.add_argument("--fed_steps", type=int, help="timed optimiser steps fed by the DataLoader (default: the "
                                                      "larger of --steps and 20 per worker)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; --tiny: 1)")
    parser.add_argument("--store", help="a folder written by frozen_tfrecord.py (frozen_train_labels.json, "
                                        "path.index) instead of the synthetic one")
    parser.add_argument("--videos", type=int, help="distinct synthetic videos (default 64; --tiny: 8)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, not speed")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    clip = TINY if args.tiny else CLIPConfig()
    resolve_counts(parser, args, {"batch": (4, 32, 2), "videos": (8, 64, 1), "steps": (4, 30, 2),
                                  "warmup": (1, 5, 0), "workers": (default_workers(), default_workers(), 0)})
    batch_size, videos, steps, warmup, workers = args.batch, args.videos, args.steps, args.warmup, args.workers
    enough_steps = max(steps, 20 * workers)  # see the docstring: the prefetch can hide at most 10%
    resolve_counts(parser, args, {"fed_steps": (enough_steps, enough_steps, 2)})
    fed_steps = args.fed_steps
    config = args.config or ("fp32" if args.tiny or device.type == "cpu" else "bf16")
    check_config_name(parser, config)
    first_prefetch = 2 * workers + warmup  # the DataLoader's default prefetch_factor is 2
    loader_batches = max(steps, 2 * first_prefetch)
    # one epoch covers each phase and the trainer's look-ahead
    samples = (max(warmup + fed_steps, first_prefetch + loader_batches) + 2) * batch_size

    with tempfile.TemporaryDirectory() as tmp:
        if args.store:
            labels, index = Path(args.store) / "frozen_train_labels.json", Path(args.store) / "path.index"
        else:
            labels, index = make_store(Path(tmp), videos, samples, *((64, 36) if args.tiny else (596, 336)),
                                       workers=0 if args.tiny else workers)
        try:
            dataset = build_checked(lambda: WebVidDataset(  # the stage-1 defaults
                labels, index, max_words=32, max_frames=12, image_size=clip.image_resolution, slice_framepos=2,
                seed=0, verify_crc=True), "--store")
        except (InputError, ValueError) as error:
            parser.error(str(error))
        if len(dataset) < samples:
            parser.error(f"{labels} has {len(dataset)} samples; this run needs {samples}")
        settings = TrainSettings(epochs=1, micro_batch_size=batch_size, accumulation_steps=1, lr=1e-7, coef_lr=1.0,
                                 new_params_lr=1e-7, weight_decay=0.2, warmup_proportion=0.0,
                                 precision=config.split("+")[0], num_workers=workers, n_display=10**9)
        run = RunLogger(Path(tmp) / "run", is_main=True, tensorboard=False)
        training_logs = logging.getLogger("t2vlp")
        level = training_logs.level
        training_logs.setLevel(logging.WARNING)  # the trainer's start-up lines would bury the table
        try:
            trainer = FeedTrainer(bench_model(clip, "stage1", config, device), dataset, settings, run,
                                  DistInfo(rank=0, world_size=1, local_rank=0, device=device), str(Path(tmp) / "run"),
                                  clip_pretraining_task())
            supply = loader_rate(trainer, loader_batches, first_prefetch, batch_size)
            trainer.resident_batch = resident_batch(dataset, batch_size, device)
            resident, _ = step_rate(trainer, steps, warmup, batch_size)
            trainer.resident_batch = None
            fed, waited = step_rate(trainer, fed_steps, warmup, batch_size)
        finally:
            training_logs.setLevel(level)
            run.close()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    source = args.store or f"synthetic {'64x36' if args.tiny else '596x336'} videos, JPEG TFRecords"
    print(f"{name}, torch {torch.__version__}, {len(os.sched_getaffinity(0))} usable cores; stage 1 {config}, "
          f"B {batch_size} x 12 frames x {clip.image_resolution}px; {source}")
    print(f"{'feed':36} {'workers':>7} {'timed':>6} {'clips/s':>9} {'of resident':>11} {'waiting':>8}")
    print(f"{'DataLoader alone (no model)':36} {workers:>7} {loader_batches:>6} {supply:9.4g} "
          f"{supply / resident:11.2f} {'-':>8}")
    print(f"{'training on a device-resident batch':36} {'-':>7} {steps:>6} {resident:9.4g} {1.0:11.2f} {'-':>8}")
    print(f"{'training fed from the TFRecords':36} {workers:>7} {fed_steps:>6} {fed:9.4g} {fed / resident:11.2f} "
          f"{waited:8.1%}")
    verdict = "meets" if fed / resident >= TARGET else "misses"
    print(f"loader-fed training {verdict} the target of {TARGET:.0%} of the device-resident rate", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
