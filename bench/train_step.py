"""Training-step throughput of stage 1 and stage 2 in several configurations side by side (random weights).

    python bench/train_step.py                                  # GPU, ViT-B/16 sizes, B = 32, 12 frames
    python bench/train_step.py --batch 32 64 --configs bf16 bf16+compile bf16+compile+ckpt
    python bench/train_step.py --tiny                           # CPU smoke run in seconds (tiny model)
    python bench/train_step.py --clip_model ViT-L-14 --batch 16   # another open_clip backbone's sizes

A step is what the trainer does: forward of the stage's objective under autocast (or fp32), backward, gradient
clipping, AdamW step. Configurations: `fp32`, `bf16` (autocast over fp32 weights), `+compile` (`--compile`:
each transformer block compiled), `+ckpt` (`--grad_checkpointing`). Prints, per stage, configuration and batch:
clips/s (median over repeats, warm-up excluded, timed with synchronisation), its ratio to the first
configuration, TFLOP per clip (counted with torch.utils.flop_counter on one fp32 step), the share of a dense
matmul peak measured in the same run (bf16 on GPU, fp32 on CPU) and the peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_stage1 import synchronize  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.precision import autocast_context  # noqa: E402
from engine.tasks.base import StepContext  # noqa: E402
from engine.tasks.clip_pretraining import contrastive_objective  # noqa: E402
from engine.tasks.fusion_pretraining import FusionLossWeights, fusion_pretraining_objective  # noqa: E402
from modules.backbones import backbone_config, describe  # noqa: E402
from modules.clip import CLIPConfig, compile_blocks, set_grad_checkpointing  # noqa: E402
from modules.errors import ModelConfigError  # noqa: E402
from modules.model import T2VLP, T2VLPConfig  # noqa: E402

TINY = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
                  context_length=77, vocab_size=49408, transformer_width=32, transformer_layers=2)
CONTEXT = StepContext(seed=0, step=0, micro=0, epoch=0)


def backbone(clip_model: str | None, tiny: bool) -> CLIPConfig:
    """The sizes and activation measured: ViT-B/16 in OpenAI's layout by default (CLIPConfig's defaults), an
    open_clip architecture by name; with `tiny` the tiny sizes with that architecture's activation."""
    named = backbone_config(clip_model) if clip_model else CLIPConfig()
    return replace(TINY, quick_gelu=named.quick_gelu, clip_model=named.clip_model) if tiny else named


def bench_model(clip: CLIPConfig, stage: str, config_name: str, device: torch.device) -> T2VLP:
    torch.manual_seed(0)
    config = T2VLPConfig() if stage == "stage1" else T2VLPConfig(with_fusion=True, detach_tube_input=True,
                                                                  fusion_layers=min(6, clip.transformer_layers))
    model = T2VLP(clip, config).to(device)
    if "+ckpt" in config_name:
        set_grad_checkpointing(model)
    if "+compile" in config_name:
        compile_blocks(model)
    return model


def check_config_name(parser: argparse.ArgumentParser, name: str) -> None:
    """A configuration is a precision (fp32, bf16, fp16) followed by any of +compile, +ckpt."""
    precision, *options = name.split("+")
    if precision not in ("fp32", "bf16", "fp16") or not set(options) <= {"compile", "ckpt"}:
        parser.error(f"unknown configuration {name!r}: a precision (fp32, bf16, fp16) followed by any of "
                     f"+compile, +ckpt")


def resolve_counts(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   counts: dict[str, tuple[int, int, int]]) -> None:
    """For each option name: (default with --tiny, default, least allowed). Fills the unset ones in `args` and
    refuses a value below its least as a one-line usage error."""
    for name, (tiny_default, default, least) in counts.items():
        value = getattr(args, name)
        if value is None:
            value = tiny_default if args.tiny else default
            setattr(args, name, value)
        for item in value if isinstance(value, list) else [value]:
            if item < least:
                parser.error(f"--{name} must be at least {least}, got {item}")


def make_batch(batch: int, frames: int, words: int, resolution: int, device: torch.device) -> dict:
    ids = torch.randint(1, 49000, (batch, words), device=device)
    ids[:, 0], ids[:, -1] = 49406, 49407
    labels = torch.full_like(ids, -100)
    labels[:, 1:3] = ids[:, 1:3]  # two masked words per caption for the MLM term
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "mlm_input_ids": ids.masked_fill(labels >= 0, 0), "mlm_labels": labels,
        "plm_start": torch.zeros(batch, dtype=torch.long, device=device),
        "video": torch.randn(batch, frames, 3, resolution, resolution, device=device),
        "video_mask": torch.ones(batch, frames, dtype=torch.long, device=device),
    }


