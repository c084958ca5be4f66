"""dataloaders/catalogue.py: the catalogue derived from the original's store layout gives today's samples in
today's order; it is rebuilt when its sources change, never used half-written, put in the cache folder when the
store cannot be written; labels of any size are derived in bounded memory; and the converter's --merge streams."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conversion.encoding import EncodeOptions
from conversion.shards import FAILURES_HEADER, OutputLayout, PartManifest, ShardState, write_part_manifest
from dataloaders.catalogue import (
    Catalogue,
    CatalogueError,
    beside_path,
    cache_path,
    ensure_catalogue,
    find_catalogue,
)
from dataloaders.clip_store import read_frames
from dataloaders.webvid import WebVidDataset
from tests.test_webvid import N_VIDEOS, store  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


def original_layout(store: Path, folder: Path) -> tuple[Path, Path]:  # noqa: F811
    """The converted store rewritten as the original's were: the labels as one json.dump line with extra keys, a
    label repeated and one whose id has no record; the index with paths seen from the writer's folder, one
    absolute, a duplicate id (a later line, ignored) and lines in another order than the labels."""
    shutil.copytree(store, folder)
    beside_path(str(folder / "frozen_train_labels.json")).unlink()  # the original wrote none
    labels = json.loads((store / "frozen_train_labels.json").read_text())
    lines = (store / "path.index").read_text().splitlines()
    rows = [line.split("\t") for line in lines]
    index = [f"{rows[0][0]}\tWebVid_TFRecord/{rows[0][1]}\t{rows[0][2]}",  # relative to the writer's folder
             f"{rows[1][0]}\t{folder / rows[1][1]}\t{rows[1][2]}",  # absolute
             *[line for line in reversed(lines[2:])],
             f"{rows[0][0]}\t{rows[1][1]}\t{rows[1][2]}"]  # a duplicate id: the first line wins
    (folder / "path.index").write_text("\n".join(index) + "\n")
    items = [{**item, "duration": 10} for item in labels]
    items.insert(3, {"video_id": "no-such-clip", "caption": "missing"})
    items.append({"video_id": labels[2]["video_id"], "caption": "the same clip, another caption"})
    (folder / "frozen_train_labels.json").write_text(json.dumps(items))
    return folder / "frozen_train_labels.json", folder / "path.index"


def todays_samples(labels_path: Path, index_path: Path) -> list[tuple[str, str, tuple[str, int] | None]]:
    """What the loader made of a store before the catalogue: json.load of the labels, the index's first line of
    each id, shard paths resolved from the index's folder, then the writer's folder."""
    located: dict[str, tuple[str, int]] = {}
    for line in index_path.read_text().splitlines():
        video_id, shard, offset = line.split("\t")
        if video_id not in located:
            path = Path(shard) if Path(shard).is_absolute() else index_path.parent / shard
            if not path.is_file():
                path = Path(shard)
            located[video_id] = (str(path), int(offset))
    return [(item["video_id"], item["caption"], located.get(item["video_id"]))
            for item in json.loads(labels_path.read_text())]


def samples_of(dataset: WebVidDataset) -> list[tuple[str, str, tuple[str, int] | None]]:
    samples = []
    for row in range(len(dataset)):
        shard, offset, _ = dataset.catalogue.location(row)
        where = (dataset.shard_path(shard), offset) if shard >= 0 else None
        samples.append((dataset.video_id(row), dataset.caption(row), where))
    return samples


def test_derived_from_the_original_layout_gives_todays_samples_in_todays_order(store, tmp_path,  # noqa: F811
                                                                                 monkeypatch):
    labels, index = original_layout(store, tmp_path / "WebVid_TFRecord")
    monkeypatch.chdir(tmp_path)  # the writer's folder: its relative shard paths resolve from here
    expected = todays_samples(labels, index)
    dataset = WebVidDataset(labels, tmp_path / "WebVid_TFRecord", max_frames=4, image_size=32)
    assert samples_of(dataset) == expected
    assert len(dataset) == N_VIDEOS + 2 and dataset.n_missing == 1
    assert dataset.catalogue.info.n_duplicate_ids == 1
    assert dataset.catalogue.path == beside_path(str(labels))
    assert dataset[3] is None and dataset.n_skipped == 1  # the label without a record
    last = dataset[len(dataset) - 1]
    assert last["video_id"] == expected[2][0]
    reference = read_frames(store, expected[2][0])
    assert reference.shape[0] >= 4 and last["video_mask"].sum() == 4
    # a second dataset maps the same file: nothing is built again
    assert WebVidDataset(labels, index, max_frames=4, image_size=32).catalogue.path.stat().st_mtime_ns == \
        dataset.catalogue.path.stat().st_mtime_ns


def test_the_catalogue_is_rebuilt_when_its_labels_or_index_change(store, tmp_path):  # noqa: F811
    labels, index = original_layout(store, tmp_path / "s")
    first = ensure_catalogue(labels, index)
    assert find_catalogue(labels, index) is not None
    items = json.loads(labels.read_text())
    items[0]["caption"] = "a new caption"
    labels.write_text(json.dumps(items))
    assert find_catalogue(labels, index) is None
    assert ensure_catalogue(labels, index).caption(0) == "a new caption" != first.caption(0)

    os.utime(index, ns=(time.time_ns(), time.time_ns() + 10**9))  # the same bytes, touched: rebuilt all the same
    assert find_catalogue(labels, index) is None
    lines = index.read_text().splitlines()
    index.write_text("\n".join(line for line in lines if not line.startswith(items[0]["video_id"] + "\t")) + "\n")
    rebuilt = ensure_catalogue(labels, index)
    assert rebuilt.location(0)[0] == -1 and rebuilt.info.n_missing == 2


def test_a_damaged_catalogue_is_never_used(store, tmp_path):  # noqa: F811
    labels, index = original_layout(store, tmp_path / "s")
    path = ensure_catalogue(labels, index).path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # cut short: no footer, no trailer
    with pytest.raises(CatalogueError):
        Catalogue(path)
    assert find_catalogue(labels, index) is None
    assert len(ensure_catalogue(labels, index)) == N_VIDEOS + 2


BUILD = """
import sys
sys.path.insert(0, {repo!r})
from dataloaders.catalogue import ensure_catalogue
ensure_catalogue({labels!r}, {index!r})
"""


def big_labels(folder: Path, n: int, caption_words: int = 12) -> tuple[Path, Path]:
    """n labels (WebVid-like ids and captions) and an index listing all but every 1000th of them."""
    folder.mkdir(parents=True, exist_ok=True)
    caption = " ".join(["word"] * caption_words)
    with open(folder / "frozen_train_labels.json", "w") as handle:
        handle.write("[\n" + ",\n".join(json.dumps({"video_id": f"{10**9 + i}", "caption": f"{caption} {i}"})
                                        for i in range(n)) + "\n]\n")
    with open(folder / "path.index", "w") as handle:
        handle.writelines(f"{10**9 + i}\tpath-{i // 5000:05d}.tfrecord\t{(i % 5000) * 1000}\n"
                          for i in range(n) if i % 1000)
    return folder / "frozen_train_labels.json", folder / "path.index"


@pytest.mark.integration
def test_a_build_killed_midway_leaves_nothing_that_is_used(tmp_path):
    labels, index = big_labels(tmp_path, 200_000)
    process = subprocess.Popen([sys.executable, "-c", BUILD.format(repo=str(REPO), labels=str(labels),
                                                                   index=str(index))])
    target = beside_path(str(labels))
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(f".{target.name}.*.tmp")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not target.exists(), "killed while its temp files were being written"
    assert find_catalogue(labels, index) is None
    catalogue = ensure_catalogue(labels, index)
    assert len(catalogue) == 200_000 and catalogue.info.n_missing == 200
    assert not list(tmp_path.glob(".*.tmp"))


def make_unwritable(folder: Path) -> None:
    """No file can be created in `folder`: its mode for a user, its immutable flag for root (who ignores modes)."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return
    subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)


