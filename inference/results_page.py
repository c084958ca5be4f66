"""An HTML page of search results: each hit with its score, path and a strip of frame thumbnails (JPEGs embedded
as data URIs, so the page is one file that can be moved or mailed)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from dataloaders.files import printable
from dataloaders.video_decoding import VideoDecodeError, open_capture

THUMBNAILS = 6
THUMBNAIL_HEIGHT = 96


def thumbnails(path: str | Path, count: int = THUMBNAILS, height: int = THUMBNAIL_HEIGHT) -> list[bytes]:
    """JPEG bytes of `count` frames spread over the video (fewer for a short video; none when unreadable). Each is
    reached by a seek (FFmpeg decodes from the keyframe before it), not by decoding the whole video."""
    try:
        capture = open_capture(str(path))
    except (VideoDecodeError, OSError):
        return []
    try:
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
        images = []
        for position in np.linspace(0, max(total - 1, 0), min(count, total)).round().astype(int):
            capture.set(cv2.CAP_PROP_POS_FRAMES, int(position))
            ok, frame = capture.read()
            if ok:
                images.append(_thumbnail(frame, height))
        return images
    finally:
        capture.release()


def _thumbnail(frame: np.ndarray, height: int) -> bytes:
    """A BGR frame scaled to `height`, as JPEG."""
    width = max(1, round(frame.shape[1] * height / frame.shape[0]))
    resized = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def write_results_page(out: str | Path, query: str, hits: Sequence[tuple[str, float]], scoring: str) -> Path:
    """Write the page for `hits` ((path, score), best first) of `query`; returns its path."""
    rows = []
    for rank, (path, score) in enumerate(hits, start=1):
        images = "".join(f'<img alt="frame" src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'
                         for jpeg in thumbnails(path))
        rows.append(f'<li><div class="meta"><b>{rank}.</b> <span class="score">{score:.3f}</span> '
                    f'<a href="{html.escape(Path(path).resolve().as_uri())}">{html.escape(printable(str(path)))}</a></div>'
                    f'<div class="strip">{images or "<i>(no frame could be read)</i>"}</div></li>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(query)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; background: #fafafa; }}
ol {{ list-style: none; padding: 0; }}
li {{ margin-bottom: 1em; padding: .5em; background: white; border: 1px solid #ddd; }}
.strip img {{ height: {THUMBNAIL_HEIGHT}px; margin-right: 4px; }}
.score {{ font-family: monospace; }}
</style></head>
<body><h1>&ldquo;{html.escape(query)}&rdquo;</h1>
<p>{len(hits)} results, {html.escape(scoring)}</p>
<ol>{''.join(rows)}</ol></body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
