"""dataloaders/tfrecord_io.py against the `tfrecord` package, an independent TFRecord/Example implementation."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tfrecord.reader import tfrecord_iterator, tfrecord_loader
from tfrecord.writer import TFRecordWriter

from dataloaders.tfrecord_io import (
    RecordCorruptError,
    RecordReader,
    decode_example,
    encode_example,
    iter_records,
    masked_crc32c,
    write_record,
)

PAYLOADS = [b"", b"x", bytes(range(256)) * 40, b"\x00" * 70_000]


def write_payloads(path, payloads) -> list[int]:
    offsets, position = [], 0
    with open(path, "wb") as stream:
        for payload in payloads:
            offsets.append(position)
            position += write_record(stream, payload)
    return offsets


def test_masked_crc_matches_the_tfrecord_package():
    for data in (b"", b"123456789", bytes(range(256))):
        assert struct.pack("<I", masked_crc32c(data)) == TFRecordWriter.masked_crc(data)


def test_our_records_parse_with_the_tfrecord_package(tmp_path):
    path = tmp_path / "ours.tfrecord"
    write_payloads(path, PAYLOADS)
    assert [bytes(view) for view in tfrecord_iterator(str(path))] == PAYLOADS

    example = encode_example({"video_id": "42", "num_frames": 2, "frames": [b"a\xff", b"b\x00c"],
                              "scale": 0.5})
    write_payloads(path, [example])
    (parsed,) = tfrecord_loader(str(path), None)
    assert parsed["video_id"] == b"42"
    assert parsed["num_frames"].tolist() == [2]
    assert parsed["frames"].tolist() == [b"a\xff", b"b\x00c"]
    assert parsed["scale"].tolist() == [0.5]


def test_tfrecord_package_records_read_by_ours_with_crc_checks(tmp_path):
    path = tmp_path / "theirs.tfrecord"
    writer = TFRecordWriter(str(path))
    image = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).tobytes()
    writer.write({"image": (image, "byte")})
    writer.write({"label": ([3, 4], "int"), "name": (b"n", "byte")})
    writer.close()
    records = list(iter_records(path, verify_crc=True))
    assert [offset for offset, _ in records] == [0, 16 + len(records[0][1])]
    assert decode_example(records[0][1]) == {"image": [image]}
    assert decode_example(records[1][1]) == {"label": [3, 4], "name": [b"n"]}
    reader = RecordReader(verify_crc=True)
    assert reader.read(path, records[1][0]) == records[1][1]


def test_example_encoding_is_deterministic():
    features = {f"key{i}": i for i in range(20)} | {"frames": [b"a", b"b"]}
    shuffled = dict(reversed(list(features.items())))
    assert encode_example(features) == encode_example(shuffled)


def test_random_access_reads(tmp_path):
    path = tmp_path / "a.tfrecord"
    offsets = write_payloads(path, PAYLOADS)
    reader = RecordReader(verify_crc=True)
    for offset, payload in reversed(list(zip(offsets, PAYLOADS, strict=True))):
        assert reader.read(path, offset) == payload


def test_crc_corruption_is_detected_only_when_verifying(tmp_path):
    path = tmp_path / "a.tfrecord"
    offsets = write_payloads(path, PAYLOADS)
    data = bytearray(path.read_bytes())
    data[offsets[2] + 12 + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecordCorruptError, match=rf"a\.tfrecord: payload CRC mismatch .* offset {offsets[2]}"):
        RecordReader(verify_crc=True).read(path, offsets[2])
    assert len(RecordReader(verify_crc=False).read(path, offsets[2])) == len(PAYLOADS[2])
    with pytest.raises(RecordCorruptError, match="payload CRC mismatch"):
        list(iter_records(path, verify_crc=True))

    data[offsets[1]] ^= 0x01  # the length field of record 1
    path.write_bytes(bytes(data))
    with pytest.raises(RecordCorruptError, match=rf"length CRC mismatch .* offset {offsets[1]}"):
        RecordReader(verify_crc=True).read(path, offsets[1])


def test_truncated_file_is_an_error_even_without_crc_checks(tmp_path):
    path = tmp_path / "a.tfrecord"
    offsets = write_payloads(path, PAYLOADS)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RecordCorruptError, match=f"truncated record at byte offset {offsets[-1]}"):
        RecordReader().read(path, offsets[-1])
    with pytest.raises(RecordCorruptError, match="truncated"):
        RecordReader().read(path, path.stat().st_size - 3)


def test_reader_keeps_at_most_max_open_files(tmp_path):
    reader = RecordReader(max_open=2)
    for number in range(5):
        path = tmp_path / f"{number}.tfrecord"
        write_payloads(path, [str(number).encode()])
        assert reader.read(path, 0) == str(number).encode()
    assert list(reader._sources) == [str(tmp_path / "3.tfrecord"), str(tmp_path / "4.tfrecord")]
    reader.close()
