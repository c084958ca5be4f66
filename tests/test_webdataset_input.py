"""frozen_tfrecord.py --webdataset: video2dataset's tar shards (written here with the webdataset library) with
H.264 and mp4v members and the junk real shards hold; brace patterns, shard lists, s3:// and the reader."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset

import frozen_tfrecord as ft
from conversion.decoders import PyAVVideo, read_clips
from dataloaders.clip_store import WebVidIndex, parse_clip_record
from dataloaders.tfrecord_io import iter_records
from tests.test_webvid_s3 import BUCKET, s3_env, s3_server  # noqa: F401 (the moto S3 fixtures)
from tests.video_helpers import frame_number, numbered_frame, write_numbered_video

JPEG_TOLERANCE = 12  # JPEG (quality 90) of flat blocks: a few levels


def meta(key: str, caption: str | None = None, status: str = "success", **extra) -> bytes:
    fields = {"url": f"https://example.com/{key}.mp4", "key": key, "status": status, "error_message": None, **extra}
    if caption is not None:
        fields["caption"] = caption
    return json.dumps(fields).encode()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("members")
    return {"h264": write_numbered_video(folder / "a.mp4", 30, codec="h264").read_bytes(),
            "mp4v": write_numbered_video(folder / "b.mp4", 25, codec="mp4v", video=1).read_bytes(),
            "h264_long": write_numbered_video(folder / "c.mp4", 60, codec="h264", video=2).read_bytes(),
            "jpeg": cv2.imencode(".jpg", numbered_frame(3))[1].tobytes()}


def write_shards(folder: Path, videos: dict[str, bytes]) -> dict[str, bytes]:
    """Three shards as video2dataset writes them, with junk; returns the member bytes of each stored sample."""
    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.TarWriter(str(folder / "00000.tar")) as writer:
        writer.write({"__key__": "000000000", "mp4": videos["h264"], "txt": "an h264 clip",
                      "json": meta("000000000", "not this one, the .txt wins")})
        writer.write({"__key__": "000000001", "mp4": videos["mp4v"], "json": meta("000000001", "caption from json")})
        writer.write({"__key__": "000000002", "mp4": videos["jpeg"], "txt": "a still image named .mp4",
                      "json": meta("000000002")})
        writer.write({"__key__": "000000003", "mp4": videos["mp4v"], "json": meta("000000003")})  # no caption
        writer.write({"__key__": "000000004", "json": meta("000000004", status="failed_to_download",
                                                          error_message="HTTP Error 403: Forbidden")})
        writer.write({"__key__": "000000005", "mp4": videos["mp4v"], "txt": "   "})
    with webdataset.TarWriter(str(folder / "00001.tar")) as writer:
        writer.write({"__key__": "000010000", "mp4": videos["h264"][: len(videos["h264"]) // 2], "txt": "cut off"})
        writer.write({"__key__": "000000000", "mp4": videos["mp4v"], "txt": "a second 000000000"})
        writer.write({"__key__": "000010002", "webm": videos["h264_long"], "txt": "a long clip"})  # any extension
    with webdataset.TarWriter(str(folder / "00002.tar")) as writer:
        writer.write({"__key__": "000020000", "mp4": videos["mp4v"], "txt": "before the cut"})
        writer.write({"__key__": "000020001", "mp4": videos["h264"], "txt": "cut in its video"})
    with tarfile.open(folder / "00002.tar") as archive:
        last = [member for member in archive.getmembers() if member.name.endswith(".mp4")][-1]
    data = (folder / "00002.tar").read_bytes()
    (folder / "00002.tar").write_bytes(data[: last.offset_data + last.size // 2])  # truncated inside a member
    return {"000000000": videos["h264"], "000000001": videos["mp4v"], "000010002": videos["h264_long"],
            "000020000": videos["mp4v"]}


def convert(*args: str) -> ft.ConversionSummary:
    return ft.convert(ft.parse_args([*args, "--workers", "0", "--no_progress"]))


def failures_of(folder: Path) -> list[list[str]]:
    return [line.split("\t") for line in (folder / "failures.tsv").read_text().splitlines()[1:]]


def test_shards_convert_with_their_captions_and_every_bad_sample_reported(tmp_path, videos):
    shards = tmp_path / "shards"
    members = write_shards(shards, videos)
    out = tmp_path / "store"
    summary = convert("--webdataset", f"{shards}/{{00000..00002}}.tar", "--output_dir", str(out))
    labels = {row["video_id"]: row["caption"] for row in json.loads((out / "frozen_train_labels.json").read_text())}
    assert labels == {"000000000": "an h264 clip", "000000001": "caption from json", "000010002": "a long clip",
                      "000020000": "before the cut"}
    assert summary.n_written == 4 and summary.n_shards == 3
    reported = {(kind, video_id, where.rsplit("/", 1)[-1]) for kind, video_id, where, _ in failures_of(out)}
    assert reported == {
        ("not_a_video", "000000002", "00000.tar:000000002"),
        ("no_caption", "000000003", "00000.tar:000000003"),
        ("failed_download", "000000004", "00000.tar:000000004"),
        ("empty_caption", "000000005", "00000.tar:000000005"),
        ("bad_video", "000010000", "00001.tar:000010000"),  # a truncated member
        ("duplicate_id", "000000000", "00001.tar:000000000"),  # across shards: the first kept
        ("bad_shard", "", "00002.tar"),  # a truncated tar: the sample cut in its video is lost with it
    }
    details = {kind: detail for kind, _, _, detail in failures_of(out)}
    assert "HTTP Error 403" in details["failed_download"] and "after member 000020000.txt" in details["bad_shard"]

    # every stored frame is the frame at its recorded position, decoded independently from the same bytes
    index = WebVidIndex(out)
    for clip_id, data in members.items():
        record = parse_clip_record(read_record(out, index, clip_id))
        reference = read_clips(PyAVVideo(data), 0, [None])[0]  # every frame of the member
        stored = record.frames()
        assert len(stored) == 12 and list(record.frame_indices) == sorted(record.frame_indices)
        for frame, position in zip(stored, record.frame_indices):
            expected = cv2.cvtColor(reference.frames[position], cv2.COLOR_BGR2RGB)
            assert np.abs(frame.astype(int) - expected).mean() < JPEG_TOLERANCE
            assert frame_number(frame) == position


def read_record(out: Path, index: WebVidIndex, clip_id: str) -> bytes:
    shard, offset = index.locate(clip_id)
    return dict(iter_records(shard))[offset]


def test_folders_lists_and_repeated_flags_name_the_same_shards(tmp_path, videos):
    shards = tmp_path / "shards"
    write_shards(shards, videos)
    (tmp_path / "list.txt").write_text("# the shards\nshards/00000.tar\nshards/00001.tar\n\nshards/00002.tar\n")
    outs = {}
    for name, flags in {"brace": ["--webdataset", f"{shards}/{{00000..00002}}.tar"],
                        "folder": ["--webdataset", str(shards)],
                        "list": ["--webdataset", str(tmp_path / "list.txt")],
                        "repeated": ["--webdataset", str(shards / "00000.tar"), "--webdataset",
                                     f"{shards}/{{00001,00002}}.tar"]}.items():
        outs[name] = tmp_path / name
        convert(*flags, "--output_dir", str(outs[name]))
    contents = {name: [(path.name, path.read_bytes()) for path in sorted(out.glob("path*"))]
                for name, out in outs.items()}
    assert contents["folder"] == contents["brace"] == contents["list"] == contents["repeated"]


def test_id_and_caption_fields_of_the_json(tmp_path, videos):
    shards = tmp_path / "shards"
    shards.mkdir()
    with webdataset.TarWriter(str(shards / "00000.tar")) as writer:
        writer.write({"__key__": "000000000", "mp4": videos["mp4v"], "txt": "the txt",
                      "json": meta("000000000", "the caption", videoid="1066", alt="another caption")})
    out = tmp_path / "store"
    convert("--webdataset", str(shards / "00000.tar"), "--id_field", "videoid", "--caption_field", "alt",
            "--output_dir", str(out))
    assert json.loads((out / "frozen_train_labels.json").read_text()) == [
        {"video_id": "1066", "caption": "another caption"}]


def test_an_s3_shard_converts_like_the_local_one(tmp_path, videos, s3_env):  # noqa: F811
    shards = tmp_path / "shards"
    write_shards(shards, videos)
    s3_env.create_bucket(Bucket=BUCKET)
    s3_env.upload_file(str(shards / "00000.tar"), BUCKET, "corpus/00000.tar")
    s3_env.upload_file(str(shards / "00001.tar"), BUCKET, "corpus/00001.tar")
    local, remote = tmp_path / "local", tmp_path / "remote"
    convert("--webdataset", f"{shards}/{{00000..00001}}.tar", "--output_dir", str(local))
    convert("--webdataset", f"s3://{BUCKET}/corpus/", "--output_dir", str(remote))  # a prefix lists its shards
    for name in ("path-00000.tfrecord", "path-00001.tfrecord", "path.index", "frozen_train_labels.json"):
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    assert [row[0] for row in failures_of(remote)] == [row[0] for row in failures_of(local)]
    assert any(where.startswith(f"s3://{BUCKET}/corpus/00000.tar:") for _, _, where, _ in failures_of(remote))


def test_a_missing_shard_is_a_failure_and_the_others_convert(tmp_path, videos):
    shards = tmp_path / "shards"
    write_shards(shards, videos)
    out = tmp_path / "store"
    summary = convert("--webdataset", f"{shards}/{{00000,00009}}.tar", "--output_dir", str(out))
    assert summary.n_written == 2
    assert ["bad_shard", "", str(shards / "00009.tar")] == failures_of(out)[-1][:3]


def member_header(name: str, size: int) -> bytes:
    """A tar header declaring `size` bytes (GNU base-256 sizes reach any size), without the data."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT)


