"""One writer per output folder: a second trainer, converter or `predict.py index` into a folder in use is refused
with one line naming the holder, touches nothing there, and the first one finishes with complete outputs; a kill
leaves no stale lock. And failures that end a run read as one line and are recorded in run.json."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import frozen_tfrecord as ft
import main_task_clip
from dataloaders.clip_store import read_frames
from dataloaders.files import FolderInUseError, FolderLock
from tests.stage1_helpers import stage1_argv
from tests.test_frozen_tfrecord import make_many_videos, run_cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def wait_for(condition, process: subprocess.Popen, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"the first writer ended before {what}: {process.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_trainer_into_a_folder_in_use_is_refused(small_demo, tiny_clip_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    argv = stage1_argv(small_demo, tiny_clip_checkpoint, out, "--epochs=3")
    first = subprocess.Popen([sys.executable, str(ROOT / "main_task_clip.py"), *argv], cwd=ROOT,
                             env={**os.environ, **CPU_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (out / "log.txt").is_file() and "step 1/" in (out / "log.txt").read_text(), first,
                 "its first step")
        assert main_task_clip.main(argv) == 2  # the same command: it would have resumed from the live restore.bin
        [line] = capsys.readouterr().err.splitlines()
        assert f"--output_dir {out} is in use by pid {first.pid} on " in line and "main_task_clip.py" in line
        assert main_task_clip.main([*argv, "--lr=0.5"]) == 2  # other flags: refused before anything is touched
        output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output[-2000:]
    entries = json.loads((out / "run.json").read_text())
    assert [entry["outcome"] for entry in entries] == ["finished"]  # the refused starts wrote nothing
    log = (out / "log.txt").read_text()
    assert log.count("command line:") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [3, 6, 9]  # one row per evaluation
    assert main_task_clip.main(argv) == 0  # the folder is free again: the finished run says so and exits 0


def test_a_killed_trainer_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from dataloaders.files import FolderLock; FolderLock(sys.argv[2]).acquire(); "
                               "print('held', flush=True); time.sleep(600)", str(ROOT), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderInUseError, match=f"in use by pid {holder.pid}"):
        FolderLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with FolderLock(tmp_path):  # released by the kernel with the process
        pass


def test_a_second_converter_is_refused_and_the_first_output_is_complete(tmp_path, capsys):
    videos = make_many_videos(tmp_path, 7)
    blocking = videos / "2004.mp4"  # the first conversion waits on this FIFO while the second starts
    blocking.rename(tmp_path / "2004.mp4")
    os.mkfifo(blocking)
    out = tmp_path / "store"
    args = ["--video_dir", str(videos), "--csv", str(tmp_path / "labels.csv"), "--shard_size", "2"]
    first = run_cli(*args, "--output_dir", str(out), "--workers", "0")
    try:
        wait_for(lambda: (out / "path-00001.meta.json").exists(), first, "its second shard")
        (tmp_path / "other.csv").write_text("videoid,name\n2000,another caption\n", encoding="utf-8")
        other = ["--video_dir", str(videos), "--csv", str(tmp_path / "other.csv"), "--output_dir", str(out)]
        assert ft.main([*other, "--workers", "0", "--no_progress"]) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert f"in use by pid {first.pid}" in line
        with pytest.raises(FolderInUseError):  # a part would share the folder with the whole conversion: refused
            ft.convert(ft.parse_args([*args, "--output_dir", str(out), "--num_parts", "2", "--part", "1",
                                      "--no_progress"]))
        with open(blocking, "wb"):  # let the first one go on: the FIFO is no video (a bad_video failure)
            pass
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output
    labels = json.loads((out / "frozen_train_labels.json").read_text())
    assert len(labels) == 6 and "another caption" not in json.dumps(labels)
    for row in labels:  # every record listed is readable
        assert read_frames(out, row["video_id"]).shape[0] > 0
    assert not list(out.glob(".*.tmp"))


def test_parts_share_a_folder_and_a_whole_conversion_waits_for_them(tmp_path):
    videos = make_many_videos(tmp_path, 7)
    blocking = videos / "2000.mp4"
    blocking.rename(tmp_path / "2000.mp4")
    os.mkfifo(blocking)
    out = tmp_path / "store"
    args = ["--video_dir", str(videos), "--csv", str(tmp_path / "labels.csv"), "--shard_size", "2",
            "--output_dir", str(out), "--num_parts", "2"]
    part0 = run_cli(*args, "--part", "0", "--workers", "0")
    try:
        wait_for(lambda: any(out.glob(".t2vlp.lock.part-000-of-002")), part0, "part 0's lock")
        time.sleep(0.5)
        assert ft.convert(ft.parse_args([*args, "--part", "1", "--workers", "0", "--no_progress"])).n_shards == 2
        with pytest.raises(FolderInUseError, match=r"1 part\(s\) of a conversion"):
            ft.convert(ft.parse_args(["--video_dir", str(videos), "--output_dir", str(out), "--no_progress"]))
        with open(blocking, "wb"):
            pass
        part0.communicate(timeout=120)
    finally:
        if part0.poll() is None:
            part0.kill()
    assert part0.returncode == 0


# ----------------------------------------------------------------------------------------------- failures


def test_a_full_disk_at_the_first_restore_bin_is_one_line_and_recorded(small_demo, tiny_clip_checkpoint, tmp_path):
    """A real write failure: the process may not write files larger than 3 MB (the tiny model's checkpoint fits,
    its restore.bin, with the optimiser state, does not), as a full disk fails the first save that needs room."""
    out = tmp_path / "run"
    argv = stage1_argv(small_demo, tiny_clip_checkpoint, out, "--epochs=2")

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))

    result = subprocess.run([sys.executable, str(ROOT / "main_task_clip.py"), *argv], cwd=ROOT,
                            env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=300,
                            preexec_fn=small_files)
    assert result.returncode == 74, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("main_task_clip.py: error: could not save step 3 in ")
    assert "File too large (errno 27)" in line and "nothing saved yet" in line and "rerun the same command" in line
    assert "Traceback" in (out / "log.txt").read_text()
    outcome = json.loads((out / "run.json").read_text())[-1]["outcome"]
    assert outcome.startswith("error: CheckpointWriteError: could not save step 3")
    assert not (out / "restore.bin").exists() and not list(out.glob(".*.tmp"))
    assert main_task_clip.main(argv) == 0  # with room again the same command trains from the start
