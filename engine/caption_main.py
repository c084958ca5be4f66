"""The one implementation behind video_captioning/msvd_captioning.py and msrvtt_captioning.py: fine-tune a
stage-2 (or captioning) checkpoint for captioning and evaluate it (METHOD §7b).

Training evaluates the validation split (a step-0 row, every `--eval_steps` and after each epoch) and keeps the
best CIDEr's checkpoint (`best_checkpoint.json`); at the end the test split is decoded with that checkpoint.
`--do_eval` decodes and scores `--eval_split` (default test) with `--init_model`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from dataloaders.captioning import caption_dataset
from engine import distributed
from engine.args import resolve_precision
from engine.checkpointing import BEST_CHECKPOINT_NAME
from engine.data import build_checked, check_eval_videos
from engine.entry import EXIT_OK, build_model, evaluate_before_training, run_main, train_or_evaluate
from engine.evaluation.caption_metrics import require_java
from engine.evaluation.retrieval import evaluated_checkpoint
from engine.run_logging import RunLogger
from engine.tasks.captioning import (
    CaptionLossWeights,
    DecodeSettings,
    best_checkpoint_for,
    caption_task,
    make_caption_evaluator,
)
from modules.checkpoint import load_state_dict_checked, read_model_state_dict
from modules.errors import InputError

logger = logging.getLogger("t2vlp")


def run_caption(dataset: str, args: argparse.Namespace, dist_info: distributed.DistInfo, run: RunLogger) -> int:
    if args.datatype not in (dataset, "msrvtt"):  # "msrvtt" is the parser's default, which every script accepts
        logger.warning("--datatype %s is ignored: this script captions %s", args.datatype, dataset)
    logger.info("Java for the caption metrics: %s", require_java())  # before any training
    precision = resolve_precision(args.precision, dist_info.device)
    model = build_model(args)
    options = dict(max_words=args.max_words, feature_framerate=args.feature_framerate, max_frames=args.max_frames,
                   image_size=model.image_resolution, seed=args.seed, slice_framepos=args.slice_framepos,
                   frame_store=args.frame_store)

    def split(subset: str, frame_order: int):
        data = build_checked(lambda: caption_dataset(dataset, args.data_path, args.features_path, subset,
                                                     frame_order=frame_order, **options), "--data_path")
        if len(data) == 0:
            raise InputError(f"the {subset} split of --data_path {args.data_path} has no captions (check "
                             f"--data_path / --features_path)")
        if subset != "train":
            check_eval_videos(data, f"the {subset} split of --data_path {args.data_path}", args.features_path)
        return data

    def evaluator(subset: str, best=None):
        return make_caption_evaluator(
            split(subset, args.eval_frame_order), subset, run, args.output_dir, dist_info.device, precision,
            decode=DecodeSettings(args.beam_size, args.length_penalty, args.max_words - 1),
            protocol=args.caption_protocol, batch_size=args.batch_size_val, num_workers=args.num_thread_reader,
            best=best, extra={"dataset": dataset, **evaluated_checkpoint(args)},
        )

    best = best_checkpoint_for(args.output_dir) if args.do_train and args.eval_split == "val" else None
    evaluate = evaluator(args.eval_split, best)
    test_evaluate = evaluator("test") if args.do_train and args.test_after_training and args.eval_split == "val" \
        else None
    task = caption_task(CaptionLossWeights(args.caption_weight, args.sim_weight, args.align_weight), evaluate)
    evaluate_before_training(args, dist_info, evaluate, model)
    code = train_or_evaluate(args, dist_info, run, model, partial(split, "train", args.train_frame_order), task,
                             precision)
    if code == EXIT_OK and test_evaluate is not None and dist_info.is_main:
        _test_selected_checkpoint(args.output_dir, model.to(dist_info.device), test_evaluate)
    return code


def _test_selected_checkpoint(output_dir: str, model, test_evaluate) -> None:
    """Evaluate the test split with the checkpoint selected on val (once per selected step)."""
    best = best_checkpoint_for(output_dir).best
    if best is None:
        logger.warning("no %s (no evaluation after step 0): the test split is not evaluated", BEST_CHECKPOINT_NAME)
        return
    if best["checkpoint"] is None or not Path(best["checkpoint"]).is_file():
        logger.warning("the best val step %d has no checkpoint on disk (see --save_steps / --keep_checkpoints): the "
                       "test split is not evaluated", best["step"])
        return
    if _already_tested(Path(output_dir) / "metrics.jsonl", best["step"]):
        logger.info("the test split was already evaluated with the step-%d checkpoint", best["step"])
        return
    logger.info("evaluating the test split with the checkpoint selected on val: %s (%s %.2f)",
                best["checkpoint"], best["metric"], best["value"])
    load_state_dict_checked(model, read_model_state_dict(best["checkpoint"]))
    test_evaluate(model, best["step"], best["epoch"])


def _already_tested(metrics: Path, step: int) -> bool:
    if not metrics.is_file():
        return False
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return any(row.get("task") == "caption" and row.get("split") == "test" and row.get("step") == step for row in rows)


def main(dataset: str, argv: Sequence[str] | None = None) -> int:
    return run_main("caption", partial(run_caption, dataset), argv)
