"""Video captioning (docs/method.md §7b) on MSVD and MSR-VTT: caption loss (prefix-masked fusion, tied head) + contrastive +
local alignment, and its evaluation: decode every video of a split, score with pycocoevalcap, write the
predictions, select the model by CIDEr. The entry scripts are video_captioning/{msvd,msrvtt}_captioning.py.

Training evaluates the validation split (a step-0 row, every `--eval_steps` and after each epoch) and keeps the
best CIDEr's checkpoint (`best_checkpoint.json`); at the end the test split is decoded with that checkpoint.
`--do_eval` decodes and scores `--eval_split` (default test) with `--init_model`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataloaders.captioning import caption_dataset, references_by_video
from engine.checkpointing import BestCheckpoint
from engine.data import build_checked, check_eval_videos
from engine.evaluation import EvalContext
from engine.evaluation.caption_metrics import METRIC_NAMES, require_java, shared_scorer
from engine.evaluation.retrieval import encoded_video_batches
from engine.precision import autocast_context
from engine.tasks.base import EvaluateFn, StepContext, Task, global_mean_scale, test_selected_checkpoint
from engine.tasks.fusion_pretraining import FUSION_PARAM_PATTERNS
from engine.tasks.registry import EvalSplitFlag, PreparedRun, RunContext, TaskDefinition, register_task
from modules.caption_decoding import decode_captions
from modules.errors import InputError
from modules.fusion_objectives import TextParts, VideoParts, prefix_lm_terms
from modules.similarity import symmetric_contrastive_loss

logger = logging.getLogger("t2vlp.caption")

NAME = "caption"
DATASETS = ("msvd", "msrvtt")
NEW_PARAM_PATTERNS = (*FUSION_PARAM_PATTERNS, "local_visual")  # the original's captioning list (docs/method.md §7b)

SELECTION_METRIC = "CIDEr"
EXAMPLES_LOGGED = 5


@dataclass(frozen=True)
class CaptionLossWeights:
    caption: float = 1.0
    sim: float = 1.0
    align: float = 1.0


def caption_loss_terms(model: nn.Module, video: VideoParts, text: TextParts, input_ids: torch.Tensor):
    """Teacher forcing under the prefix mask: every text position up to the last word predicts the next token, so
    the targets are all real tokens but SOT (EOT included), chosen by the attention mask (the original's `id > 0`
    misaligned captions containing "!", whose id is 0)."""
    start = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    return prefix_lm_terms(model, video, text, input_ids, start)


def caption_objective(weights: CaptionLossWeights):
    """`L = L_cap + L_sim + L_align` (docs/method.md §7b); nothing is detached. The caption loss is the mean over the
    global batch's target tokens (so N processes compute one process's loss)."""

    def objective(model: nn.Module, batch: dict[str, Any], context: StepContext) -> dict[str, torch.Tensor]:
        input_ids, attention_mask, video_mask = batch["input_ids"], batch["attention_mask"], batch["video_mask"]
        text_eot, tokens = model.encode_text(input_ids, attention_mask)
        frames, tubes = model.encode_video(batch["video"], video_mask)
        terms: dict[str, torch.Tensor] = {}
        loss = frames.new_zeros(())
        if weights.caption:
            caption = caption_loss_terms(model, VideoParts(frames, video_mask, tubes),
                                         TextParts(tokens, attention_mask), input_ids)
            scale = global_mean_scale(caption.count, context)
            terms["caption_loss"] = caption.loss_sum * scale
            terms["caption_acc"] = 100.0 * caption.correct.float() * scale
            loss = loss + weights.caption * terms["caption_loss"]
        if weights.sim:
            sim = model.similarity(context.gather(text_eot), context.gather(frames), context.gather(video_mask))
            terms["sim_loss"] = symmetric_contrastive_loss(sim)
            loss = loss + weights.sim * terms["sim_loss"]
        if weights.align:
            terms["align_loss"] = model.alignment_loss(tokens, attention_mask, tubes)
            loss = loss + weights.align * terms["align_loss"]
        return {"loss": loss, **{key: value.detach() for key, value in terms.items()}}

    return objective


def caption_task(weights: CaptionLossWeights, evaluate: EvaluateFn | None = None) -> Task:
    return Task(NAME, caption_objective(weights), NEW_PARAM_PATTERNS, find_unused_parameters=True,
                evaluate=evaluate)


@dataclass(frozen=True)
class DecodeSettings:
    beam_size: int = 1
    length_penalty: float = 1.0
    max_steps: int = 31  # max_words - 1, as the original

    @property
    def label(self) -> str:
        return "greedy" if self.beam_size == 1 else f"beam{self.beam_size}"


@torch.no_grad()
def decode_split(
    model: nn.Module, videos: torch.utils.data.Dataset, decode: DecodeSettings, *, batch_size: int,
    device: torch.device, precision: str, num_workers: int = 0, show_progress: bool = True,
) -> tuple[dict[str, list[int]], int]:
    """Decode a caption for every video of `videos` (a dataset of {video, video_mask, video_id}, e.g. a split's
    `video_dataset()`): ({video_id: token ids without SOT/EOT}, number of videos that could not be decoded)."""
    tokens: dict[str, list[int]] = {}
    skipped = 0
    for batch, video_mask, frames, tubes in encoded_video_batches(
            model, videos, batch_size=batch_size, device=device, precision=precision, num_workers=num_workers,
            description=f"captioning ({decode.label})", show_progress=show_progress):
        skipped += batch["n_skipped"]
        if frames is None:
            continue
        with autocast_context(device, precision):
            decoded = decode_captions(model, frames, video_mask, tubes, beam_size=decode.beam_size,
                                      max_steps=decode.max_steps, length_penalty=decode.length_penalty)
        tokens.update(zip(batch["video_id"], decoded.tokens))
    return tokens, skipped


def caption_texts(
    tokens: dict[str, list[int]], references: dict[str, list[str]], tokenizer: Any, protocol: str, max_words: int
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(hypotheses, references) as the protocol scores them. "standard": clean decoded text and the raw reference
    captions (the PTB tokenizer normalises both). "original": the BPE decoder's text with its trailing spaces,
    references re-decoded from their CLIP ids (lower-cased, cleaned, cut to `max_words`)."""
    if protocol == "standard":
        return {key: tokenizer.decode(ids) for key, ids in tokens.items()}, {key: references[key] for key in tokens}
    hypotheses = {key: tokenizer.decode(ids, strip=False) for key, ids in tokens.items()}
    redecoded = {key: [tokenizer.decode(tokenizer.encode(ref, max_words)[0]) for ref in references[key]]
                 for key in tokens}
    return hypotheses, redecoded


