"""bench/train_step.py --tiny: the benchmark table runs on the CPU (a smoke test; speed is measured on a GPU);
the bench scripts refuse bad settings in one line."""

from __future__ import annotations

import pytest
import torch

from bench import bench_eval, feed_rate, train_step


def test_tiny_run_prints_every_stage_and_configuration(capsys):
    assert train_step.main(["--tiny", "--repeats", "1"]) == 0
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


def counting(edge: int) -> tuple[list[int], object]:
    calls: list[int] = []

    def fits(size: int) -> bool:
        calls.append(size)
        return size <= edge

    return calls, fits


def test_largest_batch_search_finds_the_edge():
    search = train_step.largest_passing
    for edge in (0, 1, 2, 3, 37, 64, 100):  # 0 and 1: not even the smallest batch (2) fits
        calls, fits = counting(edge)
        assert search(fits, limit=4096) == ((edge, edge + 1) if edge >= 2 else (0, 2))
        assert min(calls) >= 2 and len(calls) <= 2 * max(edge, 1).bit_length() + 2
    assert search(lambda size: size <= 37, limit=30) == (30, None)
    assert search(lambda size: size <= 37, limit=32) == (32, None)
    assert search(lambda size: True, limit=6) == (6, None)


def test_largest_batch_search_from_a_guess_within_a_resolution():
    search = train_step.largest_passing
    for edge, guess in ((1500, 1400), (1500, 1600), (1500, 1500), (1500, 3000), (1500, 200), (5, 1000)):
        calls, fits = counting(edge)
        good, bad = search(fits, limit=4096, guess=guess, resolution=8)
        assert good <= edge < bad and bad - good <= 8
        if abs(guess - edge) <= 0.1 * edge:  # a good guess: one step brackets the edge, then 5 halvings
            assert len(calls) <= 7, calls
    calls, fits = counting(1500)
    assert search(fits, limit=4096, guess=1400, resolution=1) == (1500, 1501)
    assert search(counting(1)[1], limit=4096, guess=100) == (0, 2)
    assert search(counting(5000)[1], limit=4096, guess=4000, resolution=8) == (4096, None)
    assert search(counting(5000)[1], limit=4096, guess=9000) == (4096, None)  # a guess past the limit is clamped


def test_tiny_run_reports_the_largest_batch(capsys):
    argv = ["--tiny", "--repeats", "1", "--stages", "stage1", "--configs", "fp32", "--largest_batch", "fp32+ckpt",
            "--largest_batch_limit", "3"]
    assert train_step.main(argv) == 0
    assert "largest batch: stage1 fp32+ckpt: 3 (the search limit" in capsys.readouterr().out


def test_eval_bench_tiny_prints_encoding_and_rerank(capsys):
    assert bench_eval.main(["--tiny", "--repeats", "1"]) == 0
    encoding, rerank = capsys.readouterr().out.splitlines()[1:3]
    assert encoding.startswith("encoding: ") and float(encoding.split()[1]) > 0
    assert rerank.startswith("rerank: ") and float(rerank.split()[1]) > 0
    assert "(2560 pairs," in rerank  # 40 texts x top-32 videos + 40 videos x top-32 texts


def test_memory_guess_extrapolates_the_peak_of_two_small_steps(monkeypatch):
    """The GPU path with torch.cuda's memory queries simulated: a step's peak is 3 GiB + 0.1 GiB per clip, the card
    has 80 GiB, of which the process holds 2 GiB (after emptying its cache) and 78 GiB are free."""
    gib = 2**30
    peak = {"now": 0}

    def fits(size: int) -> bool:
        peak["now"] = 3 * gib + size * gib // 10
        return True

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: peak.update(now=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peak["now"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (78 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * gib)
    assert train_step.memory_guess(fits, torch.device("cuda")) == 770  # (80 - 3) GiB / 0.1 GiB
    assert train_step.memory_guess(fits, torch.device("cpu")) is None
    assert train_step.memory_guess(lambda size: size < 10, torch.device("cuda")) is None  # 16 does not fit


@pytest.mark.parametrize("script, argv, message", [
    (train_step, ["--batch", "2", "1"], "--batch must be at least 2, got 1"),  # the losses need two pairs
    (train_step, ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (train_step, ["--largest_batch", "bf16+ckpt", "--largest_batch_resolution", "0"],
     "--largest_batch_limit must be at least 2 and --largest_batch_resolution at least 1"),
    (train_step, ["--configs", "bf16+fast"], "unknown configuration 'bf16+fast'"),
    (bench_eval, ["--top_k", "0"], "--top_k must be at least 1, got 0"),
    (bench_eval, ["--split", "0"], "--split must be at least 1, got 0"),
    (feed_rate, ["--batch", "0"], "--batch must be at least 2, got 0"),
    (feed_rate, ["--workers", "-1"], "--workers must be at least 0, got -1"),
    (feed_rate, ["--store", "{tmp}"], "--store: No such file or directory: {tmp}"),  # an empty folder
])
def test_bad_settings_are_one_line_errors_before_measuring(script, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        script.main(["--tiny", *(arg.format(tmp=tmp_path) for arg in argv)])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was measured first
    lines = captured.err.strip().splitlines()  # argparse: the usage, then one error line
    assert lines[0].startswith("usage: ") and f": error: {message.format(tmp=tmp_path)}" in lines[-1]
    assert not any("Traceback" in line for line in lines)


def test_tiny_run_measures_a_named_open_clip_backbone(capsys):
    assert train_step.main(["--tiny", "--repeats", "1", "--stages", "stage1", "--configs", "fp32",
                            "--clip_model", "ViT-L-14"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("open_clip's ViT-L-14 (GELU)") and lines[2].split()[:3] == ["stage1", "fp32", "2"]
