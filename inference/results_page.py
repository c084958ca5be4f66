"""An HTML page of search results: each hit with its score, path and a strip of frame thumbnails (JPEGs embedded
as data URIs, so the page is one file that can be moved or mailed)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from dataloaders.video import VideoDecodeError, read_frames

THUMBNAILS = 6
THUMBNAIL_HEIGHT = 96


def thumbnails(path: str | Path, count: int = THUMBNAILS, height: int = THUMBNAIL_HEIGHT) -> list[bytes]:
    """JPEG bytes of `count` frames spread over the video (fewer for a short video; none when unreadable)."""
    try:
        frames = read_frames(path, feature_framerate=0)
    except VideoDecodeError:
        return []
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    images = []
    for frame in frames[picks]:
        width = max(1, round(frame.shape[1] * height / frame.shape[0]))
        resized = cv2.resize(np.ascontiguousarray(frame), (width, height), interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(resized, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        if ok:
            images.append(encoded.tobytes())
    return images


def write_results_page(out: str | Path, query: str, hits: Sequence[tuple[str, float]], scoring: str) -> Path:
    """Write the page for `hits` ((path, score), best first) of `query`; returns its path."""
    rows = []
    for rank, (path, score) in enumerate(hits, start=1):
        images = "".join(f'<img alt="frame" src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'
                         for jpeg in thumbnails(path))
        rows.append(f'<li><div class="meta"><b>{rank}.</b> <span class="score">{score:.3f}</span> '
                    f'<a href="{html.escape(Path(path).resolve().as_uri())}">{html.escape(str(path))}</a></div>'
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
