"""Runs never silently do the wrong thing: resume rules, --max_steps, stop codes, corrupt files, bad input
(one readable line, exit 2, the traceback in log.txt), run.json. Numbers refer to the items of the issue."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

import frozen_tfrecord
import main_task_clip
import main_task_fusion
from engine.checkpointing import load_restore
from tests.conftest import convert_to_webvid_tfrecords
from tests.model_helpers import TINY_CLIP, TINY_FUSION_CLIP
from tests.stage1_helpers import stage1_argv, stage2_argv
from tests.test_stage1_training import metrics
from tests.torchrun import CPU_ENV, ROOT


def run(demo, clip, out, *extra) -> int:
    return main_task_clip.main(stage1_argv(demo, clip, out, *extra))


def replace_flag(argv: list[str], name: str, value: str) -> list[str]:
    return [f"--{name}={value}" if a.startswith(f"--{name}=") else a for a in argv]


# 1 ------------------------------------------------------------------------------------------------------------


def test_a_missing_resume_model_is_an_error(small_demo, tiny_clip_checkpoint, tmp_path, capsys):
    code = run(small_demo, tiny_clip_checkpoint, tmp_path / "run", "--resume_model=/nonexistent/restore.bin")
    assert code == 2
    assert "--resume_model /nonexistent/restore.bin does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "restore.bin").exists()


# 2 ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_refuses_changed_fixed_settings_and_applies_them_when_allowed(small_demo, tiny_clip_checkpoint,
                                                                              tmp_path, capsys):
    out = tmp_path / "run"
    assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=2") == 0
    code = run(small_demo, tiny_clip_checkpoint, out, "--lr=5e-3", "--max_steps=3")
    assert code == 2
    err = capsys.readouterr().err
    assert "lr 0.001 -> 0.005" in err and "--allow_changed_settings" in err
    assert load_restore(out)["global_step"] == 2  # nothing trained

    argv = replace_flag(stage1_argv(small_demo, tiny_clip_checkpoint, out, "--max_steps=3",
                                    "--allow_changed_settings", "--batch_size_val=2"), "lr", "5e-3")
    assert main_task_clip.main(argv) == 0
    saved = load_restore(out)
    assert saved["global_step"] == 3 and saved["settings"]["lr"] == 5e-3
    rates = {group["name"]: group["initial_lr"] for group in saved["optim_state_dict"]["param_groups"]}
    assert rates["backbone_decay"] == pytest.approx(5e-3)  # coef_lr 1: the new rate is in effect
    entries = json.loads((out / "run.json").read_text())
    assert len(entries) == 3 and entries[-1]["changed_flags"]["lr"] == {"before": 0.001, "now": 0.005}
    # a different batch (per process or global) is a fixed setting too
    assert run(small_demo, tiny_clip_checkpoint, out, "--lr=5e-3", "--batch_size=4", "--max_steps=4") == 2
    assert "global_batch 8 -> 4" in capsys.readouterr().err


# 3 ------------------------------------------------------------------------------------------------------------


def test_max_steps_ends_the_run_and_a_rerun_says_so(small_demo, tiny_clip_checkpoint, tmp_path, caplog):
    out = tmp_path / "run"
    assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=2") == 0
    assert (out / "ckpt" / "pytorch_model.bin.2").is_file()
    assert [m["step"] for m in metrics(out)] == [2]
    log = (out / "log.txt").read_text()
    assert "reached --max_steps 2: the run is finished" in log and "rerun the same command" not in log
    with caplog.at_level(logging.INFO):
        assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=2") == 0
    assert "this run is already finished at step 2" in caplog.text
    assert load_restore(out)["global_step"] == 2 and [m["step"] for m in metrics(out)] == [2]
    # a larger --max_steps continues the same run (the schedule follows the new total)
    assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=4") == 0
    assert load_restore(out)["global_step"] == 4 and [m["step"] for m in metrics(out)] == [2, 3, 4]


# 4 ------------------------------------------------------------------------------------------------------------


def test_evaluation_data_is_checked_at_start_up(small_demo, tiny_clip_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    argv = replace_flag(stage1_argv(small_demo, tiny_clip_checkpoint, out), "features_path", str(tmp_path / "nowhere"))
    argv = [a for a in argv if not a.startswith("--data_path")] + [f"--data_path={small_demo['data_json']}"]
    # training reads the same (wrong) folder: start-up stops on the evaluation check before any step
    assert main_task_clip.main(argv) == 2
    err = capsys.readouterr().err
    assert "can be decoded from --features_path" in err and "nowhere" in err
    assert not (out / "restore.bin").exists()
    argv = replace_flag(stage1_argv(small_demo, tiny_clip_checkpoint, out), "val_csv", str(tmp_path / "no.csv"))
    assert main_task_clip.main(argv) == 2
    assert "--val_csv" in capsys.readouterr().err
    argv = [a for a in replace_flag(stage1_argv(small_demo, tiny_clip_checkpoint, out), "val_csv", "")
            if a != "--do_train"] + ["--do_eval"]
    assert main_task_clip.main(argv) == 2
    assert "--do_eval needs an evaluation split" in capsys.readouterr().err


# 5 ------------------------------------------------------------------------------------------------------------


def test_init_model_must_supply_the_models_weights(small_demo, tiny_clip_checkpoint, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert run(small_demo, tiny_clip_checkpoint, out, f"--init_model={tiny_clip_checkpoint}") == 2
    assert "supplies none of the model's" in capsys.readouterr().err

    assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=1") == 0
    evaluated = tmp_path / "eval"
    argv = [a for a in stage1_argv(small_demo, tiny_clip_checkpoint, evaluated) if a != "--do_train"]
    with caplog.at_level(logging.INFO):  # a restore.bin gives its model
        assert main_task_clip.main([*argv, "--do_eval", f"--init_model={out / 'restore.bin'}"]) == 0
    assert "is a restore.bin: taking its model weights only" in caplog.text
    assert metrics(evaluated)[0]["checkpoint"] == str((out / "restore.bin").resolve())
    assert metrics(evaluated)[0]["t2v"] == metrics(out)[0]["t2v"]

    partial = {k: v for k, v in torch.load(out / "ckpt" / "pytorch_model.bin.1")["model_state_dict"].items()
               if "local_visual" not in k}
    torch.save({"model_state_dict": partial}, tmp_path / "partial.bin")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main_task_clip.main([*argv, "--do_eval", f"--init_model={tmp_path / 'partial.bin'}"]) == 0
    warning = next(r.getMessage() for r in caplog.records if "--init_model" in r.getMessage())
    assert "missing weights keep their CLIP/random initialisation" in warning and "local_visual" in warning


# 6 ------------------------------------------------------------------------------------------------------------


def test_a_byte_flipped_record_is_skipped_and_counted_in_training(small_demo, tiny_clip_checkpoint, tmp_path):
    labels = convert_to_webvid_tfrecords(small_demo, tmp_path / "tfr")
    index = [line.split("\t") for line in (tmp_path / "tfr" / "path.index").read_text().splitlines()]
    video_id, shard, offset = index[3]
    shard_path = tmp_path / "tfr" / shard
    data = bytearray(shard_path.read_bytes())
    data[int(offset) + 40] ^= 0xFF  # inside the payload of the fourth record
    shard_path.write_bytes(bytes(data))
    out = tmp_path / "run"
    argv = replace_flag(stage1_argv(small_demo, tiny_clip_checkpoint, out, f"--dir_path={tmp_path / 'tfr'}",
                                    "--epochs=1"), "data_path", str(labels))
    assert main_task_clip.main(argv) == 0
    log = (out / "log.txt").read_text()
    assert f"skipping WebVid video {video_id}" in log and "CRC" in log
    assert load_restore(out)["progress"]["skipped_videos"] == 1

    # a conversion rerun does not keep the damaged shard: it is written again, identical to the original
    summary = frozen_tfrecord.convert(frozen_tfrecord.parse_args(
        ["--video_dir", str(small_demo["webvid_videos_dir"]), "--csv", str(small_demo["webvid_csv"]),
         "--output_dir", str(tmp_path / "tfr"), "--workers", "0", "--no_progress"]))
    assert summary.n_shards_resumed == summary.n_shards - 1
    data[int(offset) + 40] ^= 0xFF
    assert shard_path.read_bytes() == bytes(data)


# 7, 8 ---------------------------------------------------------------------------------------------------------


def test_corrupt_restore_is_named_and_the_previous_one_is_kept(small_demo, tiny_clip_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=4", "--save_steps=1") == 0
    previous = load_restore(out, path=out / "restore.bin.prev")
    assert previous["global_step"] == 3 and load_restore(out)["global_step"] == 4
    restore = out / "restore.bin"
    restore.write_bytes(restore.read_bytes()[: restore.stat().st_size // 2])  # truncated
    capsys.readouterr()  # progress bars of the first run
    assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(restore) in err[0] and "truncated or corrupt" in err[0]
    assert f"--resume_model {out / 'restore.bin.prev'}" in err[0]
    # resuming from the previous one works
    assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=5", f"--resume_model={out / 'restore.bin.prev'}") == 0
    assert load_restore(out)["global_step"] == 5


def test_stale_temporary_files_are_removed_at_start_up(small_demo, tiny_clip_checkpoint, tmp_path):
    out = tmp_path / "run"
    (out / "ckpt").mkdir(parents=True)
    stale = [out / ".restore.bin.abc123.tmp", out / "ckpt" / ".pytorch_model.bin.3.xyz.tmp",
             out / "restore.bin.prev.tmp"]
    for path in stale:
        path.write_bytes(b"half a save")
    assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=1") == 0
    assert not any(path.exists() for path in stale)
    assert "left by an interrupted save" in (out / "log.txt").read_text()


# 10 -----------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_converter_exit_codes_and_reports(small_demo, tmp_path):
    def convert(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "frozen_tfrecord.py"), *args, "--workers", "0",
                               "--no_progress"], cwd=ROOT, env={**os.environ, **CPU_ENV}, capture_output=True,
                              text=True, timeout=300)

    missing = convert("--video_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "a"))
    assert missing.returncode == 2 and "--video_dir" in missing.stderr and "Traceback" not in missing.stderr
    no_csv = convert("--video_dir", str(small_demo["webvid_videos_dir"]), "--csv", str(tmp_path / "no.csv"),
                     "--output_dir", str(tmp_path / "b"))
    assert no_csv.returncode == 2 and "--csv" in no_csv.stderr and "re-run" not in no_csv.stderr + no_csv.stdout
    empty = tmp_path / "empty_videos"
    empty.mkdir()
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("videoid,name,page_idx,page_dir,duration,contentUrl\n,,,,,\n1,a caption,1,d,2,u\n")
    nothing = convert("--video_dir", str(empty), "--csv", str(csv_path), "--output_dir", str(tmp_path / "c"))
    assert nothing.returncode == 2 and f"nothing to convert: no video under --video_dir {empty}" in nothing.stderr
    failures = (tmp_path / "c" / "failures.tsv").read_text()
    assert "malformed_row\t\t" in failures and "rows.csv:2" in failures  # the ",,,,," row is reported


# 11 and the one-line errors -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_smaller_input_checks(small_demo, tiny_clip_checkpoint, webvid_demo, tmp_path, capsys):
    out = tmp_path / "run"
    argv = replace_flag(stage1_argv(small_demo, tiny_clip_checkpoint, out), "data_path", str(tmp_path))
    assert main_task_clip.main(argv) == 2
    assert "is a folder" in capsys.readouterr().err
    empty_csv = tmp_path / "train.csv"
    empty_csv.write_text("video_id\n")
    assert main_task_clip.main(replace_flag(stage1_argv(small_demo, tiny_clip_checkpoint, out), "train_csv",
                                            str(empty_csv))) == 2
    assert "no training samples" in capsys.readouterr().err
    extra = tmp_path / "extra.csv"
    extra.write_text("video_id\nvideo0,unexpected\n")
    assert main_task_clip.main(replace_flag(stage1_argv(small_demo, tiny_clip_checkpoint, out), "train_csv",
                                            str(extra))) == 2
    assert "extra.csv, line 2: 2 fields, the header has 1" in capsys.readouterr().err
    webvid = replace_flag(stage1_argv(small_demo, tiny_clip_checkpoint, out, f"--dir_path={webvid_demo['tfrecord_dir']}"),
                          "data_path", str(webvid_demo["labels"]))
    assert main_task_clip.main([*replace_flag(webvid, "max_frames", "10"), "--max_steps=1"]) == 0
    assert ("WARNING t2vlp.data: --max_frames 10 exceeds the 8 frames stored per WebVid record: every clip gets 2 "
            "zero frames") in (out / "log.txt").read_text()
    help_text = subprocess.run([sys.executable, str(ROOT / "main_task_clip.py"), "--help"], cwd=ROOT,
                               env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=120).stdout
    assert "Training epochs" in help_text and "Seed of" in help_text and "WebVid records store" in help_text


def test_metrics_are_rounded_and_a_lost_evaluation_is_redone(small_demo, tiny_clip_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert run(small_demo, tiny_clip_checkpoint, out, "--epochs=1") == 0
    rows = (out / "metrics.jsonl").read_text()
    assert all(len(str(v).split(".")[-1]) <= 6 for v in json.loads(rows)["t2v"].values())
    # as if the run had been killed during its end-of-epoch evaluation: the row is missing
    (out / "metrics.jsonl").write_text("")
    assert run(small_demo, tiny_clip_checkpoint, out, "--epochs=1") == 0
    assert [m["step"] for m in metrics(out)] == [3]
    assert "did not finish before the run stopped: evaluating now" in (out / "log.txt").read_text()


@pytest.mark.integration
def test_bad_input_prints_one_line_and_logs_the_traceback(small_demo, tiny_clip_checkpoint, tmp_path):
    out = tmp_path / "run"
    argv = stage1_argv(small_demo, tiny_clip_checkpoint, out, "--resume_model=/nonexistent/restore.bin")
    result = subprocess.run([sys.executable, str(ROOT / "main_task_clip.py"), *argv], cwd=ROOT,
                            env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "main_task_clip.py: error: --resume_model /nonexistent/restore.bin does not exist (omit it to resume from "
        f"{out / 'restore.bin'} when present)"]
    assert "Traceback" not in result.stdout + result.stderr
    log = (out / "log.txt").read_text()
    assert "Traceback (most recent call last)" in log and "InputError" in log
    debug = subprocess.run([sys.executable, str(ROOT / "main_task_clip.py"), *argv, "--debug"], cwd=ROOT,
                           env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_model_settings_the_clip_cannot_take_are_one_line_errors(small_demo, tiny_clip_checkpoint,
                                                                 tiny_fusion_clip_checkpoint, stage1_checkpoint,
                                                                 tmp_path, capsys):
    assert run(small_demo, tiny_clip_checkpoint, tmp_path / "clip", "--split_layer=99") == 2
    error = capsys.readouterr().err.strip().splitlines()  # in-process, the script name is pytest's
    assert len(error) == 1 and error[0].endswith(
        f": error: split_layer 99 is outside the {TINY_CLIP.vision_layers} blocks of this CLIP")
    argv = stage2_argv(small_demo, tiny_fusion_clip_checkpoint, stage1_checkpoint, tmp_path / "fusion",
                       "--fusion_layers=9")
    assert main_task_fusion.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].endswith(
        f": error: fusion_layers 9 must be in 1..{TINY_FUSION_CLIP.transformer_layers} (the text tower's blocks)")


def test_run_json_records_every_invocation(small_demo, tiny_clip_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=1") == 0
    assert run(small_demo, tiny_clip_checkpoint, out, "--max_steps=2") == 0
    entries = json.loads((out / "run.json").read_text())
    assert len(entries) == 2
    first = entries[0]
    assert first["flags"]["lr"] == 0.001 and first["world_size"] == 1 and first["global_batch"] == 8
    assert first["per_process_batch"] == 8 and first["torch"] == torch.__version__ and first["python"]
    assert len(first["git"]["commit"] or "") in (0, 40) and "dirty" in first["git"]
    assert entries[1]["changed_flags"] == {"max_steps": {"before": 1, "now": 2}}


@pytest.mark.integration
def test_start_scripts_check_their_inputs_before_launching(tmp_path):
    for script in ("start_clip.sh", "start_fusion.sh"):
        env = {**os.environ, **CPU_ENV, "DATA_PATH": str(tmp_path / "nowhere"), "INIT_MODEL": "x",
               "CLIP_PATH": str(tmp_path / "missing.pt")}
        result = subprocess.run(["bash", str(ROOT / script)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, script
        assert "DATA_PATH" in result.stderr and "torch.distributed" not in result.stderr
        (tmp_path / "nowhere").mkdir(exist_ok=True)
        result = subprocess.run(["bash", str(ROOT / script)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "missing.pt" in result.stderr and "fetch_clip.py" in result.stderr
        (tmp_path / "clip.pt").write_bytes(b"x")
        (tmp_path / "init.bin").write_bytes(b"x")
        result = subprocess.run(["bash", str(ROOT / script)], env={**env, "CLIP_PATH": str(tmp_path / "clip.pt"),
                                "INIT_MODEL": str(tmp_path / "init.bin")}, capture_output=True, text=True, timeout=60)
        labels = tmp_path / "nowhere" / "WebVid_TFRecord" / "frozen_train_labels.json"
        assert result.returncode == 2 and f"'{labels}' is not a file: convert a corpus" in result.stderr
        shutil.rmtree(tmp_path / "nowhere")


def launch_command(nproc: int) -> list[str]:
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "PYTHON": "py"}
    script = 'source tools/launch.sh; printf "%s\\n" "${launch[@]}"'
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return result.stdout.split()


@pytest.mark.integration
def test_launchers_use_torchrun_only_for_more_than_one_process():
    assert launch_command(1) == ["py"]
    assert launch_command(2)[:3] == ["py", "-m", "torch.distributed.run"] and "--nproc_per_node=2" in launch_command(2)


@pytest.mark.integration
def test_one_process_launch_reports_the_scripts_own_error_and_exit_code(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "frozen_train_labels.json").write_text("[]")
    (tmp_path / "clip.pt").write_bytes(b"not a checkpoint")
    env = {**os.environ, **CPU_ENV, "DATA_PATH": str(tmp_path / "data"), "CLIP_PATH": str(tmp_path / "clip.pt"),
           "OUTPUT_PATH": str(tmp_path / "out"), "NPROC_PER_NODE": "1"}
    result = subprocess.run(["bash", str(ROOT / "start_clip.sh")], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    # the training data is checked first (before any model is built): the store has no index
    assert result.stderr.startswith("main_task_clip.py: error: --data_path / --dir_path: No such file or directory")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "torch.distributed" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("script, dataset", [("start_retrieval.sh", "msvd"), ("start_caption.sh", "msvd"),
                                             ("start_qa.sh", "msrvtt")])
@pytest.mark.integration
def test_task_launchers_check_their_inputs_before_launching(tmp_path, script, dataset):
    clip = tmp_path / "clip.pt"
    clip.write_bytes(b"x")
    (tmp_path / "data").mkdir()
    env = {**os.environ, **CPU_ENV, "DATA_PATH": str(tmp_path / "data"), "CLIP_PATH": str(clip), "DATASET": dataset}

    def launch(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / script)], env={**env, **extra}, capture_output=True, text=True,
                              timeout=60)

    result = launch(INIT_MODEL=str(tmp_path / "missing.bin"))
    assert result.returncode == 2 and "missing.bin' is not a file: set INIT_MODEL" in result.stderr
    result = launch(INIT_MODEL=str(clip))
    assert result.returncode == 2 and "not found: set VIDEO_PATH" in result.stderr
    result = launch(INIT_MODEL=str(clip), DATASET="nope")
    assert result.returncode == 2 and "DATASET must be" in result.stderr
    assert "torch.distributed" not in result.stderr
