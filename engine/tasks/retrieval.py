"""Text-video retrieval fine-tuning (docs/method.md §7a) on MSR-VTT, MSVD, LSMDC, DiDeMo and ActivityNet Captions:
contrastive + VTM with hard negatives (on detached inputs) + local alignment, and its evaluation (meanP, fusion
rerank, DSL on request) with model selection. The entry scripts are
video_text_retrieval/main_task_retrieval_{msrvtt,msvd,lsmdc,didemo,activitynet}.py."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from dataloaders.activitynet import activitynet_dataset
from dataloaders.didemo import didemo_dataset
from dataloaders.lsmdc import lsmdc_dataset
from dataloaders.msrvtt import MSRVTTFullTestDataset, MSRVTTTestDataset, MSRVTTTrainDataset
from dataloaders.msvd import msvd_dataset
from dataloaders.raw_video_text import RawVideoTextDataset, hold_out_videos
from dataloaders.video import SLICE_UNIFORM
from engine.args import add_rerank_flags, rerank_flag_error
from engine.checkpointing import BestCheckpoint
from engine.data import build_checked, check_eval_videos
from engine.evaluation import EvalContext
from engine.evaluation.qb_norm import DEFAULT_BETA, DEFAULT_K
from engine.evaluation.retrieval import (
    QueryBank,
    encode_split,
    encode_texts,
    log_retrieval_rows,
    retrieval_rows,
)
from engine.run_logging import read_metrics
from engine.tasks.base import EvaluateFn, StepContext, Task, test_selected_checkpoint
from engine.tasks.fusion_pretraining import FUSION_PARAM_PATTERNS, matching_with_hard_negatives
from engine.tasks.registry import EvalSplitFlag, PreparedRun, RunContext, TaskDefinition, register_task
from modules.errors import InputError
from modules.fusion_objectives import TextParts, VideoParts
from modules.similarity import symmetric_contrastive_loss

logger = logging.getLogger("t2vlp.retrieval")

NAME = "retrieval"
DATASETS = ("msrvtt", "msvd", "lsmdc", "didemo", "activitynet")

SELECTION_METRIC = "t2v R1"
VAL_FROM_TRAIN = "val_from_train"  # the split name of --val_from_train's held-out videos


@dataclass(frozen=True)
class RetrievalLossWeights:
    sim: float = 1.0
    vtm: float = 1.0
    align: float = 1.0


def retrieval_objective(weights: RetrievalLossWeights):
    """`L = L_sim + L_vtm + L_align` (docs/method.md §7a). The contrastive loss runs over the all-gathered batch and
    trains the backbone; VTM reads detached copies of the fusion inputs and draws its hard negatives from the same
    contrastive matrix; the alignment loss has gradients to the text states and the tubes."""

    def objective(model: nn.Module, batch: dict[str, Any], context: StepContext) -> dict[str, torch.Tensor]:
        attention_mask, video_mask = batch["attention_mask"], batch["video_mask"]
        text_eot, tokens = model.encode_text(batch["input_ids"], attention_mask)
        frames, tubes = model.encode_video(batch["video"], video_mask)
        sim = model.similarity(context.gather(text_eot), context.gather(frames), context.gather(video_mask))
        terms = {"sim_loss": symmetric_contrastive_loss(sim)}
        if weights.vtm:
            vtm = matching_with_hard_negatives(model, VideoParts(frames, video_mask, tubes),
                                               TextParts(tokens, attention_mask), text_eot, context, similarity=sim)
            terms["vtm_loss"] = vtm.loss
            terms["vtm_acc"] = 100.0 * vtm.correct.float() / vtm.count
        if weights.align:
            terms["align_loss"] = model.alignment_loss(tokens, attention_mask, tubes)
        loss = weights.sim * terms["sim_loss"] + weights.vtm * terms.get("vtm_loss", 0.0) \
            + weights.align * terms.get("align_loss", 0.0)
        return {"loss": loss, **{key: value.detach() for key, value in terms.items()}}

    return objective


def retrieval_task(weights: RetrievalLossWeights, evaluate: EvaluateFn | None = None) -> Task:
    return Task(NAME, retrieval_objective(weights), FUSION_PARAM_PATTERNS, find_unused_parameters=True,
                evaluate=evaluate)


def selection_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row model selection reads: the rerank when there is one (docs/method.md §7a), else meanP."""
    by_scoring = {row["scoring"]: row for row in rows if row["scoring"] in ("meanP", "rerank")}
    return by_scoring.get("rerank", by_scoring["meanP"])


