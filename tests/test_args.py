import logging

import pytest
import torch

from engine.args import (
    build_parser,
    check_model_limits,
    local_batch_sizes,
    parse_args,
    report_ignored_flags,
)
from engine.precision import resolve_precision
from modules.errors import InputError

# The stage-1 command line of the original start_clip.sh (launcher removed).
ORIGINAL_STAGE1 = (
    "--do_train --num_thread_reader=2 --epochs=5 --batch_size=32 --n_display=50 "
    "--data_path frozen_train_labels.json --features_path msrvtt/videos --val_csv MSRVTT_JSFUSION_test.csv "
    "--output_dir out --lr 1e-4 --max_words 32 --max_frames 12 --batch_size_val 32 --datatype msrvtt "
    "--expand_msrvtt_sentences --feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 "
    "--loose_type --linear_patch 2d --sim_header meanP --warmup_proportion 0.1 "
    "--visual_pretrain_path ./CLIP-modules/ViT-B-16.pt"
).split()


def test_original_command_line_parses_without_warnings():
    args = parse_args(ORIGINAL_STAGE1, task="clip", world_size=8)
    assert (args.batch_size, args.max_words, args.max_frames, args.coef_lr) == (32, 32, 12, 1e-3)
    assert args.ignored_flags == []
    assert args.task == "clip"


def test_defaults_follow_clip4clip_and_the_task():
    args = parse_args(["--do_eval", "--output_dir", "o"], task="clip", world_size=1)
    assert (args.lr, args.epochs, args.batch_size, args.batch_size_val, args.seed) == (1e-4, 20, 256, 3500, 42)
    assert (args.max_words, args.max_frames, args.feature_framerate, args.warmup_proportion) == (20, 100, 1, 0.1)
    assert (args.gradient_accumulation_steps, args.freeze_layer_num, args.slice_framepos) == (1, 0, 0)
    assert (args.linear_patch, args.sim_header, args.n_display, args.num_thread_reader) == ("2d", "meanP", 100, 1)
    assert args.dir_path == "./WebVid_TFRecord"
    assert args.cross_config_path == "./CLIP-modules"
    assert args.visual_pretrain_path is None  # found as the original did: see test_clip_path_found_like_the_original
    assert (args.precision, args.new_params_lr, args.weight_decay) == ("auto", 1e-5, 0.2)
    assert (args.eval_steps, args.save_steps, args.max_bad_steps, args.max_steps) == (500, 0, 20, 0)
    assert (args.num_centers, args.split_layer, args.tube_layers, args.tensorboard) == (8, None, 2, True)
    qa = parse_args(["--do_eval", "--output_dir", "o", "--webvid_tfrecord", "x"], task="qa", world_size=1)
    assert (qa.seed, qa.datatype, qa.new_params_lr, qa.eval_steps) == (2021, "msrvtt_qa", 5e-6, 0)
    fusion = parse_args(["--do_eval", "--output_dir", "o", "--split_layer", "9", "--no-tensorboard"], task="fusion")
    assert (fusion.eval_steps, fusion.save_steps, fusion.split_layer, fusion.tensorboard) == (1000, 2000, 9, False)


def test_ignored_flags_warn_once_each(caplog):
    argv = ["--do_train", "--output_dir", "o", "--fp16", "--margin", "0.2", "--local-rank=1", "--n_gpu", "1",
            "--loose_type"]
    args = parse_args(argv, task="clip", world_size=1)
    assert len(args.ignored_flags) == 3
    with caplog.at_level(logging.WARNING):
        report_ignored_flags(args)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert any(m.startswith("--fp16 True is ignored") and "--precision" in m for m in messages)
    assert any(m.startswith("--margin 0.2 is ignored") for m in messages)
    assert any(m.startswith("--local_rank 1 is ignored") for m in messages)


def test_missing_loose_type_is_reported():
    args = parse_args(["--do_train", "--output_dir", "o"], task="clip", world_size=1)
    assert len(args.ignored_flags) == 1 and "--loose_type" in args.ignored_flags[0]