def make_writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True, capture_output=True)
    os.chmod(folder, 0o755)


def test_a_store_that_cannot_be_written_gets_its_catalogue_in_the_cache_folder(store, tmp_path):  # noqa: F811
    labels, index = original_layout(store, tmp_path / "store")
    cache = tmp_path / "cache"
    before = sorted(labels.parent.iterdir())
    make_unwritable(labels.parent)
    try:
        with pytest.raises(OSError):
            (labels.parent / "probe").write_text("")
        dataset = WebVidDataset(labels, index, max_frames=4, image_size=32, catalogue_cache=cache)
    finally:
        make_writable(labels.parent)
    assert dataset.catalogue.path == cache_path(str(labels), str(index), cache) and dataset.catalogue.path.is_file()
    assert sorted(labels.parent.iterdir()) == before
    assert len(dataset) == N_VIDEOS + 2 and dataset[0]["video_id"] == dataset.video_id(0)
    found = find_catalogue(labels, index, cache)
    assert found is not None and found.path == dataset.catalogue.path


# ----------------------------------------------------------------------------------------------- memory caps

CAPPED = """
import re, resource, sys
sys.path.insert(0, {repo!r})
import json
import dataloaders.catalogue, conversion.convert, frozen_tfrecord
import pyarrow
pyarrow.table({{"warm": [1]}})

def data_bytes():
    return int(re.search(r"VmData:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

limit = data_bytes() + {margin}
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
{body}
"""
N_LABELS, LABELS_MARGIN = 600_000, 240 << 20  # json.load of those labels needs about 390 MB more than the imports


