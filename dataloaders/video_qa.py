"""Video question answering data (docs/method.md §7c; docs/data.md §5): MSRVTT-QA and MSVD-QA.

Formats:
* ClipBERT/ALPRO JSON Lines (`train.jsonl`, `val.jsonl`, `test.jsonl`): one object per line with `video_id`,
  `question`, `answer` and optionally `answer_type` (extra fields ignored; there is no question id, the line
  number serves);
* MSVD-QA's original files (`train_qa.json`, ...): one JSON array of `{"answer", "id", "question", "video_id": N}`
  where N means `vid<N>` of `youtube_mapping.txt` (`<clip id> vid<N>` per line), the clip being `<clip id>.avi`.
* `train_ans2label.json`: {answer: class index}, the answer vocabulary of the classifier head.

Each sample carries the question tokens (the model's input), the text `question + " " + answer` (the contrastive
loss's text, docs/method.md §7c) and the answer's label for the chosen head.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dataloaders.msrvtt import MSRVTT_EXCLUDED_VIDEOS
from dataloaders.raw_video_text import AnnotationError, RawVideoTextDataset, read_json_file
from dataloaders.retrieval_split import RetrievalSplit, SplitVideos, index_video_files
from dataloaders.video_decoding import VideoDecodeError

logger = logging.getLogger("t2vlp.data")

IGNORE_LABEL = -100
QA_HEADS = ("classifier", "first_token")
# Videos the original's MSRVTT-QA loader drops from every split (docs/method.md §7c).
MSRVTT_QA_EXCLUDED_VIDEOS = MSRVTT_EXCLUDED_VIDEOS | {"video8528"}


@dataclass(frozen=True)
class QAItem:
    video_id: str
    question: str
    answer: str
    answer_type: str | None
    source: str  # "file:line" or "file[item]", for messages


def read_qa_jsonl(path: str | Path) -> list[QAItem]:
    """ClipBERT/ALPRO JSON Lines; a malformed line fails naming the file and line."""
    path = Path(path)
    items = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise AnnotationError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
            items.append(_item(record, f"{path}:{number}", video_id=None))
    return items


def read_msvd_qa_json(path: str | Path, youtube_mapping: dict[str, str]) -> list[QAItem]:
    """MSVD-QA's original JSON array; `video_id` N becomes the clip id mapped to `vid<N>`."""
    path = Path(path)
    records = read_json_file(path)
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a JSON array of questions, got {type(records).__name__}")
    items = []
    for position, record in enumerate(records):
        where = f"{path}[{position}]"
        number = record.get("video_id") if isinstance(record, dict) else None
        if not isinstance(number, int) or isinstance(number, bool):
            raise AnnotationError(f"{where}: video_id must be an int (vid<N> of youtube_mapping.txt): {record!r}")
        clip = youtube_mapping.get(f"vid{number}")
        if clip is None:
            raise AnnotationError(f"{where}: vid{number} is not in youtube_mapping.txt")
        items.append(_item(record, where, video_id=clip))
    return items


def _item(record: Any, where: str, video_id: str | None) -> QAItem:
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {record!r}")
    fields = {key: record.get(key) for key in ("question", "answer")}
    if video_id is None:
        fields["video_id"] = record.get("video_id")
    bad = [key for key, value in fields.items() if not isinstance(value, str) or not value.strip()]
    if bad:
        raise AnnotationError(f"{where}: missing or empty {', '.join(bad)}: {record!r}")
    answer_type = record.get("answer_type")
    return QAItem(video_id if video_id is not None else fields["video_id"].strip(), fields["question"].strip(),
                  fields["answer"].strip(), answer_type if isinstance(answer_type, str) else None, where)


def read_youtube_mapping(path: str | Path) -> dict[str, str]:
    """`youtube_mapping.txt` -> {"vid<N>": clip id}; the clip id may contain `_` and `-` (split on the last space)."""
    path = Path(path)
    mapping = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        clip, _, vid = line.strip().rpartition(" ")
        if not clip or not re.fullmatch(r"vid\d+", vid):
            raise AnnotationError(f"{path}, line {number}: expected '<clip id> vid<N>', got {line!r}")
        mapping[vid] = clip
    return mapping


def read_ans2label(path: str | Path) -> dict[str, int]:
    """`train_ans2label.json` -> {answer: index}; indices must be 0..n-1 (each once)."""
    path = Path(path)
    mapping = read_json_file(path)
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise AnnotationError(f"{path}: expected an object {{answer: class index}}")
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise AnnotationError(f"{path}: class indices must be 0..{len(mapping) - 1}, each once")
    return mapping


