"""The CLIP weight fetcher against a small HTTP server on 127.0.0.1 (no internet here)."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "CLIP-modules" / "fetch_clip.py"
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class RangeHandler(http.server.BaseHTTPRequestHandler):
    ranges_seen: list[str | None] = []
    honour_range = True

    def do_GET(self):  # noqa: N802 - http.server's naming
        requested = self.headers.get("Range")
        type(self).ranges_seen.append(requested)
        start = int(requested.split("=")[1].rstrip("-")) if requested and self.honour_range else 0
        if start >= len(PAYLOAD):
            self.send_response(416)
            self.end_headers()
            return
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    RangeHandler.ranges_seen = []
    RangeHandler.honour_range = True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/clip/ViT-B-16.pt"
    httpd.shutdown()


def run_fetch(url: str, out: Path, sha256: str = PAYLOAD_SHA256) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--url", url, "--out", str(out), "--sha256", sha256],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.integration
def test_fresh_download_is_verified(server, tmp_path):
    out = tmp_path / "ViT-B-16.pt"
    result = run_fetch(server, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "ViT-B-16.pt.part").exists()
    assert RangeHandler.ranges_seen == [None]
    # a second run sees the verified file and does not download again
    assert run_fetch(server, out).returncode == 0
    assert RangeHandler.ranges_seen == [None]


@pytest.mark.integration
def test_partial_download_resumes(server, tmp_path):
    out = tmp_path / "ViT-B-16.pt"
    (tmp_path / "ViT-B-16.pt.part").write_bytes(PAYLOAD[:300_000])
    result = run_fetch(server, out)
    assert result.returncode == 0, result.stderr
    assert RangeHandler.ranges_seen == ["bytes=300000-"]
    assert out.read_bytes() == PAYLOAD


@pytest.mark.integration
def test_server_ignoring_range_restarts(server, tmp_path):
    RangeHandler.honour_range = False
    out = tmp_path / "ViT-B-16.pt"
    (tmp_path / "ViT-B-16.pt.part").write_bytes(b"x" * 1000)
    assert run_fetch(server, out).returncode == 0
    assert out.read_bytes() == PAYLOAD


@pytest.mark.integration
def test_checksum_mismatch_fails_and_removes_the_partial_file(server, tmp_path):
    out = tmp_path / "ViT-B-16.pt"
    result = run_fetch(server, out, sha256="0" * 64)
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr
    assert not out.exists() and not (tmp_path / "ViT-B-16.pt.part").exists()


@pytest.mark.integration
def test_unreachable_server_is_a_clear_error(tmp_path):
    result = run_fetch("http://127.0.0.1:9/ViT-B-16.pt", tmp_path / "x.pt")
    assert result.returncode == 1
    assert "cannot reach" in result.stderr
