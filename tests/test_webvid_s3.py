"""WebVid TFRecords under s3:// (ranged GETs through boto3), against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer
from torch.utils.data import DataLoader

import frozen_tfrecord as ft
from dataloaders.clip_store import WebVidIndex, parse_clip_record, read_frames
from dataloaders.collate import collate_clips
from dataloaders.tfrecord_io import RecordCorruptError, RecordReader, s3_client
from dataloaders.webvid import WebVidDataset
from tests.test_frozen_tfrecord import write_colour_video

BUCKET = "webvid"
VIDEO_IDS = [f"{4000 + n}" for n in range(5)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no_config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no_credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return boto3.client("s3")


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3_store")
    for number, video_id in enumerate(VIDEO_IDS):
        write_colour_video(root / "videos" / f"{video_id}.mp4", 15, number)
    rows = "".join(f"{video_id},a clip,1\n" for video_id in VIDEO_IDS)
    (root / "train.csv").write_text("videoid,name,page_idx\n" + rows, encoding="utf-8")
    out = root / "tfr"
    ft.convert(ft.parse_args(["--video_dir", str(root / "videos"), "--csv", str(root / "train.csv"),
                              "--output_dir", str(out), "--shard_size", "2", "--workers", "0", "--no_progress"]))
    return out


def upload(client, folder, prefix: str) -> str:
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    for path in folder.iterdir():
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}"


@contextlib.contextmanager
def recorded_gets(client) -> Iterator[list[str]]:
    """The Range of every GetObject the client sends inside the block."""
    calls: list[str] = []

    def record(params, **_):
        calls.append(params.get("Range"))

    client.meta.events.register("provide-client-params.s3.GetObject", record)
    try:
        yield calls
    finally:
        client.meta.events.unregister("provide-client-params.s3.GetObject", record)


def test_read_frames_from_s3_matches_local(s3_env, local_store):
    url = upload(s3_env, local_store, "store")
    index = WebVidIndex(url)
    assert index.locate(VIDEO_IDS[2]) == (f"{url}/path-00001.tfrecord", index.locate(VIDEO_IDS[2])[1])
    for video_id in VIDEO_IDS:
        np.testing.assert_array_equal(read_frames(url, video_id, verify_crc=True), read_frames(local_store, video_id))


def test_one_ranged_get_per_record_once_the_record_size_is_known(s3_env, local_store):
    url = upload(s3_env, local_store, "gets")
    index = WebVidIndex(f"{url}/path.index")
    reader = RecordReader(verify_crc=True, prefetch=16)  # deliberately too small for the first record
    with recorded_gets(s3_client()) as gets:
        payload = reader.read(*index.locate(VIDEO_IDS[0]))
    assert len(gets) == 2 and all(r.startswith("bytes=") for r in gets)
    assert parse_clip_record(payload).video_id == VIDEO_IDS[0]
    for video_id in VIDEO_IDS[1:]:
        with recorded_gets(s3_client()) as gets:
            assert parse_clip_record(reader.read(*index.locate(video_id))).video_id == video_id
        assert len(gets) == 1


def test_dataset_over_s3_with_two_workers(s3_env, local_store):
    url = upload(s3_env, local_store, "dataset")
    dataset = WebVidDataset(f"{url}/frozen_train_labels.json", url, max_words=8, max_frames=12, image_size=16,
                            slice_framepos=2, frame_order=0, seed=0)
    assert dataset[0] is not None  # the parent's client and sources must not leak into the workers
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_clips)
    batches = list(loader)
    assert sum(batch["n_skipped"] for batch in batches) == 0
    assert sorted(i for batch in batches for i in batch["index"].tolist()) == list(range(len(VIDEO_IDS)))


def test_s3_crc_corruption_and_missing_shard(s3_env, local_store, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for path in local_store.iterdir():
        (corrupt / path.name).write_bytes(path.read_bytes())
    offset = int((local_store / "path.index").read_text().splitlines()[1].split("\t")[2])
    shard = bytearray((corrupt / "path-00000.tfrecord").read_bytes())
    shard[offset + 50] ^= 0xFF
    (corrupt / "path-00000.tfrecord").write_bytes(bytes(shard))
    url = upload(s3_env, corrupt, "corrupt")
    with pytest.raises(RecordCorruptError, match=rf"{url}/path-00000\.tfrecord: payload CRC mismatch .* {offset}"):
        read_frames(url, VIDEO_IDS[1], verify_crc=True)

    s3_env.delete_object(Bucket=BUCKET, Key="corrupt/path-00001.tfrecord")
    with pytest.raises(OSError, match="path-00001.tfrecord"):
        read_frames(url, VIDEO_IDS[2])
