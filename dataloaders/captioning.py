"""Captioning data (docs/method.md §7b): MSVD and MSR-VTT videos with all their reference captions.

* MSVD (CLIP4Clip layout, `--data_path` the folder): `{train,val,test}_list.txt` + `raw-captions.pkl`
  (dataloaders/msvd.py reads them).
* MSR-VTT (`--data_path` the `MSRVTT_data.json` file): the standard captioning split of its `videos[].split`
  (train video0-6512, "validate" video6513-7009, test video7010-9999), every caption of a video a reference;
  training leaves out the 9 videos the original excluded.

Training has one sample per (video, caption). Evaluation splits are `PairsDataset`s with `as_split`: their
`split` lists each video once with its captions, and `video_dataset()` decodes each video once.
Frames follow the original's captioning loader: `--slice_framepos` when a video has more than `max_frames`
frames, linspace up-sampling when it has fewer (every entry a real frame).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from dataloaders.msrvtt import MSRVTT_EXCLUDED_VIDEOS, read_msrvtt_sentences, read_msrvtt_video_splits
from dataloaders.msvd import SPLIT_FILES, msvd_pairs
from dataloaders.raw_video_text import AnnotationError, PairsDataset, subset_dataset
from dataloaders.retrieval_split import RetrievalSplit
from modules.errors import InputError

CAPTION_DATASETS = ("msvd", "msrvtt")
SUBSETS = ("train", "val", "test")
MSRVTT_SPLIT_NAMES = {"train": "train", "val": "validate", "test": "test"}


def msrvtt_caption_pairs(json_path: str | Path, subset: str) -> list[tuple[str, str]]:
    """(video_id, caption) for every caption of the `subset` videos of `MSRVTT_data.json`, grouped by video in the
    file's video order (captions in file order)."""
    splits = read_msrvtt_video_splits(json_path)
    wanted = [video_id for video_id, split in splits.items() if split == MSRVTT_SPLIT_NAMES[subset]]
    if subset == "train":
        wanted = [video_id for video_id in wanted if video_id not in MSRVTT_EXCLUDED_VIDEOS]
    if not wanted:
        raise AnnotationError(f"{json_path}: no video has split {MSRVTT_SPLIT_NAMES[subset]!r}")
    captions: dict[str, list[str]] = defaultdict(list)
    for video_id, caption in read_msrvtt_sentences(json_path):
        captions[video_id].append(caption)
    without = [video_id for video_id in wanted if not captions.get(video_id)]
    if without:
        raise AnnotationError(f"{json_path}: {len(without)} {subset} video(s) have no sentence, e.g. {without[:5]}")
    return [(video_id, caption) for video_id in wanted for caption in captions[video_id]]


def caption_pairs(dataset: str, data_path: str | Path, subset: str) -> list[tuple[str, str]]:
    if dataset not in CAPTION_DATASETS:
        raise ValueError(f"dataset must be one of {CAPTION_DATASETS}, got {dataset!r}")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    path = Path(data_path)
    if dataset == "msvd":
        if not path.is_dir():
            raise InputError(f"--data_path {data_path} must be the MSVD folder with {', '.join(SPLIT_FILES.values())} "
                             f"and raw-captions.pkl")
        return msvd_pairs(path, subset)
    if not path.is_file():
        raise InputError(f"--data_path {data_path} must be MSR-VTT's MSRVTT_data.json (captioning reads its splits)")
    return msrvtt_caption_pairs(path, subset)


def caption_dataset(
    dataset: str, data_path: str | Path, features_path: str | Path, subset: str, **options: Any
) -> PairsDataset:
    """Training pairs (`subset="train"`; videos without a file left out with a warning) or an evaluation split
    (val/test: every video once with all its references; an undecodable video is skipped and counted)."""
    options.setdefault("pad_mode", "repeat")
    return subset_dataset(caption_pairs(dataset, data_path, subset), features_path, subset,
                          f"{dataset} {subset} ({data_path})", **options)


def references_by_video(split: RetrievalSplit) -> dict[str, list[str]]:
    """{video_id: [reference captions]} of an evaluation split."""
    references: dict[str, list[str]] = {video_id: [] for video_id in split.video_ids}
    for caption, video in zip(split.captions, split.caption_video):
        references[split.video_ids[video]].append(caption)
    return references
