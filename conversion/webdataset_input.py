"""webdataset tar shards as video2dataset writes them (and as mirrored on Hugging Face): per sample `<key>.mp4`
(or .webm, .mkv, .avi, ...), `<key>.txt` (the caption) and `<key>.json` (url, caption, key, status,
error_message, extra columns).

Shards are named by brace patterns (`shards/{00000..00099}.tar`), folders (their .tar files), files listing shards
(one per line, relative to the list) or shard paths, local or `s3://` (boto3, configured by the usual environment
as the TFRecord reader). Each is read as a stream, one sample at a time: members by the standard library's tar
reader (a member larger than --max_member_bytes is refused from its header, never read into memory), grouped into
samples by the `webdataset` package's key grouping (member data is read into memory, never extracted to disk by its
name); its video member is decoded from memory with PyAV.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from braceexpand import braceexpand

from conversion.decoders import open_source, read_clips
from conversion.encoding import EncodeOptions, encode_decoded_clip, sequential_decoding_note
from conversion.items import Failure
from conversion.shards import OutputLayout, ShardPlan, ShardState, ShardWriter, state_of_shard
from conversion.sources import SampleFields, parse_sample_json, sample_clip
from dataloaders.files import VIDEO_EXTENSIONS
from dataloaders.tfrecord_io import is_s3_url, s3_client, split_s3_url
from dataloaders.video_decoding import VideoDecodeError
from modules.errors import InputError

SHARD_SUFFIX = ".tar"
DEFAULT_MAX_MEMBER_BYTES = 2 << 30  # far above any clip; a larger member is refused from its header, unread
SKIP_CHUNK = 1 << 20
LIST_SUFFIXES = (".txt", ".list", ".lst")
# The video member of a sample, by preference when a sample has several.
VIDEO_SUFFIXES = tuple(dict.fromkeys(("mp4", "webm", "mkv", "avi", "mov", "m4v",
                                      *sorted(e[1:] for e in VIDEO_EXTENSIONS))))


def expand_shard_specs(specs: list[str]) -> list[str]:
    """The shards named by --webdataset values, in order, each once."""
    shards: list[str] = []
    for spec in specs:
        for name in braceexpand(spec):
            shards += _shards_of(name)
    return list(dict.fromkeys(shards))


def _shards_of(name: str) -> list[str]:
    if is_s3_url(name):
        return _s3_folder(name) if name.endswith("/") else [name]
    path = Path(name)
    if path.is_dir():
        found = sorted(str(p) for p in path.iterdir() if p.suffix == SHARD_SUFFIX and p.is_file())
        if not found:
            raise InputError(f"--webdataset {name}: no {SHARD_SUFFIX} file in this folder")
        return found
    if path.suffix.lower() in LIST_SUFFIXES:
        if not path.is_file():
            raise InputError(f"--webdataset {name}: no such shard list")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [line if is_s3_url(line) or os.path.isabs(line) else str(path.parent / line)
                for line in lines if line and not line.startswith("#")]
    return [name]  # a shard; a missing one is reported as a failure when it is read, the rest still converts


def _s3_folder(prefix: str) -> list[str]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(prefix)
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        found = sorted(item["Key"] for page in pages for item in page.get("Contents", [])
                       if item["Key"].endswith(SHARD_SUFFIX))
    except ClientError as error:  # no such bucket, access denied, ...
        detail = error.response.get("Error", {})
        raise InputError(f"--webdataset {prefix}: S3 refused the listing ({detail.get('Code', 'error')}: "
                         f"{detail.get('Message', error)})") from None
    except BotoCoreError as error:  # no endpoint, no credentials, a connection that fails
        raise InputError(f"--webdataset {prefix}: S3 cannot be reached ({error})") from None
    if not found:
        raise InputError(f"--webdataset {prefix}: no {SHARD_SUFFIX} object under this prefix")
    return [f"s3://{bucket}/{item}" for item in found]


def open_shard(url: str) -> BinaryIO:
    """A stream of the shard's bytes: a local file, or the body of an S3 GET (read as it arrives)."""
    if is_s3_url(url):
        bucket, key = split_s3_url(url)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    return open(url, "rb")


