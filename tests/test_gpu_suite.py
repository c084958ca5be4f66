"""bench/gpu_suite.sh: the one call a session with a GPU makes. Its parts run with a stand-in interpreter here
(each part itself has its own smoke test), so what is checked is the suite: order, selection, going on after a
failed part, and refusing an unknown part."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]

# A stand-in for Python: answers the suite's import and device checks, records every script call, and fails the
# feed part.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == -c ]]; then echo "torch fake"; exit 0; fi
echo "$*" >> "$CALLS"
[[ "$1" == bench/feed_rate.py ]] && { echo "feed broke"; exit 3; }
echo "ran $1"
[[ "$1" == bench/train_step.py ]] && echo "stage1  bf16  32  123.4"
true
"""


def run_suite(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.touch()
    result = subprocess.run(["bash", "bench/gpu_suite.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHON": str(python), "CALLS": str(calls),
                                 "OUT": str(tmp_path / "out"), **env})
    return result, calls.read_text().splitlines()


def test_parts_run_in_target_order_and_a_failed_part_does_not_stop_the_rest(tmp_path: Path) -> None:
    result, calls = run_suite(tmp_path)
    assert result.returncode == 0, result.stderr
    assert [call.split()[0] for call in calls] == [
        "bench/train_step.py", "bench/bench_eval.py", "bench/feed_rate.py", "bench/bench_eval.py",
        "bench/train_step.py", "bench/train_step.py"]
    assert calls[0].endswith("--configs bf16 bf16+compile bf16+compile+ckpt")
    assert calls[2].endswith("--config bf16+compile")
    assert calls[3].endswith("--compile")
    assert calls[4].endswith("--configs bf16+ckpt --repeats 1 --largest_batch bf16+ckpt")
    assert calls[5].endswith("--configs fp32 bf16")
    out = tmp_path / "out"
    assert "== feed failed (exit 3)" in (out / "feed.txt").read_text()
    assert "ran bench/train_step.py" in (out / "fp32.txt").read_text()
    summary = result.stdout.split("Summary:")[1].splitlines()
    assert "table: stage1  bf16  32  123.4" in summary and "fp32: stage1  bf16  32  123.4" in summary
    assert "feed: == feed failed (exit 3)" in summary
    assert any(line.startswith("eval: == eval took ") for line in summary)
    assert sorted(path.name for path in out.iterdir()) == [
        "device.txt", "eval.txt", "eval_compiled.txt", "feed.txt", "fp32.txt", "largest.txt", "table.txt"]


def test_chosen_parts_only_and_tiny_flags(tmp_path: Path) -> None:
    result, calls = run_suite(tmp_path, PARTS="eval largest", TINY="1")
    assert result.returncode == 0, result.stderr
    assert calls == ["bench/bench_eval.py --tiny",
                     "bench/train_step.py --tiny --configs fp32+ckpt --repeats 1 --largest_batch fp32+ckpt "
                     "--largest_batch_limit 4"]


def test_an_unknown_part_is_refused_before_anything_runs(tmp_path: Path) -> None:
    result, calls = run_suite(tmp_path, PARTS="table tabel")
    assert result.returncode == 2
    assert "unknown part 'tabel'" in result.stderr
    assert calls == []