def make_retrieval_evaluator(
    dataset: Any, settings: EvalContext, *, rerank_top_k: int, rerank_batch_size: int, dsl: bool = False,
    dsl_temperature: float = 1.0, best: BestCheckpoint | None = None, query_bank: QueryBank | None = None,
    split: str = "test", extra: dict[str, Any] | None = None, zero_shot: bool | None = None,
) -> EvaluateFn:
    """Evaluate the split: meanP, rerank and (with `dsl`) DSL rows, (with `query_bank`) a QB-Norm row, in
    metrics.jsonl and log.txt; with `best`, model selection by text->video R@1 of the rerank (meanP when
    `rerank_top_k` is 0), never by DSL or QB-Norm."""

    def evaluate(model: nn.Module, step: int, epoch: int) -> dict[str, Any]:
        encoded = encode_split(model, dataset, batch_size=settings.batch_size, device=settings.device,
                               precision=settings.precision, num_workers=settings.num_workers,
                               keep_fusion_inputs=rerank_top_k > 0)
        bank = None
        if query_bank is not None:  # encoded by the model being evaluated, at every evaluation
            bank = replace(query_bank, features=encode_texts(
                model, query_bank.texts, dataset.tokenizer, dataset.max_words, batch_size=settings.batch_size,
                device=settings.device, precision=settings.precision))
        rows = retrieval_rows(model, encoded, rerank_top_k=rerank_top_k, rerank_batch_pairs=rerank_batch_size,
                              precision=settings.precision, show_progress=True, dsl=dsl,
                              dsl_temperature=dsl_temperature, query_bank=bank)
        # the starting weights (step 0) are zero-shot when they never trained on this dataset; later steps trained
        records = log_retrieval_rows(settings.run, rows, step, epoch, split=split,
                                     extra={**settings.extra, **(extra or {}),
                                            "zero_shot": zero_shot if step == 0 else False})
        selected = selection_row(records)
        if best is not None and step > 0:  # selection among this run's checkpoints, not the starting one
            best.update(selected["t2v"]["R1"], step, epoch)
        return selected

    return evaluate


def best_checkpoint_for(output_dir: str, rerank_top_k: int) -> BestCheckpoint:
    return BestCheckpoint(output_dir, f"{'rerank' if rerank_top_k > 0 else 'meanP'} {SELECTION_METRIC}")


# ----------------------------------------------------------------------------------------------- the datasets


