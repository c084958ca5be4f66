"""Clips of longer videos from tables (Panda-70M csv, InternVid jsonl, any csv/tsv/jsonl/parquet), the one frame
rule behind the OpenCV and PyAV decoders, and videos with their captions beside them (video2dataset's files).

The test videos' frames show their own frame number, so a clip cut from the wrong window cannot pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import conversion.convert
import frozen_tfrecord as ft
from conversion.decoders import (
    BadWindow,
    OpenCVVideo,
    PyAVVideo,
    clip_positions,
    read_clips,
    sample_positions,
)
from conversion.tables import parse_timestamp
from dataloaders.clip_store import parse_clip_record, read_frames
from dataloaders.tfrecord_io import iter_records
from tests.video_helpers import frame_number, write_numbered_video

FPS = 10
SOURCES = {"vidA": 40, "vidB": 50, "vidC": 30}  # frames at 10 fps: 4 s, 5 s and 3 s


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sources")
    for number, (video_id, frames) in enumerate(SOURCES.items()):
        write_numbered_video(folder / "videos" / f"{video_id}.mp4", frames, codec="h264" if number % 2 else "mp4v",
                             fps=FPS, video=number)
    return folder


def convert(*args: str) -> ft.ConversionSummary:
    return ft.convert(ft.parse_args([*args, "--workers", "0", "--no_progress"]))


def failures_of(folder: Path) -> list[list[str]]:
    return [line.split("\t") for line in (folder / "failures.tsv").read_text().splitlines()[1:]]


def stored(out: Path) -> dict[str, object]:
    """Every record the index lists, parsed, by clip id."""
    records, shards = {}, {}
    for line in (out / "path.index").read_text().splitlines():
        clip_id, shard, offset = line.split("\t")
        if shard not in shards:
            shards[shard] = dict(iter_records(out / shard))
        records[clip_id] = parse_clip_record(shards[shard][int(offset)])
    return records


PANDA = '''videoID,url,timestamp,caption,matching_score
vidB,https://www.youtube.com/watch?v=vidB,"[['0:00:00.500', '0:00:02.000'], ['0:00:02.000', '0:00:04.950'], ['0:00:06.000', '0:00:07.000']]","['b zero', 'b one', 'b two past the end']","[0.5, 0.4, 0.3]"
vidA,https://www.youtube.com/watch?v=vidA,"[['0:00:00.000', '0:00:01.000'], ['0:00:01.500', '0:00:03.950']]","['a zero', 'a one']","[0.5, 0.4]"
vidC,https://www.youtube.com/watch?v=vidC,"[['0:00:00.000', '0:00:03.000'], ['0:00:01.000', '0:00:01.300']]","['c zero', 'c one']","[0.5, 0.4]"
'''


def test_panda70m_windows_become_clips_of_their_window(sources, tmp_path, monkeypatch):
    (tmp_path / "panda.csv").write_text(PANDA, encoding="utf-8")
    opened: list[str] = []
    real_open = conversion.convert.open_source
    monkeypatch.setattr(conversion.convert, "open_source",
                        lambda location, *a, **k: opened.append(location) or real_open(location, *a, **k))
    out = tmp_path / "store"
    summary = convert("--video_dir", str(sources / "videos"), "--table", str(tmp_path / "panda.csv"),
                      "--preset", "panda70m", "--output_dir", str(out), "--shard_size", "3")
    assert sorted(Path(path).stem for path in opened) == ["vidA", "vidB", "vidC"]  # each source once
    labels = json.loads((out / "frozen_train_labels.json").read_text())
    assert [(row["video_id"], row["caption"]) for row in labels] == [
        ("vidA_0", "a zero"), ("vidA_1", "a one"), ("vidB_0", "b zero"), ("vidB_1", "b one"),
        ("vidC_0", "c zero"), ("vidC_1", "c one")]
    assert summary.n_written == 6 and summary.n_selected == 7
    table = tmp_path / "panda.csv"
    assert [row[:3] for row in failures_of(out)] == [
        ["fewer_frames", "vidA_0", f"{table}:3"],  # stored: 10 frames in its second
        ["bad_window", "vidB_2", f"{table}:2"], ["fewer_frames", "vidC_1", f"{table}:4"]]
    assert "past the end" in failures_of(out)[1][3] and "stored 3 of the 12" in failures_of(out)[2][3]
    windows = {"vidA_0": (0, 1), "vidA_1": (1.5, 3.95), "vidB_0": (0.5, 2), "vidB_1": (2, 4.95),
               "vidC_0": (0, 3), "vidC_1": (1, 1.3)}
    for clip_id, record in stored(out).items():
        start, end = windows[clip_id]
        positions = list(record.frame_indices)
        inside = range(round(start * FPS), int(np.ceil(end * FPS)))
        assert positions == [inside[i] for i in sample_positions(len(inside), 12)], clip_id
        assert [frame_number(frame) for frame in record.frames()] == positions, clip_id
        assert record.window == pytest.approx((start, end)) and record.source_id == clip_id.split("_")[0]
    frames = read_frames(out, "vidC_1")  # the reader reads window clips like any other
    assert [frame_number(frame) for frame in frames] == [10, 11, 12]


def test_internvid_jsonl_rows_are_clips_and_bad_windows_name_their_line(sources, tmp_path):
    rows = [
        {"YoutubeID": "vidA", "Start_timestamp": "00:00:01.000", "End_timestamp": "00:00:02.500",
         "Caption": "a first", "Aesthetic_Score": 4.1, "UMT_Score": 0.4},
        {"YoutubeID": "vidC", "Start_timestamp": "00:00:02.000", "End_timestamp": "00:00:01.000",
         "Caption": "ends before it starts", "Aesthetic_Score": 4.1, "UMT_Score": 0.4},
        {"YoutubeID": "vidA", "Start_timestamp": "00:00:00.200", "End_timestamp": "00:00:00.200",
         "Caption": "an empty window", "Aesthetic_Score": 4.1, "UMT_Score": 0.4},
        {"YoutubeID": "vidA", "Start_timestamp": "00:00:03.000", "End_timestamp": "00:00:09.000",
         "Caption": "runs past the end", "Aesthetic_Score": 4.1, "UMT_Score": 0.4},
        {"YoutubeID": "vidZ", "Start_timestamp": "00:00:00.000", "End_timestamp": "00:00:01.000",
         "Caption": "no such video", "Aesthetic_Score": 4.1, "UMT_Score": 0.4},
    ]
    table = tmp_path / "InternVid-10M-FLT.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{not json\n", encoding="utf-8")
    out = tmp_path / "store"
    convert("--video_dir", str(sources / "videos"), "--table", str(table), "--preset", "internvid",
            "--output_dir", str(out))
    records = stored(out)
    assert sorted(records) == ["vidA_0", "vidA_2"]
    assert [frame_number(frame) for frame in records["vidA_0"].frames()] == [10 + p for p in sample_positions(15, 12)]
    assert list(records["vidA_2"].frame_indices) == list(range(30, 40))  # clipped to the video's end
    reported = {(kind, video_id, where.rsplit(":", 1)[-1]) for kind, video_id, where, _ in failures_of(out)}
    assert reported == {("bad_window", "vidC_0", "2"), ("bad_window", "vidA_1", "3"), ("missing_video", "vidZ", ""),
                        ("malformed_row", "", "6"), ("fewer_frames", "vidA_2", "4")}


def test_generic_tables_with_paths_seconds_and_parquet(sources, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["vidB.mp4", "vidA.mp4"], "text": ["the b clip", "the a clip"],
                             "from": [1.0, 0.0], "to": [2.0, 1.25]}), tmp_path / "clips.parquet")
    (tmp_path / "clips.tsv").write_text("path\ttext\tfrom\tto\nvidC.mp4\tthe c clip\t0.5\t1.5\n", encoding="utf-8")
    out = tmp_path / "store"
    convert("--video_dir", str(sources / "videos"), "--table", str(tmp_path / "clips.parquet"), "--table",
            str(tmp_path / "clips.tsv"), "--video_column", "path", "--caption_column", "text", "--start_column",
            "from", "--end_column", "to", "--output_dir", str(out))
    records = stored(out)
    assert {clip_id: [frame_number(f) for f in r.frames()][:2] for clip_id, r in records.items()} == {
        "vidA_0": [0, 1], "vidB_0": [10, 11], "vidC_0": [5, 6]}
    labels = {row["video_id"]: row["caption"] for row in json.loads((out / "frozen_train_labels.json").read_text())}
    assert labels == {"vidA_0": "the a clip", "vidB_0": "the b clip", "vidC_0": "the c clip"}


def test_timestamps_and_windows():
    assert parse_timestamp("0:00:05.005") == pytest.approx(5.005)
    assert parse_timestamp("01:02:03.5") == 3723.5 and parse_timestamp("12.25") == 12.25 and parse_timestamp(3) == 3
    with pytest.raises(ValueError, match="bad timestamp"):
        parse_timestamp("5 s")
    assert clip_positions(40, 10.0, 4, (1.0, 2.0)) == [11, 13, 16, 18]  # frames 10..19, segment middles
    assert clip_positions(40, 10.0, 12, None) == sample_positions(40, 12)
    for window, message in [((5.0, 6.0), "past the end"), ((2.0, 1.0), "ends before"), ((1.01, 1.05), "no frame")]:
        with pytest.raises(BadWindow, match=message):
            clip_positions(40, 10.0, 12, window)


@pytest.mark.parametrize("codec", ["h264", "mp4v"])
def test_pyav_and_opencv_select_the_same_frames(tmp_path, codec):
    path = write_numbered_video(tmp_path / f"clip.{codec}.mp4", 37, codec=codec, fps=FPS)
    windows = [None, (1.0, 2.5), (3.0, 9.0)]
    opencv = read_clips(OpenCVVideo(str(path)), 12, windows)
    from_path = read_clips(PyAVVideo(str(path)), 12, windows)
    from_bytes = read_clips(PyAVVideo(path.read_bytes()), 12, windows)
    for a, b, c in zip(opencv, from_path, from_bytes, strict=True):
        assert a.positions == b.positions == c.positions
        assert [frame_number(frame) for frame in b.frames] == b.positions
        difference = np.abs(np.stack(a.frames).astype(int) - np.stack(b.frames))
        assert difference.mean() < 1.0 and difference.max() <= 16  # two FFmpeg builds, same frames
        assert all(np.array_equal(x, y) for x, y in zip(b.frames, c.frames))  # bytes = path, exactly


def test_the_decoder_flag_gives_the_same_clips(sources, tmp_path):
    outs = {}
    for decoder in ("opencv", "pyav"):
        outs[decoder] = tmp_path / decoder
        convert("--video_dir", str(sources / "videos"), "--decoder", decoder, "--output_dir", str(outs[decoder]))
    a, b = stored(outs["opencv"]), stored(outs["pyav"])
    assert sorted(a) == sorted(b) == sorted(SOURCES)
    for clip_id in a:
        assert list(a[clip_id].frame_indices) == list(b[clip_id].frame_indices)
        assert np.abs(a[clip_id].frames().astype(int) - b[clip_id].frames()).mean() < 1.0


def test_captions_beside_the_videos_as_video2dataset_writes_files(tmp_path):
    folder = tmp_path / "out" / "00000"
    write_numbered_video(folder / "000000000.mp4", 20)
    (folder / "000000000.txt").write_text("a caption from the txt\n")
    write_numbered_video(folder / "000000001.mp4", 20, video=1)
    (folder / "000000001.json").write_text(json.dumps({"caption": "a caption from the json", "status": "success"}))
    (folder / "000000002.json").write_text(json.dumps({"status": "failed_to_download", "error_message": "410"}))
    write_numbered_video(folder / "000000003.mp4", 20, video=2)  # no caption file
    (folder / "000000004.mp4").write_bytes(cv2_jpeg())
    (folder / "000000004.txt").write_text("a still image")
    out = tmp_path / "store"
    convert("--video_dir", str(tmp_path / "out"), "--output_dir", str(out))
    assert json.loads((out / "frozen_train_labels.json").read_text()) == [
        {"video_id": "000000000", "caption": "a caption from the txt"},
        {"video_id": "000000001", "caption": "a caption from the json"}]
    assert {(kind, video_id) for kind, video_id, _, _ in failures_of(out)} == {
        ("failed_download", "000000002"), ("no_caption", "000000003"), ("not_a_video", "000000004")}


def cv2_jpeg() -> bytes:
    import cv2

    from tests.video_helpers import numbered_frame

    return cv2.imencode(".jpg", numbered_frame(1))[1].tobytes()
