"""Datasets of a run, built from the original command-line flags."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from torch.utils.data import Dataset

from dataloaders.msrvtt import MSRVTTTestDataset, MSRVTTTrainDataset
from dataloaders.webvid import WebVidDataset

logger = logging.getLogger("t2vlp.data")


def training_source(data_path: str) -> str:
    """'webvid' for a `frozen_train_labels.json` (a JSON list), 'msrvtt' for `MSRVTT_data.json` (an object)."""
    if data_path.startswith("s3://"):
        return "webvid"  # labels next to shards on S3
    path = Path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"--data_path {data_path} does not exist")
    with open(path, encoding="utf-8") as handle:
        first = handle.read(4096).lstrip()[:1]
    if first == "[":
        return "webvid"
    if first == "{":
        return "msrvtt"
    raise ValueError(f"--data_path {data_path} is neither a WebVid labels list nor an MSRVTT_data.json object")


def build_train_dataset(args: argparse.Namespace, image_size: int) -> Dataset:
    """WebVid TFRecords (`--data_path` labels JSON, index under `--dir_path`) or MSR-VTT raw videos."""
    source = training_source(args.data_path)
    if source == "webvid":
        logger.info("training on WebVid TFRecords: labels %s, index in %s", args.data_path, args.dir_path)
        return WebVidDataset(
            args.data_path, args.dir_path, max_words=args.max_words, max_frames=args.max_frames, image_size=image_size,
            slice_framepos=args.slice_framepos, frame_order=args.train_frame_order, seed=args.seed,
        )
    logger.info("training on MSR-VTT: %s + %s, videos in %s", args.train_csv, args.data_path, args.features_path)
    return MSRVTTTrainDataset(
        args.train_csv, args.data_path, args.features_path, expand_sentences=args.expand_msrvtt_sentences,
        max_words=args.max_words, feature_framerate=args.feature_framerate, max_frames=args.max_frames,
        image_size=image_size, frame_order=args.train_frame_order, slice_framepos=args.slice_framepos,
        pad_mode="zero", seed=args.seed,
    )


def build_eval_dataset(args: argparse.Namespace, image_size: int) -> Dataset | None:
    """MSR-VTT 1k-A (`--val_csv`, videos in `--features_path`), or None when no `--val_csv` is given."""
    if not args.val_csv:
        return None
    return MSRVTTTestDataset(
        args.val_csv, args.features_path, max_words=args.max_words, feature_framerate=args.feature_framerate,
        max_frames=args.max_frames, image_size=image_size, frame_order=args.eval_frame_order,
        slice_framepos=args.slice_framepos, pad_mode="zero", seed=args.seed,
    )