def build_retrieval_datasets(
    args: argparse.Namespace, dataset: str, image_size: int
) -> tuple[Callable[[], Dataset], RawVideoTextDataset | None]:
    """(training-set factory, evaluation split or None) of a retrieval dataset from the original flags.

    MSR-VTT: `--train_csv` (9k/7k list), `--data_path` (MSRVTT_data.json), `--val_csv` (1k-A) or `--msrvtt_test
    full`; its downstream loader always samples 12 frames with linspace, repeating frames of short videos
    (docs/method.md §9.8). MSVD, LSMDC, DiDeMo, ActivityNet: `--data_path` is the folder of annotation files,
    `--eval_split` picks val or test (ActivityNet: test, its val_1.json); short videos are zero-padded. Videos under
    `--features_path`.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    common = dict(max_words=args.max_words, feature_framerate=args.feature_framerate, max_frames=args.max_frames,
                  image_size=image_size, seed=args.seed, frame_store=args.frame_store)
    train_options = {**common, "frame_order": args.train_frame_order}
    eval_options = {**common, "frame_order": args.eval_frame_order}
    if dataset == "msrvtt":
        if args.slice_framepos != SLICE_UNIFORM:
            logger.warning("--slice_framepos %d is ignored for MSR-VTT retrieval: its loader always samples frames "
                           "uniformly (linspace), as the original's did", args.slice_framepos)
        frames = {"pad_mode": "repeat", "slice_framepos": SLICE_UNIFORM}
        train = lambda: build_checked(lambda: MSRVTTTrainDataset(  # noqa: E731
            args.train_csv, args.data_path, args.features_path, expand_sentences=args.expand_msrvtt_sentences,
            **train_options, **frames), "--train_csv / --data_path")
        if args.msrvtt_test == "full":
            evaluation = build_checked(lambda: MSRVTTFullTestDataset(args.data_path, args.features_path, **eval_options,
                                                                **frames), "--data_path")
            source = f"the full test split of --data_path {args.data_path}"
        elif args.val_csv:
            evaluation = build_checked(lambda: MSRVTTTestDataset(args.val_csv, args.features_path, **eval_options,
                                                            **frames), "--val_csv")
            source = f"--val_csv {args.val_csv}"
        else:
            evaluation, source = None, ""
    else:
        build = {"msvd": msvd_dataset, "lsmdc": lsmdc_dataset, "didemo": didemo_dataset,
                 "activitynet": activitynet_dataset}[dataset]
        frames = {"pad_mode": "zero", "slice_framepos": args.slice_framepos}
        if not Path(args.data_path).is_dir():
            raise InputError(f"--data_path {args.data_path} must be the folder of the {dataset.upper()} annotation "
                             f"files (see docs/data.md §3)")
        train = lambda: build_checked(lambda: build(args.data_path, args.features_path, "train",  # noqa: E731
                                               **train_options, **frames), "--data_path")
        evaluation = build_checked(lambda: build(args.data_path, args.features_path, args.eval_split, **eval_options,
                                            **frames), "--data_path")
        source = f"the {args.eval_split} split of --data_path {args.data_path}"
    if evaluation is not None:
        if len(evaluation) == 0:
            raise InputError(f"{source} has no captions")
        check_eval_videos(evaluation, source, args.features_path)
    return train, evaluation


# ----------------------------------------------------------------------------------------------- the task


def prepare(context: RunContext, model: nn.Module) -> PreparedRun:
    """Training evaluates (and selects on) the evaluation split, as the original and CLIP4Clip do, or with
    `--val_from_train N` on N held-out training videos, the test split then evaluated once with the selected
    checkpoint. Either way the run ends with a report that names the selection split."""
    args, dataset = context.args, context.dataset
    train_factory, eval_dataset = build_retrieval_datasets(args, dataset, model.image_resolution)
    held_out = None
    if args.val_from_train and args.do_train:
        train_set, held_out = hold_out_videos(train_factory(), args.val_from_train, args.seed, args.eval_frame_order)
        train_factory = lambda: train_set  # noqa: E731
    query_bank = query_bank_texts(args, train_factory) if args.qbnorm else None
    best = best_checkpoint_for(args.output_dir, args.rerank_top_k) if args.do_train else None

    def evaluator(data: Any, split: str, selection: BestCheckpoint | None, **extra: Any) -> EvaluateFn:
        return make_retrieval_evaluator(
            data, context.eval_context(), rerank_top_k=args.rerank_top_k, rerank_batch_size=args.rerank_batch_size,
            dsl=args.dsl, dsl_temperature=args.dsl_temperature, best=selection, query_bank=query_bank,
            split=split, extra=extra, zero_shot=zero_shot(context.trained_before, dataset))

    test_split = "test" if dataset == "msrvtt" else args.eval_split
    evaluate, after_training = None, None
    if held_out is not None:
        evaluate = evaluator(held_out, VAL_FROM_TRAIN, best)
        if eval_dataset is not None:
            test_evaluate = evaluator(eval_dataset, test_split, None, selected_on=VAL_FROM_TRAIN)
            after_training = lambda trained: test_selected_checkpoint(  # noqa: E731
                best, trained, test_evaluate, task=NAME, split=test_split, selected_on=VAL_FROM_TRAIN)
    elif eval_dataset is not None:
        evaluate = evaluator(eval_dataset, test_split, best)
        if best is not None:
            after_training = lambda trained: report_selection(  # noqa: E731
                args.output_dir, args.rerank_top_k, test_split, context.run)

    def train_dataset() -> Dataset:
        train = train_factory()
        if len(train) == 0:
            raise InputError(f"no {dataset} training samples (check --data_path / --train_csv / --features_path)")
        return train

    return PreparedRun(retrieval_task(RetrievalLossWeights(args.sim_weight, args.vtm_weight, args.align_weight),
                                      evaluate), train_dataset, after_training)


def zero_shot(trained_before: list[dict] | None, dataset: str) -> bool | None:
    """Whether weights with this training history have never trained on `dataset`'s training split (any task on
    its videos counts); None when the history is not known (a checkpoint of the original code)."""
    if trained_before is None:
        return None
    return not any(run.get("dataset") == dataset for run in trained_before)


def report_selection(output_dir: str, rerank_top_k: int, split: str, run: Any) -> None:
    """After training selected on the evaluated split itself (the original's and CLIP4Clip's protocol): say so, and
    put the last checkpoint's rows beside the selected one's. metrics.jsonl gets the selected step's rows again,
    marked `"selected_on": <split>`, and the last step's marked `"report": "last"`."""
    best = best_checkpoint_for(output_dir, rerank_top_k).best
    rows = [row for row in read_metrics(Path(output_dir) / "metrics.jsonl")
            if row.get("task") == NAME and row.get("split") == split and "report" not in row
            and row.get("step", 0) > 0]
    if best is None or not rows:
        return
    last_step = max(row["step"] for row in rows)
    metric = best["metric"].rsplit(" ", 2)[0]  # "rerank t2v R1" -> "rerank"
    selected = [row for row in rows if row["step"] == best["step"]]
    last = [row for row in rows if row["step"] == last_step]
    for row in selected:
        run.log_metrics({**row, "report": "selected", "selected_on": split})
    for row in last:
        run.log_metrics({**row, "report": "last"})
    value = {row["step"]: row["t2v"]["R1"] for row in rows if row["scoring"] == metric}
    logger.warning("model selection used the %s split itself (as the original and CLIP4Clip do): the selected "
                   "step %d's text->video R@1 %.2f (%s) is optimistic; the last checkpoint (step %d) gives %.2f. "
                   "--val_from_train N selects on held-out training videos instead", split, best["step"],
                   value.get(best["step"], float("nan")), metric, last_step, value.get(last_step, float("nan")))


