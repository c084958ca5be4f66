"""Evaluation speed: encoding clips and texts, and the fusion rerank of an MSR-VTT 1k-A-sized split.

    python bench/bench_eval.py                 # GPU, ViT-B/16 sizes: 64 clips x 12 frames per batch, 1000 x 1000
    python bench/bench_eval.py --tiny          # CPU smoke run in seconds (tiny model, 40 x 40)

Random weights. Encoding = `encode_video` + `encode_text` under autocast, no gradient (what `encode_split` does
per batch). The rerank is `engine.evaluation.retrieval.rerank_both_directions` on random encoder outputs of the split's
size: every text's top-K videos and every video's top-K texts re-scored by the fusion match head (docs/method.md §7a),
`--rerank_batch_size` pairs per call, as the retrieval evaluation runs it. Times: synchronised, warm-up
excluded, median of repeats.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_step import TINY, make_batch, median_seconds, resolve_counts  # noqa: E402
from engine.evaluation.retrieval import rerank_both_directions  # noqa: E402
from engine.precision import autocast_context  # noqa: E402
from modules.clip import CLIPConfig, compile_blocks  # noqa: E402
from modules.model import T2VLP, T2VLPConfig  # noqa: E402


@torch.no_grad()
def random_split(model: T2VLP, inputs: dict, n: int) -> dict:
    """Encoder outputs of an n-video, n-caption split, random but shaped like the model's own (one clip and one
    caption encoded to learn the shapes), as encode_split keeps them for the rerank."""
    frames, tubes = model.encode_video(inputs["video"][:1], inputs["video_mask"][:1])
    _, tokens = model.encode_text(inputs["input_ids"][:1], inputs["attention_mask"][:1])
    generator = torch.Generator().manual_seed(0)

    def like(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(n, *tensor.shape[1:], generator=generator).to(tensor.device)

    return {"frames": like(frames), "video_mask": inputs["video_mask"][:1].expand(n, -1), "tubes": like(tubes),
            "text_tokens": like(tokens), "attention_mask": inputs["attention_mask"][:1].expand(n, -1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, not speed")
    parser.add_argument("--batch", type=int, help="clips per encoding batch (default 64; --tiny: 4)")
    parser.add_argument("--split", type=int, help="videos = captions of the reranked split (default 1000; --tiny 40)")
    parser.add_argument("--frames", type=int, help="frames per clip (default 12; --tiny: 3)")
    parser.add_argument("--words", type=int, help="text tokens per caption (default 32)")
    parser.add_argument("--top_k", type=int, help="candidates reranked per query (default 32)")
    parser.add_argument("--rerank_batch_size", type=int, help="pairs per match-head call (default 2048)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="compile the transformer blocks first")
    parser.add_argument("--repeats", type=int, help="timed repeats, the median reported (default 3)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    resolve_counts(parser, args, {"batch": (4, 64, 1), "split": (40, 1000, 1), "frames": (3, 12, 1),
                                  "words": (32, 32, 3), "top_k": (32, 32, 1), "rerank_batch_size": (2048, 2048, 1),
                                  "repeats": (3, 3, 1)})
    batch, split, frames = args.batch, args.split, args.frames
    clip = TINY if args.tiny else CLIPConfig()
    torch.manual_seed(0)
    model = T2VLP(clip, T2VLPConfig(with_fusion=True, fusion_layers=min(6, clip.transformer_layers))).to(device)
    model.eval()
    if args.compile:
        compile_blocks(model)
    inputs = make_batch(batch, frames, args.words, clip.image_resolution, device)

    @torch.no_grad()
    def encode() -> None:
        with autocast_context(device, precision):
            model.encode_video(inputs["video"], inputs["video_mask"])
            model.encode_text(inputs["input_ids"], inputs["attention_mask"])

    encode_seconds = median_seconds(encode, device, steps=1 if args.tiny else 10, warmup=1 if args.tiny else 3,
                                    repeats=args.repeats)
    encoded = random_split(model, inputs, split)
    sim = torch.randn(split, split, generator=torch.Generator().manual_seed(1))

    def rerank() -> None:
        rerank_both_directions(model, encoded, sim, sim.T, args.top_k, args.rerank_batch_size, precision)

    rerank_seconds = median_seconds(rerank, device, steps=1, warmup=1, repeats=args.repeats)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {precision}{' + compile' if args.compile else ''}, "
          f"{'tiny model' if args.tiny else 'ViT-B/16 sizes'}")
    print(f"encoding: {batch / encode_seconds:.4g} clips/s ({batch} clips x {frames} frames + {batch} texts per "
          f"batch, {encode_seconds * 1e3:.4g} ms)")
    pairs = 2 * split * min(args.top_k, split)
    print(f"rerank: {rerank_seconds:.4g} s for {split} texts x top-{args.top_k} videos and {split} videos x "
          f"top-{args.top_k} texts ({pairs} pairs, {pairs / rerank_seconds:.4g} pairs/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