def read_qa_file(path: str | Path, youtube_mapping: dict[str, str] | None = None) -> list[QAItem]:
    """Either format, recognised by content: an array (MSVD-QA original, needs the mapping) or JSON Lines."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"QA file {path} does not exist")
    with path.open(encoding="utf-8") as handle:
        first = handle.read(1)
    if first == "[":
        if youtube_mapping is None:
            raise AnnotationError(f"{path} is MSVD-QA's original format: give youtube_mapping.txt (--youtube_mapping)")
        return read_msvd_qa_json(path, youtube_mapping)
    items = read_qa_jsonl(path)
    if youtube_mapping:  # MSVD-QA in JSON Lines with vid<N> ids
        items = [replace(item, video_id=youtube_mapping.get(item.video_id, item.video_id)) for item in items]
    return items


def drop_excluded(items: list[QAItem], excluded: frozenset[str], source: str) -> list[QAItem]:
    kept = [item for item in items if item.video_id not in excluded]
    if len(kept) != len(items):
        logger.info("%s: %d question(s) on the excluded videos left out (as the original)", source,
                    len(items) - len(kept))
    return kept


def majority_answer(items: list[QAItem]) -> str:
    """The most frequent answer (ties: the alphabetically first), for the always-answer-it baseline."""
    counts = Counter(item.answer for item in items)
    return min(counts, key=lambda answer: (-counts[answer], answer))


class QADataset(RawVideoTextDataset):
    """One sample per question: the video, the question tokens (`input_ids`, `attention_mask`), the contrastive
    text `question + " " + answer` (`qa_input_ids`, `qa_attention_mask`) and `label`: the answer's class in
    `ans2label` (IGNORE_LABEL when outside it) for the classifier head, or its first BPE id for `first_token`."""

    def __init__(self, items: list[QAItem], features_path: str | Path, *, ans2label: dict[str, int], head: str,
                 video_files: dict[str, Path] | None = None, video_extension: str = ".mp4", **options: Any) -> None:
        if head not in QA_HEADS:
            raise ValueError(f"head must be one of {QA_HEADS}, got {head!r}")
        super().__init__(features_path, video_extension=video_extension, **options)
        self.items, self.ans2label, self.head, self.video_files = items, ans2label, head, video_files

    def __len__(self) -> int:
        return len(self.items)

    def locate(self, video_id: str) -> tuple[Path, tuple[int, int] | None]:
        if self.video_files is None:
            return super().locate(video_id)
        path = self.video_files.get(video_id)
        if path is None:
            raise VideoDecodeError(f"no file for video {video_id} under {self.features_path}")
        return path, None

    def video_dataset(self) -> SplitVideos:
        """Each video of the questions once (decoded as for the questions), e.g. for the start-up check."""
        split = RetrievalSplit.from_pairs([(item.video_id, item.question) for item in self.items])
        return SplitVideos(split, self.load_video, self.seed)

    def label(self, answer: str) -> int:
        if self.head == "first_token":
            pieces = self.tokenizer.bpe_ids(answer)
            return pieces[0] if pieces else IGNORE_LABEL
        return self.ans2label.get(answer, IGNORE_LABEL)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        try:
            video, video_mask = self.load_video(item.video_id, self.sample_rng(index))
        except VideoDecodeError as error:
            self._record_skip(item.video_id, error)
            return None
        ids, mask = self.tokenizer.encode(item.question, self.max_words)
        qa_ids, qa_mask = self.tokenizer.encode(f"{item.question} {item.answer}", self.max_words)
        return {
            "input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "qa_input_ids": torch.tensor(qa_ids), "qa_attention_mask": torch.tensor(qa_mask),
            "video": video, "video_mask": video_mask, "label": self.label(item.answer),
            "video_id": item.video_id, "index": index,
        }


def qa_dataset(
    path: str | Path, features_path: str | Path, *, ans2label: dict[str, int], head: str,
    youtube_mapping: str | Path | None = None, excluded: frozenset[str] = frozenset(), **options: Any,
) -> QADataset:
    """The questions of one split file. Videos: MSR-VTT-style `<features_path>/<video_id>.mp4` when the file names
    `video<N>` ids, else found anywhere under `features_path` by name without extension (MSVD's `<clip>.avi`)."""
    mapping = read_youtube_mapping(youtube_mapping) if youtube_mapping else None
    items = drop_excluded(read_qa_file(path, mapping), excluded, str(path))
    msrvtt_style = all(re.fullmatch(r"video\d+", item.video_id) for item in items)
    files = None if msrvtt_style else index_video_files(features_path, key="stem")
    options.setdefault("pad_mode", "repeat")  # the original's QA loader: every frame entry a real frame
    return QADataset(items, features_path, ans2label=ans2label, head=head, video_files=files, **options)
