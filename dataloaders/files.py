"""Files on disk that several tools read or write: the video extensions, the one folder walk, checksums, and the
lock that keeps a folder to one writer."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from modules.errors import InputError

logger = logging.getLogger("t2vlp.data")

# What counts as a video file, for every folder walk of the project (converter, predict.py's index, loaders).
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                              ".3gp", ".ogv", ".ts"})


def is_video_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def is_utf8(text: str) -> bool:
    """Whether `text` is valid UTF-8 text: False for a file name whose bytes are not (Python reads such names with
    surrogate escapes, which cannot be written to a UTF-8 file or handed to OpenCV)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with the bytes of a name that are not UTF-8 shown as \\xNN, so it can go into a UTF-8 file or a log."""
    if is_utf8(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


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


def files_by_name(paths: Iterable[Path], key: str = "stem") -> dict[str, Path]:
    """`paths` (e.g. of `walk_files`) by name without extension (`key="stem"`) or by full name (`"name"`); of two
    files with one name the first is kept, with a warning."""
    if key not in ("stem", "name"):
        raise ValueError(f"key must be 'stem' or 'name', got {key!r}")
    found: dict[str, Path] = {}
    for path in paths:
        name = path.name if key == "name" else os.path.splitext(path.name)[0]
        if name in found:
            logger.warning("two files for video %s: %s and %s (using the first)", name, found[name], path)
            continue
        found[name] = path
    return found


def temporary_beside(path: Path) -> tuple[int, Path]:
    """A new temp file beside `path` (`.<name>.<random>.tmp`, for an atomic rename over it), open (its fd), with
    the mode a plain open() gives (0666 less the umask): mkstemp's 0600 would survive the rename and keep a shared
    store or checkpoint from its group."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, Path(name)


def unique_temporary(path: Path) -> Path:
    """A new, empty temp file beside `path` (`temporary_beside`, closed): no two writers ever share one."""
    fd, name = temporary_beside(path)
    os.close(fd)
    return name


def remove_temporaries(path: Path) -> None:
    """The temp files of `path` (`temporary_beside`'s) a killed writer left: only for the writer that holds
    `path`'s lock or its folder's."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's contents, as hex (read in blocks: any size)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------- one writer


LOCK_NAME = ".t2vlp.lock"


class FolderInUseError(InputError):
    """Another process writes into the folder (bad input: one line naming it, exit code 2)."""


class FolderLock:
    """One writer per folder: an exclusive `flock` on `<folder>/.t2vlp.lock` (or on `name`) for the writer's
    lifetime, the holder's host, pid, start time and command written into the file. The kernel releases it when
    the process ends however it ends (a kill -9 leaves no stale lock), so a restarted run takes it again.

    `shared=True` takes the lock shared instead (the parts of one conversion share the folder, each holding an
    exclusive lock of its own) and writes nothing into the file."""

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME, *, shared: bool = False,
                 what: str = "folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.shared = shared
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            os.close(fd)
            raise FolderInUseError(f"{self.what} {self.folder} is in use by {holder}: wait for it to end, or use "
                                   f"another folder") from None
        if not self.shared:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder_record()).encode())
            os.fsync(fd)
        self._fd = fd
        return self

    def holder(self) -> str:
        """Who holds the lock, as its file says (the parts of a conversion when it is held shared)."""
        record = _read_record(self.path)
        parts = [path for path in self.folder.glob(f"{self.path.name}.*") if _is_locked(path)]
        if parts:
            return f"{len(parts)} part(s) of a conversion (e.g. {describe_holder(_read_record(parts[0]))})"
        return describe_holder(record) if record else "another process"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_record() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}


def describe_holder(record: dict[str, object]) -> str:
    return (f"pid {record.get('pid', '?')} on {record.get('host', '?')} (started {record.get('started', '?')}: "
            f"{record.get('command', '?')})")


def _read_record(path: Path) -> dict[str, object]:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _is_locked(path: Path) -> bool:
    """Whether some process holds `path` locked exclusively right now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
