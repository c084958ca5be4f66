"""The embedded demo: synthetic videos in the real datasets' layouts plus a tiny random CLIP checkpoint.

    python -m tools.demo prepare --out demo_data     # idempotent; what start_clip.sh runs without DATA_PATH
    python -m tools.demo summary --output_dir RUN    # the last evaluation next to chance level
    python -m tools.demo latest --stage 1            # the newest demo checkpoint of a stage

`prepare` writes the MSR-VTT-layout dataset (dataloaders/demo_data.py), packs its WebVid-style pre-training set
into webdataset tar shards as video2dataset writes them (<key>.mp4, .txt, .json; 1000 samples per shard), converts
those shards into the TFRecord store with frozen_tfrecord.py (as real pre-training data is stored), and writes a
randomly initialised CLIP in OpenAI's state-dict format, so the demo goes through the same loading path as real
weights.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

from dataloaders.demo_data import DEMO_WEBVID_ONLY, MARKER_NAME, make_demo_dataset
from modules.checkpoint import (
    CheckpointError,
    read_clip_state_dict,
    read_model_state_dict,
    write_random_clip_checkpoint,
)
from modules.clip import CLIPConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO_CLIP = CLIPConfig(
    embed_dim=128,
    image_resolution=32,
    vision_layers=4,
    vision_width=128,
    vision_patch_size=8,
    context_length=77,
    vocab_size=49408,
    # = embed_dim, which the fusion encoder (stage 2 on) needs. At 64 the stage-2 demo's matching head stayed at
    # chance against hard negatives (four heads at 64 did not help); at 128 it learns them (docs/demo.md).
    transformer_width=128,
    transformer_layers=3,
)
CHECKPOINT_NAME = "ViT-demo.pt"
TFRECORD_DIR = "WebVid_TFRecord"
TFRECORD_SOURCE = ".converted_from.json"  # the demo data marker the TFRecords were converted from
WEBDATASET_DIR = "webdataset"  # beside the WebVid-style csv and videos
SAMPLES_PER_SHARD = 1000


def prepare(out_dir: Path) -> dict[str, Path]:
    """Create (or reuse) the demo data, its WebVid TFRecords and the tiny CLIP checkpoint."""
    paths = make_demo_dataset(out_dir, n_webvid_only=DEMO_WEBVID_ONLY)
    checkpoint = out_dir / CHECKPOINT_NAME
    if not checkpoint.is_file() or CLIPConfig.from_state_dict(read_clip_state_dict(checkpoint)) != DEMO_CLIP:
        write_random_clip_checkpoint(checkpoint, DEMO_CLIP, seed=0)  # new, or left by an older demo
    tfrecords = out_dir / TFRECORD_DIR
    shards = paths["webvid_dir"] / WEBDATASET_DIR
    source = json.dumps({"demo_data": json.loads((out_dir / MARKER_NAME).read_text()), "from": "webdataset"})
    stamp = tfrecords / TFRECORD_SOURCE
    if not stamp.is_file() or stamp.read_text() != source:  # none yet, or converted from an older demo dataset
        shutil.rmtree(tfrecords, ignore_errors=True)
        pattern = write_webdataset_shards(paths["webvid_csv"], paths["webvid_videos_dir"], shards)
        command = [
            sys.executable, str(ROOT / "frozen_tfrecord.py"), "--webdataset", pattern, "--id_field", "videoid",
            "--output_dir", str(tfrecords), "--workers", "0",
        ]
        subprocess.run(command, check=True, cwd=ROOT)
        stamp.write_text(source)
    return {**paths, "checkpoint": checkpoint, "tfrecord_dir": tfrecords, "webdataset_shards": shards,
            "webvid_labels": tfrecords / "frozen_train_labels.json"}


def write_webdataset_shards(csv_path: Path, videos_dir: Path, out: Path, per_shard: int = SAMPLES_PER_SHARD) -> str:
    """The WebVid-style csv's videos as video2dataset would download them into webdataset shards: per sample
    `<key>.mp4`, `<key>.txt` (the caption) and `<key>.json` (url, caption, key, status, error_message and the
    csv's videoid), keys of 5 shard + 4 sample digits, in csv order. Returns the shards' brace pattern."""
    import webdataset

    from conversion.sources import find_videos

    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    videos = find_videos(videos_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n_shards = max(1, -(-len(rows) // per_shard))
    for shard in range(n_shards):
        with webdataset.TarWriter(str(out / f"{shard:05d}.tar")) as writer:
            for index, row in enumerate(rows[shard * per_shard:(shard + 1) * per_shard]):
                key = f"{shard:05d}{index:04d}"
                meta = {"url": row["contentUrl"], "caption": row["name"], "key": key, "status": "success",
                        "error_message": None, "videoid": row["videoid"]}
                writer.write({"__key__": key, "mp4": Path(videos[row["videoid"]]).read_bytes(), "txt": row["name"],
                              "json": json.dumps(meta).encode()})
    return str(out / f"{{00000..{n_shards - 1:05d}}}.tar")


def summary(output_dir: Path) -> str:
    """A few lines on the last evaluation of a demo run: each retrieval scoring and the fusion heads, or the
    captioning scores before and after training with a few test captions beside their references."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "report" not in r]  # a retrieval run's closing copies of its rows
    if records[-1]["task"] == "caption":
        return caption_summary(output_dir, records)
    if records[-1]["task"] == "qa":
        return qa_summary(output_dir, records)
    last_step = records[-1]["step"]
    lines = []
    shown = [r for r in records if r["step"] == 0] if last_step else []
    shown += [r for r in records if r["step"] == last_step]
    for record in shown:
        when = "before training: " if record["step"] == 0 and last_step else ""
        if record["task"] == "retrieval":
            t2v, chance = record["t2v"]["R1"], record["chance"]["R1"]
            v2t = f"; video->text R@1 {record['v2t']['R1']:.1f}%" if record["v2t"] else ""  # QB-Norm: text->video only
            lines.append(
                f"{when}retrieval ({record['scoring']}{' on ' + record['base'] if record.get('base') else ''}): "
                f"text->video R@1 {t2v:.1f}% on {record['n_texts']} held-out videos (chance {chance:.1f}%, "
                f"{t2v / chance:.1f}x chance){v2t}"
            )
        elif record["task"] == "fusion":
            lines.append(
                f"{when}fusion heads: MLM accuracy {record['mlm_acc']:.1f}% (chance {record['chance']['mlm_acc']:.3f}%), "
                f"VTM balanced accuracy {record['vtm_acc']:.1f}% (chance {record['chance']['vtm_acc']:.0f}%), "
                f"matching pair above its hard negatives {record.get('vtm_pairwise_acc', float('nan')):.1f}% "
                f"(chance 50%); against random negatives: VTM balanced accuracy "
                f"{record.get('vtm_random_acc', float('nan')):.1f}%, matching pair above them "
                f"{record.get('vtm_random_pairwise_acc', float('nan')):.1f}%"
            )
    lines.append(f"log: {output_dir / 'log.txt'}, metrics: {output_dir / 'metrics.jsonl'}")
    return f"demo finished (step {last_step}):\n  " + "\n  ".join(lines)


EXAMPLES_SHOWN = 8


def caption_summary(output_dir: Path, records: list[dict], examples: int = EXAMPLES_SHOWN) -> str:
    """CIDEr (and the other scores) of the starting checkpoint and of the selected one, and test captions beside
    their references (read from the run's --data_path)."""
    from dataloaders.captioning import caption_pairs

    def scores(record: dict) -> str:
        return (f"CIDEr {record['CIDEr']:.1f}, BLEU-4 {record['Bleu_4']:.1f}, METEOR {record['METEOR']:.1f}, "
                f"ROUGE-L {record['ROUGE_L']:.1f}")

    val = [r for r in records if r["split"] == "val"]
    tests = [r for r in records if r["split"] == "test"]
    lines = []
    if val and val[0]["step"] == 0:
        lines.append(f"before training (val, {val[0]['n_videos']} videos): {scores(val[0])}")
    if len(val) > 1:
        best = max(val[1:], key=lambda r: (r["CIDEr"], -r["step"]))
        lines.append(f"after training (val, best at step {best['step']}): {scores(best)}")
    if tests:
        test = tests[-1]
        lines.append(f"test split ({test['n_videos']} videos, checkpoint of step {test['step']}, {test['decode']}): "
                     f"{scores(test)}")
        predictions = json.loads((output_dir / f"predictions_test_step{test['step']}.json").read_text())
        flags = json.loads((output_dir / "run.json").read_text())[-1]["flags"]
        references: dict[str, list[str]] = {}
        for video_id, caption in caption_pairs(test["dataset"], flags["data_path"], "test"):
            references.setdefault(video_id, []).append(caption)
        named = demo_attribute_rates(predictions, references)
        if named:
            lines.append("test captions naming the video's " + ", ".join(f"{k} {v:.0f}%" for k, v in named.items()))
        lines.append("test captions (model | a reference):")
        lines += [f"  {p['video_id']}: {p['caption']!r:45} | {references[p['video_id']][0]!r}"
                  for p in predictions[:examples]]
    lines.append(f"log: {output_dir / 'log.txt'}, metrics: {output_dir / 'metrics.jsonl'}")
    return f"demo finished (captioning, {records[-1]['dataset']}):\n  " + "\n  ".join(lines)


def demo_attribute_rates(predictions: list[dict], references: dict[str, list[str]]) -> dict[str, float]:
    """For demo captions: the share of predictions that name the video's colour, shape and direction (read from its
    first reference), and all three; empty when the references are not demo captions."""
    from dataloaders.demo_data import COLOURS, DIRECTIONS, SHAPES

    def attributes(text: str) -> tuple:
        words = text.split()
        return (next((w for w in words if w in COLOURS), None), next((w for w in words if w in SHAPES), None),
                next((name for name, (_, phrase) in DIRECTIONS.items() if phrase in text), None))

    truths = {p["video_id"]: attributes(references[p["video_id"]][0]) for p in predictions}
    if not truths or any(None in truth for truth in truths.values()):
        return {}
    hits = [[got == want for got, want in zip(attributes(p["caption"]), truths[p["video_id"]])] for p in predictions]
    rates = {name: 100.0 * sum(h[i] for h in hits) / len(hits) for i, name in enumerate(("colour", "shape",
                                                                                         "direction"))}
    rates["all three"] = 100.0 * sum(all(h) for h in hits) / len(hits)
    return rates


def qa_summary(output_dir: Path, records: list[dict], examples: int = EXAMPLES_SHOWN) -> str:
    """Accuracy before training and of the best evaluation, beside the majority-answer baseline, and a few
    answered questions."""
    first, best = records[0], max(records, key=lambda r: (r["accuracy"], -r["step"]))
    lines = [f"{best['split']} split, {best['n']} questions, {best['head']} head:"]
    if first["step"] == 0:
        lines.append(f"before training: accuracy {first['accuracy']:.1f}%")
    lines.append(f"after training (best at step {best['step']}): accuracy {best['accuracy']:.1f}% "
                 f"(always answering {best['majority_answer']!r}: {best['majority_baseline']:.1f}%)")
    for kind, value in best.get("by_type", {}).items():
        lines.append(f"  {kind} questions: {value['accuracy']:.1f}% of {value['n']}")
    path = output_dir / f"predictions_{best['split']}_step{best['step']}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    lines.append("answers (question -> model | truth):")
    picks = sorted({round(i * (len(rows) - 1) / max(examples - 1, 1)) for i in range(examples)})  # spread out
    lines += [f"  {rows[i]['video_id']}: {rows[i]['question']} -> {rows[i]['prediction']} | {rows[i]['answer']}"
              for i in picks]
    lines.append(f"log: {output_dir / 'log.txt'}, metrics: {output_dir / 'metrics.jsonl'}")
    return f"demo finished (video QA, {records[-1]['dataset']}):\n  " + "\n  ".join(lines)


def latest_checkpoint(stage: int, output_root: Path = ROOT / "output") -> Path | None:
    """The newest `ckpt/pytorch_model.bin.<step>` of the demo runs of `stage` whose model fits the demo CLIP."""
    candidates = sorted(
        output_root.glob(f"demo_stage{stage}_*/ckpt/pytorch_model.bin.*"), key=lambda p: p.stat().st_mtime
    )
    for path in reversed(candidates):
        if _fits_demo_clip(path):
            return path
    return None


def _fits_demo_clip(path: Path) -> bool:
    try:
        state = read_model_state_dict(path)
    except CheckpointError:
        return False
    width = state.get("clip.ln_final.weight")
    return width is not None and width.shape[0] == DEMO_CLIP.transformer_width


def search_rate(checkpoint: Path, demo_dir: Path, work: Path, rerank: bool = False) -> str:
    """predict.py's index + query on the demo's held-out videos: how often a test caption finds its own video in
    the top 3 (the search a user runs on their own folder, checked against known answers)."""
    import csv

    import predict

    videos = work / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    with open(demo_dir / "MSRVTT" / "MSRVTT_JSFUSION_test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        link = videos / f"{row['video_id']}.mp4"
        if not link.exists():
            link.symlink_to((demo_dir / "MSRVTT" / "videos" / "all" / link.name).resolve())
    predict.main(["index", str(videos), "--init_model", str(checkpoint), "--out", str(work / "index"),
                  "--num_workers", "0"])
    import torch

    from inference.trained_model import load_trained_model
    from inference.video_index import VideoIndex, search

    trained = load_trained_model(checkpoint)
    index = VideoIndex.load(work / "index")
    found = 0
    for row in rows:
        hits = search(trained, index, row["sentence"], top_k=3, rerank=rerank, device=torch.device("cpu"),
                      precision="fp32")
        found += any(Path(hit.path).stem == row["video_id"] for hit in hits)
    return (f"predict.py search on {len(rows)} held-out demo videos ({'rerank' if rerank else 'meanP'}): a test "
            f"caption's own video is in the top 3 for {found} of {len(rows)} ({100 * found / len(rows):.0f}%; "
            f"chance {300 / len(rows):.0f}%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="create the demo data and checkpoint")
    prepare_parser.add_argument("--out", type=Path, default=Path("demo_data"))
    summary_parser = commands.add_parser("summary", help="print the last retrieval result of a run")
    summary_parser.add_argument("--output_dir", type=Path, required=True)
    latest_parser = commands.add_parser("latest", help="print the newest demo checkpoint of a stage (exit 1: none)")
    latest_parser.add_argument("--stage", type=int, choices=[1, 2], required=True)
    latest_parser.add_argument("--output_root", type=Path, default=ROOT / "output")
    search_parser = commands.add_parser("search_rate", help="predict.py index/query on the held-out demo videos")
    search_parser.add_argument("--checkpoint", type=Path, required=True)
    search_parser.add_argument("--demo_data", type=Path, default=Path("demo_data"))
    search_parser.add_argument("--work", type=Path, default=ROOT / "output" / "demo_search")
    search_parser.add_argument("--rerank", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "search_rate":
        print(search_rate(args.checkpoint, args.demo_data, args.work, args.rerank))
        return 0
    if args.command == "prepare":
        for name, path in prepare(args.out).items():
            print(f"{name}: {path}")
    elif args.command == "latest":
        path = latest_checkpoint(args.stage, args.output_root)
        if path is None:
            return 1
        print(path)
    else:
        print(summary(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
