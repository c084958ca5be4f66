"""Shards of the store: planning, writing (under a unique temp name, verified before the rename), resuming, and
assembling the index, labels and failures.tsv over all shards (one conversion, or the parts of one merged).

A shard's sidecar (`<name>-<n>.meta.json`) holds what the shard contributes to the final files, so a rerun keeps
every shard whose sidecar matches the plan and the options, and the final files can be assembled, by one
conversion or by `--merge` over parts, without reading a shard again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from conversion.encoding import EncodeOptions
from conversion.items import Failure, Unit
from dataloaders.catalogue import CatalogueWriter, beside_path, sources_of
from dataloaders.clip_store import parse_clip_record
from dataloaders.files import file_sha256, remove_temporaries, unique_temporary
from dataloaders.tfrecord_io import iter_records, write_record
from modules.errors import InputError

logger = logging.getLogger("frozen_tfrecord")

FAILURES_HEADER = "kind\tvideo_id\twhere\tdetail\n"


@dataclass
class ShardPlan:
    """One output shard: the units it converts (files and tables), or the webdataset shard it converts."""

    number: int
    units: list[Unit] = field(default_factory=list)
    input: str | None = None  # a webdataset shard (local path or s3:// URL)

    @property
    def clip_ids(self) -> list[str]:
        return [clip_id for unit in self.units for clip_id in unit.clip_ids]

    @property
    def windows(self) -> list | None:
        windows = [list(clip.window) if clip.window else None for unit in self.units for clip in unit.clips]
        return windows if any(windows) else None


@dataclass
class ShardState:
    """What a complete shard contributes to the final files (the content of its sidecar)."""

    file_name: str
    video_ids: list[str]  # the clips planned (files and tables) or stored (webdataset)
    options: dict
    size: int
    records: list[tuple[str, int]]
    labels: list[dict[str, str]]
    failures: list[list[str]]
    sha256: str = ""  # of the shard file, recorded when it was finished; checked before a rerun keeps it
    input: str | None = None  # the webdataset shard it was converted from
    windows: list | None = None  # the planned clips' windows, when some clip has one


def plan_units(units: list[Unit], shard_size: int) -> list[ShardPlan]:
    """Consecutive units (sorted by id) packed into shards of at most `shard_size` clips; a source's clips are
    never split, so each source is opened once. One clip per unit gives chunks of the sorted ids."""
    plans: list[ShardPlan] = []
    current: list[Unit] = []
    count = 0
    for unit in units:
        if current and count + len(unit.clips) > shard_size:
            plans.append(ShardPlan(len(plans), current))
            current, count = [], 0
        current.append(unit)
        count += len(unit.clips)
    if current:
        plans.append(ShardPlan(len(plans), current))
    return plans


def plan_inputs(urls: list[str]) -> list[ShardPlan]:
    """One output shard per webdataset shard, in the order given."""
    return [ShardPlan(number, input=url) for number, url in enumerate(urls)]


class OutputLayout:
    def __init__(self, output_dir: str | Path, name: str) -> None:
        self.dir = Path(output_dir)
        self.name = name

    def shard(self, number: int) -> Path:
        return self.dir / f"{self.name}-{number:05d}.tfrecord"

    def sidecar(self, number: int) -> Path:
        return self.dir / f"{self.name}-{number:05d}.meta.json"

    @property
    def index(self) -> Path:
        return self.dir / f"{self.name}.index"

    def part_manifest(self, part: int, parts: int) -> Path:
        return self.dir / f"{self.name}.part-{part:03d}-of-{parts:03d}.json"

    def part_manifests(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.name}.part-*-of-*.json"))


def write_atomically(path: Path, text: str) -> None:
    with AtomicText(path) as handle:
        handle.write(text)
        handle.commit()


class ShardWriter:
    """Records of one shard, written to a unique temp file; `finish` verifies every record (CRC, parse) and only
    then renames it into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temporary = unique_temporary(path)
        self.stream = self.temporary.open("wb")
        self.records: list[tuple[str, int]] = []
        self.offset = 0

    def add(self, clip_id: str, payload: bytes) -> None:
        self.records.append((clip_id, self.offset))
        self.offset += write_record(self.stream, payload)

    def finish(self) -> tuple[int, str]:
        """(size, sha256) of the verified shard, now at its final name."""
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        verify_shard(self.temporary, self.records)
        sha256 = file_sha256(self.temporary)
        os.replace(self.temporary, self.path)
        return self.offset, sha256

    def abort(self) -> None:
        self.stream.close()
        self.temporary.unlink(missing_ok=True)


def verify_shard(path: Path, records: list[tuple[str, int]]) -> None:
    """Every record of the file has a valid CRC and parses, at the offsets written and with the ids written (the
    original's raw layout records carry none); else OSError."""
    try:
        found = [(offset, parse_clip_record(payload).video_id)
                 for offset, payload in iter_records(path, verify_crc=True)]
    except ValueError as error:  # a CRC mismatch or a record that does not parse: the write went wrong
        raise OSError(f"{path}: the shard read back is damaged: {error}") from error
    if [offset for offset, _ in found] != [offset for _, offset in records] or any(
            stored is not None and stored != clip_id for (_, stored), (clip_id, _) in zip(found, records)):
        raise OSError(f"{path}: the shard read back does not hold the records written ({len(found)} read, "
                      f"{len(records)} written)")


