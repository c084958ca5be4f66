"""Stage-1 training-step and encoding throughput of T2VLP at ViT-B/16 size (random weights).

    python bench/bench_stage1.py --batch 32 --steps 10                 # GPU: fp32 vs bf16 autocast
    python bench/bench_stage1.py --batch 2 --frames 4 --steps 2        # a CPU smoke run

A training step is what the trainer does: autocast forward (contrastive + alignment), backward, clip-norm,
AdamW step. Prints clips/s per precision and the ratio to fp32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.optim import apply_freeze_rule, build_optimizer  # noqa: E402
from engine.precision import autocast_context  # noqa: E402
from modules.clip import CLIPConfig  # noqa: E402
from modules.model import T2VLP  # noqa: E402


def make_batch(batch: int, frames: int, words: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 49000, (batch, words), device=device)
    ids[:, 0], ids[:, -1] = 49406, 49407
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(batch, words, dtype=torch.long, device=device),
        "video": torch.randn(batch, frames, 3, 224, 224, device=device),
        "video_mask": torch.ones(batch, frames, dtype=torch.long, device=device),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(step, device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def time_training(model, optimizer, batch, precision, device, steps, warmup) -> float:
    def step() -> None:
        with autocast_context(device, precision):
            loss = model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    return seconds_per_call(step, device, steps, warmup)


def time_encoding(model, batch, precision, device, steps, warmup) -> float:
    @torch.no_grad()
    def step() -> None:
        with autocast_context(device, precision):
            model.encode_video(batch["video"], batch["video_mask"])
            model.encode_text(batch["input_ids"], batch["attention_mask"])

    model.eval()
    return seconds_per_call(step, device, steps, warmup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="clips per step")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--words", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default=None, help="comma list; default fp32,bf16 on CUDA, fp32 on CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = (args.precisions or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    model = T2VLP(CLIPConfig()).to(device)
    apply_freeze_rule(model, 0)
    optimizer = build_optimizer(model, 1e-4, 1e-3, 1e-5, 0.2)
    batch = make_batch(args.batch, args.frames, args.words, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, batch {args.batch} clips x {args.frames} frames, 224 px")
    results = {}
    for precision in precisions:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train = time_training(model, optimizer, batch, precision, device, args.steps, args.warmup)
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        encode = time_encoding(model, batch, precision, device, args.steps, args.warmup)
        results[precision] = (args.batch / train, args.batch / encode)
        print(f"{precision:>5}: train {args.batch / train:8.1f} clips/s ({train * 1e3:7.1f} ms/step, "
              f"peak {memory:.1f} GiB)   encode {args.batch / encode:8.1f} clips/s")
    base = results[precisions[0]]
    for precision, (train, encode) in results.items():
        print(f"ratio {precision}/{precisions[0]}: train {train / base[0]:.2f}x, encode {encode / base[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