class ShardErrors:
    """The `handler` of webdataset's iterators: records what went wrong in the shard (and after which member) and
    goes on where it can."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.last_member: str | None = None

    def __call__(self, error: Exception) -> bool:
        message = str(error.args[0]) if error.args else str(error)
        after = f" after member {self.last_member}" if self.last_member else " at its start"
        self.errors.append(f"{type(error).__name__}{after}: {message.split(' @ ')[0]}")
        return True

    def members(self, files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for member in files:
            self.last_member = member.get("fname", self.last_member)
            yield member


@dataclass(frozen=True)
class RefusedMember:
    """In a sample, in place of the data of a member larger than the limit (never read into memory)."""

    size: int
    limit: int


def samples_of(url: str, stream: BinaryIO, errors: ShardErrors, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
               ) -> Iterator[dict[str, Any]]:
    """The shard's samples ({"__key__", suffix: bytes, ...}), grouped by key as webdataset groups them. A member
    that cannot be read (a truncated or damaged tar) ends the shard; the samples before it are complete, and a
    sample it cut short has lost that member and those after it (reported as such when that leaves it without
    video or caption). A member over `max_member_bytes` is a `RefusedMember`."""
    return group_by_keys(errors.members(tar_members(url, stream, errors, max_member_bytes)), errors)


KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def group_by_keys(members: Iterator[dict[str, Any]], errors: ShardErrors) -> Iterator[dict[str, Any]]:
    """Consecutive members with one key (the path up to the first dot of the file name) as one sample, the suffix
    lower-cased; a repeated suffix in a sample is an error, the member skipped. This is webdataset's rule
    (`webdataset.tariterators.group_by_keys`, the test compares the two), here because importing anything from
    the webdataset package imports torch: 3 s of CPU in every conversion worker."""
    sample: dict[str, Any] | None = None
    for member in members:
        match = KEY_AND_SUFFIX.match(member["fname"])
        if match is None:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": member["__url__"]}
        if suffix in sample:
            errors(ValueError(f"{member['fname']}: duplicate file name in tar file {suffix} {list(sample)}"))
            continue
        sample[suffix] = member["data"]
    if sample is not None:
        yield sample


def tar_members(url: str, stream: BinaryIO, errors: ShardErrors, max_member_bytes: int) -> Iterator[dict[str, Any]]:
    """The regular files of a tar stream as webdataset's tar iterator gives them ({"fname", "data", "__url__"}; its
    metadata files skipped), except that a member whose header declares more than `max_member_bytes` is not read:
    its bytes are skipped in chunks (memory stays bounded, and a header that claims more than the stream holds
    ends at the end of the stream, not after counting through the claimed size)."""
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*")
        for info in archive:
            name = info.name
            if not info.isreg() or _is_metadata(name):
                continue
            if info.size > max_member_bytes:
                yield {"fname": name, "data": RefusedMember(info.size, max_member_bytes), "__url__": url}
                _skip_member(archive)
                continue
            yield {"fname": name, "data": archive.extractfile(info).read(), "__url__": url}
            archive.members = []  # a stream of many members: keep no list of them
    except Exception as error:  # noqa: BLE001 - a damaged or cut tar ends the shard; what came before is kept
        errors(error)


def _is_metadata(name: str) -> bool:
    """webdataset's rule: `__key__`-style names at the top level and under any folder are not members."""
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or \
        re.match(r"__[^/]*__($|/)", name) is not None


