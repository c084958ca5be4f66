"""bench/feed_rate.py: the loader-vs-resident comparison runs on the CPU, and its resident phase really reads no
data (a smoke test of the script; the speed itself is measured on a GPU)."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from bench import feed_rate
from dataloaders.collate import clip_sample
from engine.distributed import DistInfo
from engine.run_logging import RunLogger
from engine.tasks.clip_pretraining import clip_pretraining_task
from engine.trainer import TrainSettings


def test_tiny_run_prints_the_three_feeds_and_the_verdict(capsys):
    training_logs = logging.getLogger("t2vlp")
    level = training_logs.level
    assert feed_rate.main(["--tiny", "--steps", "3", "--fed_steps", "5"]) == 0
    assert training_logs.level == level  # the tests after this one read the training loop's INFO lines
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU, torch ") and "stage 1 fp32, B 4 x 12 frames x 32px" in lines[0]
    rows = {line[:36].strip(): line[36:].split() for line in lines[2:5]}
    assert list(rows) == ["DataLoader alone (no model)", "training on a device-resident batch",
                          "training fed from the TFRecords"]
    assert [row[:2] for row in rows.values()] == [["1", "6"], ["-", "3"], ["1", "5"]]  # workers, timed
    resident = float(rows["training on a device-resident batch"][2])
    assert resident > 0
    for name in ("DataLoader alone (no model)", "training fed from the TFRecords"):
        rate, share = (float(v) for v in rows[name][2:4])
        assert rate > 0 and abs(share - rate / resident) <= printed_ratio_error(rate / resident)
    assert 0 <= float(rows["training fed from the TFRecords"][4].rstrip("%")) <= 100
    fed_share = float(rows["training fed from the TFRecords"][3])
    if abs(fed_share - 0.90) > 0.005:  # the printed share is rounded: stay off the edge
        assert lines[5].startswith(f"loader-fed training {'meets' if fed_share >= 0.90 else 'misses'} the target")


def printed_ratio_error(ratio: float) -> float:
    """The most a share printed with 2 decimals can differ from the ratio of two rates printed with 4 significant
    digits: half a unit of the share's last digit plus the rates' relative rounding (at most 5e-4 each)."""
    return 0.005 + ratio * (1.0005 / 0.9995 - 1) + 1e-9


def test_wait_clock_records_the_time_spent_waiting_for_each_batch(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(feed_rate.time, "perf_counter", lambda: now[0])

    def slow():
        for delay in (0.0, 0.5):
            now[0] += delay  # the batch takes `delay` seconds to arrive
            yield delay
        now[0] += 0.25

    clock = feed_rate.WaitClock(slow())
    assert list(clock) == [0.0, 0.5]
    assert clock.waits == [(100.0, 0.0), (100.0, 0.5), (100.5, 0.25)]  # the last call ends the iteration


class CountingClips(Dataset):
    """Random uint8 clips that count how often they are read."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size, self.reads = n, size, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        self.reads += 1
        ids = [49406, 320 + index, 49407] + [0] * 5
        video = torch.randint(0, 256, (3, 3, self.size, self.size), dtype=torch.uint8)
        return clip_sample(ids, [int(i > 0) for i in ids], video, torch.ones(3, dtype=torch.long), str(index), index)


def test_resident_phase_reads_no_data_and_the_fed_phase_reads_each_step(tmp_path):
    dataset = CountingClips(24, feed_rate.TINY.image_resolution)
    settings = TrainSettings(epochs=1, micro_batch_size=2, accumulation_steps=1, lr=1e-7, coef_lr=1.0,
                             new_params_lr=1e-7, weight_decay=0.2, warmup_proportion=0.0, n_display=10**9)
    run = RunLogger(tmp_path, is_main=True, tensorboard=False)
    cpu = torch.device("cpu")
    model = feed_rate.bench_model(feed_rate.TINY, "stage1", "fp32", cpu)
    trainer = feed_rate.FeedTrainer(model, dataset, settings, run, DistInfo(0, 1, 0, cpu), str(tmp_path),
                                    clip_pretraining_task())
    trainer.resident_batch = feed_rate.resident_batch(dataset, 2, cpu)
    dataset.reads = 0
    rate, waited = feed_rate.step_rate(trainer, steps=3, warmup=1, batch_size=2)
    assert rate > 0 and 0 <= waited < 1
    assert dataset.reads == 0 and trainer.progress.global_step == 4
    trainer.resident_batch = None
    rate, waited = feed_rate.step_rate(trainer, steps=3, warmup=1, batch_size=2)
    assert rate > 0 and 0 <= waited < 1
    # 4 steps of 2 clips, plus the one-step look-ahead of the loop; the phase restarts the epoch
    assert dataset.reads == (4 + 1) * 2 and trainer.progress.global_step == 8
    run.close()

