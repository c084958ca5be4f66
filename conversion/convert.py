"""A conversion, one part of one (`num_parts`, `part`), or the merge of the parts.

Files and tables are planned from the sources sorted by id (a source's clips stay in one shard) and decoded by a
pool of worker processes, one source per task, while the main process writes the shards in plan order.
webdataset input gives one output shard per input shard, each converted whole by one worker (streamed, so memory
stays bounded whatever the shards). Either way shard n of the plan is the same file whoever writes it, so parts
write disjoint shards (n mod num_parts == part) into one folder or several, and the merge lists them all.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.pool
import signal
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
from tqdm import tqdm

from conversion.decoders import BadWindow, DecodedClip, open_source, read_clips
from conversion.encoding import (
    EncodeOptions,
    encode_decoded_clip,
    encode_frame_store_clip,
    sequential_decoding_note,
)
from conversion.items import DECODED_SEQUENTIALLY, RETRIABLE_FAILURES, Failure, Unit
from conversion.shards import (
    OutputLayout,
    PartManifest,
    ShardPlan,
    ShardState,
    ShardStates,
    ShardWriter,
    assemble,
    load_complete_shard,
    plan_inputs,
    plan_units,
    read_part_manifests,
    read_sidecar,
    state_of_shard,
    write_part_manifest,
)
from conversion.sources import SampleFields, select_files
from conversion.tables import PRESETS, TableLayout
from conversion.webdataset_input import DEFAULT_MAX_MEMBER_BYTES, convert_input_shard, expand_shard_specs
from dataloaders.files import LOCK_NAME, FolderLock, remove_temporaries
from modules.errors import InputError

logger = logging.getLogger("frozen_tfrecord")

DEFAULT_OUTPUT_DIR = "./WebVid_TFRecord"


@dataclass
class ConversionConfig:
    output_dir: str = DEFAULT_OUTPUT_DIR
    video_dir: str | None = None
    frames_dir: str | None = None
    csv_paths: list[str] = field(default_factory=list)  # WebVid csv: tables with the "webvid" preset
    output_name: str = "path"
    labels_name: str = "frozen_train_labels.json"
    shard_size: int = 1000
    workers: int = 0
    progress: bool = True
    options: EncodeOptions = field(default_factory=EncodeOptions)
    tables: list[tuple[str, TableLayout]] = field(default_factory=list)
    webdataset: list[str] = field(default_factory=list)  # shard specs
    fields: SampleFields = field(default_factory=SampleFields)
    num_parts: int = 1
    part: int = 0
    merge_dirs: list[str] | None = None  # set: merge the parts in these folders (empty: --output_dir)
    allow_outside_paths: bool = False  # a table's video paths may lead outside --video_dir
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # a larger webdataset member is refused unread

    def all_tables(self) -> list[tuple[str, TableLayout]]:
        return [(path, PRESETS["webvid"]) for path in self.csv_paths] + list(self.tables)


@dataclass
class ConversionSummary:
    n_csv_rows: int = 0
    n_sources_found: int = 0
    n_selected: int = 0
    n_written: int = 0
    n_shards: int = 0
    n_shards_resumed: int = 0
    n_shards_retried: int = 0  # complete shards converted again: inputs of theirs had failed in a way that can change
    failures: dict[str, int] = field(default_factory=dict)
    part: str = ""  # "part K of N" for one part of a conversion
    n_input_shards: int = 0  # webdataset shards

    def report(self) -> str:
        failures = ", ".join(f"{kind}: {count}" for kind, count in sorted(self.failures.items())
                             if kind != DECODED_SEQUENTIALLY) or "none"
        where = f"{self.part}: " if self.part else ""
        rows = f"table rows: {self.n_csv_rows}; " if self.n_csv_rows else ""  # files mode reads no table
        inputs = (f"webdataset shards: {self.n_input_shards}" if self.n_input_shards else
                  f"{rows}videos found: {self.n_sources_found}; selected: {self.n_selected}")
        retried = (f", {self.n_shards_retried} converted again for inputs that had failed (unreadable, cut short "
                   f"or missing)") if self.n_shards_retried else ""
        sequential = self.failures.get(DECODED_SEQUENTIALLY)
        sequential = (f"; decoded from the first frame, seeking unsafe in them (see failures.tsv): "
                      f"{sequential} source(s)") if sequential else ""
        return (f"{where}{inputs}; written: {self.n_written} in {self.n_shards} shard(s) ({self.n_shards_resumed} "
                f"kept from an earlier run{retried}); failures: {failures}{sequential}")

    def count(self, failures: list[Failure]) -> None:
        for failure in failures:
            self.add_counts({failure.kind: 1})

    def add_counts(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            self.failures[kind] = self.failures.get(kind, 0) + n


@dataclass
class Planned:
    plans: list[ShardPlan]
    input_failures: list[Failure]
    has_captions: bool


def convert(config: ConversionConfig) -> ConversionSummary:
    """Run (or resume) a conversion or one part of it, or merge the parts, holding the output folder against
    other writers (`FolderInUseError`: the parts of one conversion share it); raises OSError if a shard cannot be
    written (complete shards are kept)."""
    with contextlib.ExitStack() as held:
        for lock in output_locks(config):
            held.enter_context(lock)
        return merge(config) if config.merge_dirs is not None else _convert(config)


def output_locks(config: ConversionConfig) -> list[FolderLock]:
    """A whole conversion or a merge holds the output folder alone; a part shares it with the other parts and
    holds its own part alone."""
    what = "--output_dir"
    if config.merge_dirs is not None or config.num_parts == 1:
        return [FolderLock(config.output_dir, what=what)]
    own = f"{LOCK_NAME}.part-{config.part:03d}-of-{config.num_parts:03d}"
    return [FolderLock(config.output_dir, shared=True, what=what),
            FolderLock(config.output_dir, own, what=f"part {config.part} of {config.num_parts} in")]


def _convert(config: ConversionConfig) -> ConversionSummary:
    summary = ConversionSummary()
    planned = plan_conversion(config, summary)
    layout = OutputLayout(config.output_dir, config.output_name)
    layout.dir.mkdir(parents=True, exist_ok=True)
    mine = [plan for plan in planned.plans if plan.number % config.num_parts == config.part]
    remove_stale_temporaries(layout, [plan.number for plan in mine])
    finished: set[int] = set()  # plan numbers whose shard is complete: their sidecars say the rest
    for plan in mine:
        state = load_complete_shard(layout, plan, config.options)
        if state is not None and any(failure[0] in RETRIABLE_FAILURES for failure in state.failures):
            summary.n_shards_retried += 1  # complete, but an input of it may be readable now
        elif state is not None:
            finished.add(plan.number)
    summary.n_shards, summary.n_shards_resumed = len(mine), len(finished)
    todo = [plan for plan in mine if plan.number not in finished]
    if config.webdataset:
        _convert_input_shards(todo, layout, config, finished)
    else:
        _convert_units(todo, layout, config, planned.has_captions, finished, done=sum(
            len(plan.clip_ids) for plan in mine if plan.number in finished), total=sum(len(p.clip_ids) for p in mine))
    ordered = sidecar_states([(layout.dir, plan.number) for plan in mine], config.output_name)
    if config.num_parts > 1:
        manifest = PartManifest(config.num_parts, config.part, [_plan_key(plan) for plan in planned.plans],
                                config.options.recorded(), [list(asdict(f).values()) for f in planned.input_failures],
                                planned.has_captions, config.labels_name,
                                {"n_csv_rows": summary.n_csv_rows, "n_sources_found": summary.n_sources_found,
                                 "n_selected": summary.n_selected, "n_input_shards": summary.n_input_shards})
        write_part_manifest(layout, manifest)
        summary.part = f"part {config.part} of {config.num_parts}"
        for _, state in ordered():
            summary.n_written += len(state.records)
            summary.count([Failure(*f) for f in state.failures])
        return summary
    labels_path = layout.dir / config.labels_name if planned.has_captions else None
    assembled = assemble(layout.dir, layout.index, ordered, planned.input_failures, config.options, labels_path)
    summary.n_written = assembled.n_written
    summary.add_counts(assembled.failure_counts)
    for failure in planned.input_failures:
        logger.warning("%s %s (%s): %s", failure.kind, failure.video_id or "-", failure.where, failure.detail)
    return summary


def plan_conversion(config: ConversionConfig, summary: ConversionSummary) -> Planned:
    """The whole plan (every part computes the same one) and the failures found before decoding."""
    if config.webdataset:
        urls = expand_shard_specs(config.webdataset)
        if not urls:
            raise InputError("--webdataset names no shard")
        summary.n_input_shards = len(urls)
        return Planned(plan_inputs(urls), [], True)
    if (config.video_dir is None) == (config.frames_dir is None):
        raise InputError("give exactly one of --video_dir, --frames_dir and --webdataset")
    flag, folder = ("--frames_dir", config.frames_dir) if config.frames_dir else ("--video_dir", config.video_dir)
    if not Path(folder).is_dir():
        raise InputError(f"{flag} {folder} is not a folder")
    for path, _ in config.all_tables():
        if not Path(path).is_file():
            raise InputError(f"{'--csv' if path in config.csv_paths else '--table'} {path} does not exist")
    selection = select_files(folder, "frames" if config.frames_dir else "video", config.all_tables(),
                             use_captions_beside=not config.options.is_frame_store, fields=config.fields,
                             allow_outside=config.allow_outside_paths)
    summary.n_csv_rows, summary.n_sources_found = selection.n_rows, selection.n_sources_found
    summary.n_selected = sum(len(unit.clips) for unit in selection.units)
    has_captions = selection.has_captions and not config.options.is_frame_store
    return Planned(plan_units(selection.units, config.shard_size), selection.failures, has_captions)


def remove_stale_temporaries(layout: OutputLayout, numbers: list[int]) -> None:
    """Temp files of this run's shards left by an interrupted run (never another part's)."""
    for number in numbers:
        for final in (layout.shard(number), layout.sidecar(number)):
            remove_temporaries(final)


def _plan_key(plan: ShardPlan) -> list:
    """A plan shard's identity, as a merge checks it against the shard's sidecar."""
    return [plan.number, plan.input or _ids_digest(plan.clip_ids, plan.windows)]


def _state_key(number: int, state: ShardState) -> list:
    return [number, state.input or _ids_digest(state.video_ids, state.windows)]


def _ids_digest(clip_ids: list[str], windows: list | None) -> str:
    return hashlib.sha256(json.dumps([clip_ids, windows]).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- files


@dataclass
class ClipResult:
    clip_id: str
    payload: bytes | None
    failure: Failure | None  # why it was not stored, or a note on a stored clip (fewer_frames)
    notes: list[Failure] = field(default_factory=list)  # on its source: decoded_sequentially


def convert_unit(unit: Unit, options: EncodeOptions) -> list[ClipResult]:
    """Worker entry point: read one source once, sample and encode each of its clips; failures come back in the
    results, never raised."""
    try:
        if options.is_frame_store:
            payload, _ = encode_frame_store_clip(unit.source_id, unit.location, options)
            return [ClipResult(unit.clips[0].clip_id, payload, None)]
        source = open_source(unit.location, unit.kind, options.decoder, threads=_decode_threads,
                             short_side=options.decode_to_short_side)
        decoded = read_clips(source, options.num_frames, [clip.window for clip in unit.clips])
    except Exception as error:  # the worker boundary: a failure on one source only skips its clips
        return [ClipResult(clip.clip_id, None, Failure("bad_video", clip.clip_id, unit.location,
                                                       f"{type(error).__name__}: {error}")) for clip in unit.clips]
    results = [_clip_result(unit, clip, result, options) for clip, result in zip(unit.clips, decoded)]
    if note := sequential_decoding_note(source, unit.source_id, unit.location):
        results[0].notes.append(note)
    return results


def _clip_result(unit: Unit, clip, result: DecodedClip | Exception, options: EncodeOptions) -> ClipResult:
    if isinstance(result, BadWindow):
        return ClipResult(clip.clip_id, None, Failure("bad_window", clip.clip_id, clip.where, str(result)))
    if isinstance(result, Exception):
        return ClipResult(clip.clip_id, None, Failure("bad_video", clip.clip_id, unit.location,
                                                      f"{type(result).__name__}: {result}"))
    windowed = clip.window is not None
    where = clip.where if windowed else unit.location  # a window: its table row
    payload, failure = encode_decoded_clip(clip.clip_id, result, options, where, window=clip.window,
                                           source_id=unit.source_id if windowed else None)
    return ClipResult(clip.clip_id, payload, failure)


_decode_threads = 0  # FFmpeg decoding threads per video; 0 = FFmpeg's choice (all cores)


def use_one_decoding_thread() -> None:
    """What each worker process runs first: parallelism comes from the processes, not from FFmpeg's threads."""
    global _decode_threads
    _decode_threads = 1  # parallelism comes from the worker processes
    cv2.setNumThreads(1)