class CountingReader:
    """A file read through counted calls (what a shard's reader asked of its stream)."""

    def __init__(self, path: Path) -> None:
        self.file, self.calls = open(path, "rb"), 0

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        return self.file.read(size)

    def close(self) -> None:
        self.file.close()


def test_a_header_declaring_a_terabyte_is_refused_unread_and_ends_at_the_real_end(tmp_path, videos):
    from conversion.webdataset_input import RefusedMember, ShardErrors, samples_of

    shard = tmp_path / "bomb.tar"
    with webdataset.TarWriter(str(shard)) as writer:
        writer.write({"__key__": "a", "mp4": videos["h264"], "txt": "kept"})
    data = shard.read_bytes().rstrip(b"\0")  # the archive without its end blocks: more members follow
    data += b"\0" * (-len(data) % 512) + member_header("b.txt", 5) + b"bomb!" + b"\0" * 507
    shard.write_bytes(data + member_header("b.mp4", 1 << 40) + b"x" * 4096)  # claims 1 TB, holds 4 KB

    stream, errors = CountingReader(shard), ShardErrors()
    samples = list(samples_of(str(shard), stream, errors))
    assert [sample["__key__"] for sample in samples] == ["a", "b"]
    assert samples[0]["mp4"] == videos["h264"] and samples[1]["mp4"] == RefusedMember(1 << 40, 2 << 30)
    assert len(errors.errors) == 1 and "unexpected end of data" in errors.errors[0]
    assert stream.calls < 100  # the stream's end ends the skip (counting through 1 TB took minutes)

    out = tmp_path / "store"
    convert("--webdataset", str(shard), "--output_dir", str(out))
    kinds = {kind: (video_id, detail) for kind, video_id, _, detail in failures_of(out)}
    assert sorted(kinds) == ["bad_shard", "too_large"] and kinds["too_large"][0] == "b"
    assert f"declares {1 << 40} bytes, over --max_member_bytes {2 << 30}: refused unread" in kinds["too_large"][1]
    assert WebVidIndex(out).locate("a") is not None


