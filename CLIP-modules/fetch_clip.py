"""Fetch OpenAI's CLIP ViT-B/16 weights into CLIP-modules/ (docs/method.md §10.2).

    python CLIP-modules/fetch_clip.py                   # -> CLIP-modules/ViT-B-16.pt

Downloads from OpenAI's public address, resumes a partial download (`<out>.part`, HTTP Range), shows a
progress bar and checks the SHA-256 that OpenAI publishes in the URL. Nothing else in the project downloads.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloaders.files import file_sha256  # noqa: E402

VIT_B16_SHA256 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
VIT_B16_URL = f"https://openaipublic.azureedge.net/clip/models/{VIT_B16_SHA256}/ViT-B-16.pt"
DEFAULT_OUT = Path(__file__).resolve().parent / "ViT-B-16.pt"
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download that failed or gave the wrong file; the message says what happened."""


def fetch(
    url: str = VIT_B16_URL, out: Path = DEFAULT_OUT, sha256: str = VIT_B16_SHA256, timeout: float = 60
) -> Path:
    """Download `url` to `out` unless it is already there with the right checksum; resume a `.part` file."""
    out = Path(out)
    if out.is_file() and file_sha256(out) == sha256:
        print(f"{out} is present and its SHA-256 matches")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and done:  # the part file is already complete
            response = None
        else:
            raise FetchError(f"cannot download {url}: HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise FetchError(f"cannot reach {url}: {error.reason}") from error
    if response is not None:
        _write_body(response, part, done)
    actual = file_sha256(part)
    if actual != sha256:
        part.unlink()
        raise FetchError(
            f"checksum mismatch for {url}: expected {sha256}, got {actual}; the partial file was removed"
        )
    os.replace(part, out)
    print(f"saved {out} (SHA-256 verified)")
    return out


def _write_body(response, part: Path, done: int) -> None:
    resumed = response.status == 206
    if done and not resumed:
        done = 0  # the server ignored the Range header: start over
    total = response.headers.get("Content-Length")
    total = int(total) + done if total is not None else None
    with (
        response,
        open(part, "ab" if resumed else "wb") as handle,
        tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=part.name) as progress,
    ):
        for block in iter(lambda: response.read(CHUNK), b""):
            handle.write(block)
            progress.update(len(block))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", default=VIT_B16_URL, help="where to download from (default: OpenAI's address)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="destination file")
    parser.add_argument("--sha256", default=VIT_B16_SHA256, help="expected SHA-256 of the file")
    args = parser.parse_args(argv)
    try:
        fetch(args.url, args.out, args.sha256)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
