"""ActivityNet Captions paragraph retrieval as CLIP4Clip evaluates it (docs/data.md §3.5).

`<data_path>/train.json` (training) and `<data_path>/val_1.json` (the test split) map `v_<youtube id>` to
{"duration", "timestamps", "sentences"}. Each video's sentences form one paragraph: CLIP4Clip joins them with spaces
as they are, and the real file's sentences after the first start with a space, which CLIP's whitespace cleaning
collapses; here each is stripped and they are joined with one space, which tokenises to the same tokens. The clip
is the whole video. Which videos a split holds: CLIP4Clip's `train_ids.json` / `val_ids.json` (lists of
`v_<id>`) when present, else the json's keys in file order. Video files are found anywhere under `features_path`
by the id without `v_` (CLIP4Clip's names) or with it, with any video extension.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dataloaders.files import is_video_file
from dataloaders.raw_video_text import AnnotationError, PairsDataset, read_json_file, subset_dataset
from dataloaders.retrieval_split import index_video_files
from modules.errors import InputError

logger = logging.getLogger("t2vlp.data")

SPLIT_FILES = {"train": ("train.json", "train_ids.json"), "test": ("val_1.json", "val_ids.json")}
ID_PREFIX = "v_"


def read_paragraphs(path: str | Path) -> dict[str, str]:
    """{video id: paragraph} of an ActivityNet Captions json, in file order."""
    path = Path(path)
    videos = read_json_file(path)
    if not isinstance(videos, dict):
        raise AnnotationError(f"{path}: expected a JSON object of videos (v_<id>: {{duration, timestamps, "
                              f"sentences}})")
    paragraphs = {}
    for video_id, item in videos.items():
        sentences = item.get("sentences") if isinstance(item, dict) else None
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise AnnotationError(f"{path}: video {video_id} has no list of sentences")
        paragraphs[video_id] = " ".join(sentence.strip() for sentence in sentences if sentence.strip())
    return paragraphs


def split_ids(data_path: Path, subset: str, paragraphs: dict[str, str]) -> list[str]:
    """The split's video ids: CLIP4Clip's id list when the folder holds it, else every video of the json."""
    annotation, id_list = (data_path / name for name in SPLIT_FILES[subset])
    if not id_list.is_file():
        return list(paragraphs)
    ids = read_json_file(id_list)
    if not isinstance(ids, list) or not all(isinstance(video_id, str) for video_id in ids):
        raise AnnotationError(f"{id_list}: expected a JSON list of video ids (v_<id>)")
    unannotated = [video_id for video_id in ids if video_id not in paragraphs]
    if unannotated:
        raise AnnotationError(f"{id_list}: {len(unannotated)} id(s) have no entry in {annotation}, e.g. "
                              f"{unannotated[:5]}")
    return list(dict.fromkeys(ids))


def activitynet_pairs(data_path: str | Path, subset: str) -> list[tuple[str, str]]:
    """(video id, paragraph) for every video of the split, in its order."""
    if subset not in SPLIT_FILES:
        raise InputError(f"ActivityNet Captions has a train and a test split (val_1.json, as CLIP4Clip tests on), "
                         f"not {subset!r}: evaluate with --eval_split test")
    data_path = Path(data_path)
    annotation = data_path / SPLIT_FILES[subset][0]
    if not annotation.is_file():
        raise InputError(f"--data_path {data_path} has no {annotation.name} (ActivityNet Captions' annotation files "
                         f"train.json and val_1.json, see docs/data.md §3.5)")
    paragraphs = read_paragraphs(annotation)
    return [(video_id, paragraphs[video_id]) for video_id in split_ids(data_path, subset, paragraphs)]


def find_activitynet_videos(features_path: str | Path, video_ids: list[str]) -> dict[str, Path]:
    """{video id: file} for the ids whose video is under `features_path`, named by the id without `v_` or with it."""
    files = index_video_files(features_path, keep=is_video_file)
    found = {}
    for video_id in video_ids:
        bare = video_id[len(ID_PREFIX):] if video_id.startswith(ID_PREFIX) else video_id
        path = files.get(bare) or files.get(video_id)
        if path is not None:
            found[video_id] = path
    return found


def activitynet_dataset(data_path: str | Path, features_path: str | Path, subset: str, **options: Any
                        ) -> PairsDataset:
    """One paragraph per video over the whole video. Training leaves out videos without a file (with a warning);
    the test split skips and counts them when evaluated."""
    pairs = activitynet_pairs(data_path, subset)
    files = find_activitynet_videos(features_path, [video_id for video_id, _ in pairs])
    missing = [video_id for video_id, _ in pairs if video_id not in files]
    if missing and subset != "train":  # training says so itself when it leaves them out
        logger.warning("%s: %d of %d videos have no file under %s (named <id> or v_<id>, any video extension); the "
                       "evaluation skips and counts them, e.g. %s", SPLIT_FILES[subset][0], len(missing), len(pairs),
                       features_path, missing[:5])
    return subset_dataset(pairs, features_path, subset, str(Path(data_path) / SPLIT_FILES[subset][0]),
                          video_files=files, **options)
