"""Tables of videos or clips and their captions: WebVid csv, WebVid-10M metadata, Panda-70M csv, InternVid jsonl,
or any csv / tsv / jsonl / parquet with named columns.

A row names its video by an id (found under --video_dir by file name without extension) or by a path relative to
--video_dir, and gives a caption. With a window (start and end columns, or a column of [start, end] pairs as
Panda-70M's `timestamp`) each window is one clip of the video, `<video id>_<k>` with k the window's 0-based
index among that video's windows in table order; list-valued columns give one clip per entry. Timestamps are
seconds or [H]H:MM:SS[.fff]. Bad rows are failures with their file:line, never fatal.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conversion.items import Clip, Failure, id_problem
from modules.errors import InputError

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
CSV_ERROR = "csv error: "
TIMESTAMP = re.compile(r"(\d+):([0-5]?\d):([0-5]?\d(?:\.\d*)?)")


@dataclass(frozen=True)
class TableLayout:
    """Which columns hold what (None: absent)."""

    id_column: str | None = None
    caption_column: str = "caption"
    video_column: str | None = None  # a path relative to --video_dir
    start_column: str | None = None
    end_column: str | None = None
    window_column: str | None = None  # a list of [start, end] pairs (Panda-70M)

    @property
    def has_windows(self) -> bool:
        return self.window_column is not None or self.start_column is not None

    def required(self) -> list[str]:
        names = [self.id_column, self.video_column, self.caption_column, self.start_column, self.end_column,
                 self.window_column]
        return [name for name in names if name is not None]


PRESETS = {
    "webvid": TableLayout(id_column="videoid", caption_column="name"),  # results_2M_*.csv, results_10M_*.csv
    "webvid10m": TableLayout(id_column="videoid", caption_column="name"),  # videoid,contentUrl,duration,page_dir,name
    "panda70m": TableLayout(id_column="videoID", caption_column="caption", window_column="timestamp"),
    "internvid": TableLayout(id_column="YoutubeID", caption_column="Caption", start_column="Start_timestamp",
                             end_column="End_timestamp"),
}


class TableHeaderError(InputError, ValueError):
    """A table lacks the columns its layout names."""


@dataclass
class TableRows:
    """The clips of every video the tables name, in table order, and what was refused."""

    clips: dict[str, list[Clip]] = field(default_factory=dict)  # video id -> its clips
    video_paths: dict[str, str] = field(default_factory=dict)  # video id -> path relative to --video_dir
    failures: list[Failure] = field(default_factory=list)
    n_rows: int = 0

    @property
    def captions(self) -> dict[str, str]:
        """Caption by clip id."""
        return {clip.clip_id: clip.caption for clips in self.clips.values() for clip in clips}


def read_tables(paths: Iterable[str | Path], layout: TableLayout, rows: TableRows | None = None) -> TableRows:
    """The clips the tables at `paths` give (added to `rows`, whose earlier rows win over duplicates)."""
    rows = rows if rows is not None else TableRows()
    for path in paths:
        path = Path(path)
        for where, values in _table_rows(path, layout):
            if not (isinstance(values, Failure) and values.detail.startswith(CSV_ERROR)):  # not a row at all
                rows.n_rows += 1
            _add_row(values, where, layout, rows)
    return rows


def table_format(path: Path) -> str:
    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown table format {path.suffix!r} (expected {', '.join(TABLE_FORMATS)})")
    return fmt


def _table_rows(path: Path, layout: TableLayout) -> Iterator[tuple[str, dict[str, Any] | Failure]]:
    """(file:line, {column: value}) per row, or a Failure for a row that cannot be read."""
    fmt = table_format(path)
    if fmt in ("csv", "tsv"):
        yield from _delimited_rows(path, layout, "," if fmt == "csv" else "\t")
    elif fmt == "jsonl":
        yield from _jsonl_rows(path, layout)
    else:
        yield from _parquet_rows(path, layout)


def _check_header(path: Path, header: list[str], layout: TableLayout) -> None:
    needed = layout.required()
    if not all(name in header for name in needed):
        raise TableHeaderError(f"{path}: the header must name the columns {' and '.join(map(repr, needed))}, "
                               f"got {header}")


def _delimited_rows(path: Path, layout: TableLayout, delimiter: str) -> Iterator[tuple[str, dict | Failure]]:
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = [name.strip() for name in next(reader, [])]
        _check_header(path, header, layout)
        record_start = reader.line_num + 1
        while True:
            where = f"{path}:{record_start}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                yield where, Failure("malformed_row", "", where, f"{CSV_ERROR}{error}")
                continue
            finally:
                record_start = reader.line_num + 1
            if not row:  # a blank line has no cells; a row of empty cells (",,,,") is reported as malformed
                continue
            if len(row) != len(header):
                video_id = row[header.index(layout.id_column)].strip() if layout.id_column and \
                    header.index(layout.id_column) < len(row) else ""
                yield where, Failure("malformed_row", video_id, where,
                                     f"{len(row)} fields, the header has {len(header)}")
                continue
            yield where, dict(zip(header, row))


def _jsonl_rows(path: Path, layout: TableLayout) -> Iterator[tuple[str, dict | Failure]]:
    checked = False
    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                values = json.loads(line)
            except json.JSONDecodeError as error:
                yield where, Failure("malformed_row", "", where, f"not JSON: {error}")
                continue
            if not isinstance(values, dict):
                yield where, Failure("malformed_row", "", where, "not a JSON object")
                continue
            if not checked:  # the first object names the columns, as a header would
                _check_header(path, list(values), layout)
                checked = True
            yield where, values


def _parquet_rows(path: Path, layout: TableLayout) -> Iterator[tuple[str, dict | Failure]]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    _check_header(path, table.schema_arrow.names, layout)
    number = 0
    for batch in table.iter_batches(columns=layout.required()):
        for values in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", values


def _add_row(values: dict[str, Any] | Failure, where: str, layout: TableLayout, rows: TableRows) -> None:
    if isinstance(values, Failure):
        rows.failures.append(values)
        return
    try:
        video_id, path = _video_of(values, layout)
        entries = _row_clips(values, layout)
    except ValueError as error:
        rows.failures.append(Failure("malformed_row", _text(values.get(layout.id_column)).strip()
                                     if layout.id_column else "", where, str(error)))
        return
    known = rows.clips.setdefault(video_id, [])
    if path is not None:
        rows.video_paths.setdefault(video_id, path)
    if not layout.has_windows:
        if known:
            rows.failures.append(Failure("duplicate_id", video_id, where, "id seen before; first row kept"))
            return
        known.append(Clip(video_id, entries[0][0], None, where))
        return
    for caption, window in entries:
        known.append(Clip(f"{video_id}_{len(known)}", caption, window, where))


def _video_of(values: dict[str, Any], layout: TableLayout) -> tuple[str, str | None]:
    path = _text(values.get(layout.video_column)).strip() if layout.video_column else None
    if layout.id_column:
        video_id = _text(values.get(layout.id_column)).strip()
    else:
        video_id = Path(path or "").stem
    if problem := id_problem(video_id):
        raise ValueError(f"invalid video id: {problem}")
    if layout.video_column is not None and not path:
        raise ValueError(f"empty {layout.video_column!r}")
    return video_id, path


def _row_clips(values: dict[str, Any], layout: TableLayout) -> list[tuple[str, tuple[float, float] | None]]:
    """(caption, window or None) of each clip the row gives."""
    caption = values.get(layout.caption_column)
    captions = _listed(caption) if layout.has_windows else [caption]
    if layout.window_column is not None:
        windows = [_window(pair) for pair in _as_list(values.get(layout.window_column), layout.window_column)]
    elif layout.start_column is not None:
        starts = _listed(values.get(layout.start_column))
        ends = _listed(values.get(layout.end_column))
        if len(starts) != len(ends):
            raise ValueError(f"{len(starts)} start but {len(ends)} end timestamps")
        windows = [(parse_timestamp(start), parse_timestamp(end)) for start, end in zip(starts, ends)]
    else:
        if len(captions) != 1:
            raise ValueError("a list of captions needs a list of windows")
        windows = [None]
    if len(captions) == 1 and len(windows) > 1:
        captions = captions * len(windows)
    if len(captions) != len(windows):
        raise ValueError(f"{len(windows)} windows but {len(captions)} captions")
    texts = [_caption_text(caption, layout.caption_column).strip() for caption in captions]
    if not windows or any(not text for text in texts):
        raise ValueError("empty caption")
    return list(zip(texts, windows))


def _listed(value: Any) -> list[Any]:
    """A list-valued cell as a list (a Python or JSON literal in text tables), any other value as [value]."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return _as_list(value, "")
        except ValueError:
            return [value]  # text that opens with a bracket, e.g. "[Music] a concert"
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _as_list(value: Any, column: str) -> list[Any]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"column {column!r} is not a list: {value[:60]!r}") from error
    if not isinstance(value, list | tuple):
        raise ValueError(f"column {column!r} is not a list: {value!r}")
    return list(value)


def _window(pair: Any) -> tuple[float, float]:
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        raise ValueError(f"a window must be [start, end], got {pair!r}")
    return parse_timestamp(pair[0]), parse_timestamp(pair[1])


def parse_timestamp(value: Any) -> float:
    """Seconds from a number, a number in text, or [H]H:MM:SS[.fff]."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = _text(value).strip()
        match = TIMESTAMP.fullmatch(text)
        if match:
            hours, minutes, secs = match.groups()
            seconds = int(hours) * 3600 + int(minutes) * 60 + float(secs)
        else:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f"bad timestamp {text!r} (seconds or [H]H:MM:SS[.fff])") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"bad timestamp {value!r}")
    return seconds


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _caption_text(value: Any, column: str | None) -> str:
    """A caption cell as text: a string, or UTF-8 bytes (a parquet binary column); anything else (a struct, a
    number, binary that is not UTF-8) is no caption and names its type."""
    if value is None or isinstance(value, str):
        return _text(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"caption column {column!r} holds bytes that are not UTF-8 text") from None
    raise ValueError(f"caption column {column!r} holds a {type(value).__name__} ({str(value)[:40]!r}), not text")
