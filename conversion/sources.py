"""What a conversion of files stores: videos under --video_dir (or the original's frame folders under --frames_dir),
listed by tables (WebVid csv and the other layouts of tables.py), or captioned by the .txt / .json files beside
them (video2dataset's `files` output), or every video found (frame stores, captionless stores)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conversion.items import Clip, Failure, Selection, Unit, id_problem
from conversion.tables import TableLayout, TableRows, read_tables
from dataloaders.files import files_by_name, is_utf8, is_video_file, walk_files
from modules.errors import InputError

CAPTION_SUFFIXES = (".txt", ".json")
SUCCESS = "success"  # video2dataset's status of a downloaded sample


@dataclass(frozen=True)
class SampleFields:
    """Which fields of a sample's json give its caption and id (video2dataset's .json, webdataset or files)."""

    caption_field: str | None = None  # None: the .txt, else the json's "caption"
    id_field: str | None = None  # None: the sample key (file name without extension)


def find_videos(video_dir: str | Path) -> dict[str, str]:
    """`video_id -> path` for every video file under `video_dir` (one walk; id = file name without extension)."""
    return _videos_by_id(walk_files(video_dir, is_video_file))


def _videos_by_id(paths: Iterable[Path]) -> dict[str, str]:
    return {video_id: str(path) for video_id, path in files_by_name(paths).items() if is_video_file(path.name)}


def find_frame_folders(frames_dir: str | Path) -> dict[str, str]:
    """`video_id -> folder` for every sub-folder of `frames_dir` (the original's <input_dir>/<videoid>/)."""
    return {entry.name: entry.path for entry in os.scandir(frames_dir) if entry.is_dir()}


def select_files(folder: str, kind: str, tables: list[tuple[str, TableLayout]], *, use_captions_beside: bool,
                 fields: SampleFields, allow_outside: bool = False) -> Selection:
    """The units to convert from `folder` (`kind` "video": --video_dir, "frames": --frames_dir), in id order.

    With `tables` only the videos they name, with their clips and captions (a named video missing from the
    folder is a `missing_video` failure); else, with `use_captions_beside` and caption files beside the videos,
    the captioned videos; else every video or frame folder found, without captions."""
    if kind == "frames":
        walked, found = [], find_frame_folders(folder)
    else:  # one walk finds the videos and the caption files beside them
        walked = list(walk_files(folder, lambda name: is_video_file(name) or name.endswith(CAPTION_SUFFIXES)))
        found = _videos_by_id(path for path in walked if is_video_file(path.name))
    selection = Selection(n_sources_found=len(found))
    if tables:
        rows = TableRows()
        for path, layout in tables:
            if kind == "frames" and layout.has_windows:
                raise InputError(f"{path}: clip windows need videos (--video_dir), not frame folders")
            read_tables([path], layout, rows)
        selection.n_rows, selection.has_captions = rows.n_rows, True
        selection.failures += rows.failures
        _units_from_tables(rows, found, folder, kind, selection, allow_outside)
    elif use_captions_beside and any(not is_video_file(path.name) for path in walked):
        selection.has_captions = True
        _units_from_captions_beside(walked, fields, selection)
    else:
        for video_id in sorted(found):
            if not is_utf8(video_id):
                selection.failures.append(bad_name(found[video_id]))
            elif problem := id_problem(video_id):
                selection.failures.append(Failure("bad_id", " ".join(video_id.split()), found[video_id],
                                                  f"the file name {problem}"))
            else:
                selection.units.append(Unit(video_id, found[video_id], kind, (Clip(video_id, None),)))
    return selection


def _units_from_tables(rows: TableRows, found: dict[str, str], folder: str, kind: str, selection: Selection,
                       allow_outside: bool) -> None:
    missing = []
    for video_id in sorted(rows.clips):
        clips = rows.clips[video_id]
        if not clips:
            continue
        relative = rows.video_paths.get(video_id)
        if relative is not None and not allow_outside and not _stays_inside(relative):
            selection.failures.append(Failure("outside_video_dir", video_id, clips[0].where,
                                              f"{relative} leads outside --video_dir {folder} "
                                              f"(--allow_outside_paths reads it)"))
            continue
        location = str(Path(folder) / relative) if relative is not None else found.get(video_id)
        if location is None or (relative is not None and not os.path.exists(location)):
            where = clips[0].where if relative is not None else ""
            detail = f"no file {relative} under {folder}" if relative is not None else \
                "no video file or frame folder with this id"
            missing.append(Failure("missing_video", video_id, where, detail))
            continue
        selection.units.append(Unit(video_id, location, kind, tuple(clips)))
    selection.failures += missing


def bad_name(path: str) -> Failure:
    """The failure of a file whose name is not UTF-8: its id (the name) could not be stored in the index or labels."""
    return Failure("bad_name", "", path, "the file name is not valid UTF-8, so it cannot be a clip id: rename the "
                   "file (e.g. with convmv)")


def _stays_inside(relative: str) -> bool:
    """A table's path stays under the folder it is relative to: not absolute, no `..` above it (links inside the
    folder may still point anywhere: the folder's owner made them)."""
    normal = os.path.normpath(relative)
    return not os.path.isabs(relative) and normal != ".." and not normal.startswith(".." + os.sep)


def _units_from_captions_beside(walked: list[Path], fields: SampleFields, selection: Selection) -> None:
    """video2dataset's `files` layout: `<key>.mp4` with `<key>.txt` and/or `<key>.json` in the same folder."""
    samples: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    for path in walked:
        samples[(str(path.parent), path.stem)]["video" if is_video_file(path.name) else path.suffix[1:]] = path
    seen: set[str] = set()
    units = []
    for (_, key), members in sorted(samples.items(), key=lambda item: item[0][1]):
        where = str(members.get("video") or members.get("json") or members.get("txt"))
        if not is_utf8(key):
            selection.failures.append(bad_name(where))
            continue
        meta = _read_json(members["json"]) if "json" in members else {}
        clip_id, caption, failure = sample_clip(key, meta, _read_text(members.get("txt")), fields, where,
                                                has_video="video" in members)
        if failure is None and clip_id in seen:
            failure = Failure("duplicate_id", clip_id, where, "id seen before; first kept")
        if failure is not None:
            selection.failures.append(failure)
            continue
        seen.add(clip_id)
        units.append(Unit(clip_id, str(members["video"]), "video", (Clip(clip_id, caption),)))
    selection.units = sorted(units, key=lambda unit: unit.source_id)


def sample_clip(key: str, meta: dict[str, Any] | Failure, text: str | None, fields: SampleFields, where: str, *,
                has_video: bool) -> tuple[str, str | None, Failure | None]:
    """(clip id, caption, None) of a video2dataset sample (a webdataset sample or a files-layout triple), or the
    Failure that keeps it out: a json that does not parse, a status other than success, no video, no caption or an
    empty one, an id field that is missing."""
    if isinstance(meta, Failure):
        return key, None, Failure(meta.kind, key, where, meta.detail)
    clip_id = key
    if fields.id_field is not None:
        if fields.id_field not in meta:
            return key, None, Failure("no_id", key, where, f"no json field {fields.id_field!r}")
        value = meta[fields.id_field]
        clip_id = value.strip() if isinstance(value, str) else value
        problem = id_problem(clip_id)
        if problem:
            return key, None, Failure("bad_id", " ".join(str(key).split()), where,
                                      f"json field {fields.id_field!r}: {problem}")
        clip_id = str(clip_id)
    elif problem := id_problem(key):
        return key, None, Failure("bad_id", " ".join(key.split()), where, f"the sample key {problem}")
    status = meta.get("status")
    if status is not None and status != SUCCESS:
        return clip_id, None, Failure("failed_download", clip_id, where,
                                      f"status {status}: {meta.get('error_message') or 'no message'}")
    if not has_video:
        return clip_id, None, Failure("no_video", clip_id, where, "the sample has no video member")
    if fields.caption_field is not None:
        caption = meta.get(fields.caption_field)
        source = f"json field {fields.caption_field!r}"
    elif text is not None:
        caption, source = text, ".txt"
    else:
        caption, source = meta.get("caption"), "json field 'caption'"
    if caption is None:
        return clip_id, None, Failure("no_caption", clip_id, where, f"no caption (no {source})")
    if not str(caption).strip():
        return clip_id, None, Failure("empty_caption", clip_id, where, f"the caption ({source}) is empty")
    return clip_id, str(caption).strip(), None


def _read_json(path: Path) -> dict[str, Any] | Failure:
    return parse_sample_json(path.read_bytes())


def parse_sample_json(data: bytes) -> dict[str, Any] | Failure:
    try:
        meta = json.loads(data.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as error:
        return Failure("bad_json", "", "", f"the .json does not parse: {error}")
    if not isinstance(meta, dict):
        return Failure("bad_json", "", "", "the .json is not an object")
    return meta


def _read_text(path: Path | None) -> str | None:
    return None if path is None else path.read_bytes().decode("utf-8", errors="replace")
