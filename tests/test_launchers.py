"""The launchers run each stage's and task's recipe (tools/recipes.sh) as the original scripts did (docs/method.md §8):
every launcher is run with a stand-in interpreter that records its calls, and the recorded command lines are
parsed with the entry scripts' own parser."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from engine.args import parse_args

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = """#!/usr/bin/env bash
printf '%q ' "$@" >> "$CALLS"; echo >> "$CALLS"
for a in "$@"; do if [[ "$a" == latest ]]; then echo /demo/latest.bin; fi; done
"""
TASK_OF = {"main_task_clip.py": "clip", "main_task_fusion.py": "fusion"}


def task_of(script: str) -> str:
    name = Path(script).name
    if name in TASK_OF:
        return TASK_OF[name]
    return "retrieval" if "retrieval" in name else "caption" if "captioning" in name else "qa"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for videos in ("MSRVTT_Videos", "MSVD_Videos", "LSMDC_Videos", "DiDeMo_Videos", "ActivityNet_Videos"):
        (root / videos).mkdir()
    for name in ("clip.pt", "init.bin", "frozen_train_labels.json"):
        (root / name).write_bytes(b"x")
    return root


def launch(tmp_path: Path, launcher: str, *args: str, **env: str) -> tuple[list[list[str]], subprocess.CompletedProcess]:
    """The interpreter calls `launcher` makes (each as its argument list) and its result."""
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": str(stand_in), "CALLS": str(calls),
                   "NPROC_PER_NODE": "1", **env}
    result = subprocess.run(["bash", str(ROOT / launcher), *args], env=environment, capture_output=True, text=True,
                            timeout=60)
    return [shlex.split(line) for line in calls.read_text().splitlines()], result


def parsed(call: list[str]):
    script = next(i for i, arg in enumerate(call) if arg.endswith(".py"))
    return call[script], parse_args(call[script + 1:], task=task_of(call[script]), world_size=1)


def real(data: Path, **env: str) -> dict[str, str]:
    return {"DATA_PATH": str(data), "CLIP_PATH": str(data / "clip.pt"), "INIT_MODEL": str(data / "init.bin"), **env}


# (launcher, environment, script, {flag: value} of the original recipe)
ORIGINAL = [
    ("start_clip.sh", {}, "main_task_clip.py",
     dict(epochs=5, lr=1e-4, coef_lr=1e-3, batch_size=32, max_words=32, max_frames=12, feature_framerate=1,
          num_thread_reader=2, expand_msrvtt_sentences=True, init_model=None, data_path="frozen_train_labels.json")),
    ("start_fusion.sh", {}, "main_task_fusion.py",
     dict(epochs=10, lr=1e-5, coef_lr=1e-3, warmup_proportion=0.2, feature_framerate=2, num_thread_reader=4,
          init_model="init.bin", dir_path="WebVid_TFRecord")),
    ("start_retrieval.sh", {"DATASET": "msvd"}, "video_text_retrieval/main_task_retrieval_msvd.py",
     dict(epochs=5, lr=5e-5, coef_lr=1e-3, feature_framerate=2, max_words=32, datatype="msvd", do_train=True,
          features_path="MSVD_Videos")),
    ("start_retrieval.sh", {"DATASET": "didemo", "EVAL_ONLY": "1", "MAX_WORDS": "56"},
     "video_text_retrieval/main_task_retrieval_didemo.py",
     dict(do_train=False, do_eval=True, max_words=56, features_path="DiDeMo_Videos")),
    ("start_retrieval.sh", {"DATASET": "activitynet"}, "video_text_retrieval/main_task_retrieval_activitynet.py",
     dict(epochs=5, lr=5e-5, max_words=56, max_frames=12, datatype="activitynet", features_path="ActivityNet_Videos")),
    ("start_caption.sh", {"DATASET": "msrvtt"}, "video_captioning/msrvtt_captioning.py",
     dict(epochs=10, lr=5e-5, warmup_proportion=0.2, feature_framerate=1, data_path="MSRVTT_data.json",
          features_path="MSRVTT_Videos")),
    ("start_qa.sh", {"DATASET": "msvd", "QA_HEAD": "first_token", "EVAL_ONLY": "1"}, "video_qa/main_task_qa_msvd.py",
     dict(epochs=5, lr=2e-4, feature_framerate=1, qa_head="first_token", do_eval=True, seed=2021,
          qa_anslabel_json="train_ans2label.json", youtube_mapping="youtube_mapping.txt")),
]


@pytest.mark.parametrize("launcher, env, script, expected", ORIGINAL, ids=[f"{o[0]}-{i}" for i, o in
                                                                          enumerate(ORIGINAL)])
def test_launchers_run_the_original_recipes(tmp_path, data, launcher, env, script, expected):
    calls, result = launch(tmp_path, launcher, "--max_steps", "7", **real(data, **env))
    assert result.returncode == 0, result.stderr
    assert len(calls) == 1
    called, args = parsed(calls[0])
    assert called == script
    for flag, value in expected.items():
        got = getattr(args, flag)
        if isinstance(value, str) and isinstance(got, str):
            assert Path(got).name == value or got.endswith(value), (flag, got)
        else:
            assert got == value, (flag, got)
    assert (args.loose_type, args.linear_patch, args.sim_header, args.slice_framepos) == (True, "2d", "meanP", 2)
    assert args.visual_pretrain_path == str(data / "clip.pt") and args.max_steps == 7  # the launcher's own last


def test_torchrun_for_several_processes_and_a_global_batch_per_node(tmp_path, data):
    calls, result = launch(tmp_path, "start_clip.sh", **real(data, NPROC_PER_NODE="8"))
    assert result.returncode == 0, result.stderr
    assert calls[0][:2] == ["-m", "torch.distributed.run"]  # one node: the static rendezvous, as before
    assert {"--nnodes=1", "--node_rank=0", "--nproc_per_node=8", "--master_addr=127.0.0.1"} <= set(calls[0])
    calls, result = launch(tmp_path, "start_clip.sh", **real(data, NNODES="2", MASTER_ADDR="head",
                                                              NPROC_PER_NODE="8", WEBVID_PATH="s3://bucket/webvid"))
    assert result.returncode == 0, result.stderr
    assert {"--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29500",
            "--rdzv-id=t2vlp", "--max-restarts=0"} <= set(calls[0])  # several nodes: c10d rendezvous
    _, args = parsed(calls[0])
    assert (args.batch_size, args.dir_path) == (64, "s3://bucket/webvid")


def test_max_restarts_uses_the_c10d_rendezvous_also_for_one_process(tmp_path, data):
    calls, result = launch(tmp_path, "start_fusion.sh", **real(data, MAX_RESTARTS="3", RDZV_ENDPOINT="n0:1234",
                                                                RDZV_ID="job7"))
    assert result.returncode == 0, result.stderr
    assert calls[0][:2] == ["-m", "torch.distributed.run"]
    assert {"--nproc_per_node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=n0:1234", "--rdzv-id=job7",
            "--max-restarts=3"} <= set(calls[0])


@pytest.mark.parametrize("launcher, env, stage", [("start_clip.sh", {}, None), ("start_fusion.sh", {}, 1),
                                                  ("start_retrieval.sh", {}, 2), ("start_caption.sh", {}, 2),
                                                  ("start_qa.sh", {"DATASET": "msvd"}, 2)])
def test_without_data_path_the_demo_recipe_runs_and_is_summarised(tmp_path, launcher, env, stage):
    calls, result = launch(tmp_path, launcher, **env, OUTPUT_PATH=str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert calls[0][:3] == ["-m", "tools.demo", "prepare"]
    if stage:
        assert calls[1] == ["-m", "tools.demo", "latest", "--stage", str(stage)]
    _, args = parsed(calls[-2])
    assert args.visual_pretrain_path == "./demo_data/ViT-demo.pt" and args.max_frames == 4
    assert args.output_dir == str(tmp_path / "out") and args.keep_checkpoints == 2
    if stage:
        assert args.init_model == "/demo/latest.bin" and args.fusion_layers == 3 and args.match_norm == "pair"
    assert calls[-1] == ["-m", "tools.demo", "summary", "--output_dir", str(tmp_path / "out")]


@pytest.mark.parametrize("launcher, env, message", [
    ("start_retrieval.sh", {"DATASET": "nope"}, "DATASET must be msrvtt, msvd, lsmdc, didemo or activitynet, not 'nope'"),
    ("start_caption.sh", {"DATASET": "nope"}, "DATASET must be msvd or msrvtt, not 'nope'"),
    ("start_retrieval.sh", {"DATASET": "msvd", "DATA_PATH": ""}, "the demo data is laid out as MSR-VTT"),
    ("start_fusion.sh", {"INIT_MODEL": "/missing.bin"}, "'/missing.bin' is not a file: set INIT_MODEL"),
    ("start_qa.sh", {"VIDEO_PATH": "/missing"}, "folder /missing not found: set VIDEO_PATH"),
    ("start_clip.sh", {"MAX_RESTARTS": "two"}, "MAX_RESTARTS must be a whole number"),
])
def test_bad_launcher_settings_are_one_line_and_exit_2(tmp_path, data, launcher, env, message):
    calls, result = launch(tmp_path, launcher, **{**real(data), **env})
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert calls == [] or all(call[:2] == ["-m", "tools.demo"] for call in calls)