def _convert_units(todo: list[ShardPlan], layout: OutputLayout, config: ConversionConfig, has_captions: bool,
                   finished: set[int], done: int, total: int) -> None:
    with (
        tqdm(total=total, initial=done, unit="video", disable=not config.progress, dynamic_ncols=True) as bar,
        contextlib.closing(_run_units(todo, config)) as shards,
    ):
        for plan, results in shards:
            write_unit_shard(layout, plan, results, config.options, has_captions, lambda: bar.update(1))
            finished.add(plan.number)


def write_unit_shard(layout: OutputLayout, plan: ShardPlan, results: Iterator[list[ClipResult]],
                     options: EncodeOptions, has_captions: bool, on_clip=lambda: None) -> ShardState:
    """Write one shard from its (ordered) results: a verified temp file renamed into place, then the sidecar."""
    writer = ShardWriter(layout.shard(plan.number))
    labels, failures = [], []
    try:
        for unit, unit_results in zip(plan.units, results, strict=True):
            for clip, result in zip(unit.clips, unit_results, strict=True):
                failures += result.notes
                if result.failure is not None:
                    failures.append(result.failure)
                    if result.payload is None:
                        logger.warning("skipping %s (%s): %s", clip.clip_id, result.failure.where,
                                       result.failure.detail)
                if result.payload is not None:
                    writer.add(clip.clip_id, result.payload)
                    if has_captions and clip.caption is not None:
                        labels.append({"video_id": clip.clip_id, "caption": clip.caption})
                on_clip()
        return state_of_shard(layout, plan, writer, options, labels, failures)
    except BaseException:
        writer.abort()
        raise


