"""The embedded demo: synthetic videos in the real datasets' layouts plus a tiny random CLIP checkpoint.

    python -m engine.demo prepare --out demo_data     # idempotent; what start_clip.sh runs without DATA_PATH
    python -m engine.demo summary --output_dir RUN    # the last retrieval result next to chance level

`prepare` writes the MSR-VTT-layout dataset (dataloaders/demo_data.py), converts its training split into WebVid
TFRecords with frozen_tfrecord.py (as real pre-training data is stored), and writes a randomly initialised
CLIP in OpenAI's state-dict format, so the demo goes through the same loading path as real weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dataloaders.demo_data import make_demo_dataset
from modules.checkpoint import write_random_clip_checkpoint
from modules.clip import CLIPConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO_CLIP = CLIPConfig(
    embed_dim=64,
    image_resolution=32,
    vision_layers=4,
    vision_width=128,
    vision_patch_size=8,
    context_length=77,
    vocab_size=49408,
    transformer_width=128,
    transformer_layers=3,
)
CHECKPOINT_NAME = "ViT-demo.pt"
TFRECORD_DIR = "WebVid_TFRecord"


def prepare(out_dir: Path) -> dict[str, Path]:
    """Create (or reuse) the demo data, its WebVid TFRecords and the tiny CLIP checkpoint."""
    paths = make_demo_dataset(out_dir)
    checkpoint = out_dir / CHECKPOINT_NAME
    if not checkpoint.is_file():
        write_random_clip_checkpoint(checkpoint, DEMO_CLIP, seed=0)
    tfrecords = out_dir / TFRECORD_DIR
    if not (tfrecords / "frozen_train_labels.json").is_file():
        command = [
            sys.executable, str(ROOT / "frozen_tfrecord.py"), "--video_dir", str(paths["webvid_videos_dir"]),
            "--csv", str(paths["webvid_csv"]), "--output_dir", str(tfrecords), "--workers", "0",
        ]
        subprocess.run(command, check=True, cwd=ROOT)
    return {**paths, "checkpoint": checkpoint, "tfrecord_dir": tfrecords,
            "webvid_labels": tfrecords / "frozen_train_labels.json"}


def summary(output_dir: Path) -> str:
    """One paragraph on the last evaluation of a demo run."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    t2v, chance = last["t2v"]["R1"], last["chance"]["R1"]
    return (
        f"demo finished: text->video R@1 {t2v:.1f}% on {last['n_texts']} held-out videos "
        f"(chance {chance:.1f}%, {t2v / chance:.1f}x chance); video->text R@1 {last['v2t']['R1']:.1f}%.\n"
        f"log: {output_dir / 'log.txt'}, metrics: {output_dir / 'metrics.jsonl'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="create the demo data and checkpoint")
    prepare_parser.add_argument("--out", type=Path, default=Path("demo_data"))
    summary_parser = commands.add_parser("summary", help="print the last retrieval result of a run")
    summary_parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        for name, path in prepare(args.out).items():
            print(f"{name}: {path}")
    else:
        print(summary(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