@pytest.mark.parametrize("argv, message", [
    (["--output_dir", "o"], "--do_train / --do_eval"),
    (["--do_train", "--output_dir", "o", "--batch_size", "30"], "not divisible by the world size 4"),
    (["--do_train", "--output_dir", "o", "--batch_size", "8", "--gradient_accumulation_steps", "3"],
     "not divisible by --gradient_accumulation_steps 3"),
    (["--do_train", "--output_dir", "o", "--sim_header", "seqTransf"], "only meanP"),
    (["--do_train", "--output_dir", "o", "--warmup_proportion", "1.0"], "warmup_proportion"),
    (["--do_train", "--output_dir", "o", "--freeze_layer_num", "-2"], "freeze_layer_num"),
])
def test_impossible_combinations_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, task="clip", world_size=4)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_batch_sizes():
    assert local_batch_sizes(256, 8, 2) == (32, 16)
    with pytest.raises(ValueError):
        local_batch_sizes(10, 4, 1)


def test_model_limits():
    args = parse_args(ORIGINAL_STAGE1, task="clip", world_size=1)
    check_model_limits(args, context_length=77, num_frames=12, fusion_extra_tokens=1 + 12 + 8)
    args.max_words = 64
    with pytest.raises(ValueError, match="max_words <= 56"):
        check_model_limits(args, context_length=77, num_frames=12, fusion_extra_tokens=21)
    with pytest.raises(InputError, match=r"use fewer --max_frames \(now 12; the original recipes use 12\)"):
        check_model_limits(args, context_length=77, num_frames=12, fusion_extra_tokens=1 + 100 + 8)
    args.max_words, args.max_frames = 32, 16
    with pytest.raises(ValueError, match="--max_frames 16"):
        check_model_limits(args, context_length=77, num_frames=12)
    args.max_words = 78
    with pytest.raises(ValueError, match="context length"):
        check_model_limits(args, context_length=77)


def test_help_documents_global_batch_and_freeze_rule():
    text = " ".join(build_parser("clip").format_help().split())
    assert "GLOBAL training batch over all processes" in text
    assert "0 does NOT mean 'freeze nothing'" in text
    assert "the original hard-coded it per script; default 1e-05" in text
    with pytest.raises(ValueError):
        build_parser("nonsense")


def test_resolve_precision():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


def test_clip_path_found_like_the_original(tmp_path, monkeypatch):
    from engine.args import resolve_clip_path
    from modules.errors import InputError

    task_folder = tmp_path / "video_text_retrieval"
    task_folder.mkdir()
    monkeypatch.chdir(task_folder)
    args = parse_args(["--do_eval", "--output_dir", "o", "--cross_config_path", "../CLIP-modules"], task="retrieval")
    with pytest.raises(InputError, match=r"tried CLIP-modules/ViT-B-16.pt, \.\./CLIP-modules/ViT-B-16.pt"):
        resolve_clip_path(args)
    (tmp_path / "CLIP-modules").mkdir()
    (tmp_path / "CLIP-modules" / "ViT-B-16.pt").write_bytes(b"x")  # run from the task folder: ../CLIP-modules
    assert resolve_clip_path(args) == "../CLIP-modules/ViT-B-16.pt"
    (task_folder / "CLIP-modules").mkdir()
    (task_folder / "CLIP-modules" / "ViT-B-16.pt").write_bytes(b"x")  # ./CLIP-modules comes first
    assert resolve_clip_path(args) == "CLIP-modules/ViT-B-16.pt"
    explicit = parse_args(["--do_eval", "--output_dir", "o", "--visual_pretrain_path", "a.pt"], task="retrieval")
    assert resolve_clip_path(explicit) == "a.pt"


SHARED_RUN_CONFIG = ["task", "max_words", "max_frames", "num_centers", "split_layer", "tube_layers", "freeze_layer_num",
                     "slice_framepos", "train_frame_order", "feature_framerate", "expand_msrvtt_sentences",
                     "fusion_layers", "clip_model"]
FUSION_RUN_CONFIG = ["head_dropout", "match_norm", "train_encoders"]


@pytest.mark.parametrize("task, own", [
    ("clip", []),
    ("fusion", [*FUSION_RUN_CONFIG, "mask_ratio", "mlm_weight", "plm_weight", "vtm_weight", "align_weight"]),
    ("retrieval", [*FUSION_RUN_CONFIG, "val_from_train", "sim_weight", "vtm_weight", "align_weight"]),
    ("caption", [*FUSION_RUN_CONFIG, "caption_weight", "sim_weight", "align_weight"]),
    ("qa", [*FUSION_RUN_CONFIG, "qa_head", "qa_weight", "sim_weight"]),
])
def test_restore_bin_fixes_the_flags_that_shape_each_task(task, own):
    from engine.entry import run_config

    config = run_config(parse_args(["--do_eval", "--output_dir", "o"], task=task, world_size=1))
    assert list(config) == [*SHARED_RUN_CONFIG, *own] and config["task"] == task
