"""The datasets of a run that more than one task reads, built from the original command-line flags: the
pre-training data (WebVid TFRecords or MSR-VTT videos), the MSR-VTT 1k-A evaluation split, and the start-up checks."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from torch.utils.data import Dataset

from dataloaders.blocks import block_layout
from dataloaders.catalogue import Catalogue, ensure_catalogue, find_catalogue, wait_for_catalogue
from dataloaders.msrvtt import MSRVTTTestDataset, MSRVTTTrainDataset
from dataloaders.raw_video_text import RawVideoTextDataset
from dataloaders.webvid import WebVidDataset
from modules.errors import InputError

EVAL_ITEMS_CHECKED = 8  # items tried at start-up: one must decode, or the evaluation data is wrong

logger = logging.getLogger("t2vlp.data")


def training_source(data_path: str) -> str:
    """'webvid' for a `frozen_train_labels.json` (a JSON list), 'msrvtt' for `MSRVTT_data.json` (an object)."""
    if data_path.startswith("s3://"):
        return "webvid"  # labels next to shards on S3
    path = Path(data_path)
    if path.is_dir():
        raise InputError(f"--data_path {data_path} is a folder; give the file: frozen_train_labels.json (WebVid) "
                         f"or MSRVTT_data.json (MSR-VTT)")
    if not path.is_file():
        raise InputError(f"--data_path {data_path} does not exist")
    with open(path, encoding="utf-8") as handle:
        first = handle.read(4096).lstrip()[:1]
    if first == "[":
        return "webvid"
    if first == "{":
        return "msrvtt"
    raise InputError(f"--data_path {data_path} is neither a WebVid labels list nor an MSRVTT_data.json object")


def build_train_dataset(args: argparse.Namespace, image_size: int, webvid: WebVidDataset | None = None) -> Dataset:
    """WebVid TFRecords (`--data_path` labels JSON, index under `--dir_path`) or MSR-VTT raw videos. `webvid`: the
    WebVid set `build_webvid_dataset` built before the model, given its frame size now."""
    source = training_source(args.data_path)
    if source == "webvid":
        dataset = webvid if webvid is not None else build_webvid_dataset(args)
        dataset.image_size = image_size
        return dataset
    logger.info("training on MSR-VTT: %s + %s, videos in %s", args.train_csv, args.data_path, args.features_path)
    dataset = build_checked(lambda: MSRVTTTrainDataset(
        args.train_csv, args.data_path, args.features_path, expand_sentences=args.expand_msrvtt_sentences,
        max_words=args.max_words, feature_framerate=args.feature_framerate, max_frames=args.max_frames,
        image_size=image_size, frame_order=args.train_frame_order, slice_framepos=args.slice_framepos,
        pad_mode="zero", seed=args.seed, frame_store=args.frame_store,
    ), "--train_csv / --data_path")
    if len(dataset) == 0:
        raise InputError(f"no training samples in --data_path {args.data_path} with --train_csv {args.train_csv}")
    return dataset


def build_webvid_dataset(args: argparse.Namespace) -> WebVidDataset | None:
    """The WebVid training set of a pre-training run (None when `--data_path` is MSR-VTT's), checked: labels that
    have no record in the index (another store's, an incomplete one) are refused. It needs nothing of the model
    (the frame size is set when the model is built), so a run builds it first: a bad training set stops the run
    before minutes of model building."""
    if training_source(args.data_path) != "webvid":
        return None
    logger.info("training on WebVid TFRecords: labels %s, index in %s", args.data_path, args.dir_path)
    catalogue = build_checked(lambda: node_catalogue(args.data_path, args.dir_path, args.catalogue_cache),
                              "--data_path / --dir_path")
    blocks = None
    if args.block_records:
        blocks = block_layout(catalogue, args.block_records)
        logger.info("block mode: %d samples in %d blocks of up to %d records, a shuffle buffer of %d blocks",
                    blocks.n_samples, blocks.n_blocks, args.block_records, args.block_buffer)
    dataset = build_checked(lambda: WebVidDataset(
        args.data_path, args.dir_path, max_words=args.max_words, max_frames=args.max_frames,
        slice_framepos=args.slice_framepos, frame_order=args.train_frame_order, seed=args.seed,
        verify_crc=args.verify_crc, catalogue=catalogue, blocks=blocks, block_buffer=args.block_buffer,
    ), "--data_path / --dir_path")
    if len(dataset) == 0:
        raise InputError(f"no training samples in --data_path {args.data_path}")
    _check_stored_frames(dataset, args.max_frames)
    _check_labels_have_records(dataset, args)
    return dataset


def node_catalogue(labels_path: str, index_path: str, cache_dir: str | None) -> Catalogue:
    """The store's catalogue (dataloaders/catalogue.py). Where there is none, each node's first rank (torchrun's
    LOCAL_RANK 0) builds it while the node's other ranks wait for it: one build per node, not one per rank (and,
    on a shared filesystem, one in all: the others find it built, under its lock)."""
    found = find_catalogue(labels_path, index_path, cache_dir)
    if found is not None:
        return found
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        logger.info("waiting for this node's first rank to build the catalogue of %s", labels_path)
        return wait_for_catalogue(labels_path, index_path, cache_dir)
    return ensure_catalogue(labels_path, index_path, cache_dir)


def build_checked(build, flags: str):
    """Build a dataset; a missing or malformed annotation file or index (a truncated labels JSON, an index line
    that is not id<TAB>shard<TAB>offset) is an InputError naming the flags."""
    try:
        return build()
    except FileNotFoundError as error:
        raise InputError(f"{flags}: {error.strerror or 'not found'}: {error.filename or error}") from error
    except ValueError as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{flags}: {error}") from error


def _check_labels_have_records(dataset: WebVidDataset, args: argparse.Namespace) -> None:
    """Labels of one store with the index of another train on nothing: refuse before training starts."""
    total, missing = len(dataset), dataset.n_missing
    if total and missing == total:
        raise InputError(f"none of the {total} labels in --data_path {args.data_path} has a record in "
                         f"{dataset.index_path}: do --data_path and --dir_path name the same store?")
    if missing > args.max_missing_fraction * total:
        raise InputError(f"{missing} of {total} labels in --data_path {args.data_path} have no record in "
                         f"{dataset.index_path}, more than --max_missing_fraction {args.max_missing_fraction}: "
                         f"is the store complete? (raise the flag to train on what is there)")


def _check_stored_frames(dataset: WebVidDataset, max_frames: int) -> None:
    """WebVid records hold a fixed number of frames (12): asking for more only adds masked zero frames, which
    still cost compute in the joint attention. Said at WARNING (the original padded the same way)."""
    stored = dataset.stored_frames()
    if stored is not None and max_frames > stored:
        logger.warning("--max_frames %d exceeds the %d frames stored per WebVid record: every clip gets %d zero "
                       "frames (masked out of meanP, but part of the joint attention); T2VLP's recipes use 12",
                       max_frames, stored, max_frames - stored)


def build_eval_dataset(args: argparse.Namespace, image_size: int) -> Dataset | None:
    """MSR-VTT 1k-A (`--val_csv`, videos in `--features_path`), or None for `--val_csv ''`.

    Checked at start-up, not at the first evaluation: the csv must exist and one of its first items must decode."""
    if not args.val_csv:
        return None
    if not Path(args.val_csv).is_file():
        raise InputError(f"--val_csv {args.val_csv} does not exist (pass --val_csv '' to train without evaluating)")
    dataset = MSRVTTTestDataset(
        args.val_csv, args.features_path, max_words=args.max_words, feature_framerate=args.feature_framerate,
        max_frames=args.max_frames, image_size=image_size, frame_order=args.eval_frame_order,
        slice_framepos=args.slice_framepos, pad_mode="zero", seed=args.seed, frame_store=args.frame_store,
    )
    if len(dataset) == 0:
        raise InputError(f"--val_csv {args.val_csv} has no rows")
    check_eval_videos(dataset, f"--val_csv {args.val_csv}", args.features_path)
    return dataset


def check_eval_videos(dataset: RawVideoTextDataset, source: str, features_path: str) -> None:
    """One of the first videos of an evaluation split must decode, or the data is wrong (checked at start-up)."""
    videos = dataset.video_dataset()
    tried = min(EVAL_ITEMS_CHECKED, len(videos))
    with _quiet_skips():
        if not any(videos[i] is not None for i in range(tried)):
            raise InputError(f"none of the first {tried} videos of {source} can be decoded from --features_path "
                             f"{features_path} (wrong folder?)")


class _quiet_skips:
    """Silence the per-video skip warnings of the start-up check (the evaluation reports skips itself)."""

    def __enter__(self) -> None:
        self.level = logging.getLogger("t2vlp.data").level
        logging.getLogger("t2vlp.data").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("t2vlp.data").setLevel(self.level)
