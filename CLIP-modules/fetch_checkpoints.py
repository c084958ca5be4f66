"""Fetch the original T2VLP's released checkpoints from Google Drive (the links of its README).

    python CLIP-modules/fetch_checkpoints.py --list           # what exists, what is here, how to evaluate it
    python CLIP-modules/fetch_checkpoints.py msrvtt_retrieval msvd_caption
    python CLIP-modules/fetch_checkpoints.py all               # every published file
    python CLIP-modules/fetch_checkpoints.py --verify          # check the files against the manifest

Files go to `checkpoints/released/` (or `--out`). A file already there and matching the manifest is skipped. On
first download its size and SHA-256 go into `manifest.json` beside it, and every later run verifies them, so a
damaged or swapped file is noticed. Downloads use gdown (progress bar, resumable `.part` file). Nothing else in the
project downloads, and training and evaluation never do.

The original README published three links empty: the WebVid-2.5M pre-trained model, MSVD retrieval and MSVD QA.
Those checkpoints cannot be fetched from anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_clip import FetchError, file_sha256  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "checkpoints" / "released"
MANIFEST = "manifest.json"
DRIVE_URL = "https://drive.google.com/uc?id={id}"


@dataclass(frozen=True)
class Released:
    name: str
    task: str
    drive_id: str
    evaluate: str  # the command that evaluates it ({path} is the file)

    @property
    def filename(self) -> str:
        return f"t2vlp_{self.name}.bin"


RELEASED = (
    Released("msrvtt_retrieval", "MSR-VTT text-video retrieval", "1sfIDLUGHfGtMS5ttCFfo-ecE71hgHBm1",
             "DATASET=msrvtt DATA_PATH=/data/msrvtt INIT_MODEL={path} EVAL_ONLY=1 bash start_retrieval.sh"),
    Released("lsmdc_retrieval", "LSMDC text-video retrieval", "1PXV4I6nD0JBRmMSUHyH0_1sVRYy7wkO-",
             "DATASET=lsmdc DATA_PATH=/data/lsmdc INIT_MODEL={path} EVAL_ONLY=1 bash start_retrieval.sh"),
    Released("didemo_retrieval", "DiDeMo text-video retrieval", "16Ai3ksp5kLkcdwIjSNARMIB9qABZQEnQ",
             "DATASET=didemo DATA_PATH=/data/didemo INIT_MODEL={path} EVAL_ONLY=1 bash start_retrieval.sh"),
    Released("msrvtt_caption", "MSR-VTT captioning", "10yMgLXgDvnit9un77Zkpv3jWoaKTRnD7",
             "DATASET=msrvtt DATA_PATH=/data/msrvtt INIT_MODEL={path} EVAL_ONLY=1 bash start_caption.sh"),
    Released("msvd_caption", "MSVD captioning", "1UZUoq5SVrsXid1X1PfHYFJZ-jFwSWlL9",
             "DATASET=msvd DATA_PATH=/data/msvd INIT_MODEL={path} EVAL_ONLY=1 bash start_caption.sh"),
    Released("msrvtt_qa", "MSRVTT-QA (the original's first-token head)", "1GyFO0HYUm3GfwYpKdEyJVpBkdvKs7st9",
             "DATASET=msrvtt DATA_PATH=/data/msrvtt_qa INIT_MODEL={path} QA_HEAD=first_token EVAL_ONLY=1 "
             "bash start_qa.sh"),
)
PUBLISHED_EMPTY = ("WebVid-2.5M pre-trained model (stage 2)", "MSVD text-video retrieval", "MSVD QA")

# download(url, destination) writes the file at `url` to `destination`; raises on failure.
Download = Callable[[str, Path], None]


def gdown_download(url: str, destination: Path) -> None:
    """gdown, resuming `destination` when it exists; Drive's refusals become a FetchError that says what happened."""
    import gdown
    from gdown.exceptions import FileURLRetrievalError

    try:
        result = gdown.download(url, str(destination), quiet=False, resume=True)
    except FileURLRetrievalError as error:
        raise FetchError(f"Google Drive refused {url} (a daily download quota, or the file is no longer shared): "
                         f"{str(error).strip().splitlines()[0]}. Try again later, or open the link in a browser "
                         f"and save the file as {destination.name.removesuffix('.part')}.") from error
    except Exception as error:  # requests' HTTP and connection errors
        raise FetchError(f"cannot download {url}: {error}") from error
    if result is None:
        raise FetchError(f"cannot download {url} (gdown gave no file)")


