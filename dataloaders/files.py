"""Files on disk that several tools read: the video extensions, the one folder walk, checksums."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger("t2vlp.data")

# What counts as a video file, for every folder walk of the project (converter, predict.py's index, loaders).
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                              ".3gp", ".ogv", ".ts"})


def is_video_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def walk_files(root: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Every file under `root` whose name `keep` accepts (all by default), folders and names in sorted order,
    following symbolic links; a folder reached a second time (a link to a folder already seen, or a link loop)
    is skipped with one warning, so each file is listed once and the walk always ends."""
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in seen:
            logger.warning("%s: a folder already walked (a link to it, or a link loop): skipped", folder)
            dirs.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        dirs.sort()
        for name in sorted(files):
            if keep is None or keep(name):
                yield Path(folder) / name


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's contents, as hex (read in blocks: any size)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
