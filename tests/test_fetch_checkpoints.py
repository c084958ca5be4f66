"""The released-checkpoint fetcher with the real gdown against a local HTTP server standing in for Drive."""

from __future__ import annotations

import http.server
import io
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CLIP-modules"))
import fetch_checkpoints  # noqa: E402


def checkpoint_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"global_step": 5, "model_state_dict": {"clip.logit_scale": torch.tensor(float(seed))}}, buffer)
    return buffer.getvalue()


class DriveStandIn(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    refused: set[str] = set()  # answered 403, as a file that is no longer shared
    web_pages: set[str] = set()  # answered with an HTML page (Drive's quota page), status 200
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        file_id = self.path.strip("/")
        type(self).requests.append(file_id)
        if file_id in self.refused or file_id not in self.files and file_id not in self.web_pages:
            self.send_response(403)
            self.end_headers()
            return
        body = b"<html><body>Too many users have viewed or downloaded this file recently.</body></html>" \
            if file_id in self.web_pages else self.files[file_id]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/html" if file_id in self.web_pages else "application/octet-stream")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def drive():
    entries = {entry.name: entry for entry in fetch_checkpoints.RELEASED}
    DriveStandIn.files = {entries["msrvtt_qa"].drive_id: checkpoint_bytes(1),
                          entries["msvd_caption"].drive_id: checkpoint_bytes(2)}
    DriveStandIn.refused = {entries["lsmdc_retrieval"].drive_id}
    DriveStandIn.web_pages = {entries["didemo_retrieval"].drive_id}
    DriveStandIn.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DriveStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"template": f"http://127.0.0.1:{server.server_address[1]}/{{id}}", "entries": entries}
    server.shutdown()


def run(drive, out: Path, *arguments: str) -> int:
    return fetch_checkpoints.main([*arguments, "--out", str(out), "--url_template", drive["template"]])


def test_fresh_download_records_the_manifest_and_a_rerun_skips(drive, tmp_path, capsys):
    out = tmp_path / "released"
    assert run(drive, out, "msrvtt_qa", "msvd_caption") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for name, seed in (("msrvtt_qa", 1), ("msvd_caption", 2)):
        path = out / f"t2vlp_{name}.bin"
        assert path.read_bytes() == checkpoint_bytes(seed)
        assert manifest[path.name]["size"] == path.stat().st_size
        assert manifest[path.name]["sha256"] == fetch_checkpoints.file_sha256(path)
        assert manifest[path.name]["drive_id"] == drive["entries"][name].drive_id
    assert not list(out.glob("*.part"))
    requests = len(DriveStandIn.requests)
    assert run(drive, out, "msrvtt_qa", "msvd_caption") == 0
    assert len(DriveStandIn.requests) == requests  # complete files are not downloaded again
    assert capsys.readouterr().out.count("(skipped)") == 2


def test_a_corrupted_file_is_detected_and_replaced(drive, tmp_path, capsys):
    out = tmp_path / "released"
    assert run(drive, out, "msrvtt_qa") == 0
    path = out / "t2vlp_msrvtt_qa.bin"
    damaged = bytearray(path.read_bytes())
    damaged[-10] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert run(drive, out, "--verify") == 1
    assert "msrvtt_qa: corrupt" in capsys.readouterr().out
    assert run(drive, out, "msrvtt_qa") == 0
    assert "does not match the manifest" in capsys.readouterr().err
    assert path.read_bytes() == checkpoint_bytes(1)
    assert run(drive, out, "--verify") == 0


def test_refused_downloads_are_reported_clearly_and_leave_nothing(drive, tmp_path, capsys):
    out = tmp_path / "released"
    assert run(drive, out, "didemo_retrieval") == 1  # Drive's quota page instead of the file
    error = capsys.readouterr().err
    assert "not a checkpoint" in error and "quota" in error
    assert not list(out.glob("t2vlp_*")) and not (out / "manifest.json").exists()


def test_refused_http_status_names_the_url(drive, tmp_path, capsys):
    assert run(drive, tmp_path / "released", "lsmdc_retrieval") == 1
    error = capsys.readouterr().err
    assert "cannot download http://127.0.0.1" in error and "403" in error


def test_list_says_what_each_file_serves_and_how_to_evaluate_it(drive, tmp_path, capsys):
    out = tmp_path / "released"
    assert run(drive, out, "msrvtt_qa") == 0
    capsys.readouterr()
    assert run(drive, out, "--list") == 0
    listing = capsys.readouterr().out
    assert "msrvtt_qa          MSRVTT-QA (the original's first-token head) [ok]" in listing
    assert "msvd_caption       MSVD captioning [missing]" in listing
    assert f"INIT_MODEL={out / 't2vlp_msrvtt_qa.bin'} QA_HEAD=first_token EVAL_ONLY=1 bash start_qa.sh" in listing
    assert "MSVD text-video retrieval" in listing and "MSVD QA" in listing and "WebVid" in listing


def test_unknown_names_are_refused(drive, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run(drive, tmp_path, "msvd_retrieval")
    assert exit_info.value.code == 2
