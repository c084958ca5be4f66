"""frozen_tfrecord.py: WebVid csv parsing, video/frame-folder conversion round trips, resume after a kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import conversion.convert
import frozen_tfrecord as ft
from conversion.decoders import sample_positions
from conversion.tables import PRESETS, TableHeaderError, read_tables
from dataloaders.clip_store import parse_clip_record, read_frames
from dataloaders.tfrecord_io import iter_records
from tests.real_fixtures import REAL_FIXTURES, needs_real

REPO = Path(__file__).resolve().parents[1]
REAL_WEBVID = REAL_FIXTURES / "webvid"
COLOUR_TOLERANCE = 8  # mp4v + JPEG error on flat frames is at most ~6; neighbouring frames differ by 10


# ----------------------------------------------------------------------------------------------- test data


def frame_colour(video_number: int, position: int) -> np.ndarray:
    """RGB of frame `position` of test video `video_number`: R/G encode the position, B the video."""
    return np.array([5 + 10 * position, 245 - 10 * position, 40 + 30 * (video_number % 6)], dtype=np.int64)


def write_colour_video(path: Path, n_frames: int, video_number: int, size: tuple[int, int] = (64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    for position in range(n_frames):
        rgb = frame_colour(video_number, position).astype(np.uint8)
        writer.write(np.broadcast_to(rgb[::-1], (size[1], size[0], 3)).copy())
    writer.release()


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "videoid,name,page_idx,page_dir") -> None:
    lines = [header] + [f'{video_id},"{caption}",1,000001_000050' for video_id, caption in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# Frame counts of the good test videos; ids sort in this order. 24 and 13 > 12 (sampled), 12 and 7 kept whole.
VIDEO_FRAMES = {"1001": 24, "1002": 13, "1003": 12, "1004": 7}


def make_webvid_folder(root: Path) -> dict[str, int]:
    """WebVid layout: videos/<page_dir>/<id>.mp4 + results_2M_train.csv with a bad video, a missing one and a
    malformed row. Returns the expected frame counts of the videos that convert."""
    for number, (video_id, n_frames) in enumerate(VIDEO_FRAMES.items()):
        write_colour_video(root / "videos" / f"00000{number % 2}_000050" / f"{video_id}.mp4", n_frames, number)
    (root / "videos" / "000000_000050" / "1005.mp4").write_bytes(b"not a video")
    rows = [(video_id, f"caption of {video_id}, with a comma") for video_id in [*VIDEO_FRAMES, "1005", "1006"]]
    write_csv(root / "results_2M_train.csv", rows)
    with (root / "results_2M_train.csv").open("a", encoding="utf-8") as handle:
        handle.write("1007,too few fields\n")
    return dict(VIDEO_FRAMES)


def assert_frames_match(frames: np.ndarray, video_number: int, n_source_frames: int) -> None:
    positions = sample_positions(n_source_frames, 12)
    assert len(frames) == len(positions)
    means = frames[:, 8:-8, 8:-8].reshape(len(frames), -1, 3).mean(axis=1)
    expected = np.stack([frame_colour(video_number, p) for p in positions])
    assert np.abs(means - expected).max() <= COLOUR_TOLERANCE, (means.round(), expected)


def output_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in {".tfrecord", ".index"}} | {
        name: (folder / name).read_bytes() for name in ("frozen_train_labels.json", "failures.tsv")
    }


def run_cli(*args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "frozen_tfrecord.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def kill_when_written(path: Path, *args: str) -> None:
    """Run the converter's command line with `args` and SIGKILL it (and its workers) once `path` exists."""
    process = run_cli(*args, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the converter ended before the kill"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the converter and its worker processes
        process.communicate()


def convert(output_dir: Path, *args: str) -> ft.ConversionSummary:
    return ft.convert(ft.parse_args([*args, "--output_dir", str(output_dir), "--no_progress"]))


# ----------------------------------------------------------------------------------------------- csv parsing


@needs_real("webvid")
def test_real_webvid_csvs_both_column_orders_and_multiline_captions():
    labels = read_tables([REAL_WEBVID / "results_2M_val.csv", REAL_WEBVID / "results_10M_val.csv"], PRESETS["webvid"])
    assert labels.failures == []
    assert labels.n_rows == 9 + 31
    assert len(labels.captions) == 40
    assert all(video_id.isdigit() for video_id in labels.captions)
    assert labels.captions["5641526"] == "Horse grazing - seperated on green screen"  # 2M order
    assert labels.captions["4350377"] == "Cloudy moscow kremlin time lapse"  # 10M order: name is last
    # Quoted newlines: inside a caption (kept) or at its end (CR LF / LF, stripped like other outer whitespace).
    assert "\n" in labels.captions["21885613"] and "\r" not in labels.captions["21885613"]
    assert labels.captions["8824387"].endswith("video shot in late 2013.")
    assert labels.captions["1045144609"].endswith("times lapse.")
    assert any('"clean water"' in caption for caption in labels.captions.values())  # doubled inner quotes
    assert all(caption == caption.strip() for caption in labels.captions.values())


def test_malformed_rows_are_reported_with_file_and_line(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(
        'videoid,name,page_dir\n1,"first, ok",a\n2,missing field\n1,duplicate,b\n,no id,c\n3,"multi\nline",d\n'
        "4 4,space in id,e\n5,,f\n6,last,g\n",
        encoding="utf-8",
    )
    labels = read_tables([csv_path], PRESETS["webvid"])
    assert labels.captions == {"1": "first, ok", "3": "multi\nline", "6": "last"}
    reported = [(f.kind, f.video_id, f.where.rsplit(":", 1)[1]) for f in labels.failures]
    assert reported == [
        ("malformed_row", "2", "3"),
        ("duplicate_id", "1", "4"),
        ("malformed_row", "", "5"),
        ("malformed_row", "4 4", "8"),  # the multi-line record took lines 6-7
        ("malformed_row", "5", "9"),
    ]


def test_csv_without_videoid_and_name_columns_is_rejected(tmp_path):
    csv_path = tmp_path / "no_header.csv"
    csv_path.write_text("1053841541,Travel blogger,27732\n", encoding="utf-8")
    with pytest.raises(TableHeaderError, match="no_header.csv"):
        read_tables([csv_path], PRESETS["webvid"])


def test_sample_positions_are_segment_middles():
    assert sample_positions(24, 12) == list(range(1, 24, 2))
    assert sample_positions(7, 12) == list(range(7))
    assert sample_positions(30, 0) == list(range(30))


# ----------------------------------------------------------------------------------------------- round trips


@pytest.mark.integration
def test_cli_round_trip_jpeg_with_failures_report(tmp_path):
    frame_counts = make_webvid_folder(tmp_path)
    out = tmp_path / "tfr"
    process = run_cli("--video_dir", str(tmp_path / "videos"), "--csv", str(tmp_path / "results_2M_train.csv"),
                      "--output_dir", str(out), "--shard_size", "3", "--workers", "2")
    log, _ = process.communicate(timeout=120)
    assert process.returncode == 0, log
    assert "written: 4 in 2 shard(s)" in log

    for number, (video_id, n_frames) in enumerate(frame_counts.items()):
        frames = read_frames(out / "path.index", video_id, verify_crc=True)
        assert frames.dtype == np.uint8 and frames.shape[1:] == (48, 64, 3)
        assert_frames_match(frames, number, n_frames)

    index = [line.split("\t") for line in (out / "path.index").read_text().splitlines()]
    # Shards are planned over the sorted ids that have a file (1005 is planned in shard 1, then fails to decode).
    assert [row[:2] for row in index] == [["1001", "path-00000.tfrecord"], ["1002", "path-00000.tfrecord"],
                                          ["1003", "path-00000.tfrecord"], ["1004", "path-00001.tfrecord"]]
    labels = json.loads((out / "frozen_train_labels.json").read_text())
    assert labels == [{"video_id": v, "caption": f"caption of {v}, with a comma"} for v in frame_counts]
    failures = [line.split("\t") for line in (out / "failures.tsv").read_text().splitlines()[1:]]
    short = {("fewer_frames", video_id) for video_id, n in frame_counts.items() if n < 12}
    assert short  # a video with fewer frames than asked for is stored as it is, and reported
    assert {(kind, video_id) for kind, video_id, *_ in failures} == {
        ("malformed_row", "1007"), ("missing_video", "1006"), ("bad_video", "1005"), *short}

    record = parse_clip_record(next(iter_records(out / "path-00000.tfrecord"))[1])
    assert (record.video_id, record.num_frames) == ("1001", 12)


def test_raw_layout_round_trip(tmp_path):
    frame_counts = make_webvid_folder(tmp_path)
    out = tmp_path / "raw"
    summary = convert(out, "--video_dir", str(tmp_path / "videos"), "--csv", str(tmp_path / "results_2M_train.csv"),
                      "--raw", "--workers", "0")
    assert summary.n_written == 4
    for number, (video_id, n_frames) in enumerate(frame_counts.items()):
        frames = read_frames(out, video_id)
        assert frames.shape[1:] == (256, 256, 3)
        assert_frames_match(frames, number, n_frames)
    _, payload = next(iter_records(out / "path-00000.tfrecord"))
    record = parse_clip_record(payload)
    assert record.video_id is None and record.raw_bgr is not None  # only the original's `image` key


def test_frame_folders_raw_is_the_originals_exact_layout(tmp_path):
    frames_dir = tmp_path / "frames"
    rng = np.random.default_rng(0)
    expected = {}
    for video_id, n_frames in (("7", 3), ("8", 5)):
        (frames_dir / video_id).mkdir(parents=True)
        images = [rng.integers(0, 256, (40, 70, 3), dtype=np.uint8) for _ in range(n_frames)]
        for number, image in enumerate(images):
            cv2.imwrite(str(frames_dir / video_id / f"{number:03d}.png"), image)
        expected[video_id] = np.stack([cv2.resize(image, (256, 256)) for image in images])  # BGR, bilinear
    out = tmp_path / "tfr"
    convert(out, "--frames_dir", str(frames_dir), "--raw", "--workers", "0")
    for video_id, bgr in expected.items():
        np.testing.assert_array_equal(read_frames(out, video_id), bgr[..., ::-1])
    assert not (out / "frozen_train_labels.json").exists()  # no csv, no captions

    convert(tmp_path / "jpeg", "--frames_dir", str(frames_dir), "--short_side", "20", "--workers", "0")
    jpeg = read_frames(tmp_path / "jpeg", "8")
    assert jpeg.shape == (5, 20, 35, 3)  # shorter side 40 -> 20, aspect kept


# ----------------------------------------------------------------------------------------------- resume


def make_many_videos(root: Path, n_videos: int) -> Path:
    videos = root / "videos"
    for number in range(n_videos):
        write_colour_video(videos / f"{2000 + number}.mp4", 6 + number % 5, number)
    write_csv(root / "labels.csv", [(str(2000 + n), f"video {n}") for n in range(n_videos)])
    return videos


def test_injected_failure_then_rerun_gives_identical_files(tmp_path, monkeypatch):
    videos = make_many_videos(tmp_path, 7)
    args = ("--video_dir", str(videos), "--csv", str(tmp_path / "labels.csv"), "--shard_size", "2", "--workers", "0")
    convert(tmp_path / "reference", *args)

    real_write_shard = conversion.convert.write_unit_shard

    def write_two_shards_then_fail(layout, plan, *rest, **kwargs):
        if plan.number == 2:
            raise OSError("disk full (injected)")
        return real_write_shard(layout, plan, *rest, **kwargs)

    monkeypatch.setattr(conversion.convert, "write_unit_shard", write_two_shards_then_fail)
    with pytest.raises(OSError, match="injected"):
        convert(tmp_path / "resumed", *args)
    assert not (tmp_path / "resumed" / "path.index").exists()
    monkeypatch.setattr(conversion.convert, "write_unit_shard", real_write_shard)
    summary = convert(tmp_path / "resumed", *args)
    assert (summary.n_shards, summary.n_shards_resumed) == (4, 2)
    assert output_bytes(tmp_path / "resumed") == output_bytes(tmp_path / "reference")


@pytest.mark.integration
def test_killed_conversion_resumes_to_byte_identical_output(tmp_path):
    videos = make_many_videos(tmp_path, 7)
    args = ["--video_dir", str(videos), "--csv", str(tmp_path / "labels.csv"), "--shard_size", "2"]
    convert(tmp_path / "reference", *args, "--workers", "0")

    # A FIFO blocks the decoder that opens it, so the run is stuck in shard 2 after finishing shards 0 and 1.
    blocking = videos / "2004.mp4"
    real_video = blocking.rename(tmp_path / "2004.mp4")
    os.mkfifo(blocking)
    out = tmp_path / "killed"
    kill_when_written(out / "path-00001.meta.json", *args, "--output_dir", str(out), "--workers", "1")
    assert not (out / "path.index").exists() and not (out / "path-00002.meta.json").exists()

    blocking.unlink()
    real_video.rename(blocking)
    summary = convert(out, *args, "--workers", "0")
    assert (summary.n_shards, summary.n_shards_resumed) == (4, 2)
    assert output_bytes(out) == output_bytes(tmp_path / "reference")
    assert not list(out.glob("*.tmp"))


@pytest.mark.integration
def test_ctrl_c_stops_the_conversion_with_one_line_and_a_rerun_completes_it(tmp_path):
    videos = make_many_videos(tmp_path, 7)
    args = ["--video_dir", str(videos), "--csv", str(tmp_path / "labels.csv"), "--shard_size", "2"]
    convert(tmp_path / "reference", *args, "--workers", "0")
    blocking = videos / "2004.mp4"  # a FIFO holds a worker in shard 2 until the interrupt
    real_video = blocking.rename(tmp_path / "2004.mp4")
    os.mkfifo(blocking)
    out = tmp_path / "interrupted"
    process = run_cli(*args, "--output_dir", str(out), "--workers", "2", "--no_progress", start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "path-00001.meta.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the converter ended before the interrupt"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the converter and its workers
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Traceback" not in output and "Error" not in output
    assert output.strip().splitlines()[-1] == (f"frozen_tfrecord.py: stopped; 2 complete shard(s) kept in {out}; "
                                               f"rerun the same command to resume")
    blocking.unlink()
    real_video.rename(blocking)
    summary = convert(out, *args, "--workers", "2")
    assert (summary.n_shards, summary.n_shards_resumed) == (4, 2)
    assert output_bytes(out) == output_bytes(tmp_path / "reference")


def holders_of(path: Path, parent: int) -> list[int]:
    """The child processes of `parent` that hold `path` open."""
    found = []
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{child}/fd").iterdir()):
                found.append(int(child))
    return found


@pytest.mark.integration
def test_a_worker_that_dies_stops_the_conversion_with_one_line_instead_of_a_hang(tmp_path):
    videos = make_many_videos(tmp_path, 7)
    args = ["--video_dir", str(videos), "--csv", str(tmp_path / "labels.csv"), "--shard_size", "2"]
    convert(tmp_path / "reference", *args, "--workers", "0")
    blocking = videos / "2004.mp4"  # a FIFO: the worker that reads it waits for data
    real_video = blocking.rename(tmp_path / "2004.mp4")
    os.mkfifo(blocking)
    out = tmp_path / "crashed"
    process = run_cli(*args, "--output_dir", str(out), "--workers", "2", "--no_progress")
    deadline = time.monotonic() + 120
    while True:  # a writer can open the FIFO once a worker has it open for reading
        assert process.poll() is None and time.monotonic() < deadline, "the converter ended before the crash"
        with contextlib.suppress(OSError):
            writer = os.open(blocking, os.O_WRONLY | os.O_NONBLOCK)
            break
        time.sleep(0.02)
    while not (holders := holders_of(blocking, process.pid)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(holders[0], signal.SIGKILL)  # as a crash inside the decoder would end it
    try:
        output, _ = process.communicate(timeout=120)  # the pool alone would wait for the lost task forever
    finally:
        process.kill()
        os.close(writer)
    assert process.returncode == 1, output
    assert "Traceback" not in output
    assert "conversion stopped (a worker process died (killed by signal 9: a crash in a decoder, or out of memory) " \
           "while converting shard 2" in output
    blocking.unlink()
    real_video.rename(blocking)
    convert(out, *args, "--workers", "2")
    assert output_bytes(out) == output_bytes(tmp_path / "reference")


@pytest.mark.integration
@pytest.mark.parametrize("source", ["files", "webdataset"])
def test_a_conversion_never_imports_torch(tmp_path, source):
    """Neither from files nor from webdataset shards (3 s of CPU per worker process otherwise)."""
    import webdataset

    videos = make_many_videos(tmp_path, 3)
    inputs = ["--video_dir", str(videos), "--csv", str(tmp_path / "labels.csv")]
    if source == "webdataset":
        with webdataset.TarWriter(str(tmp_path / "00000.tar")) as writer:
            for number, video in enumerate(sorted(videos.rglob("*.mp4"))):
                writer.write({"__key__": f"{number:09d}", "mp4": video.read_bytes(), "txt": f"clip {number}"})
        inputs = ["--webdataset", str(tmp_path / "00000.tar")]
    script = (f"import sys, frozen_tfrecord; code = frozen_tfrecord.main({inputs!r} + ['--output_dir', "
              f"{str(tmp_path / 'out')!r}, '--workers', '0', '--no_progress']); "
              f"print(code, sorted(m for m in ('torch', 'torchvision', 'webdataset') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.stdout.split("\n")[-2] == "0 []", result.stdout + result.stderr[-2000:]
    assert (tmp_path / "out" / "path.index").read_text().count("\n") == 3


def test_resize_swscale_scales_in_the_decoder_and_is_recorded(tmp_path, capsys):
    import imageio_ffmpeg

    from dataloaders.clip_store import WebVidIndex, parse_clip_record

    videos = tmp_path / "videos"
    videos.mkdir()
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=512x384:rate=10", "-frames:v", "20", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(videos / "a.mp4")], check=True)
    common = ["--video_dir", str(videos), "--decoder", "pyav", "--workers", "0", "--frame_format", "png"]
    convert(tmp_path / "area", *common)
    convert(tmp_path / "swscale", *common, "--resize", "swscale")

    def frames(folder: Path) -> np.ndarray:
        index = WebVidIndex(folder)
        shard, offset = index.locate("a")
        return parse_clip_record(dict(iter_records(shard))[offset]).frames().astype(np.float64)

    area, fused = frames(tmp_path / "area"), frames(tmp_path / "swscale")
    assert area.shape == fused.shape == (12, 256, 341, 3)  # 512x384 -> short side 256
    psnr = 10 * np.log10(255 ** 2 / np.mean((area - fused) ** 2))
    assert 20 < psnr < 60  # other pixels (a test pattern's sharp edges are the hard case), the same picture
    sidecar = json.loads(next((tmp_path / "swscale").glob("*.meta.json")).read_text())
    assert sidecar["options"]["resize"] == "swscale"  # a rerun with the other resize converts again
    assert "resize" not in json.loads(next((tmp_path / "area").glob("*.meta.json")).read_text())["options"]
    with pytest.raises(SystemExit):
        ft.parse_args(["--video_dir", str(videos), "--resize", "swscale", "--decoder", "opencv"])
    assert "--resize swscale is PyAV's: not with --decoder opencv" in capsys.readouterr().err