def _skip_member(archive: tarfile.TarFile) -> None:
    """Read past the current member's data (up to the next header) in chunks, discarding them."""
    stream = archive.fileobj
    remaining = archive.offset - stream.tell()  # the next header's position: after the data and its padding
    while remaining > 0:
        chunk = stream.read(min(SKIP_CHUNK, remaining))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data inside a member that was skipped")
        remaining -= len(chunk)


def convert_input_shard(plan: ShardPlan, layout: OutputLayout, options: EncodeOptions, fields: SampleFields,
                        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> ShardState:
    """Worker entry point: convert one webdataset shard into output shard `plan.number`, writing the shard and
    its sidecar; every sample that cannot be stored is a failure naming the shard and key."""
    url = plan.input
    writer = ShardWriter(layout.shard(plan.number))
    labels: list[dict[str, str]] = []
    failures: list[Failure] = []
    stored: list[str] = []
    errors = ShardErrors()
    try:
        try:
            stream = open_shard(url)
        except Exception as error:  # noqa: BLE001 - a shard that cannot be opened is a failure, not a crash
            failures.append(Failure("bad_shard", "", url, f"cannot read the shard: {type(error).__name__}: {error}"))
            stream = None
        if stream is not None:
            try:
                for sample in samples_of(url, stream, errors, max_member_bytes):
                    _store(sample, url, options, fields, writer, labels, failures, stored)
            finally:
                stream.close()
            if errors.errors:
                failures.append(Failure("bad_shard", "", url, "the shard is cut short or damaged, the samples "
                                        "after this point are lost: " + "; ".join(dict.fromkeys(errors.errors))))
        return state_of_shard(layout, plan, writer, options, labels, failures, stored)
    except BaseException:
        writer.abort()
        raise


def _store(sample: dict[str, Any], url: str, options: EncodeOptions, fields: SampleFields, writer: ShardWriter,
           labels: list[dict[str, str]], failures: list[Failure], stored: list[str]) -> None:
    key = Path(sample["__key__"]).name
    where = f"{url}:{key}"
    refused = {suffix: value for suffix, value in sample.items() if isinstance(value, RefusedMember)}
    if refused:
        failures.append(Failure("too_large", key, where, "; ".join(
            f"the member {key}.{suffix} declares {value.size} bytes, over --max_member_bytes {value.limit}: "
            f"refused unread" for suffix, value in refused.items())))
        return
    video_suffix = next((suffix for suffix in VIDEO_SUFFIXES if suffix in sample), None)
    meta = parse_sample_json(sample["json"]) if "json" in sample else {}
    text = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else None
    clip_id, caption, failure = sample_clip(key, meta, text, fields, where, has_video=video_suffix is not None)
    if failure is None and clip_id in stored:
        failure = Failure("duplicate_id", clip_id, where, "id seen before in this shard; the first kept")
    payload = None
    if failure is None:
        payload, failure, note = encode_member(clip_id, sample[video_suffix], where, options)
        failures += [note] if note else []
    if failure is not None:
        failures.append(failure)
        if payload is None:
            return
    writer.add(clip_id, payload)
    stored.append(clip_id)
    labels.append({"video_id": clip_id, "caption": caption})


def encode_member(clip_id: str, data: bytes, where: str, options: EncodeOptions
                  ) -> tuple[bytes | None, Failure | None, Failure | None]:
    """An in-memory video member decoded with PyAV, as `encode_decoded_clip` gives it (a member that cannot be
    decoded: None and its `bad_video` Failure), and the `decoded_sequentially` note when it could not seek."""
    try:
        source = open_source(data, "video", "pyav", threads=1, name=where, short_side=options.decode_to_short_side)
        clip = read_clips(source, options.num_frames, [None])[0]
    except VideoDecodeError as error:
        return None, Failure("bad_video", clip_id, where, str(error)), None
    if isinstance(clip, Exception):
        return None, Failure("bad_video", clip_id, where, str(clip)), None
    return (*encode_decoded_clip(clip_id, clip, options, where), sequential_decoding_note(source, clip_id, where))
