"""predict.py's inputs that used to pass in silence or end in a traceback: an empty index, a bad --device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import predict
from modules.errors import InputError
from tests.test_predict import run_predict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cpu0", "gpu", "cuda:99", "mps"])
def test_a_bad_device_is_one_line_listing_the_forms(name):
    with pytest.raises(InputError, match=rf"--device {name}") as raised:
        predict._device(name)
    assert "\n" not in str(raised.value) and ("cpu, cuda, cuda:N" in str(raised.value) or "CUDA device" in
                                              str(raised.value))
    assert predict._device("cpu") == torch.device("cpu") and predict._device("cpu:0") == torch.device("cpu:0")


@pytest.mark.integration
def test_a_bad_device_on_the_command_line_is_exit_2_without_traceback(stage1_checkpoint, small_demo_source):
    video = str(small_demo_source["videos_dir"] / "video0.mp4")
    result = subprocess.run([sys.executable, "predict.py", "caption", video, "--init_model", str(stage1_checkpoint),
                             "--device", "cpu0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "predict.py: error: --device cpu0 is not a device: use one of cpu, cuda, cuda:N"]


def test_querying_an_index_of_no_video_is_one_line(stage1_checkpoint, tmp_path):
    (tmp_path / "nothing").mkdir()
    run_predict("index", str(tmp_path / "nothing"), "--init_model", str(stage1_checkpoint), "--out",
                str(tmp_path / "ix"), "--num_workers", "0", "--max_frames", "3")
    result = run_predict("query", str(tmp_path / "ix"), "a red circle", check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"predict.py: error: the index {tmp_path / 'ix'} holds no video: "
                                                  f"nothing to search (index a folder of videos into it with "
                                                  f"`predict.py index`)"]


def test_a_clip_file_as_the_model_says_what_to_do_with_it(tiny_fusion_clip_checkpoint, small_demo_source, tmp_path):
    video = str(small_demo_source["videos_dir"] / "video0.mp4")
    plain = tmp_path / "open_clip_pytorch_model.bin"
    from modules.checkpoint import read_clip_state_dict

    torch.save(read_clip_state_dict(tiny_fusion_clip_checkpoint), plain)
    for clip_file in (tiny_fusion_clip_checkpoint, plain):
        result = run_predict("caption", video, "--init_model", str(clip_file), check=False)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"predict.py: error: {clip_file} is a CLIP file, not a T2VLP checkpoint: predict.py uses a model trained "
            f"by this project or the original (stage 1 or later); train one from it with CLIP_PATH={clip_file} bash "
            f"start_clip.sh"]
