"""MSVD retrieval in the CLIP4Clip layout (docs/method.md §9.4; docs/data.md §3.2).

`<data_path>/{train,val,test}_list.txt`: one clip id per line (the final newline may or may not be there; ids may
start with `-` and contain `_`). `<data_path>/raw-captions.pkl`: {clip id: [caption as a list of words, ...]}.
Videos are found anywhere under `features_path` by their file name without extension (`<id>.avi`).
Training has one sample per caption; val/test are multi-sentence splits (every caption of every video).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from dataloaders.raw_video_text import AnnotationError, PairsDataset, subset_dataset

SPLIT_FILES = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
CAPTIONS_FILE = "raw-captions.pkl"


def read_id_list(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a list file, in order; duplicates are an error (they would double-count)."""
    path = Path(path)
    ids, seen = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        video_id = line.strip()
        if not video_id:
            continue
        if video_id in seen:
            raise AnnotationError(f"{path}, line {number}: {video_id} is listed again (first on line {seen[video_id]})")
        seen[video_id] = number
        ids.append(video_id)
    return ids


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler for plain data only: dicts, lists, tuples, strings and numbers. A pickle that names any class
    or function (what a crafted file uses to run code when it is loaded) is refused before anything runs."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}: only plain data (dicts, lists, strings) is "
                                     f"read from annotation files")


def read_raw_captions(path: str | Path) -> dict[str, list[str]]:
    """`raw-captions.pkl` -> {clip id: [caption, ...]} with each caption's words joined by single spaces. Read with
    `PlainDataUnpickler`: the file is a dict of lists of lists of strings, and nothing else is accepted."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = PlainDataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, IndexError, KeyError) as error:
        raise AnnotationError(f"{path}: not a readable pickle of captions ({error})") from error
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a dict {{video id: [caption words, ...]}}, got {type(data).__name__}")
    captions = {}
    for video_id, entries in data.items():
        if not isinstance(video_id, str) or not isinstance(entries, list):
            raise AnnotationError(f"{path}: entry {video_id!r} is not 'str id -> list of captions'")
        joined = []
        for position, words in enumerate(entries):
            if isinstance(words, str) or not all(isinstance(word, str) for word in words):
                raise AnnotationError(f"{path}: {video_id} caption {position} is not a list of words: {words!r}")
            joined.append(" ".join(words))
        captions[video_id] = joined
    return captions


def msvd_pairs(data_path: str | Path, subset: str) -> list[tuple[str, str]]:
    """(clip id, caption) for every caption of every clip listed for `subset`, in list then caption order."""
    data_path = Path(data_path)
    if subset not in SPLIT_FILES:
        raise ValueError(f"subset must be one of {sorted(SPLIT_FILES)}, got {subset!r}")
    list_path = data_path / SPLIT_FILES[subset]
    video_ids = read_id_list(list_path)
    captions = read_raw_captions(data_path / CAPTIONS_FILE)
    without = [video_id for video_id in video_ids if not captions.get(video_id)]
    if without:
        raise AnnotationError(f"{data_path / CAPTIONS_FILE}: no caption for {len(without)} clip(s) of {list_path}, "
                              f"e.g. {without[:5]}")
    return [(video_id, caption) for video_id in video_ids for caption in captions[video_id]]


def msvd_dataset(data_path: str | Path, features_path: str | Path, subset: str, **options: Any) -> PairsDataset:
    """Training (`subset="train"`: one sample per caption, clips without a video file left out with a warning) or
    evaluation (val/test: a multi-sentence split; a missing video is skipped and counted at evaluation)."""
    return subset_dataset(msvd_pairs(data_path, subset), features_path, subset,
                          str(Path(data_path) / SPLIT_FILES[subset]), **options)