@contextlib.contextmanager
def interrupt_flag() -> Iterator[threading.Event]:
    """While workers run: Ctrl-C sets the event instead of raising inside the pool's waits (where it can leave the
    pool's locks half-taken and its shutdown hanging); `polled` raises KeyboardInterrupt at a safe point."""
    flag = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class WorkerDied(RuntimeError):
    """A worker process ended while converting (a crash inside a decoder, the kernel's out-of-memory killer)."""


def start_pool(processes: int) -> tuple[multiprocessing.pool.Pool, list[multiprocessing.Process]]:
    """Worker processes that start with Ctrl-C ignored (an ignored signal stays ignored through exec, so not even a
    worker still importing prints a KeyboardInterrupt); fresh interpreters, as forking a parent whose OpenCV thread
    pool has run deadlocks cv2 in the children. Returns the pool and its processes, which live as long as it does:
    one that ends is a worker that died (the pool would wait for its task forever)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    before = set(multiprocessing.active_children())
    try:
        pool = multiprocessing.get_context("spawn").Pool(processes, initializer=use_one_decoding_thread)
    finally:
        signal.signal(signal.SIGINT, previous)
    return pool, [child for child in multiprocessing.active_children() if child not in before]


def polled(results: Any, flag: threading.Event, workers: list[multiprocessing.Process], doing: str) -> Iterator:
    """The results of `Pool.imap`, in order, waking to check `flag` (Ctrl-C) and that no worker died while waiting
    for the next one."""
    while True:
        try:
            item = results.next(timeout=0.2)
        except multiprocessing.TimeoutError:
            if flag.is_set():
                raise KeyboardInterrupt from None
            if dead := [worker.exitcode for worker in workers if worker.exitcode is not None]:
                how = f"killed by signal {-dead[0]}" if dead[0] < 0 else f"exit status {dead[0]}"
                raise WorkerDied(f"a worker process died ({how}: a crash in a decoder, or out of memory) while "
                                 f"converting {doing}") from None
            continue
        except StopIteration:
            return
        yield item


def _run_units(todo: list[ShardPlan], config: ConversionConfig) -> Iterator[tuple[ShardPlan, Iterator]]:
    """(plan, ordered results) per shard; with workers, the next shard is already queued while one is written."""
    work = functools.partial(convert_unit, options=config.options)
    if config.workers <= 0:
        for plan in todo:
            yield plan, map(work, plan.units)
        return
    pool, workers = start_pool(config.workers)
    with interrupt_flag() as flag, pool:
        queued: deque = deque()
        for plan in todo:
            doing = f"shard {plan.number} ({plan.units[0].location} .. {plan.units[-1].location})"
            queued.append((plan, polled(pool.imap(work, plan.units, chunksize=1), flag, workers, doing)))
            if len(queued) == 2:
                yield queued.popleft()
        while queued:
            yield queued.popleft()


# ----------------------------------------------------------------------------------------------- webdataset


def _convert_input_shards(todo: list[ShardPlan], layout: OutputLayout, config: ConversionConfig,
                          finished: set[int]) -> None:
    work = functools.partial(convert_input_shard, layout=layout, options=config.options, fields=config.fields,
                             max_member_bytes=config.max_member_bytes)
    with (tqdm(total=len(todo), unit="shard", disable=not config.progress, dynamic_ncols=True) as bar,
          interrupt_flag() if config.workers > 0 else contextlib.nullcontext() as flag):
        if config.workers <= 0:
            results = map(work, todo)
        else:
            pool, workers = start_pool(min(config.workers, len(todo)) or 1)
            results = polled(pool.imap(work, todo, chunksize=1), flag, workers, "the webdataset shards")
        try:
            for plan, _ in zip(todo, results):
                finished.add(plan.number)
                bar.update(1)
        except BaseException:
            if config.workers > 0:
                pool.terminate()  # Ctrl-C or a failure: the shards being written are abandoned, as planned
            raise
        finally:
            if config.workers > 0:
                pool.close()
                pool.join()


# ----------------------------------------------------------------------------------------------- merge


def merge(config: ConversionConfig) -> ConversionSummary:
    """path.index, labels and failures.tsv in --output_dir over the parts in the merge folders, from their
    sidecars and part manifests (no shard is read or copied; each must exist with its recorded size)."""
    out = Path(config.output_dir)
    folders = [Path(folder) for folder in (config.merge_dirs or [config.output_dir])]
    for folder in folders:
        if not folder.is_dir():
            raise InputError(f"--merge: {folder} is not a folder")
    manifests = read_part_manifests(folders, config.output_name)
    manifest = manifests[0][1]
    options = EncodeOptions(**{**asdict(EncodeOptions()), **manifest.options})
    located, missing = [], []
    for number, key in manifest.shards:
        folder = _find_part_shard(folders, config.output_name, number, key, manifest.options)
        if folder is None:
            missing.append(number)
        else:
            located.append((folder, number))
    if missing:
        parts = sorted({number % manifest.parts for number in missing})
        raise InputError(f"--merge: {len(missing)} of {len(manifest.shards)} shard(s) are missing or incomplete "
                         f"(e.g. shard {missing[0]}); rerun part(s) {', '.join(map(str, parts))} of "
                         f"{manifest.parts}, then merge again")
    out.mkdir(parents=True, exist_ok=True)
    layout = OutputLayout(out, config.output_name)
    labels_path = out / manifest.labels_name if manifest.has_captions else None
    input_failures = [Failure(*f) for f in manifest.input_failures]
    assembled = assemble(out, layout.index, sidecar_states(located, config.output_name), input_failures, options,
                         labels_path)
    summary = ConversionSummary(**manifest.summary, n_written=assembled.n_written, n_shards=len(located),
                                n_shards_resumed=len(located), part=f"merged {manifest.parts} parts")
    summary.add_counts(assembled.failure_counts)
    return summary


def sidecar_states(located: list[tuple[Path, int]], name: str) -> ShardStates:
    """The states of complete shards, (folder, plan number) each, read from their sidecars one at a time each time
    they are gone through: never all in memory."""
    def states() -> Iterator[tuple[Path, ShardState]]:
        for folder, number in located:
            state = read_sidecar(OutputLayout(folder, name), number)
            if state is None:
                raise InputError(f"{OutputLayout(folder, name).sidecar(number)} or its shard changed during the "
                                 f"merge: run it again")
            yield folder, state
    return states


def _find_part_shard(folders: list[Path], name: str, number: int, key: str, options: dict) -> Path | None:
    for folder in folders:
        state = read_sidecar(OutputLayout(folder, name), number)
        if state is not None and _state_key(number, state) == [number, key] and state.options == options:
            return folder
    return None
