"""The original README's stage-1 command line runs unchanged, launcher replaced by torchrun."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest

from tests.torchrun import ROOT, run_torchrun

pytestmark = pytest.mark.integration

# docs/method.md §8 / start_clip.sh of the original repository, with `python3 -u -m light.pytorch.launch` replaced.
ORIGINAL_STAGE1 = (
    "main_task_clip.py --do_train --num_thread_reader=2 --epochs=5 --batch_size=32 --n_display=50 "
    "--train_csv ${DATA_PATH}/MSRVTT_train.9k.csv --val_csv ${DATA_PATH}/MSRVTT_JSFUSION_test.csv "
    "--data_path ${DATA_PATH}/frozen_train_labels.json --features_path ${DATA_PATH}/MSRVTT_Videos "
    "--output_dir ${OUTPUT_PATH} --lr 1e-4 --max_words 32 --max_frames 12 --batch_size_val 32 --datatype msrvtt "
    "--expand_msrvtt_sentences --feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 "
    "--loose_type --linear_patch 2d --sim_header meanP --pretrained_clip_name ViT-B/16 "
    "--visual_pretrain_path ./CLIP-modules/ViT-B-16.pt --cross_config_path ./CLIP-modules"
)


def original_layout(webvid_demo, clip_checkpoint, tmp_path):
    """(working directory, DATA_PATH) as the original's scripts expect them: ./WebVid_TFRecord and
    ./CLIP-modules/ViT-B-16.pt under the working directory; annotations and MSR-VTT videos under DATA_PATH."""
    work, data = tmp_path / "work", tmp_path / "data"
    data.mkdir()
    (work / "CLIP-modules").mkdir(parents=True)
    shutil.copy(clip_checkpoint, work / "CLIP-modules" / "ViT-B-16.pt")
    shutil.copytree(ROOT / "CLIP-modules" / "cross-base", work / "CLIP-modules" / "cross-base")
    (work / "WebVid_TFRecord").symlink_to(webvid_demo["tfrecord_dir"])
    (data / "frozen_train_labels.json").symlink_to(webvid_demo["labels"])
    (data / "MSRVTT_train.9k.csv").symlink_to(webvid_demo["train_csv"])
    (data / "MSRVTT_JSFUSION_test.csv").symlink_to(webvid_demo["test_csv"])
    (data / "MSRVTT_Videos").symlink_to(webvid_demo["videos_dir"])
    return work, data


def test_original_stage1_command(webvid_demo, tiny_clip_checkpoint, tmp_path):
    # The original reads WebVid TFRecords from ./WebVid_TFRecord and CLIP from ./CLIP-modules (relative to the
    # working directory); DATA_PATH holds the annotation files and MSR-VTT videos.
    work, data = original_layout(webvid_demo, tiny_clip_checkpoint, tmp_path)
    output = tmp_path / "output"

    arguments = shlex.split(
        ORIGINAL_STAGE1.replace("${DATA_PATH}", str(data)).replace("${OUTPUT_PATH}", str(output))
    )
    run_torchrun(ROOT / arguments[0], *arguments[1:], nproc=1, cwd=work, timeout=600)

    # 64 WebVid clips / global batch 32 = 2 steps per epoch, 5 epochs, evaluated and saved after each
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    assert all(r["n_texts"] == r["n_videos"] == 6 and r["scoring"] == "meanP" for r in records)
    log = (output / "log.txt").read_text()
    assert all(f"saved {output / 'ckpt' / f'pytorch_model.bin.{s}'}" in log for s in (2, 4, 6, 8, 10))
    # the original kept every epoch's; the last (and the best, when a task selects) stay (--keep_checkpoints 1)
    assert sorted(p.name for p in (output / "ckpt").iterdir()) == ["pytorch_model.bin.10"]
    assert "training on WebVid TFRecords" in log
    assert "--pretrained_clip_name 'ViT-B/16' is ignored: use --visual_pretrain_path" in log
