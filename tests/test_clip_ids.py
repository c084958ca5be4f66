"""One rule for every clip id, whatever its source: a webdataset key, a json id field, a file name or a table cell
that holds a tab, a newline or a path separator, or a json null, is a failures.tsv line, and the store stays
readable."""

from __future__ import annotations

import json

import pytest
import webdataset

from conversion.items import id_problem
from dataloaders.clip_store import WebVidIndex, read_frames
from tests.test_webdataset_input import convert, failures_of, meta, videos  # noqa: F401 (the member fixture)
from tests.test_webvid_s3 import s3_env, s3_server  # noqa: F401 (the moto S3 fixtures)


@pytest.mark.parametrize("value, problem", [
    ("video1", None), (1066, None), ("a\tb", "holds whitespace"), ("a\nb", "holds whitespace"),
    ("a/b", "path separator"), ("", "is empty"), (None, "not a string but null"), (True, "not a string but bool"),
    ([1], "not a string but list"),
])
def test_the_id_rule(value, problem):
    assert (id_problem(value) is None) if problem is None else (problem in id_problem(value))


def test_bad_ids_from_webdataset_keys_and_json_fields_are_failures(tmp_path, videos):  # noqa: F811
    shards = tmp_path / "shards"
    shards.mkdir()
    with webdataset.TarWriter(str(shards / "00000.tar")) as writer:
        writer.write({"__key__": "good", "mp4": videos["mp4v"], "txt": "kept"})
        writer.write({"__key__": "tab\there", "mp4": videos["mp4v"], "txt": "a key with a tab"})
    with webdataset.TarWriter(str(shards / "00001.tar")) as writer:
        writer.write({"__key__": "k1", "mp4": videos["mp4v"], "json": meta("k1", "null id", videoid=None)})
        writer.write({"__key__": "k2", "mp4": videos["mp4v"], "json": meta("k2", "fine", videoid="2000")})
    out = tmp_path / "store"
    convert("--webdataset", str(shards / "00000.tar"), "--output_dir", str(out))
    assert [row[0] for row in failures_of(out)] == ["bad_id"] and "the sample key" in failures_of(out)[0][3]
    assert list(WebVidIndex(out / "path.index")._ids) == [b"good"] and read_frames(out, "good").shape[0] > 0
    out = tmp_path / "by_field"
    convert("--webdataset", str(shards / "00001.tar"), "--id_field", "videoid", "--output_dir", str(out))
    assert [(row[0], row[1], row[3]) for row in failures_of(out)] == [
        ("bad_id", "k1", "json field 'videoid': not a string but null")]
    assert json.loads((out / "frozen_train_labels.json").read_text()) == [{"video_id": "2000", "caption": "fine"}]


def test_file_names_that_are_no_ids_are_failures(tmp_path, videos):  # noqa: F811
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("plain", "new\nline", "tab\tbed"):
        (folder / f"{name}.mp4").write_bytes(videos["mp4v"])
    out = tmp_path / "store"
    convert("--video_dir", str(folder), "--output_dir", str(out))
    assert sorted((row[0], row[1]) for row in failures_of(out)) == [("bad_id", "new line"), ("bad_id", "tab bed")]
    lines = (out / "path.index").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plain\t")


def test_only_text_is_a_caption(tmp_path, videos):  # noqa: F811
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.mp4").write_bytes(videos["mp4v"])
    pq.write_table(pa.table({"path": ["a.mp4", "b.mp4"], "caption": pa.array([b"utf-8 bytes \xc3\xa9", b"\xff\xfe"],
                                                                            pa.binary())}), tmp_path / "binary.parquet")
    pq.write_table(pa.table({"path": ["c.mp4"], "caption": [{"a": 1}]}), tmp_path / "struct.parquet")
    out = tmp_path / "store"
    convert("--video_dir", str(folder), "--table", str(tmp_path / "binary.parquet"), "--table",
            str(tmp_path / "struct.parquet"), "--video_column", "path", "--caption_column", "caption",
            "--output_dir", str(out))
    assert json.loads((out / "frozen_train_labels.json").read_text()) == [{"video_id": "a", "caption": "utf-8 bytes é"}]
    assert sorted((row[0], row[3]) for row in failures_of(out)) == [
        ("malformed_row", "caption column 'caption' holds a dict (\"{'a': 1}\"), not text"),
        ("malformed_row", "caption column 'caption' holds bytes that are not UTF-8 text")]


