"""LSMDC retrieval (docs/method.md §9.5; docs/data.md §3.3).

Annotation files are tab-separated, without header, 6 fields: clip id, start/end (aligned), start/end
(extracted), sentence. They are split on tabs, never parsed as CSV: a sentence may start with an unbalanced `"`,
which a CSV reader would let swallow the following lines. Clip ids repeat in training, so samples are keyed by row.
Videos `<clip id>.avi` live in per-movie folders: found anywhere under `features_path` by name without extension.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

from dataloaders.raw_video_text import AnnotationError, PairsDataset, subset_dataset

SPLIT_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",  # "publictect": the real, misspelt name
}
FIELDS = 6
_TIME = r"\d\d\.\d\d\.\d\d\.\d{3}"
CLIP_ID = re.compile(rf"^(?P<movie>\d{{4}}_.+)_(?P<start>{_TIME})-(?P<end>{_TIME})$")


class LSMDCRow(NamedTuple):
    clip_id: str
    movie: str
    start: str
    end: str
    sentence: str
    line: int


def parse_clip_id(clip_id: str) -> tuple[str, str, str] | None:
    """(movie, start, end) of `<4-digit no>_<MOVIE_NAME>_<hh.mm.ss.mmm>-<hh.mm.ss.mmm>`, split at the end (movie
    names contain `_` and other characters), or None."""
    match = CLIP_ID.match(clip_id)
    return (match["movie"], match["start"], match["end"]) if match else None


def read_lsmdc_rows(path: str | Path) -> list[LSMDCRow]:
    """Every non-empty line of an LSMDC annotation file; a malformed line is an error naming file and line."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != FIELDS:
                raise AnnotationError(f"{path}, line {number}: {len(fields)} tab-separated fields, expected {FIELDS} "
                                      f"(clip id, 4 timestamps, sentence)")
            clip_id = fields[0].strip()
            parsed = parse_clip_id(clip_id)
            if parsed is None:
                raise AnnotationError(f"{path}, line {number}: clip id {clip_id!r} is not "
                                      f"<movie>_<hh.mm.ss.mmm>-<hh.mm.ss.mmm>")
            sentence = fields[5].strip()
            if not sentence:
                raise AnnotationError(f"{path}, line {number}: empty sentence")
            rows.append(LSMDCRow(clip_id, *parsed, sentence, number))
    return rows


def lsmdc_dataset(data_path: str | Path, features_path: str | Path, subset: str, **options: Any) -> PairsDataset:
    """One sample per row. Training leaves out (with a warning) rows whose clip has no video file, as the original
    did; val/test form a split (the 1000-clip public test has one sentence per clip) whose missing videos are
    skipped and counted at evaluation."""
    if subset not in SPLIT_FILES:
        raise ValueError(f"subset must be one of {sorted(SPLIT_FILES)}, got {subset!r}")
    path = Path(data_path) / SPLIT_FILES[subset]
    pairs = [(row.clip_id, row.sentence) for row in read_lsmdc_rows(path)]
    return subset_dataset(pairs, features_path, subset, str(path), **options)