def objective_for(stage: str):
    return contrastive_objective if stage == "stage1" else fusion_pretraining_objective(FusionLossWeights())


def make_step(model: T2VLP, stage: str, batch: dict, precision: str, device: torch.device):
    optimizer = build_optimizer(model, 1e-5, 1.0, 1e-5, 0.2)
    objective = objective_for(stage)

    def step() -> None:
        with autocast_context(device, precision):
            loss = objective(model, batch, CONTEXT)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def median_seconds(call, device: torch.device, steps: int, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            call()
        synchronize(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def step_flops(model: T2VLP, stage: str, batch: dict) -> int:
    """FLOPs of one fp32 forward + backward (no optimizer), counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        objective_for(stage)(model, batch, CONTEXT)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(device: torch.device, tiny: bool) -> float:
    """Dense matmul FLOP/s measured here: bf16 on GPU (the tensor-core peak a training step can approach), fp32 on
    CPU."""
    size = 512 if tiny else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, steps=5 if tiny else 20, warmup=2, repeats=3)
    return 2 * size**3 / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["stage1", "stage2"], choices=["stage1", "stage2"])
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (default 32; --tiny: 2)")
    parser.add_argument("--configs", nargs="+",
                        help="among fp32, bf16, bf16+compile, bf16+ckpt, bf16+compile+ckpt (any precision prefix "
                             "fp32/bf16/fp16). Default: all four of fp32, bf16, bf16+compile, bf16+compile+ckpt; "
                             "--tiny: fp32, bf16, fp32+ckpt (compiling on a CPU takes minutes, ask for it)")
    parser.add_argument("--frames", type=int, help="frames per clip (default 12; --tiny: 3)")
    parser.add_argument("--words", type=int, help="text tokens per caption (default 32)")
    parser.add_argument("--steps", type=int, help="steps per repeat (default 5; --tiny: 1)")
    parser.add_argument("--repeats", type=int, help="timed repeats, the median reported (default 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3, covers compilation; --tiny: 1)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, not speed")
    parser.add_argument("--clip_model", help="open_clip architecture whose sizes and activation to measure, e.g. "
                                             "ViT-L-14 (default: ViT-B/16 in OpenAI's layout; with --tiny: the tiny "
                                             "sizes with that activation)")
    parser.add_argument("--largest_batch", nargs="+", default=[], metavar="CONFIG",
                        help="after the table, find the largest batch one training step of these configurations "
                             "fits in (e.g. bf16+ckpt): from the batch memory at 8 and 16 predicts (GPU) or by "
                             "doubling, then bisection, up to --largest_batch_limit")
    parser.add_argument("--largest_batch_limit", type=int, help="stop searching there (default 4096; --tiny: 8)")
    parser.add_argument("--largest_batch_resolution", type=int, default=8,
                        help="stop the bisection when the largest fitting and smallest failing batch are this close "
                             "(default 8: each try near the edge is a full step of a large batch)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    try:
        clip = backbone(args.clip_model, args.tiny)
    except ModelConfigError as error:
        parser.error(str(error))
    resolve_counts(parser, args, {"batch": ([2], [32], 2), "frames": (3, 12, 1), "words": (32, 32, 3),
                                  "steps": (1, 5, 1), "repeats": (3, 3, 1), "warmup": (1, 3, 0)})
    configs = args.configs or (["fp32", "bf16", "fp32+ckpt"] if args.tiny else
                               ["fp32", "bf16", "bf16+compile", "bf16+compile+ckpt"])
    for name in configs + args.largest_batch:
        check_config_name(parser, name)
    limit = args.largest_batch_limit or (8 if args.tiny else 4096)
    if limit < 2 or args.largest_batch_resolution < 1:
        parser.error("--largest_batch_limit must be at least 2 and --largest_batch_resolution at least 1")
    batches, frames, steps, warmup = args.batch, args.frames, args.steps, args.warmup

    peak = matmul_peak(device, args.tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; dense matmul peak measured: {peak / 1e12:.3g} TFLOP/s "
          f"({'bf16' if device.type == 'cuda' else 'fp32'}); {frames} frames x {clip.image_resolution}px, "
          f"{args.words} words; {describe(clip)}")
    print(f"{'stage':7} {'config':20} {'B':>4} {'clips/s':>9} {'ratio':>6} {'TFLOP/clip':>10} {'of peak':>8} "
          f"{'peak GiB':>9}")
    for stage in args.stages:
        for batch_size in batches:
            batch = make_batch(batch_size, frames, args.words, clip.image_resolution, device)
            flops = step_flops(bench_model(clip, stage, "fp32", device), stage, batch)
            first = None
            for config_name in configs:
                model = bench_model(clip, stage, config_name, device)
                precision = config_name.split("+")[0]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    seconds = median_seconds(make_step(model, stage, batch, precision, device), device,
                                             steps, warmup, args.repeats)
                except torch.OutOfMemoryError:
                    print(f"{stage:7} {config_name:20} {batch_size:>4} {'out of memory':>9}")
                    continue
                clips_per_second = batch_size / seconds
                first = first or clips_per_second
                memory = (f"{torch.cuda.max_memory_allocated(device) / 2**30:9.1f}" if device.type == "cuda"
                          else f"{'-':>9}")
                print(f"{stage:7} {config_name:20} {batch_size:>4} {clips_per_second:9.4g} "
                      f"{clips_per_second / first:6.2f} {flops / batch_size / 1e12:10.4g} "
                      f"{flops / seconds / peak:8.3g} {memory}", flush=True)
                del model
    for stage in args.stages:
        for config_name in args.largest_batch:
            largest, failing = largest_fitting_batch(clip, stage, config_name, frames, args.words, device, limit,
                                                     args.largest_batch_resolution)
            note = (" (the search limit; raise --largest_batch_limit)" if failing is None
                    else f" ({failing} does not fit)")
            print(f"largest batch: {stage} {config_name}: {largest}{note}", flush=True)
    return 0


def largest_fitting_batch(clip: CLIPConfig, stage: str, config_name: str, frames: int, words: int,
                          device: torch.device, limit: int, resolution: int) -> tuple[int, int | None]:
    """(the largest batch <= limit whose training step runs without running out of memory, the smallest batch
    found not to: within `resolution` of it, None when the limit fits); (0, 2) if not even 2 fits. On a GPU the
    search starts from the batch that memory measured at two small batches predicts."""
    model = bench_model(clip, stage, config_name, device)
    precision = config_name.split("+")[0]

    def fits(batch_size: int) -> bool:
        try:
            batch = make_batch(batch_size, frames, words, clip.image_resolution, device)
            make_step(model, stage, batch, precision, device)()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    return largest_passing(fits, limit, guess=memory_guess(fits, device), resolution=resolution)


def memory_guess(fits: Callable[[int], bool], device: torch.device, small: tuple[int, int] = (8, 16)) -> int | None:
    """The batch that should just fit in the GPU's memory, from the peak memory of steps at two small batches
    (activations grow linearly with the batch); None on a CPU or when the small steps say nothing."""
    if device.type != "cuda":
        return None
    peaks = []
    for size in small:
        torch.cuda.reset_peak_memory_stats(device)
        if not fits(size):
            return None
        peaks.append(torch.cuda.max_memory_allocated(device))
    per_clip = (peaks[1] - peaks[0]) / (small[1] - small[0])
    if per_clip <= 0:
        return None
    fixed = peaks[0] - small[0] * per_clip
    free, _ = torch.cuda.mem_get_info(device)
    return int((free + torch.cuda.memory_reserved(device) - fixed) / per_clip)


def largest_passing(fits: Callable[[int], bool], limit: int, start: int = 2, guess: int | None = None,
                    resolution: int = 1) -> tuple[int, int | None]:
    """(good, bad): the largest n in [start, limit] with fits(n) found, and the smallest size found failing, with
    bad - good <= resolution (bad None: the limit fits), assuming fits holds up to some size and fails above it;
    (0, start) if not even `start` fits (2: the contrastive and matching losses need two pairs). Brackets the edge
    by doubling from `start`, or by steps of 10% from `guess`, then bisects."""
    good, bad = _bracket(fits, limit, start, guess)
    if good == 0 or bad is None:
        return good, bad
    while bad - good > resolution:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good, bad


def _bracket(fits: Callable[[int], bool], limit: int, start: int, guess: int | None) -> tuple[int, int | None]:
    growth = 2.0 if guess is None else 1.1
    size = min(max(guess or start, start), limit)
    if fits(size):
        good = size
        while good < limit:
            size = min(limit, max(good + 1, int(good * growth)))
            if not fits(size):
                return good, size
            good = size
        return good, None
    bad = size
    while bad > start:
        size = max(start, min(bad - 1, int(bad / growth)))
        if fits(size):
            return size, bad
        bad = size
    return 0, bad


if __name__ == "__main__":
    sys.exit(main())