def query_bank_texts(args: argparse.Namespace, train_factory: Callable[[], Dataset]) -> QueryBank:
    """`--qbnorm`'s bank: the lines of `--qbnorm_bank`, else every caption of the training split (never the
    evaluated split's)."""
    if args.qbnorm_bank:
        path = Path(args.qbnorm_bank)
        if not path.is_file():
            raise InputError(f"--qbnorm_bank {path} does not exist")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = str(path)
    else:
        texts, source = training_captions(train_factory()), "the training split"
    if not texts:
        raise InputError(f"--qbnorm: the query bank ({source}) holds no text")
    logger.info("QB-Norm query bank: %d texts from %s (beta %g, k %d)", len(texts), source, args.qbnorm_beta,
                args.qbnorm_k)
    return QueryBank(texts, source, args.qbnorm_beta, args.qbnorm_k)


def training_captions(train: Any) -> list[str]:
    """Every caption of a retrieval training set (MSR-VTT: all captions of the training videos)."""
    return [caption for _, caption in train.all_pairs()]


def add_flags(parser: argparse.ArgumentParser) -> None:
    add_rerank_flags(parser)
    group = parser.add_argument_group("retrieval")
    group.add_argument("--dsl", action="store_true",
                       help="Also report dual-softmax (DSL) rows, on meanP and on the rerank (labelled 'dsl'; DSL uses "
                            "every query of the split at once, so it is not comparable with plain retrieval).")
    group.add_argument("--dsl_temperature", type=float, default=1.0,
                       help="Temperature of the DSL prior over the meanP logits.")
    group.add_argument("--qbnorm", action="store_true",
                       help="Also report a QB-Norm row (querybank normalisation, dynamic inverted softmax, text->video "
                            "on meanP; labelled 'qbnorm', never used for model selection).")
    group.add_argument("--qbnorm_bank", metavar="FILE",
                       help="QB-Norm's query bank: a text file, one query per line (default: the training split's "
                            "captions; never the evaluated split's).")
    group.add_argument("--qbnorm_beta", type=float, default=DEFAULT_BETA,
                       help="QB-Norm's inverse temperature on cosine similarities (20, the paper's).")
    group.add_argument("--qbnorm_k", type=int, default=DEFAULT_K,
                       help="QB-Norm's activation set: videos in some bank query's top k (1, the paper's).")
    group.add_argument("--val_from_train", type=int, default=0, metavar="N",
                       help="Hold N training videos (drawn with --seed) out of training as the validation split: "
                            "evaluations during training and model selection use them, and the test split is "
                            "evaluated once, with the selected checkpoint (default 0: select on the evaluated split, "
                            "as the original and CLIP4Clip do; the final report says so).")
    group.add_argument("--msrvtt_test", choices=["1k-A", "full"], default="1k-A",
                       help="MSR-VTT: '1k-A' evaluates --val_csv (MSRVTT_JSFUSION_test.csv, one caption per video); "
                            "'full' the 2,990 test videos of --data_path (MSRVTT_data.json) with all their captions.")


def check_flags(args: argparse.Namespace) -> str | None:
    if args.dsl_temperature <= 0:
        return "--dsl_temperature must be > 0"
    if args.val_from_train < 0:
        return "--val_from_train must be >= 0"
    if args.qbnorm_beta <= 0 or args.qbnorm_k < 1:
        return "--qbnorm_beta must be > 0 and --qbnorm_k >= 1"
    return rerank_flag_error(args)


DEFINITION = register_task(TaskDefinition(
    name=NAME, prepare=prepare, new_param_patterns=FUSION_PARAM_PATTERNS,
    defaults={"eval_steps": 500, "save_steps": 500, "new_params_lr": 5e-6},  # the original script's (docs/method.md §8)
    head_dropout=0.2, loss_weights=("sim", "vtm", "align"), add_flags=add_flags, check_flags=check_flags,
    eval_split=EvalSplitFlag(lambda args: "test", "MSVD, LSMDC, DiDeMo, ActivityNet (test only: val_1.json): the "
                                                  "split evaluated (default test)."),
    datasets=DATASETS, run_config_flags=("val_from_train",),
))