def read_manifest(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_manifest(folder: Path, manifest: dict[str, dict]) -> None:
    temporary = folder / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, folder / MANIFEST)


def verify(entry: Released, folder: Path, manifest: dict[str, dict]) -> str:
    """"missing", "unrecorded" (present, not in the manifest), "ok" or "corrupt" (size or SHA-256 differ)."""
    path = folder / entry.filename
    if not path.is_file():
        return "missing"
    recorded = manifest.get(entry.filename)
    if recorded is None:
        return "unrecorded"
    if path.stat().st_size != recorded["size"] or file_sha256(path) != recorded["sha256"]:
        return "corrupt"
    return "ok"


def looks_like_a_checkpoint(path: Path) -> bool:
    """torch.save files are zip archives (`PK`) or pickles (`0x80`); Drive's error pages are HTML."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def fetch(entry: Released, folder: Path, download: Download = gdown_download, url_template: str = DRIVE_URL) -> str:
    """Make `folder/<entry.filename>` present and verified; returns what was done."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    state = verify(entry, folder, manifest)
    target = folder / entry.filename
    if state == "ok":
        return f"{entry.filename}: present, size and SHA-256 match the manifest (skipped)"
    if state == "corrupt":
        print(f"{entry.filename}: does not match the manifest (damaged or replaced): downloading it again",
              file=sys.stderr)
    part = target.with_name(target.name + ".part")
    download(url_template.format(id=entry.drive_id), part)
    if not part.is_file() or not looks_like_a_checkpoint(part):
        part.unlink(missing_ok=True)
        raise FetchError(f"{entry.name}: the download is not a checkpoint (Drive answers with a web page when its "
                         f"download quota is exhausted); nothing was kept")
    size, digest = part.stat().st_size, file_sha256(part)
    recorded = manifest.get(entry.filename)
    if recorded is not None and (recorded["size"], recorded["sha256"]) != (size, digest):
        part.unlink()
        raise FetchError(f"{entry.name}: the new download differs from the manifest's record (SHA-256 "
                         f"{digest[:12]}… vs {recorded['sha256'][:12]}…): the file on Drive changed, or the "
                         f"manifest is wrong; delete the entry from {folder / MANIFEST} to accept the new file")
    os.replace(part, target)
    if recorded is None:
        manifest[entry.filename] = {"size": size, "sha256": digest, "drive_id": entry.drive_id, "task": entry.task,
                                    "downloaded": datetime.now(UTC).isoformat(timespec="seconds")}
        write_manifest(folder, manifest)
        return f"{entry.filename}: downloaded, {size} bytes, SHA-256 {digest} recorded in {MANIFEST}"
    return f"{entry.filename}: downloaded again, matches the manifest"


def listing(folder: Path) -> str:
    manifest = read_manifest(folder)
    lines = [f"released T2VLP checkpoints (folder {folder}):"]
    for entry in RELEASED:
        path = folder / entry.filename
        lines.append(f"  {entry.name:18} {entry.task} [{verify(entry, folder, manifest)}]")
        lines.append(f"  {'':18} evaluate: {entry.evaluate.format(path=path)}")
    lines.append("published with an empty link (not available anywhere): " + "; ".join(PUBLISHED_EMPTY))
    return "\n".join(lines)


def main(argv: list[str] | None = None, download: Download = gdown_download) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"'all' or any of: {', '.join(e.name for e in RELEASED)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="destination folder (default %(default)s)")
    parser.add_argument("--list", action="store_true", help="list the checkpoints, their state and how to evaluate")
    parser.add_argument("--verify", action="store_true", help="check every present file against the manifest")
    parser.add_argument("--url_template", default=DRIVE_URL, help="where a file id is fetched from (for mirrors)")
    args = parser.parse_args(argv)
    if args.list:
        print(listing(args.out))
        return 0
    if args.verify:
        manifest = read_manifest(args.out)
        states = {entry.name: verify(entry, args.out, manifest) for entry in RELEASED}
        for name, state in states.items():
            print(f"{name}: {state}")
        return 1 if "corrupt" in states.values() else 0
    by_name = {entry.name: entry for entry in RELEASED}
    names = list(by_name) if args.names == ["all"] else args.names
    unknown = [name for name in names if name not in by_name]
    if not names or unknown:
        parser.error(f"name the checkpoints to fetch ('all' or {', '.join(by_name)})"
                     + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    failed = 0
    for name in names:
        try:
            print(fetch(by_name[name], args.out, download, args.url_template))
        except FetchError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
