"""What starting pre-training costs a rank at corpus scale: the catalogue's build once, then, in fresh processes,
the time to open the stage-1 dataset and its sampler and read the first batch, and each rank's private memory (USS,
from /proc/<pid>/smaps_rollup), with 1 rank and with 8 ranks started together, beside an earlier version of the
loader on the same stores (`--baseline DIR`: a checkout of it, e.g. `git worktree add /tmp/before 75e79b0`).

    python bench/bench_catalogue.py --sizes 100000 1000000 10000000 --baseline /tmp/before

Synthetic stores in the converter's layout: `path.index` and `frozen_train_labels.json` (one object per line) with
WebVid-like ids and captions, every index entry pointing at one of 32 real records of the original's raw layout
(4 frames of 256x256 each, no clip id in them), so any sample reads a real record. Stores are kept under --work
and reused. One thread per process; the first batch is 8 samples read in the main process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECORDS = 32
BATCH = 8
WORDS = "a man walks his dog along the beach at sunset in slow motion aerial view of green hills and rivers".split()

PROBE = """
import json, os, sys, time
sys.path.insert(0, {code!r})
import torch
torch.set_num_threads(1)
from torch.utils.data import DataLoader
from dataloaders.collate import collate_clips
from dataloaders.webvid import WebVidDataset
from engine.sampler import ResumableDistributedSampler

def uss_mb():
    fields = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup").read().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024

class Words:
    def encode(self, text, max_words, drop_zero_ids=False):
        ids = [49406] + [len(w) for w in text.split()][: max_words - 2] + [49407]
        return ids + [0] * (max_words - len(ids)), [1] * len(ids) + [0] * (max_words - len(ids))

start = time.perf_counter()
dataset = WebVidDataset({labels!r}, {index!r}, max_words=32, max_frames=4, image_size=64, tokenizer=Words())
sampler = ResumableDistributedSampler(len(dataset), {world}, {rank}, seed=42, drop_last={world} > 1)
sampler.set_epoch(0)
batch = next(iter(DataLoader(dataset, batch_size={batch}, sampler=sampler, collate_fn=collate_clips)))
elapsed = time.perf_counter() - start
assert batch is not None and batch["video"].shape[0] == {batch}, "the first batch did not read"
print(json.dumps({{"seconds": elapsed, "uss_mb": uss_mb(), "samples": len(dataset)}}))
"""


def make_store(folder: Path, n: int) -> None:
    """Index and labels of `n` clips, and one shard of RECORDS raw records they all point into."""
    if (folder / "done").exists():
        return
    sys.path.insert(0, str(ROOT))
    from dataloaders.clip_store import encode_raw_clip_record
    from dataloaders.tfrecord_io import write_record

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    offsets = []
    with open(folder / "path-00000.tfrecord", "wb") as shard:
        position = 0
        for _ in range(RECORDS):
            offsets.append(position)
            position += write_record(shard, encode_raw_clip_record(rng.integers(0, 256, (4, 256, 256, 3),
                                                                                 dtype=np.uint8)))
    chunk = 100_000
    with open(folder / "path.index", "w") as index, open(folder / "frozen_train_labels.json", "w") as labels:
        labels.write("[\n")
        for start in range(0, n, chunk):
            ids = [str(1_000_000_000 + i * 7) for i in range(start, min(n, start + chunk))]
            index.writelines(f"{v}\tpath-00000.tfrecord\t{offsets[(start + k) % RECORDS]}\n"
                             for k, v in enumerate(ids))
            captions = (" ".join(WORDS[j % len(WORDS)] for j in range(i % 7, i % 7 + 8 + i % 9))
                        for i in range(start, start + len(ids)))
            labels.write(",\n".join(json.dumps({"video_id": v, "caption": c}) for v, c in zip(ids, captions)))
            labels.write(",\n" if start + chunk < n else "\n]\n")
    (folder / "done").write_text("")


BUILD = """
import re, sys, threading, time
sys.path.insert(0, {root!r})
from dataloaders.catalogue import ensure_catalogue

peak = [0]
def watch():  # private (anonymous) memory: the mapped files' pages are the page cache's, not the process's
    while True:
        status = open("/proc/self/status").read()
        peak[0] = max(peak[0], int(re.search(r"RssAnon:\\s+(\\d+)", status).group(1)))
        time.sleep(0.01)

