"""Put a trained T2VLP model to work on your own videos: search a folder by text, caption a video, ask about it.

    python predict.py index VIDEO_DIR --init_model CKPT --out INDEX      # encode the folder (incremental)
    python predict.py query INDEX "a dog catches a frisbee" [--top_k 10] [--rerank] [--json] [--html page.html]
    python predict.py caption VIDEO [VIDEO ...] --init_model CKPT [--beam_size 5]
    python predict.py answer VIDEO "what is the man holding?" --init_model CKPT [--ans2label train_ans2label.json]

A checkpoint is enough (ours or the original's): sizes come from it, and the settings it was trained with (fusion
blocks, frames, text length, ...) from the run.json beside it when there is one, else the original recipe's;
flags override them. `--visual_pretrain_path` is only needed for a checkpoint without CLIP weights. Runs on the GPU
when there is one. Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dataloaders.files import printable
from dataloaders.video import ClipSampling, load_video_clip, normalize_video
from dataloaders.video_decoding import VideoDecodeError
from engine.precision import autocast_context, resolve_precision
from inference.results_page import write_results_page
from inference.trained_model import TrainedModel, load_trained_model
from inference.video_index import (
    INDEX_SETTINGS,
    VideoIndex,
    same_checkpoint,
    sampling_settings,
    search,
    update_index,
)
from modules.errors import InputError

DEVICE_FORMS = "cpu, cuda, cuda:N"


def _device(name: str | None) -> torch.device:
    """--device as a torch device: one line (exit 2) for a name that is none, or a GPU this machine lacks."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name} is not a device: use one of {DEVICE_FORMS}") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name} is not supported: use one of {DEVICE_FORMS}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _precision(device: torch.device) -> str:
    return resolve_precision("auto", device)  # what training runs in by default


