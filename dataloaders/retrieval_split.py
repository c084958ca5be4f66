"""An evaluation split for text-video retrieval: captions, the videos they describe, and which is which.

Single-sentence splits (MSR-VTT 1k-A, LSMDC, DiDeMo paragraphs) have one caption per video; multi-sentence splits
(MSVD, the full MSR-VTT test set) several. Evaluation encodes every caption once and every video once (never a
video per caption), so a split is two datasets over one description: `SplitCaptions` and `SplitVideos`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dataloaders.files import files_by_name, walk_files
from dataloaders.video_decoding import VideoDecodeError
from modules.errors import InputError

logger = logging.getLogger("t2vlp.data")


@dataclass(frozen=True)
class RetrievalSplit:
    """`captions[i]` describes `video_ids[caption_video[i]]`; every video has at least one caption."""

    captions: list[str]
    caption_video: list[int]
    video_ids: list[str]
    dropped: dict[str, int] = field(default_factory=dict)  # captions left out of the annotations, by reason

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.caption_video):
            raise ValueError("captions and caption_video differ in length")
        described = set(self.caption_video)
        if described != set(range(len(self.video_ids))):
            raise ValueError("every video of a split needs at least one caption, and every caption a video")

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]], dropped: dict[str, int] | None = None) -> RetrievalSplit:
        """(video_id, caption) pairs -> a split whose videos are in order of first appearance."""
        position: dict[str, int] = {}
        caption_video = [position.setdefault(video_id, len(position)) for video_id, _ in pairs]
        return cls([caption for _, caption in pairs], caption_video, list(position), dict(dropped or {}))

    @property
    def multi_sentence(self) -> bool:
        return len(self.captions) != len(self.video_ids)


def clean_evaluation_pairs(pairs: Sequence[tuple[str, str]], source: str
                           ) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """The (video_id, caption) pairs an evaluation counts: a row repeated word for word would count as one more
    query, an empty caption would be a query of nothing; both are left out, counted and reported (a video left with
    no caption leaves the split). Returns (kept pairs, {"duplicate_texts": n, "empty_texts": m}) with only the
    reasons that occurred."""
    kept, seen = [], set()
    dropped = {"duplicate_texts": 0, "empty_texts": 0}
    for video_id, caption in pairs:
        if not caption.strip():
            dropped["empty_texts"] += 1
        elif (video_id, caption) in seen:
            dropped["duplicate_texts"] += 1
        else:
            seen.add((video_id, caption))
            kept.append((video_id, caption))
    dropped = {reason: count for reason, count in dropped.items() if count}
    if dropped:
        videos = len({video for video, _ in pairs}) - len({video for video, _ in kept})
        logger.warning("%s: left out of the evaluation: %s%s", source,
                       ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in dropped.items()),
                       f" ({videos} video(s) left without a caption)" if videos else "")
    return kept, dropped


# load_video(video_id, rng) -> (uint8 video [T, 3, S, S], video_mask [T]); raises VideoDecodeError
VideoLoader = Callable[[str, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


class TokenizedTexts(Dataset):
    """Texts, tokenised: {input_ids, attention_mask, index}."""

    def __init__(self, texts: Sequence[str], tokenizer: Any, max_words: int) -> None:
        self.texts, self.tokenizer, self.max_words = texts, tokenizer, max_words

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids, mask = self.tokenizer.encode(self.texts[index], self.max_words)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "index": index}


class SplitCaptions(TokenizedTexts):
    """The captions of a split, tokenised."""

    def __init__(self, split: RetrievalSplit, tokenizer: Any, max_words: int) -> None:
        super().__init__(split.captions, tokenizer, max_words)
        self.split = split


class SplitVideos(Dataset):
    """The videos of a split, decoded: {video, video_mask, video_id, index}, or None when undecodable."""

    def __init__(self, split: RetrievalSplit, load_video: VideoLoader, seed: int = 0) -> None:
        self.split, self.load_video, self.seed = split, load_video, seed

    def __len__(self) -> int:
        return len(self.split.video_ids)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        video_id = self.split.video_ids[index]
        try:
            video, video_mask = self.load_video(video_id, np.random.default_rng([self.seed, index]))
        except VideoDecodeError as error:
            logger.warning("evaluation: skipping video %s: %s", video_id, error)
            return None
        return {"video": video, "video_mask": video_mask, "video_id": video_id, "index": index}


def index_video_files(features_path: str | Path, key: str = "stem",
                      keep: Callable[[str], bool] | None = None) -> dict[str, Path]:
    """Every file under `features_path` (recursively; only the names `keep` accepts, when given) by its name without
    extension ("stem", MSVD and LSMDC) or its full name ("name", DiDeMo, whose ids keep the extension and may end
    in a bare dot)."""
    if not Path(features_path).is_dir():
        raise InputError(f"--features_path {features_path} is not a folder of videos")
    return files_by_name(walk_files(features_path, keep), key)