def make_caption_evaluator(
    dataset: Any, split_name: str, settings: EvalContext, *, decode: DecodeSettings, protocol: str,
    best: BestCheckpoint | None = None,
) -> EvaluateFn:
    """Evaluate a captioning split: a metrics.jsonl row {"task": "caption", ...} (scores in percent, as papers
    report them), `predictions_<split>_step<N>.json` ([{"video_id", "caption"}]), the scores and a few examples in
    log.txt; with `best`, model selection by CIDEr."""
    split = dataset.video_dataset().split
    references = references_by_video(split)
    tokenizer = dataset.tokenizer
    run, extra = settings.run, dict(settings.extra)

    def evaluate(model: nn.Module, step: int, epoch: int) -> dict[str, Any]:
        tokens, skipped = decode_split(model, dataset.video_dataset(), decode, batch_size=settings.batch_size,
                                       device=settings.device, precision=settings.precision,
                                       num_workers=settings.num_workers)
        if not tokens:
            raise RuntimeError(f"no video of the {split_name} split could be decoded ({skipped} skipped)")
        hypotheses, scored_references = caption_texts(tokens, references, tokenizer, protocol, dataset.max_words)
        scores = shared_scorer().score(hypotheses, scored_references, protocol)
        record = {"task": "caption", "split": split_name, "step": step, "epoch": epoch,
                  **{name: 100.0 * scores[name] for name in METRIC_NAMES}, "decode": decode.label,
                  "protocol": protocol, "n_videos": len(tokens), "n_skipped": skipped, **extra}
        run.log_metrics(record)
        run.scalars({name: record[name] for name in METRIC_NAMES}, step, prefix=f"eval_{split_name}/")
        predictions = [{"video_id": video_id, "caption": tokenizer.decode(tokens[video_id])}
                       for video_id in split.video_ids if video_id in tokens]
        path = Path(settings.output_dir) / f"predictions_{split_name}_step{step}.json"
        path.write_text(json.dumps(predictions, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        logger.info("captioning (%s, %s protocol) on %s at step %d, epoch %d: %d videos%s\n  %s\n%s\npredictions: %s",
                    decode.label, protocol, split_name, step, epoch, len(tokens),
                    f", {skipped} skipped" if skipped else "",
                    "  ".join(f"{name} {record[name]:.2f}" for name in METRIC_NAMES),
                    format_examples(predictions, references), path)
        if best is not None and step > 0:
            best.update(record[SELECTION_METRIC], step, epoch)
        return record

    return evaluate


def format_examples(predictions: list[dict[str, str]], references: dict[str, list[str]],
                    count: int = EXAMPLES_LOGGED) -> str:
    lines = []
    for item in predictions[:count]:
        refs = references[item["video_id"]]
        lines.append(f"  {item['video_id']}: \"{item['caption']}\"  (references: \"{refs[0]}\""
                     f"{f' and {len(refs) - 1} more' if len(refs) > 1 else ''})")
    return "\n".join(lines)


def best_checkpoint_for(output_dir: str | Path) -> BestCheckpoint:
    return BestCheckpoint(output_dir, f"val {SELECTION_METRIC}")


# ----------------------------------------------------------------------------------------------- the task


def prepare(context: RunContext, model: nn.Module) -> PreparedRun:
    args, dataset = context.args, context.dataset
    logger.info("Java for the caption metrics: %s", require_java())  # before any training
    options = dict(max_words=args.max_words, feature_framerate=args.feature_framerate, max_frames=args.max_frames,
                   image_size=model.image_resolution, seed=args.seed, slice_framepos=args.slice_framepos,
                   frame_store=args.frame_store)

    def split(subset: str, frame_order: int):
        data = build_checked(lambda: caption_dataset(dataset, args.data_path, args.features_path, subset,
                                                     frame_order=frame_order, **options), "--data_path")
        if len(data) == 0:
            raise InputError(f"the {subset} split of --data_path {args.data_path} has no captions (check "
                             f"--data_path / --features_path)")
        if subset != "train":
            check_eval_videos(data, f"the {subset} split of --data_path {args.data_path}", args.features_path)
        return data

    def evaluator(subset: str, best: BestCheckpoint | None = None) -> EvaluateFn:
        return make_caption_evaluator(
            split(subset, args.eval_frame_order), subset, context.eval_context(),
            decode=DecodeSettings(args.beam_size, args.length_penalty, args.max_words - 1),
            protocol=args.caption_protocol, best=best,
        )

    selecting = args.do_train and args.eval_split == "val"
    evaluate = evaluator(args.eval_split, best_checkpoint_for(args.output_dir) if selecting else None)
    after_training = None
    if selecting and args.test_after_training:
        test_evaluate = evaluator("test")
        after_training = lambda trained: test_selected_checkpoint(  # noqa: E731
            best_checkpoint_for(args.output_dir), trained, test_evaluate, task=NAME, split="test", selected_on="val")
    task = caption_task(CaptionLossWeights(args.caption_weight, args.sim_weight, args.align_weight), evaluate)
    return PreparedRun(task, lambda: split("train", args.train_frame_order), after_training)


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("captioning")
    add = group.add_argument
    add("--beam_size", type=int, default=1,
        help="Captions are decoded greedily (1, the original) or by beam search with this many hypotheses.")
    add("--length_penalty", type=float, default=1.0,
        help="Beam search ranks hypotheses by summed log-probability / length ** this (0: the plain model score).")
    add("--caption_protocol", choices=["standard", "original"], default="standard",
        help="'standard': references and hypotheses through pycocoevalcap's PTB tokenizer (published numbers); "
             "'original': the T2VLP script's un-tokenised scoring (references re-decoded from CLIP ids), for "
             "comparison with its logs.")
    add("--test_after_training", action=argparse.BooleanOptionalAction, default=True,
        help="With --do_train, evaluate the test split with the selected (best-on-val) checkpoint at the end.")


def check_flags(args: argparse.Namespace) -> str | None:
    if args.beam_size < 1:
        return "--beam_size must be >= 1"
    if args.length_penalty < 0:
        return "--length_penalty must be >= 0"
    return None


DEFINITION = register_task(TaskDefinition(
    name=NAME, prepare=prepare, new_param_patterns=NEW_PARAM_PATTERNS,
    defaults={"eval_steps": 1000, "save_steps": 1000, "new_params_lr": 1e-6},  # the original script's (docs/method.md §8)
    head_dropout=0.5, loss_weights=("caption", "sim", "align"), add_flags=add_flags, check_flags=check_flags,
    eval_split=EvalSplitFlag(lambda args: "val" if args.do_train else "test",
                             "The split evaluated during training (default val, which selects the model) or by "
                             "--do_eval (default test)."),
    datasets=DATASETS,
))
