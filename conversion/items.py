"""What a conversion works on: the clips to store, the sources they are read from, and what went wrong."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dataloaders.files import is_utf8, printable

VALID_ID = re.compile(r"[^\s/\\]+")  # a video or clip id: no whitespace, no path separators


def id_problem(value: object) -> str | None:
    """Why `value` cannot be a video or clip id (None when it can): the one rule for ids from every source (table
    cells, file names, webdataset keys, json fields). A tab or newline would break path.index's lines, a path
    separator the files named after the id; a json null or list is no id at all."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return f"not a string but {'null' if value is None else type(value).__name__}"
    if not is_utf8(str(value)):
        return f"{printable(str(value))!r} is not valid UTF-8 (a file name's bytes?)"
    if not VALID_ID.fullmatch(str(value)):
        return f"{str(value)!r} is empty or holds whitespace or a path separator"
    return None


# Failures whose cause can go away (a shard or video unreadable, cut short, missing): a shard that recorded one is
# converted again on a rerun; the others (not a video, a bad window, a malformed row, ...) are in the data itself.
RETRIABLE_FAILURES = frozenset({"bad_shard", "bad_video", "missing_video"})
# A note, not a failure: a source whose clips were stored, decoded from its first frame because its packets'
# timestamps or packets made seeking to the wanted frames unsafe (conversion/decoders.py).
DECODED_SEQUENTIALLY = "decoded_sequentially"


@dataclass
class Failure:
    """One line of failures.tsv: why a row, a sample or a clip was not stored (or, for `fewer_frames`, stored with
    fewer frames than asked for)."""

    kind: str
    video_id: str
    where: str  # file:line of a table row, <shard>:<key> of a webdataset sample, or the video's path
    detail: str

    def __post_init__(self) -> None:  # a file name that is not UTF-8 is shown escaped, not written as such
        self.video_id, self.where, self.detail = (printable(str(f)) for f in (self.video_id, self.where,
                                                                              self.detail))

    def tsv_line(self) -> str:
        fields = (self.kind, self.video_id, self.where, self.detail)
        return "\t".join(" ".join(str(f).split()) for f in fields)


@dataclass(frozen=True)
class Clip:
    """A clip to store: its id and caption, and for a clip of a longer video the window (seconds) it covers."""

    clip_id: str
    caption: str | None
    window: tuple[float, float] | None = None
    where: str = ""  # the table row it came from, for failures


@dataclass(frozen=True)
class Unit:
    """One source opened once for all its clips: a video file or a frame folder."""

    source_id: str
    location: str
    kind: str  # "video" or "frames"
    clips: tuple[Clip, ...]

    @property
    def clip_ids(self) -> list[str]:
        return [clip.clip_id for clip in self.clips]


@dataclass
class Selection:
    """What a conversion of files or tables will store, and what was refused before any decoding."""

    units: list[Unit] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    has_captions: bool = False  # write frozen_train_labels.json
    n_rows: int = 0  # table rows read
    n_sources_found: int = 0  # videos (or frame folders) found on disk
