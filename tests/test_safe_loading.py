"""No code runs from data files: MSVD's raw-captions.pkl is read with an unpickler that allows no globals, every
checkpoint this project reads (restore.bin included) loads with weights_only=True; annotation rows that would
count twice or query nothing are left out, counted and reported."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main_task_clip
from dataloaders.msvd import read_raw_captions
from engine.checkpointing import load_restore
from tests.stage1_helpers import stage1_argv
from tests.test_retrieval_training import retrieval_argv

ROOT = Path(__file__).resolve().parents[1]


class CreatesAFile:
    """What a crafted pickle does: runs code (here: opens a file for writing) the moment it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.integration
def test_a_crafted_captions_pickle_runs_nothing_through_the_msvd_entry_script(small_demo_source,
                                                                              tiny_fusion_clip_checkpoint, tmp_path):
    msvd = tmp_path / "MSVD"
    shutil.copytree(small_demo_source["msvd_dir"], msvd)
    marker = tmp_path / "created_by_the_pickle"
    with open(msvd / "raw-captions.pkl", "rb") as handle:
        captions = pickle.load(handle)
    captions["evil"] = CreatesAFile(marker)
    with open(msvd / "raw-captions.pkl", "wb") as handle:
        pickle.dump(captions, handle)
    argv = ["--do_eval", f"--data_path={msvd}", f"--features_path={small_demo_source['videos_dir']}",
            f"--output_dir={tmp_path / 'out'}", "--max_words=16", "--max_frames=3", "--fusion_layers=2",
            f"--visual_pretrain_path={tiny_fusion_clip_checkpoint}", "--no-tensorboard", "--loose_type"]
    result = subprocess.run([sys.executable, str(ROOT / "video_text_retrieval" / "main_task_retrieval_msvd.py"),
                             *argv], cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert not marker.exists()
    [line] = result.stderr.strip().splitlines()
    assert "raw-captions.pkl: not a readable pickle of captions (it refers to io.open" in line


def test_the_captions_pickle_is_plain_data_only(tmp_path):
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps({"v1": [["a", "dog"], ["runs"]], "v2": [[]]}))
    assert read_raw_captions(path) == {"v1": ["a dog", "runs"], "v2": [""]}
    path.write_bytes(pickle.dumps({"v1": np.array([1])}))  # a numpy array needs a global too
    with pytest.raises(ValueError, match="only plain data"):
        read_raw_captions(path)


def test_restore_bin_loads_weights_only_and_an_earlier_one_needs_trust(small_demo, tiny_clip_checkpoint, tmp_path,
                                                                        capsys):
    out = tmp_path / "run"
    argv = stage1_argv(small_demo, tiny_clip_checkpoint, out, "--max_steps=3")
    assert main_task_clip.main(argv) == 0
    state = torch.load(out / "restore.bin", weights_only=True)  # nothing in it needs an unrestricted load
    assert state["global_step"] == 3 and isinstance(state["rng_state"][0]["numpy"]["keys"], torch.Tensor)

    state["rng_state"][0]["numpy"] = np.random.get_state()  # as versions before this one wrote it
    torch.save(state, out / "restore.bin")
    longer = stage1_argv(small_demo, tiny_clip_checkpoint, out, "--max_steps=4")
    capsys.readouterr()
    assert main_task_clip.main(longer) == 2
    assert "--trust_checkpoint" in capsys.readouterr().err
    assert main_task_clip.main([*longer, "--trust_checkpoint"]) == 0
    assert load_restore(out)["global_step"] == 4  # rewritten in the safe format
    earlier = _earlier_format(out, tmp_path)  # as --init_model too
    assert main_task_clip.main(stage1_argv(small_demo, tiny_clip_checkpoint, tmp_path / "other", "--do_eval",
                                           f"--init_model={earlier}")) == 2
    assert "is a restore.bin of an earlier version" in capsys.readouterr().err


def _earlier_format(out: Path, tmp_path: Path) -> Path:
    state = load_restore(out)
    state["rng_state"][0]["numpy"] = np.random.get_state()
    path = tmp_path / "restore.bin"
    torch.save(state, path)
    return path


def test_duplicate_and_empty_captions_are_left_out_of_evaluation_and_counted(small_demo, tiny_fusion_clip_checkpoint,
                                                                          stage1_checkpoint, tmp_path, caplog):
    from tests.test_retrieval_training import main_task_retrieval_msrvtt

    lines = small_demo["test_csv"].read_text().splitlines()
    small_demo["test_csv"].write_text("\n".join([*lines, lines[1], lines[2], lines[1]]) + "\n")  # 3 repeated rows
    out = tmp_path / "eval"
    argv = retrieval_argv(small_demo, tiny_fusion_clip_checkpoint, stage1_checkpoint, out)
    argv = ["--do_eval" if flag == "--do_train" else flag for flag in argv]
    assert main_task_retrieval_msrvtt.main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {row["n_texts"] for row in rows} == {6} and all(row["dropped_texts"] == {"duplicate_texts": 3}
                                                           for row in rows)
    assert "3 duplicate texts" in (out / "log.txt").read_text()

    from dataloaders.msvd import msvd_dataset

    msvd = tmp_path / "MSVD"
    shutil.copytree(small_demo["msvd_dir"], msvd)
    with open(msvd / "raw-captions.pkl", "rb") as handle:
        captions = pickle.load(handle)
    test_video = (msvd / "test_list.txt").read_text().split()[0]
    captions[test_video] += [[], [""]]
    with open(msvd / "raw-captions.pkl", "wb") as handle:
        pickle.dump(captions, handle)
    split = msvd_dataset(msvd, small_demo["videos_dir"], "test", max_words=16, max_frames=3).split
    assert split.dropped == {"empty_texts": 2} and all(caption.strip() for caption in split.captions)
