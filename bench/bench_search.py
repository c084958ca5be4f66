"""Exact text-to-video search cost (predict.py query) over a synthetic index: N unit clip features of size D,
stored as .npy and read memory-mapped in chunks, as `inference.video_index.top_rows` does for every query.

    python bench/bench_search.py --rows 1000000 --dim 512 --queries 5 [--device cuda]

Prints the index size on disk, the first (cold) and the mean (warm, page cache) query time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inference.video_index import top_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip_features.npy"
        features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.rows, args.dim))
        generator = np.random.default_rng(0)
        for start in range(0, args.rows, 100_000):
            block = generator.standard_normal((min(100_000, args.rows - start), args.dim), dtype=np.float32)
            features[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        features.flush()
        del features
        mapped = np.load(path, mmap_mode="r")
        times = []
        for _ in range(args.queries):
            query = torch.nn.functional.normalize(torch.randn(args.dim), dim=0).to(device)
            start = time.perf_counter()
            top_rows(mapped, query, args.top_k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        size = path.stat().st_size / 2**30
    print(f"{args.rows} clips x {args.dim} dims ({size:.2f} GiB of clip features), device {device}, "
          f"threads {torch.get_num_threads()}: first query {times[0]:.3f} s, mean of the rest "
          f"{np.mean(times[1:]) if len(times) > 1 else times[0]:.3f} s per query")


if __name__ == "__main__":
    main()