def _model_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--init_model", required=required, help="the checkpoint (ours or the original's)")
    parser.add_argument("--visual_pretrain_path", help="CLIP .pt, only for a checkpoint without CLIP weights")
    parser.add_argument("--clip_model", help="open_clip architecture of the backbone (default: what the checkpoint "
                                             "records, else OpenAI's layout with QuickGELU)")
    parser.add_argument("--fusion_layers", type=int, help="fusion blocks executed (default: run.json, else 6)")
    parser.add_argument("--match_norm", choices=["group", "pair"], help="default: run.json, else group")
    parser.add_argument("--max_frames", type=int, help="frames per clip (default: run.json, else 12)")
    parser.add_argument("--feature_framerate", type=int, help="frames sampled per second (default: run.json, else 1)")
    parser.add_argument("--slice_framepos", type=int, choices=[0, 1, 2], help="default: run.json, else 2")
    parser.add_argument("--max_words", type=int, help="text tokens (default: run.json, else 32)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")


def _load(args: argparse.Namespace, checkpoint: str | None = None) -> TrainedModel:
    overrides = {name: getattr(args, name, None) for name in
                 ("fusion_layers", "match_norm", "max_frames", "feature_framerate", "slice_framepos", "max_words")}
    return load_trained_model(checkpoint or args.init_model, clip_path=args.visual_pretrain_path,
                              clip_model=args.clip_model, overrides=overrides, device=_device(args.device))


def _clip(trained: TrainedModel, path: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One video as the evaluation loaders give it: normalised [1, T, 3, S, S] and its mask [1, T]."""
    if not Path(path).is_file():
        raise InputError(f"video {path} does not exist")
    try:
        video, video_mask = load_video_clip(path, ClipSampling(pad_mode="repeat", **sampling_settings(trained)))
    except VideoDecodeError as error:
        raise InputError(f"cannot read video {path}: {error}") from error
    return normalize_video(video[None].to(device)), video_mask[None].to(device)


# ------------------------------------------------------------------------------------------------ subcommands


def run_index(args: argparse.Namespace) -> int:
    device = _device(args.device)
    trained = _load(args)
    update = update_index(trained, args.video_dir, args.out, batch_size=args.batch_size,
                          num_workers=args.num_workers, device=device, precision=_precision(device))
    print(f"index {args.out}: {len(update['encoded'])} encoded, {update['reused']} unchanged, "
          f"{len(update['removed'])} removed, {len(update['failed'])} unreadable")
    for failure in update["failed"]:
        print(f"  unreadable: {printable(failure['path'])}: {printable(failure['error'])}")
    return 0


def run_query(args: argparse.Namespace) -> int:
    if not args.text.strip():
        raise InputError("the query is empty: give the text to search for")
    index = VideoIndex.load(args.index)
    if not index.meta.get("videos"):
        raise InputError(f"the index {args.index} holds no video: nothing to search (index a folder of videos "
                         f"into it with `predict.py index`)")
    settings = index.meta["settings"]
    checkpoint = check_index_checkpoint(args.index, settings, args.init_model, args.allow_other_model)
    use_index_settings(args, settings)
    trained = _load(args, checkpoint)
    if args.rerank:
        trained.require_fusion("--rerank")
    device = _device(args.device)
    hits = search(trained, index, args.text, top_k=args.top_k, rerank=args.rerank, rerank_top_k=args.rerank_top_k,
                  device=device, precision=_precision(device))
    scoring = f"fusion rerank of the top {max(args.top_k, args.rerank_top_k)}" if args.rerank else "meanP similarity"
    if args.html:
        page = write_results_page(args.html, args.text, [(hit.path, hit.score) for hit in hits], scoring)
        print(f"wrote {page}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"path": hit.path, "score": round(hit.score, 6)} for hit in hits]))
    else:
        for rank, hit in enumerate(hits, start=1):
            print(f"{rank:3d}  {hit.score:9.4f}  {printable(hit.path)}")
    return 0


def use_index_settings(args: argparse.Namespace, settings: dict) -> None:
    """Query with the settings the index was built with; a flag that contradicts one is refused."""
    for name in INDEX_SETTINGS:
        if name not in settings:  # an index of an earlier version: the flag or the checkpoint decides
            continue
        given = getattr(args, name, None)
        if given is not None and given != settings[name]:
            raise InputError(f"--{name} {given} contradicts the index {args.index}, built with {name} "
                             f"{settings[name]}: omit the flag (the index's settings apply) or rebuild the index")
        setattr(args, name, settings[name])


def check_index_checkpoint(index: str, settings: dict, init_model: str | None, allow_other: bool) -> str:
    """The checkpoint to encode queries with: the one that built the index, unchanged; another one only with
    --allow_other_model (its text features would be scored against the other model's video features)."""
    built_with = Path(settings["checkpoint"])
    recorded = settings.get("checkpoint_identity")
    if init_model is not None and Path(init_model).resolve() != built_with:
        if not Path(init_model).is_file():
            raise InputError(f"checkpoint {init_model} does not exist")
        if not allow_other and not same_checkpoint(recorded, Path(init_model)):
            raise InputError(f"index {index} was built with {built_with}, not with --init_model {init_model}: "
                             f"query with the same checkpoint, index again with this one, or pass "
                             f"--allow_other_model")
        return init_model
    if not built_with.is_file():
        raise InputError(f"{built_with}, the checkpoint index {index} was built with, does not exist: pass "
                         f"--init_model")
    if recorded is not None and not allow_other and not same_checkpoint(recorded, built_with):
        raise InputError(f"{built_with} has changed since index {index} was built with it: run `predict.py index` "
                         f"again (or pass --allow_other_model)")
    return str(built_with)


@torch.no_grad()
def run_caption(args: argparse.Namespace) -> int:
    from modules.caption_decoding import decode_captions
    from modules.tokenization import ClipTokenizer

    trained = _load(args)
    trained.require_fusion("caption")
    trained.warn_unless_fine_tuned("caption", "captioning")
    device, tokenizer = _device(args.device), ClipTokenizer()
    for path in args.videos:
        video, video_mask = _clip(trained, path, device)
        with autocast_context(device, _precision(device)):
            frames, tubes = trained.model.encode_video(video, video_mask)
            decoded = decode_captions(trained.model, frames, video_mask, tubes, beam_size=args.beam_size,
                                      max_steps=trained.settings["max_words"] - 1,
                                      length_penalty=args.length_penalty)
        print(f"{printable(path)}\t{tokenizer.decode(decoded.tokens[0])}")
    return 0


@torch.no_grad()
def run_answer(args: argparse.Namespace) -> int:
    from dataloaders.video_qa import read_ans2label
    from engine.tasks.video_qa import answer_logits_of
    from modules.tokenization import ClipTokenizer

    trained = _load(args)
    trained.require_fusion("answer")
    trained.warn_unless_fine_tuned("qa", "question answering")
    model, device, tokenizer = trained.model, _device(args.device), ClipTokenizer()
    head = "classifier" if model.config.num_answers else "first_token"
    labels = None
    if head == "classifier" and trained.answers is not None and not args.ans2label:
        labels = dict(enumerate(trained.answers))  # recorded in the checkpoint
    elif head == "classifier":
        path = args.ans2label or _recorded_ans2label(trained)
        if path is None:
            raise InputError(f"{trained.checkpoint} has an answer classifier: give its --ans2label "
                             f"(train_ans2label.json)")
        ans2label = read_ans2label(path)
        if len(ans2label) != model.config.num_answers:
            raise InputError(f"{path} has {len(ans2label)} answers, the checkpoint's classifier {model.config.num_answers}")
        labels = {index: answer for answer, index in ans2label.items()}
    video, video_mask = _clip(trained, args.video, device)
    ids, mask = tokenizer.encode(args.question, trained.settings["max_words"])
    question = {"input_ids": torch.tensor([ids], device=device), "attention_mask": torch.tensor([mask], device=device)}
    with autocast_context(device, _precision(device)):
        frames, tubes = model.encode_video(video, video_mask)
        logits = answer_logits_of(model, question, head, video_mask, frames, tubes)
    probability, choice = torch.softmax(logits.float(), dim=-1)[0].max(dim=-1)
    answer = labels[int(choice)] if labels is not None else tokenizer.decode([int(choice)])
    print(f"{answer}\t{float(probability):.4f}")
    return 0


def _recorded_ans2label(trained: TrainedModel) -> str | None:
    from inference.trained_model import run_settings

    path = run_settings(trained.checkpoint).get("qa_anslabel_json")
    return path if path and Path(path).is_file() else None


# ------------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="encode a folder of videos into a searchable index")
    index.add_argument("video_dir")
    index.add_argument("--out", required=True, help="the index folder (created, or updated incrementally)")
    index.add_argument("--batch_size", type=int, default=16)
    index.add_argument("--num_workers", type=int, default=2, help="decoding processes")
    _model_flags(index)
    index.set_defaults(run=run_index)

    query = commands.add_parser("query", help="search an index by text")
    query.add_argument("index")
    query.add_argument("text")
    query.add_argument("--top_k", type=int, default=10)
    query.add_argument("--rerank", action="store_true", help="rerank with the fusion match head (stage 2 and later)")
    query.add_argument("--rerank_top_k", type=int, default=32, help="candidates reranked (at least --top_k)")
    query.add_argument("--json", action="store_true", help="print one JSON list of {path, score}")
    query.add_argument("--html", help="also write an HTML page with six frame thumbnails of each hit (each frame "
                                      "reached by a seek: a fraction of a second per hit)")
    query.add_argument("--allow_other_model", action="store_true",
                       help="encode the query with --init_model (or a changed checkpoint) although the index was "
                            "built with another: scores then compare features of two models")
    _model_flags(query, required=False)
    query.set_defaults(run=run_query)

    caption = commands.add_parser("caption", help="caption videos (a captioning checkpoint)")
    caption.add_argument("videos", nargs="+")
    caption.add_argument("--beam_size", type=int, default=1, help="1: greedy, the original's decoding")
    caption.add_argument("--length_penalty", type=float, default=1.0)
    _model_flags(caption)
    caption.set_defaults(run=run_caption)

    answer = commands.add_parser("answer", help="answer a question about a video (a QA checkpoint)")
    answer.add_argument("video")
    answer.add_argument("question")
    answer.add_argument("--ans2label", help="train_ans2label.json of a classifier checkpoint (default: from run.json)")
    _model_flags(answer)
    answer.set_defaults(run=run_answer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "top_k", 1) < 1 or getattr(args, "beam_size", 1) < 1:
        print("predict.py: error: --top_k and --beam_size must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except InputError as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
