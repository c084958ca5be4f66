"""bench/train_step.py --tiny: the benchmark table runs on the CPU (a smoke test; speed is measured on a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "bench" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_every_stage_and_configuration(capsys):
    assert load_bench().main(["--tiny", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU, torch ")
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (stage, config, "2") for stage in ("stage1", "stage2") for config in ("fp32", "bf16", "fp32+ckpt")]
    for stage in ("stage1", "stage2"):
        numbers = [[float(v) for v in r[3:7]] for r in rows if r[0] == stage]
        first_rate = numbers[0][0]
        for clips_per_second, ratio, tflop_per_clip, share in numbers:
            assert clips_per_second > 0 and share > 0
            assert abs(ratio - clips_per_second / first_rate) < 0.01
            assert tflop_per_clip == numbers[0][2] > 0  # counted once per stage: the same work in every config
    stage1_flops = float(rows[0][5])
    assert float(rows[3][5]) > stage1_flops  # stage 2 adds a second text pass and the fusion encoder
