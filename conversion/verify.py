"""`frozen_tfrecord.py --verify DIR`: check a whole store before training on it. Every index entry's record is read
(CRC of length and payload, the Example parsed, the frames' container readable), its clip id compared with the
entry's (a record of another clip pairs captions with the wrong frames), and the labels checked against the index."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dataloaders.clip_store import (
    check_record_id,
    index_file,
    index_lines,
    parse_clip_record,
    read_labels,
    resolve_shard_path,
)
from dataloaders.tfrecord_io import RecordReader, read_text

SHOWN = 10  # problems listed by name; the rest are counted


@dataclass
class StoreCheck:
    index: str
    entries: int = 0
    duplicate_ids: int = 0
    problems: list[str] = field(default_factory=list)  # one line each: id, where, what
    n_problems: int = 0
    labels: int | None = None  # None: no labels file beside the index
    labels_without_record: int = 0

    def add(self, line: str) -> None:
        self.n_problems += 1
        if len(self.problems) < SHOWN:
            self.problems.append(line)

    @property
    def ok(self) -> bool:
        return self.n_problems == 0 and self.labels_without_record == 0

    def report(self) -> list[str]:
        lines = [f"{self.index}: {self.entries} entries, {self.entries - self.n_problems} records readable and "
                 f"naming their clip, {self.n_problems} not"]
        lines += [f"  {problem}" for problem in self.problems]
        if self.n_problems > len(self.problems):
            lines.append(f"  ... and {self.n_problems - len(self.problems)} more")
        if self.duplicate_ids:
            lines.append(f"  {self.duplicate_ids} duplicate id line(s): readers use the first of each")
        if self.labels is not None:
            lines.append(f"labels: {self.labels}, of which {self.labels_without_record} have no record in the index")
        lines.append("store OK" if self.ok else "store has problems (see above)")
        return lines


def verify_store(folder: str | Path, labels_name: str = "frozen_train_labels.json") -> StoreCheck:
    """Check the store in `folder` (its path.index, or an `.index` file); labels `labels_name` beside it when
    present."""
    index_path = index_file(folder)
    check = StoreCheck(index_path)
    reader = RecordReader(verify_crc=True)
    seen: set[str] = set()
    for line_number, video_id, recorded, offset in index_lines(index_path, read_text(index_path)):
        check.entries += 1
        if video_id in seen:
            check.duplicate_ids += 1
            continue
        seen.add(video_id)
        shard = resolve_shard_path(index_path, recorded)
        try:
            record = parse_clip_record(reader.read(shard, offset))
            check_record_id(record, video_id)
            if record.num_frames:
                record.frames([0])
        except (OSError, ValueError) as error:  # unreadable shard, bad CRC or Example, record of another clip
            check.add(f"{video_id} (line {line_number}, {Path(shard).name} @ {offset}): {error}")
    labels_path = Path(index_path).parent / labels_name
    if labels_path.is_file():
        video_ids, _ = read_labels(labels_path)
        check.labels = len(video_ids)
        check.labels_without_record = sum(video_id not in seen for video_id in video_ids)
    return check