def run_capped(body: str, margin: int) -> subprocess.CompletedProcess:
    """`body` in a fresh interpreter whose data segment (heap and private anonymous maps, not mapped files: the
    catalogue is read by mapping it) may grow by `margin` over what the imports took. pyarrow's system allocator,
    so that its own pool reserves no arena up front, and 2 MB thread stacks, so that the threads pyarrow's pools
    start (each stack a private map) do not count as data."""
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2"}
    return subprocess.run([sys.executable, "-c", CAPPED.format(repo=str(REPO), margin=margin, body=body)],
                          capture_output=True, text=True, env=env, timeout=300, preexec_fn=small_thread_stacks)


def small_thread_stacks() -> None:
    resource.setrlimit(resource.RLIMIT_STACK, (2 << 20, resource.getrlimit(resource.RLIMIT_STACK)[1]))


@pytest.mark.integration
def test_labels_far_larger_than_the_memory_cap_are_derived_where_json_load_fails(tmp_path):
    labels, index = big_labels(tmp_path, N_LABELS)
    whole = run_capped(f"json.load(open({str(labels)!r}))", LABELS_MARGIN)
    assert whole.returncode != 0 and "MemoryError" in whole.stderr, whole.stderr[-2000:]
    derived = run_capped(f"c = dataloaders.catalogue.ensure_catalogue({str(labels)!r}, {str(index)!r})\n"
                         f"print(len(c), c.info.n_missing, c.caption({N_LABELS - 1}))", LABELS_MARGIN)
    assert derived.returncode == 0, derived.stderr[-3000:]
    assert derived.stdout.split()[:2] == [str(N_LABELS), str(N_LABELS // 1000)]
    assert derived.stdout.split()[-1] == str(N_LABELS - 1)
    catalogue = Catalogue(beside_path(str(labels)))
    ids = [catalogue.video_id(row) for row in (0, 999, 1000, N_LABELS - 1)]
    assert ids == ["1000000000", "1000000999", "1000001000", str(10**9 + N_LABELS - 1)]
    assert [catalogue.location(row)[:2] for row in (0, 999, 1000, 5001)] == [(-1, 0), (0, 999_000), (-1, 0),
                                                                            (1, 1000)]
    assert catalogue.shards[:2] == ["path-00000.tfrecord", "path-00001.tfrecord"]


MERGE_MARGIN = 48 << 20  # holding the 60 sidecars' states at once needs about 3 times that


def synthetic_parts(root: Path, n_shards: int, per_shard: int) -> list[Path]:
    """Two parts of a webdataset conversion, as their sidecars and part manifests say (the shard files sparse,
    of the recorded size): ids repeated across shards and within one, and failures, as a merge meets them."""
    options = EncodeOptions().recorded()
    folders = [root / "part0", root / "part1"]
    keys = []
    for number in range(n_shards):
        folder = folders[number % 2]
        layout = OutputLayout(folder, "path")
        folder.mkdir(parents=True, exist_ok=True)
        ids = [f"{number:04d}-{i:06d}-clip" for i in range(per_shard)]
        if number % 7 == 3:  # ids stored by an earlier shard too
            ids[:25] = [f"{number - 3:04d}-{i:06d}-clip" for i in range(25)]
        if number == 5:
            ids[-1] = ids[-2]  # and one repeated within its shard
        records = [(clip_id, i * 1000) for i, clip_id in enumerate(ids)]
        labels = [{"video_id": clip_id, "caption": f"caption of {clip_id} ü"} for clip_id in ids[::1 + number % 2]]
        failures = [["undecodable", f"{number}-bad", f"in-{number}.tar:{number}-bad", "no video stream"]]
        size = per_shard * 1000
        with open(layout.shard(number), "wb") as handle:
            handle.truncate(size)
        state = ShardState(layout.shard(number).name, ids, options, size, records, labels, failures, "",
                           f"in-{number}.tar")
        layout.sidecar(number).write_text(json.dumps(state.__dict__))
        keys.append([number, f"in-{number}.tar"])
    for part, folder in enumerate(folders):
        write_part_manifest(OutputLayout(folder, "path"), PartManifest(
            2, part, keys, options, [["missing_video", "x", "list.csv", "not found"]], True,
            "frozen_train_labels.json"))
    return folders


def todays_merge(folders: list[Path], n_shards: int, out: Path) -> dict[str, bytes]:
    """index, labels and failures.tsv as the merge wrote them before it streamed: every state in memory, a set of
    every id."""
    index, labels, failures, seen = [], [], ["missing_video\tx\tlist.csv\tnot found\n"], set()
    for number in range(n_shards):
        folder = folders[number % 2]
        state = json.loads(OutputLayout(folder, "path").sidecar(number).read_text())
        shard_path = os.path.relpath(folder / state["file_name"], out)
        captions = {label["video_id"]: label["caption"] for label in state["labels"]}
        failures += ["\t".join(f) + "\n" for f in state["failures"]]
        for clip_id, offset in state["records"]:
            if clip_id in seen:
                failures.append(f"duplicate_id\t{clip_id}\t{state['input']}:{clip_id}\tid stored before by an "
                                f"earlier shard; the first kept\n")
                continue
            seen.add(clip_id)
            index.append(f"{clip_id}\t{shard_path}\t{offset}\n")
            if clip_id in captions:
                labels.append(json.dumps({"video_id": clip_id, "caption": captions[clip_id]}, ensure_ascii=False))
    labels_text = "[\n" + ",\n".join(labels) + "\n]\n"
    return {"path.index": "".join(index).encode(), "frozen_train_labels.json": labels_text.encode(),
            "failures.tsv": (FAILURES_HEADER + "".join(failures)).encode()}


@pytest.mark.integration
def test_merge_streams_under_a_memory_cap_where_holding_every_state_fails(tmp_path):
    n_shards, per_shard = 60, 5000
    folders = synthetic_parts(tmp_path, n_shards, per_shard)
    out = tmp_path / "merged"
    sidecars = [str(OutputLayout(folders[n % 2], "path").sidecar(n)) for n in range(n_shards)]
    held = run_capped(f"states = [json.loads(open(p).read()) for p in {sidecars!r}]", MERGE_MARGIN)
    assert held.returncode != 0 and "MemoryError" in held.stderr, held.stderr[-2000:]
    merged = run_capped(f"frozen_tfrecord.main(['--merge', {str(folders[0])!r}, {str(folders[1])!r}, "
                        f"'--output_dir', {str(out)!r}, '--no_progress'])", MERGE_MARGIN)
    assert merged.returncode == 0, merged.stderr[-3000:]
    expected = todays_merge(folders, n_shards, out)
    for name, data in expected.items():
        assert (out / name).read_bytes() == data, name
    catalogue = Catalogue(beside_path(str(out / "frozen_train_labels.json")))
    labels = json.loads(expected["frozen_train_labels.json"])
    assert len(catalogue) == len(labels) > 150_000
    rows = np.random.default_rng(0).choice(len(labels), 50, replace=False)
    assert [(catalogue.video_id(r), catalogue.caption(r)) for r in rows] == \
        [(labels[r]["video_id"], labels[r]["caption"]) for r in rows]
    index_lines = {line.split("\t")[0]: line.split("\t") for line in expected["path.index"].decode().splitlines()}
    for row in rows:
        shard, offset, length = catalogue.location(row)
        recorded = index_lines[catalogue.video_id(row)]
        assert (catalogue.shards[shard], offset, length) == (recorded[1], int(recorded[2]), 1000)


def test_the_other_ranks_of_a_node_wait_for_its_first_rank_to_build_it(store, tmp_path, monkeypatch):  # noqa: F811
    from engine.data import node_catalogue

    labels, index = original_layout(store, tmp_path / "s")
    monkeypatch.setenv("LOCAL_RANK", "1")
    found = {}
    waiter = threading.Thread(target=lambda: found.update(catalogue=node_catalogue(str(labels), str(index), None)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not beside_path(str(labels)).exists()  # waiting, building nothing
    built = ensure_catalogue(labels, index)  # what LOCAL_RANK 0 does
    waiter.join(timeout=60)
    assert not waiter.is_alive() and found["catalogue"].path == built.path


def test_the_catalogue_command(store, tmp_path, capsys):  # noqa: F811
    import frozen_tfrecord as ft

    labels, _ = original_layout(store, tmp_path / "s")
    assert ft.main(["--catalogue", str(labels.parent)]) == 0
    assert capsys.readouterr().out.startswith(f"built: {beside_path(str(labels))}: {N_VIDEOS + 2} labels, 5 shard path(s) in the index,"
                                              f" 1 without a record in the index, 1 repeated index line(s)")
    assert ft.main(["--catalogue", str(labels.parent)]) == 0
    assert capsys.readouterr().out.startswith("up to date: ")
    assert ft.main(["--catalogue", str(tmp_path / "nothing")]) == 2
    assert "--catalogue" in capsys.readouterr().err


def test_the_index_reads_the_same_by_columns_and_by_lines(tmp_path):
    from dataloaders.clip_store import _read_index_arrow, _read_index_lines, read_index_columns

    plain = tmp_path / "plain.index"
    plain.write_text("a\tp-0.tfrecord\t0\r\nb\tp-0.tfrecord\t120\n\nc\t/abs/p-1.tfrecord\t7\na\tp-1.tfrecord\t9\n")
    odd = tmp_path / "odd.index"  # a padded id, an extra field, a line of spaces: only the line reader takes it
    odd.write_text(" a \tp-0.tfrecord\t0\textra\nb\tp-0.tfrecord\t120\n   \nc\t/abs/p-1.tfrecord\t7\na\tp-1.tfrecord\t9\n")
    expected = (["a", "b", "c", "a"], [0, 0, 1, 2], [0, 120, 7, 9], ["p-0.tfrecord", "/abs/p-1.tfrecord",
                                                                       "p-1.tfrecord"])
    for columns in (_read_index_arrow(str(plain)), _read_index_lines(str(plain)), read_index_columns(str(odd))):
        assert (columns.video_ids.to_pylist(), columns.shards.tolist(), columns.offsets.tolist(),
                columns.recorded_shards) == expected
    bad = tmp_path / "bad.index"
    bad.write_text("a\tp-0.tfrecord\t0\nb\tp-0.tfrecord\t-3\n")
    with pytest.raises(ValueError, match=r"bad\.index, line 2: expected 'id<TAB>shard<TAB>offset'"):
        read_index_columns(str(bad))
