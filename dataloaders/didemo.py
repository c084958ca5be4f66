"""DiDeMo paragraph retrieval in the CLIP4Clip layout (docs/method.md §7a, §9.6; docs/data.md §3.4).

`<data_path>/{train,val,test}_list.txt` name the video files (with their extension, which may be a bare dot:
`10052357@N03_7585070382_5762149bfc.`); `<data_path>/{train,val,test}_data.json` hold the moment annotations. All
descriptions of a listed video, stripped and joined with spaces in file order, form one paragraph; json videos
that are not listed (unavailable) are left out. The clip is read from second 0 to second 31 (the 30-s annotation
cap). Videos are found anywhere under `features_path` by their full file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataloaders.msvd import read_id_list
from dataloaders.raw_video_text import AnnotationError, PairsDataset, read_json_file, subset_dataset

SPLITS = ("train", "val", "test")
WINDOW_SECONDS = (0, 31)


def read_didemo_descriptions(path: str | Path) -> dict[str, list[str]]:
    """{video file name: [description, ...]} in file order from a `*_data.json` array."""
    path = Path(path)
    items = read_json_file(path)
    if not isinstance(items, list):
        raise AnnotationError(f"{path}: expected a JSON array of moment annotations")
    descriptions: dict[str, list[str]] = {}
    for position, item in enumerate(items):
        video = item.get("video") if isinstance(item, dict) else None
        description = item.get("description") if isinstance(item, dict) else None
        if not isinstance(video, str) or not isinstance(description, str):
            raise AnnotationError(f"{path}: item {position} lacks a string 'video' or 'description': {item!r}")
        descriptions.setdefault(video, []).append(description.strip())
    return descriptions


def didemo_pairs(data_path: str | Path, subset: str) -> list[tuple[str, str]]:
    """(video file name, paragraph) for every listed video, in list order."""
    if subset not in SPLITS:
        raise ValueError(f"subset must be one of {SPLITS}, got {subset!r}")
    data_path = Path(data_path)
    list_path, json_path = data_path / f"{subset}_list.txt", data_path / f"{subset}_data.json"
    video_ids = read_id_list(list_path)
    descriptions = read_didemo_descriptions(json_path)
    unannotated = [video for video in video_ids if video not in descriptions]
    if unannotated:
        raise AnnotationError(f"{json_path}: no description for {len(unannotated)} video(s) of {list_path}, e.g. "
                              f"{unannotated[:5]}")
    return [(video, " ".join(text for text in descriptions[video] if text)) for video in video_ids]


def didemo_dataset(data_path: str | Path, features_path: str | Path, subset: str, **options: Any) -> PairsDataset:
    """One paragraph per video, read over seconds 0-31. Training leaves out videos without a file (with a
    warning); val/test form a single-sentence split whose missing videos are skipped and counted."""
    return subset_dataset(didemo_pairs(data_path, subset), features_path, subset,
                          str(Path(data_path) / f"{subset}_list.txt"), file_key="name", window=WINDOW_SECONDS,
                          **options)
