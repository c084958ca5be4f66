"""bench/train_step.py --tiny: the benchmark table runs on the CPU (a smoke test; speed is measured on a GPU)."""

from __future__ import annotations

from bench import bench_eval, train_step


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


def test_largest_batch_search_finds_the_edge():
    search = train_step.largest_passing
    for edge in (0, 1, 2, 3, 37, 64, 100):  # 0 and 1: not even the smallest batch (2) fits
        calls = []

        def fits(size, edge=edge, calls=calls):
            calls.append(size)
            return size <= edge

        assert search(fits, limit=4096) == (edge if edge >= 2 else 0)
        assert min(calls) >= 2 and len(calls) <= 2 * max(edge, 1).bit_length() + 2
    assert search(lambda size: size <= 37, limit=30) == 30
    assert search(lambda size: size <= 37, limit=32) == 32
    assert search(lambda size: True, limit=6) == 6


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
