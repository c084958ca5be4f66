"""Files on disk that more than one tool reads: checksums."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's contents, as hex (read in blocks: any size)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