def test_a_member_over_the_limit_is_skipped_and_the_samples_after_it_kept(tmp_path, videos):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, middle in (("with.tar", videos["h264_long"]), ("without.tar", None)):
        with webdataset.TarWriter(str(shards / name)) as writer:
            writer.write({"__key__": "first", "mp4": videos["h264"], "txt": "one"})
            if middle is not None:
                writer.write({"__key__": "big", "mp4": middle, "txt": "too big"})
            writer.write({"__key__": "last", "mp4": videos["mp4v"], "txt": "three"})
    limit = max(len(videos["h264"]), len(videos["mp4v"]))
    assert len(videos["h264_long"]) > limit
    for name in ("with", "without"):
        convert("--webdataset", str(shards / f"{name}.tar"), "--output_dir", str(tmp_path / name),
                "--max_member_bytes", str(limit))
    assert failures_of(tmp_path / "with") == [["too_large", "big", f"{shards / 'with.tar'}:big",
                                               f"the member big.mp4 declares {len(videos['h264_long'])} bytes, over "
                                               f"--max_member_bytes {limit}: refused unread"]]
    assert failures_of(tmp_path / "without") == []
    assert (tmp_path / "with" / "path-00000.tfrecord").read_bytes() == \
        (tmp_path / "without" / "path-00000.tfrecord").read_bytes()


def test_members_are_grouped_into_samples_as_webdataset_groups_them():
    """The converter groups tar members itself (importing webdataset imports torch): the same samples as
    webdataset's own group_by_keys, including nested keys, upper-case suffixes, names without a dot and a repeated
    suffix (an error, the member skipped)."""
    from webdataset.tariterators import group_by_keys as webdatasets

    from conversion.webdataset_input import ShardErrors, group_by_keys

    names = ["a/000.mp4", "a/000.TXT", "a/000.json", "a/001.mp4", "README", "a/001.txt", "a/001.txt", "b.c.d/002.x.MP4",
             "b.c.d/002.x.txt", "003.mp4", "x/.hidden", "004"]
    members = [{"fname": name, "data": f"{number}".encode(), "__url__": "s.tar"} for number, name in enumerate(names)]
    ours_errors, theirs_errors = ShardErrors(), ShardErrors()
    ours = list(group_by_keys(iter(members), ours_errors))
    theirs = list(webdatasets(iter(members), handler=theirs_errors))
    assert ours == theirs
    assert [sample["__key__"] for sample in ours] == ["a/000", "a/001", "b.c.d/002", "003", "x/"]
    assert ours[2] == {"__key__": "b.c.d/002", "__url__": "s.tar", "x.mp4": b"7", "x.txt": b"8"}
    assert len(ours_errors.errors) == len(theirs_errors.errors) == 1 and "duplicate" in ours_errors.errors[0]
