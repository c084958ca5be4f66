"""One rank's cost of an epoch's order in the training sampler (engine/sampler.py) at corpus scale: the time to
produce the order and the rank's share, and the memory the share holds, beside a Python list of the same order (what
the sampler kept before: every epoch's permutation turned into a list and sliced).

    python bench/bench_sampler.py --samples 10000000 --world_size 8

Each measurement runs in a fresh process (peak RSS is per process), one thread.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(kind: str, samples: int, world_size: int) -> dict[str, float]:
    """Run in a child process: the order of epoch 1 for rank 0, consumed as the DataLoader would."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from engine.sampler import ResumableDistributedSampler

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    sampler = ResumableDistributedSampler(samples, world_size, 0, seed=42, drop_last=True)
    sampler.set_epoch(1)
    if kind == "list":  # the former way: the whole permutation as a list, then this rank's slice
        share = sampler.epoch_indices().tolist()[0::world_size]
    else:
        share = sampler.rank_indices()
    elapsed = time.perf_counter() - start
    total = sum(int(i) for i in share[:1000])  # touch it, as a loader would start to
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": elapsed, "peak_mb": (peak - before) / 1024, "check": total, "share": len(share)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--world_size", type=int, default=8)
    parser.add_argument("--child", choices=["list", "tensor"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.samples, args.world_size)))
        return
    results = {}
    for kind in ("list", "tensor"):
        output = subprocess.run([sys.executable, __file__, "--child", kind, "--samples", str(args.samples),
                                 "--world_size", str(args.world_size)], capture_output=True, text=True, check=True)
        results[kind] = json.loads(output.stdout)
    old, new = results["list"], results["tensor"]
    assert old["check"] == new["check"] and old["share"] == new["share"]  # the same order
    print(f"{args.samples} samples, {args.world_size} ranks, rank 0's share {new['share']}")
    print(f"list of the order (before): {old['seconds']:.2f} s, {old['peak_mb']:.0f} MB peak")
    print(f"tensor share (now):         {new['seconds']:.2f} s, {new['peak_mb']:.0f} MB peak")
    print(f"ratio: {old['seconds'] / new['seconds']:.1f}x faster, {old['peak_mb'] / max(new['peak_mb'], 1):.1f}x less "
          f"memory")


if __name__ == "__main__":
    main()