threading.Thread(target=watch, daemon=True).start()
time.sleep(0.05)
before = peak[0]
start = time.perf_counter()
ensure_catalogue({labels!r}, {store!r})
print(time.perf_counter() - start, (peak[0] - before) / 1024)
"""


def build(folder: Path) -> dict:
    """The catalogue derived in a fresh process: seconds, and the peak of its private memory above the imports."""
    for stale in folder.glob("*.catalogue.arrow*"):
        stale.unlink()
    code = BUILD.format(root=str(ROOT), labels=str(folder / "frozen_train_labels.json"), store=str(folder))
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"seconds": float(output[-2]), "peak_mb": float(output[-1]),
            "mb": (folder / "frozen_train_labels.catalogue.arrow").stat().st_size / 2**20}


def ranks(code: Path, folder: Path, world: int) -> list[dict]:
    """`world` probes started together, rank r of `world` each; their results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    probes = [subprocess.Popen([sys.executable, "-I", "-c", PROBE.format(
        code=str(code), labels=str(folder / "frozen_train_labels.json"), index=str(folder), world=world, rank=rank,
        batch=BATCH)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in range(world)]
    results = []
    for probe in probes:
        out, err = probe.communicate()
        if probe.returncode:
            raise RuntimeError(f"a probe of {code} failed: {err[-2000:]}")
        results.append(json.loads(out.splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_catalogue"))
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier version, run on the same stores")
    parser.add_argument("--baseline_max_ranks_size", type=int, default=1_000_000,
                        help="the earlier version's 8 ranks only up to this size (it holds ~0.65 GB a million each)")
    args = parser.parse_args()
    if args.baseline and not (args.baseline / "dataloaders" / "webvid.py").is_file():
        parser.error(f"--baseline {args.baseline} is not a checkout of this project")
    rows = []
    for n in sorted(args.sizes):
        folder = args.work / f"store_{n}"
        make_store(folder, n)
        built = build(folder)
        row = {"n": n, "build_s": built["seconds"], "build_peak_mb": built["peak_mb"], "catalogue_mb": built["mb"]}
        for world in (1, 8):
            results = ranks(ROOT, folder, world)
            row[f"open_s_{world}"] = max(r["seconds"] for r in results)
            row[f"uss_mb_{world}"] = max(r["uss_mb"] for r in results)
            if args.baseline and (world == 1 or n <= args.baseline_max_ranks_size):
                for stale in folder.glob("*.catalogue.arrow"):
                    stale.unlink()  # not that the earlier version would read it
                results = ranks(args.baseline, folder, world)
                row[f"before_open_s_{world}"] = max(r["seconds"] for r in results)
                row[f"before_uss_mb_{world}"] = max(r["uss_mb"] for r in results)
                build(folder)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report(rows)


def report(rows: list[dict]) -> None:
    base = rows[0]
    print(f"\n| clips | build (s) | build: private memory, peak (MB) | catalogue (MB) | open + first batch, 1 rank (s) | "
          f"8 ranks, slowest (s) | USS 1 rank (MB) | USS of a rank of 8 (MB) | above {base['n']:,} clips, of 8 "
          f"(MB) | allowed: 8N/8 + 50 (MB) | earlier version: open 1 rank (s) | its USS 1 rank / of 8 (MB) |")
    print("|" + "---:|" * 12)
    for row in rows:
        above = row["uss_mb_8"] - base["uss_mb_8"]
        allowed = 8 * row["n"] / 8 / 2**20 + 50
        before = (f"{row['before_open_s_1']:.2f} | {row['before_uss_mb_1']:.0f} / "
                  f"{row.get('before_uss_mb_8', float('nan')):.0f}") if "before_open_s_1" in row else "- | -"
        print(f"| {row['n']:,} | {row['build_s']:.1f} | {row['build_peak_mb']:.0f} | {row['catalogue_mb']:.0f} | "
              f"{row['open_s_1']:.2f} | {row['open_s_8']:.2f} | {row['uss_mb_1']:.0f} | {row['uss_mb_8']:.0f} | "
              f"{above:.1f} | {allowed:.0f} | {before} |")


if __name__ == "__main__":
    main()