def test_table_paths_outside_the_video_folder_are_refused_unless_allowed(tmp_path, videos):  # noqa: F811
    folder, outside = tmp_path / "videos", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "inside.mp4").write_bytes(videos["mp4v"])
    for name in ("x", "y"):
        (outside / f"{name}.mp4").write_bytes(videos["mp4v"])
    table = tmp_path / "clips.csv"
    table.write_text(f"path,caption\ninside.mp4,kept\n../outside/x.mp4,climbs out\n{outside / 'y.mp4'},absolute\n")
    args = ["--video_dir", str(folder), "--table", str(table), "--video_column", "path", "--caption_column",
            "caption"]
    out = tmp_path / "store"
    convert(*args, "--output_dir", str(out))
    assert [label["caption"] for label in json.loads((out / "frozen_train_labels.json").read_text())] == ["kept"]
    assert sorted((row[0], row[1], row[3].split(" leads")[0]) for row in failures_of(out)) == [
        ("outside_video_dir", "x", "../outside/x.mp4"), ("outside_video_dir", "y", str(outside / "y.mp4"))]
    convert(*args, "--output_dir", str(tmp_path / "allowed"), "--allow_outside_paths")
    labels = json.loads((tmp_path / "allowed" / "frozen_train_labels.json").read_text())
    assert sorted(label["caption"] for label in labels) == ["absolute", "climbs out", "kept"]


def test_a_missing_bucket_or_an_unreachable_endpoint_is_one_line(s3_env, monkeypatch, tmp_path, capsys):  # noqa: F811
    import frozen_tfrecord
    from tests.test_webvid_s3 import free_port

    def run(output: str) -> list[str]:
        argv = ["--webdataset", "s3://no-such-bucket/shards/", "--output_dir", str(tmp_path / output), "--workers",
                "0", "--no_progress"]
        assert frozen_tfrecord.main(argv) == 2
        return [line for line in capsys.readouterr().err.splitlines() if "error" in line]

    assert run("a") == ["frozen_tfrecord.py: error: --webdataset s3://no-such-bucket/shards/: S3 refused the listing "
                        "(NoSuchBucket: The specified bucket does not exist)"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    errors = run("b")
    assert len(errors) == 1 and "--webdataset s3://no-such-bucket/shards/: S3 cannot be reached (" in errors[0]


def test_a_rerun_converts_again_the_shards_whose_inputs_had_failed_and_can_be_read_now(tmp_path, videos):  # noqa: F811
    from tests.test_frozen_tfrecord import output_bytes

    shards = tmp_path / "shards"
    shards.mkdir()
    with webdataset.TarWriter(str(shards / "00000.tar")) as writer:
        for n in range(4):
            writer.write({"__key__": f"clip{n}", "mp4": videos["mp4v"], "txt": f"caption {n}"})
    with webdataset.TarWriter(str(shards / "00001.tar")) as writer:
        writer.write({"__key__": "other", "mp4": videos["mp4v"], "txt": "a sound shard"})
    complete = (shards / "00000.tar").read_bytes()
    reference = tmp_path / "reference"
    convert("--webdataset", f"{shards}/{{00000,00001}}.tar", "--output_dir", str(reference))

    (shards / "00000.tar").write_bytes(complete[: len(complete) // 3])  # a download cut short
    out = tmp_path / "store"
    first = convert("--webdataset", f"{shards}/{{00000,00001}}.tar", "--output_dir", str(out))
    assert first.n_written < 5 and "bad_shard" in first.failures
    (shards / "00000.tar").write_bytes(complete)  # the user downloads it again
    again = convert("--webdataset", f"{shards}/{{00000,00001}}.tar", "--output_dir", str(out))
    assert (again.n_shards_resumed, again.n_shards_retried, again.n_written) == (1, 1, 5)
    assert "1 converted again for inputs that had failed" in again.report()
    assert output_bytes(out) == output_bytes(reference)
    assert convert("--webdataset", f"{shards}/{{00000,00001}}.tar", "--output_dir", str(out)).n_shards_retried == 0


def test_a_truncated_video_restored_is_converted_on_the_rerun(tmp_path, videos):  # noqa: F811
    from tests.test_frozen_tfrecord import output_bytes

    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.mp4").write_bytes(videos["h264"])
        (folder / f"{name}.txt").write_text(f"clip {name}")
    reference = tmp_path / "reference"
    convert("--video_dir", str(folder), "--output_dir", str(reference))
    (folder / "b.mp4").write_bytes(videos["h264"][:200])  # cut short
    out = tmp_path / "store"
    assert convert("--video_dir", str(folder), "--output_dir", str(out)).failures.get("bad_video") == 1
    (folder / "b.mp4").write_bytes(videos["h264"])
    again = convert("--video_dir", str(folder), "--output_dir", str(out))
    assert (again.n_shards_retried, again.n_written) == (1, 2) and not again.failures
    assert output_bytes(out) == output_bytes(reference)