def state_of_shard(layout: OutputLayout, plan: ShardPlan, writer: ShardWriter, options: EncodeOptions,
                   labels: list[dict[str, str]], failures: list[Failure], stored_ids: list[str] | None = None
                   ) -> ShardState:
    """Finish the shard and write its sidecar (atomically, after the shard)."""
    size, sha256 = writer.finish()
    state = ShardState(writer.path.name, plan.clip_ids if stored_ids is None else stored_ids, options.recorded(),
                       size, writer.records, labels, [list(asdict(f).values()) for f in failures], sha256,
                       plan.input, plan.windows)
    write_atomically(layout.sidecar(plan.number), json.dumps(asdict(state), ensure_ascii=False))
    return state


def read_sidecar(layout: OutputLayout, number: int) -> ShardState | None:
    """The state shard `number`'s sidecar records when the shard file beside it has the recorded size, else None
    (no sidecar, an unreadable one, or a shard missing or cut short)."""
    try:
        state = ShardState(**json.loads(layout.sidecar(number).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    shard = layout.shard(number)
    if not shard.is_file() or shard.stat().st_size != state.size:
        return None
    state.records = [tuple(record) for record in state.records]
    return state


def load_complete_shard(layout: OutputLayout, plan: ShardPlan, options: EncodeOptions) -> ShardState | None:
    """The sidecar state of a shard finished earlier with the same plan and options (its checksum verified),
    else None."""
    state = read_sidecar(layout, plan.number)
    if state is None or not _same_options(state.options, options, plan) or state.input != plan.input:
        return None
    if plan.input is None and (state.video_ids != plan.clip_ids or state.windows != plan.windows):
        return None
    shard = layout.shard(plan.number)
    if not state.sha256 or file_sha256(shard) != state.sha256:
        logger.warning("%s does not match the checksum recorded when it was finished: writing it again", shard)
        return None
    return state


def _same_options(recorded: dict, options: EncodeOptions, plan: ShardPlan) -> bool:
    """Whether a sidecar's options give the records these options give. A webdataset shard's members are always
    decoded with PyAV, so its `decoder` (recorded all the same) does not matter."""
    mine = options.recorded()
    if plan.input is not None:
        recorded, mine = ({k: v for k, v in d.items() if k != "decoder"} for d in (recorded, mine))
    return recorded == mine


# ----------------------------------------------------------------------------------------------- final files


@dataclass
class Assembled:
    n_written: int
    failure_counts: dict[str, int]


ShardStates = Callable[[], Iterator[tuple[Path, ShardState]]]


def assemble(output_dir: Path, index: Path, states: ShardStates, input_failures: list[Failure],
             options: EncodeOptions, labels_path: Path | None) -> Assembled:
    """path.index, frozen_train_labels.json and its catalogue (when `labels_path`) and failures.tsv over the shards
    `states()` yields in plan order, each with its folder (index paths are relative to the index's folder). A clip
    id already stored by an earlier shard is reported (`duplicate_id`) and left out; its record stays in its
    shard, unlisted.

    Streamed, in memory that does not grow with the corpus but for 8 bytes a clip: a first pass over the sidecars
    finds the id hashes that occur more than once, and only ids with such a hash are remembered while writing."""
    catalogue_path = beside_path(str(labels_path)) if labels_path is not None else None
    for final in (index, labels_path, catalogue_path, output_dir / "failures.tsv"):
        if final is not None:  # left by a killed assembly (the folder is this process's alone)
            remove_temporaries(final)
    repeated = _repeated_id_hashes(states())
    seen: set[str] = set()
    counts: dict[str, int] = {}
    n_written = 0
    with contextlib.ExitStack() as files:
        index_out = files.enter_context(AtomicText(index))
        labels_out = files.enter_context(LabelsWriter(labels_path)) if labels_path is not None else None
        failures_out = files.enter_context(AtomicText(output_dir / "failures.tsv"))
        catalogue = files.enter_context(CatalogueWriter(catalogue_path)) if catalogue_path is not None else None
        failures_out.write(FAILURES_HEADER)
        shard_table: list[str] = []

        def report(failure: Failure) -> None:
            counts[failure.kind] = counts.get(failure.kind, 0) + 1
            failures_out.write(failure.tsv_line() + "\n")

        for failure in input_failures:
            report(failure)
        for folder, state in states():
            shard_path = os.path.relpath(folder / state.file_name, index.parent).replace(os.sep, "/")
            shard_table.append(shard_path)
            captions = {label["video_id"]: label["caption"] for label in state.labels}
            lengths = _record_lengths(state)
            for failure in state.failures:
                report(Failure(*failure))
            for clip_id, offset in state.records:
                if hash(clip_id) in repeated:
                    if clip_id in seen:
                        where = f"{state.input}:{clip_id}" if state.input else shard_path
                        report(Failure("duplicate_id", clip_id, where,
                                       "id stored before by an earlier shard; the first kept"))
                        continue
                    seen.add(clip_id)
                index_out.write(f"{clip_id}\t{shard_path}\t{offset}\n")
                n_written += 1
                if labels_out is not None and clip_id in captions:
                    labels_out.add({"video_id": clip_id, "caption": captions[clip_id]})
                    catalogue.add(clip_id, captions[clip_id], len(shard_table) - 1, offset, lengths[offset])
        index_out.commit()
        if options.is_frame_store:
            _write_frame_store_manifest(index, options)
        if labels_out is not None:
            labels_out.commit()
            catalogue.finish(shard_table, 0, 0, sources_of(str(labels_path), str(index), catalogue_path))
        failures_out.commit()
    return Assembled(n_written, counts)


def _write_frame_store_manifest(index: Path, options: EncodeOptions) -> None:
    from dataloaders.frame_store import FrameStoreManifest, manifest_path  # torch: only for a frame store

    manifest = FrameStoreManifest(options.feature_framerate, options.image_size, options.frame_format)
    write_atomically(manifest_path(index), manifest.to_json())


def _repeated_id_hashes(states: Iterator[tuple[Path, ShardState]]) -> set[int]:
    """The hashes of the clip ids that more than one record carries (ids repeated, or a rare collision of two)."""
    hashes = [np.fromiter((hash(clip_id) for clip_id, _ in state.records), dtype=np.int64, count=len(state.records))
              for _, state in states]
    every = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.int64)
    return set(every[1:][every[1:] == every[:-1]].tolist())


def _record_lengths(state: ShardState) -> dict[int, int]:
    """The framed length of each record of a shard, by offset: records lie back to back."""
    offsets = sorted(offset for _, offset in state.records)
    return {offset: end - offset for offset, end in zip(offsets, [*offsets[1:], state.size])}


class AtomicText:
    """A text file written to a temp file beside it and renamed into place by `commit` (after an fsync); left
    unfinished, the temp file is removed and the file is as it was."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temporary = unique_temporary(path)
        self.handle = self.temporary.open("w", encoding="utf-8", newline="\n")
        self.committed = False

    def __enter__(self) -> AtomicText:
        return self

    def write(self, text: str) -> None:
        self.handle.write(text)

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.temporary, self.path)
        self.committed = True

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.handle.close()
            self.temporary.unlink(missing_ok=True)


class LabelsWriter(AtomicText):
    """`frozen_train_labels.json` written one object per line: a JSON array any JSON reader takes, and that a
    reader of lines can stream."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.n_labels = 0

    def add(self, label: dict[str, str]) -> None:
        self.write(("[\n" if not self.n_labels else ",\n") + json.dumps(label, ensure_ascii=False))
        self.n_labels += 1

    def commit(self) -> None:
        self.write("\n]\n" if self.n_labels else "[]\n")
        super().commit()


# ----------------------------------------------------------------------------------------------- parts


@dataclass
class PartManifest:
    """What every part of a conversion over several machines knows: the whole plan, the options, the failures
    found before decoding (the same for every part) and whether captions are stored."""

    parts: int
    part: int
    shards: list[int]  # plan numbers of the whole conversion
    options: dict
    input_failures: list[list[str]]
    has_captions: bool
    labels_name: str
    summary: dict = field(default_factory=dict)  # inputs counted before decoding (csv rows, videos found)

    def plan_key(self) -> tuple:
        return self.parts, self.shards, self.options, self.input_failures, self.has_captions, self.labels_name


def write_part_manifest(layout: OutputLayout, manifest: PartManifest) -> Path:
    path = layout.part_manifest(manifest.part, manifest.parts)
    write_atomically(path, json.dumps(asdict(manifest), ensure_ascii=False, indent=1))
    return path


def read_part_manifests(folders: list[Path], name: str) -> list[tuple[Path, PartManifest]]:
    manifests = []
    for folder in folders:
        for path in OutputLayout(folder, name).part_manifests():
            try:
                manifests.append((folder, PartManifest(**json.loads(path.read_text(encoding="utf-8")))))
            except (OSError, ValueError, TypeError) as error:
                raise InputError(f"{path} is not a part manifest of this converter ({error})") from error
    if not manifests:
        raise InputError(f"--merge: no part manifest ({name}.part-*-of-*.json) in {', '.join(map(str, folders))}: "
                         f"convert the parts first (--num_parts N --part K)")
    first = manifests[0][1]
    for path, manifest in manifests[1:]:
        if manifest.plan_key() != first.plan_key():
            raise InputError(f"--merge: the part manifest in {path} belongs to another conversion (other inputs, "
                             f"options or number of parts) than the one in {manifests[0][0]}")
    return manifests
