"""Command-line flags shared by every entry script; each task adds its own (`TaskDefinition.add_flags`, its loss
weights and defaults, engine/tasks/).

Every flag of the original scripts (CLIP4Clip's parser plus T2VLP's additions, docs/method.md §8) is accepted verbatim,
with CLIP4Clip's defaults. Flags that only mattered to the original's internals are accepted and ignored: if one
is set to a non-default value, `report_ignored_flags` logs one warning for it (nothing is re-purposed). New flags
are additive.

Differences in meaning that a copied original command line would hit:
* `--batch_size` is the *global* batch over all processes (the original divided a per-node value by the number
  of GPUs per node, so its global batch was batch_size x nodes).
* the world size, ranks and GPU count come from torchrun's environment, never from flags.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

from dataloaders.catalogue import CACHE_ENV
from engine.tasks.registry import TaskDefinition, task_definition
from modules.errors import InputError, ModelConfigError

logger = logging.getLogger("t2vlp.args")

DEFAULT_DATATYPE = "msrvtt"  # CLIP4Clip's; a task may set another default (QA: msrvtt_qa)
IGNORED_HINT = "ignored_hint"  # set on the argparse action of a flag accepted only for compatibility

BATCH_HELP = (
    "GLOBAL training batch over all processes (default %(default)s). Each process loads batch_size / world_size "
    "samples per optimiser step (must divide), and each forward pass batch_size / world_size / "
    "gradient_accumulation_steps (must divide). The original divided a per-node value by the GPUs per node: to "
    "reproduce an original run on n nodes, pass its --batch_size times n."
)
FREEZE_HELP = (
    "CLIP4Clip's freeze rule (default %(default)s). With N > -1 every clip.* parameter is frozen except "
    "ln_final, text_projection, logit_scale, visual.ln_post, visual.proj, transformer blocks with index >= N "
    "(visual.transformer.resblocks.N / transformer.resblocks.N) and parameters whose name contains 'fusion' or "
    "'local'. So 0 does NOT mean 'freeze nothing': it still freezes visual.conv1, class and positional "
    "embeddings, ln_pre, token_embedding, the text positional embedding and lm_head. -1 freezes nothing."
)


def build_parser(task: str | TaskDefinition) -> argparse.ArgumentParser:
    """Parser with every original flag plus the new ones, and the task's own flags and defaults."""
    definition = task if isinstance(task, TaskDefinition) else task_definition(task)
    parser = argparse.ArgumentParser(description=f"T2VLP ({definition.name})", allow_abbrev=False)
    _add_original_flags(parser)
    _add_ignored_flags(parser)
    _add_new_flags(parser)
    if definition.with_fusion:
        _add_fusion_flags(parser, definition.head_dropout)
    if definition.add_flags is not None:
        definition.add_flags(parser)
    for loss in definition.loss_weights:
        parser.add_argument(f"--{loss}_weight", type=float, default=1.0, help=f"Weight of the {loss.upper()} loss.")
    if definition.eval_split is not None:
        parser.add_argument("--eval_split", choices=["val", "test"], default=None, help=definition.eval_split.help)
    parser.set_defaults(**definition.defaults)
    return parser


def _add_original_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("original flags")
    add = group.add_argument
    add("--do_train", action="store_true", help="Train.")
    add("--do_eval", action="store_true", help="Evaluate only.")
    add("--train_csv", type=str, default="data/.train.csv", help="Training annotation CSV (unused for WebVid).")
    add("--val_csv", type=str, default="data/.val.csv", help="Evaluation annotation CSV.")
    add("--data_path", type=str, default="data/caption.pickle",
        help="Annotation file or folder (for WebVid: the labels JSON).")
    add("--features_path", type=str, default="data/videos_feature.pickle", help="Folder of raw videos.")
    add("--dir_path", type=str, default="./WebVid_TFRecord", help="Folder holding the WebVid path.index.")
    add("--num_thread_reader", type=int, default=1, help="DataLoader workers per process.")
    add("--lr", type=float, default=1e-4, help="Base learning rate (non-CLIP parameters; backbone: lr*coef_lr).")
    add("--epochs", type=int, default=20, help="Training epochs (default %(default)s; may change on resume).")
    add("--batch_size", type=int, default=256, help=BATCH_HELP)
    add("--batch_size_val", type=int, default=3500, help="Evaluation batch per process.")
    add("--n_display", type=int, default=100, help="Log the training loss every n optimiser steps.")
    add("--seed", type=int, default=42,
        help="Seed of model initialisation, shuffling, masks and hard negatives (default %(default)s).")
    add("--max_words", type=int, default=20, help="Text length in tokens, SOT and EOT included.")
    add("--max_frames", type=int, default=100,
        help="Frames per clip (default %(default)s, CLIP4Clip's; T2VLP's recipes use 12, and WebVid records store "
             "12: frames beyond those stored are zeros, with a warning). Any number works with this model.")
    add("--feature_framerate", type=int, default=1, help="Frames sampled per second when decoding raw videos.")
    add("--output_dir", type=str, required=True, help="Logs, metrics, checkpoints and restore.bin go here.")
    add("--init_model", type=str, default=None, help="Starting checkpoint (original format or ours).")
    add("--resume_model", type=str, default=None,
        help="restore.bin to resume from (default: <output_dir>/restore.bin when it exists).")
    add("--warmup_proportion", type=float, default=0.1, help="Warmup fraction of the total optimiser steps.")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--datatype", type=str, default=DEFAULT_DATATYPE, help="Dataset of the (evaluation) loader.")
    add("--coef_lr", type=float, default=1.0, help="LR multiplier of the CLIP backbone parameters.")
    add("--loose_type", action="store_true",
        help="meanP similarity without a cross encoder; the only type implemented, so always on.")
    add("--expand_msrvtt_sentences", action="store_true", help="One MSR-VTT training sample per caption.")
    add("--train_frame_order", type=int, default=0, choices=[0, 1, 2], help="0 keep, 1 reverse, 2 shuffle.")
    add("--eval_frame_order", type=int, default=0, choices=[0, 1, 2], help="0 keep, 1 reverse, 2 shuffle.")
    add("--freeze_layer_num", type=int, default=0, help=FREEZE_HELP)
    add("--slice_framepos", type=int, default=0, choices=[0, 1, 2],
        help="Cut long videos to max_frames: 0 head, 1 tail, 2 uniform.")
    add("--linear_patch", type=str, default="2d", choices=["2d", "3d"], help="Only 2d is implemented.")
    add("--sim_header", type=str, default="meanP", choices=["meanP", "seqLSTM", "seqTransf", "tightTransf"],
        help="Only meanP is implemented.")
    add("--cross_config_path", type=str, default="./CLIP-modules",
        help="Folder containing cross-base/cross_config.json.")
    add("--visual_pretrain_path", type=str, default=None,
        help="OpenAI CLIP checkpoint (ViT-B-16.pt). Default: the first of ./CLIP-modules/ViT-B-16.pt, "
             "../CLIP-modules/ViT-B-16.pt (the original's task scripts ran from their folder) and "
             "<--cross_config_path>/ViT-B-16.pt that exists. Also an open_clip state dict (.bin or "
             ".safetensors) with --clip_model.")
    add("--clip_model", type=str, default=None,
        help="open_clip architecture of the CLIP weights (e.g. ViT-B-16 for LAION-2B or DataComp weights, "
             "ViT-B-16-quickgelu for MetaCLIP, ViT-L-14): its activation and sizes come from open_clip's config. "
             "Default: OpenAI's layout with QuickGELU, or what --init_model / the resumed run recorded.")


def add_ignored_flag(group: argparse._ActionsContainer, *names: str, hint: str, **options: Any) -> None:
    """A flag of the original scripts accepted for compatibility and not used: setting it logs `hint`."""
    action = group.add_argument(*names, **options)
    setattr(action, IGNORED_HINT, hint)


def _add_ignored_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accepted for compatibility and ignored (a warning if set)")
    clip4clip = "CLIP4Clip leftover, unused by the original too"
    from_checkpoint = "sizes come from the CLIP checkpoint"
    for names, hint, options in [
        (("--do_pretrain",), "use --do_train", {"action": "store_true"}),
        (("--do_lower_case",), "the CLIP tokenizer always lower-cases", {"action": "store_true"}),
        (("--lr_decay",), "the schedule is warmup_cosine", {"type": float, "default": 0.9}),
        (("--video_dim",), from_checkpoint, {"type": int, "default": 1024}),
        (("--margin",), clip4clip, {"type": float, "default": 0.1}),
        (("--hard_negative_rate",), clip4clip, {"type": float, "default": 0.5}),
        (("--negative_weighting",), clip4clip, {"type": int, "default": 1}),
        (("--n_pair",), clip4clip, {"type": int, "default": 1}),
        (("--use_mil",), clip4clip, {"action": "store_true"}),
        (("--sampled_use_mil",), clip4clip, {"action": "store_true"}),
        (("--mask_ratio",), "the original hard-coded 0.15 and never read this flag",
         {"type": float, "default": 0.15,
          "help": "Stage 2: probability that a word token is masked for MLM (the original hard-coded 0.15)."}),
        (("--cross_model",), "no CLIP4Clip cross model is built (meanP similarity)", {"default": "cross-base"}),
        (("--cache_dir",), "nothing is downloaded", {"default": ""}),
        (("--n_gpu",), "one process per GPU under torchrun", {"type": int, "default": 1}),
        (("--fp16",), "use --precision fp16 (autocast + GradScaler); apex is not used", {"action": "store_true"}),
        (("--fp16_opt_level",), "use --precision; apex is not used", {"default": "O1"}),
        (("--task_type",), "the entry script decides the task", {"default": "retrieval"}),
        (("--world_size",), "read from torchrun's WORLD_SIZE", {"type": int, "default": 0}),
        (("--local_rank", "--local-rank"), "read from torchrun's LOCAL_RANK", {"type": int, "default": 0}),
        (("--rank",), "read from torchrun's RANK", {"type": int, "default": 0}),
        (("--text_num_hidden_layers",), from_checkpoint, {"type": int, "default": 12}),
        (("--visual_num_hidden_layers",), from_checkpoint, {"type": int, "default": 12}),
        (("--cross_num_hidden_layers",), "no CLIP4Clip cross model is built", {"type": int, "default": 4}),
        (("--pretrained_clip_name",), "use --visual_pretrain_path", {"default": "ViT-B/32"}),
    ]:
        add_ignored_flag(group, *names, hint=hint, **options)


def _add_new_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("new flags")
    add = group.add_argument
    add("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
        help="Autocast precision over fp32 master weights: auto = bf16 on CUDA, fp32 on CPU; fp16 adds a "
             "GradScaler.")
    add("--new_params_lr", type=float, default=1e-5,
        help="Fixed LR of the new tube/alignment/fusion parameters, independent of --lr (the original "
             "hard-coded it per script; default %(default)s for this task). The schedule still applies.")
    add("--weight_decay", type=float, default=0.2, help="Decoupled weight decay of the non-bias parameters.")
    add("--max_grad_norm", type=float, default=1.0, help="Global gradient-norm clipping; 0 disables.")
    add("--eval_steps", type=int, default=0,
        help="Evaluate every n optimiser steps and after each epoch; 0: epochs only.")
    add("--save_steps", type=int, default=0, help="Checkpoint every n optimiser steps; 0: only after each epoch.")
    add("--max_bad_steps", type=int, default=20,
        help="Stop the run after this many consecutive non-finite losses (those steps are skipped).")
    add("--max_empty_batches", type=int, default=20,
        help="Stop the run (exit 65) after this many consecutive micro-batches without one readable video, or an "
             "epoch without any: the training data stopped being readable.")
    add("--keep_checkpoints", type=int, default=1,
        help="Keep only the newest n ckpt/pytorch_model.bin.<step> files, and always the best by model selection "
             "(default 1: the last and the best; 0: keep all, as the original).")
    add("--max_steps", type=int, default=0, help="Stop after this many optimiser steps (0: no limit).")
    add("--num_centers", type=int, default=8, help="Semantic centers / tube tokens per video.")
    add("--split_layer", type=int, default=None,
        help="Index of the first ViT block that attends jointly over all frames of a clip. Default: the number "
             "of ViT blocks - 2, i.e. 10 for ViT-B/16 as the original hard-codes (blocks 10 and 11 joint).")
    add("--tube_layers", type=int, default=2, help="Depth of the tube encoder (copies of the last ViT blocks).")
    add("--fusion_layers", type=int, default=6, help="Fusion-encoder blocks executed (of 12).")
    add("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
        help="Write TensorBoard scalars to <output_dir>/tensorboard.")
    add("--debug", action="store_true",
        help="Show the traceback of bad-input errors (by default: one line on the console, the traceback in log.txt).")
    add("--allow_changed_settings", action="store_true",
        help="Resume even though settings that restore.bin fixes (learning rates, batch, model and data shape) "
             "differ: the new values take effect from the resume on, and run.json records them.")
    add("--grad_checkpointing", action="store_true",
        help="Recompute each transformer block's activations in the backward pass: the same gradients with far "
             "less activation memory, for about a third more compute.")
    add("--compile", action="store_true",
        help="torch.compile every transformer block (regional compilation; checkpoint keys unchanged). The first "
             "steps are slow while it compiles.")
    add("--frame_store", type=str, default=None,
        help="Read the raw-video datasets' frames from this decode-once store (a folder written by "
             "`frozen_tfrecord.py --video_dir <videos> --feature_framerate N`, at this run's --feature_framerate and "
             "input size) instead of decoding the videos every epoch: the same clips, far less CPU. Videos it "
             "lacks are decoded from --features_path.")
    add("--trust_checkpoint", action="store_true",
        help="Read a restore.bin written by an earlier version of this project (its numpy RNG state needs an "
             "unrestricted load, which can run code: only for your own files); the next save writes the safe "
             "format. Every other checkpoint is always loaded with weights_only=True.")
    add("--no_verify_crc", dest="verify_crc", action="store_false",
        help="Do not check the CRCs of WebVid TFRecords when training reads them (checked by default: a damaged "
             "record is skipped and counted like an undecodable video).")
    add("--max_missing_fraction", type=float, default=0.5,
        help="Refuse to train when more than this share of the WebVid labels has no record in the index "
             "(default 0.5; labels without a record are skipped and counted). None at all is always refused.")
    add("--catalogue_cache", default=None, metavar="DIR",
        help="Where the catalogue of a store goes when the labels' folder cannot be written (read-only, or s3://) "
             f"(default ${CACHE_ENV}, else ~/.cache/t2vlp/catalogues). A store without a catalogue gets one on the "
             "first run, built by each node's first rank while the others wait; frozen_tfrecord.py --catalogue "
             "builds it ahead.")
    add("--block_records", type=int, default=0, metavar="K",
        help="Block mode, for stores on s3:// or a slow network filesystem (off by default): read the store in "
             "blocks of up to K records that lie together in one shard, each with one ranged read; the epoch's "
             "order is a permutation of blocks, shuffled within --block_buffer blocks (docs/data.md §2.2).")
    add("--block_buffer", type=int, default=8, metavar="B",
        help="Block mode: blocks whose samples are shuffled together (each DataLoader worker holds B + 1 blocks).")


def _add_fusion_flags(parser: argparse.ArgumentParser, head_dropout: float) -> None:
    group = parser.add_argument_group("fusion encoder (stage 2 and downstream)")
    add = group.add_argument
    add("--head_dropout", type=float, default=head_dropout,
        help="Dropout of the token and match heads (default %(default)s for this task, as the original).")
    add("--match_norm", choices=["group", "pair"], default="group",
        help="Normalisation of the match head's text vectors: 'group' divides each feature by its norm over the "
             "pairs of a call, as the original (its released checkpoints need it); 'pair' normalises each vector "
             "(results then do not depend on the batch). Evaluate a model the way it was trained.")
    add("--train_encoders", action="store_true",
        help="Let the fusion losses' gradients reach the CLIP towers and the tube input (the original detaches "
             "them: only the fusion encoder, its heads and the tube encoder learn).")
    add("--eval_before_training", action=argparse.BooleanOptionalAction, default=True,
        help="With --do_train, evaluate the starting checkpoint first (a step-0 row; default on).")


def add_rerank_flags(parser: argparse.ArgumentParser) -> None:
    """The fusion rerank of retrieval evaluation (stage 2 and retrieval)."""
    group = parser.add_argument_group("retrieval rerank")
    group.add_argument("--rerank_top_k", type=int, default=32,
                       help="Evaluation: rerank each query's top-K candidates with the fusion match head (0: meanP "
                            "only).")
    group.add_argument("--rerank_batch_size", type=int, default=2048,
                       help="Evaluation: (video, text) pairs per rerank call.")


def rerank_flag_error(args: argparse.Namespace) -> str | None:
    if args.rerank_top_k < 0 or args.rerank_batch_size < 1:
        return "--rerank_top_k must be >= 0 and --rerank_batch_size >= 1"
    return None


def parse_args(argv: Sequence[str] | None = None, task: str | TaskDefinition = "clip",
               world_size: int | None = None) -> argparse.Namespace:
    """Parse and validate the flags of `task`. `world_size` defaults to torchrun's WORLD_SIZE (1 without torchrun).

    The result carries `task` (its name) and `ignored_flags`: one message per ignored flag that was set; call
    `report_ignored_flags` once logging is configured.
    """
    definition = task if isinstance(task, TaskDefinition) else task_definition(task)
    parser = build_parser(definition)
    args = parser.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    error = validation_error(args, world_size)
    if error:
        parser.error(error)
    args.task = definition.name
    error = _task_flag_error(args, definition)
    if error:
        parser.error(error)
    if definition.eval_split is not None and args.eval_split is None:
        args.eval_split = definition.eval_split.default(args)
    args.ignored_flags = _ignored_flag_messages(parser, args, definition.reads_compat_flags)
    return args


def validation_error(args: argparse.Namespace, world_size: int) -> str | None:
    """The first problem with flags that are impossible whatever the model, or None."""
    checks = [
        (args.do_train or args.do_eval, "one of --do_train / --do_eval is required"),
        (args.sim_header == "meanP", f"--sim_header {args.sim_header} is not implemented (only meanP)"),
        (args.linear_patch == "2d", "--linear_patch 3d is not implemented (only 2d)"),
        (args.epochs >= 1, "--epochs must be >= 1"),
        (args.lr > 0, "--lr must be > 0"),
        (args.coef_lr >= 0 and args.new_params_lr >= 0, "--coef_lr and --new_params_lr must be >= 0"),
        (0 <= args.warmup_proportion < 1, "--warmup_proportion must be in [0, 1)"),
        (0 <= args.max_missing_fraction <= 1, "--max_missing_fraction must be in [0, 1]"),
        (args.block_records >= 0 and args.block_buffer >= 1, "--block_records must be >= 0 and --block_buffer >= 1"),
        (args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
        (args.batch_size >= 1 and args.batch_size_val >= 1, "--batch_size and --batch_size_val must be >= 1"),
        (args.max_words >= 2, "--max_words must be >= 2 (SOT and EOT)"),
        (args.max_frames >= 1, "--max_frames must be >= 1"),
        (args.feature_framerate >= 1, "--feature_framerate must be >= 1"),
        (args.freeze_layer_num >= -1, "--freeze_layer_num must be >= -1"),
        (args.eval_steps >= 0 and args.save_steps >= 0, "--eval_steps and --save_steps must be >= 0"),
        (args.max_steps >= 0, "--max_steps must be >= 0"),
        (args.keep_checkpoints >= 0, "--keep_checkpoints must be >= 0"),
        (args.max_bad_steps >= 1, "--max_bad_steps must be >= 1"),
        (args.max_empty_batches >= 1, "--max_empty_batches must be >= 1"),
        (args.n_display >= 1, "--n_display must be >= 1"),
        (args.num_thread_reader >= 0, "--num_thread_reader must be >= 0"),
        (args.num_centers >= 1 and args.tube_layers >= 1, "--num_centers and --tube_layers must be >= 1"),
        ((args.split_layer is None or args.split_layer >= 0) and args.fusion_layers >= 1,
         "--split_layer must be >= 0, --fusion_layers >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            return message
    if args.do_train:
        try:
            local_batch_sizes(args.batch_size, world_size, args.gradient_accumulation_steps)
        except ValueError as exc:
            return str(exc)
    return None


def _task_flag_error(args: argparse.Namespace, definition: TaskDefinition) -> str | None:
    if definition.with_fusion and not 0 <= args.head_dropout < 1:
        return "--head_dropout must be in [0, 1)"
    weights = [getattr(args, f"{loss}_weight") for loss in definition.loss_weights]
    if weights and (min(weights) < 0 or max(weights) == 0):
        flags = " ".join(f"--{loss}_weight" for loss in definition.loss_weights)
        return f"the loss weights ({flags}) must be >= 0, one > 0"
    return definition.check_flags(args) if definition.check_flags is not None else None


def local_batch_sizes(batch_size: int, world_size: int, gradient_accumulation_steps: int) -> tuple[int, int]:
    """(per-process batch per optimiser step, per-forward micro batch) for a global `batch_size`."""
    if batch_size % world_size:
        raise ValueError(f"--batch_size {batch_size} (global) is not divisible by the world size {world_size}")
    per_process = batch_size // world_size
    if per_process % gradient_accumulation_steps:
        raise ValueError(
            f"the per-process batch {per_process} (--batch_size {batch_size} / world size {world_size}) is not "
            f"divisible by --gradient_accumulation_steps {gradient_accumulation_steps}"
        )
    return per_process, per_process // gradient_accumulation_steps


def check_model_limits(args: argparse.Namespace, *, context_length: int, num_frames: int | None = None,
                       fusion_extra_tokens: int | None = None) -> None:
    """Raise ModelConfigError naming the flag when the model cannot take these sizes.

    `context_length`: rows of the text positional table (77 for CLIP). `num_frames`: frames per clip the joint
    attention is built for. `fusion_extra_tokens`: non-text positions of the fusion sequence (1 + frames +
    centers, +1 for QA), when the fusion encoder is used; it shares the same positional table length.
    """
    if args.max_words > context_length:
        raise ModelConfigError(f"--max_words {args.max_words} exceeds the text context length {context_length}")
    if num_frames is not None and args.max_frames != num_frames:
        raise ModelConfigError(
            f"--max_frames {args.max_frames} must equal the model's frames per clip ({num_frames}): the joint "
            f"attention of the last ViT blocks is built for that many frames"
        )
    if fusion_extra_tokens is not None and args.max_words + fusion_extra_tokens > context_length:
        room = context_length - fusion_extra_tokens
        fix = (f"use --max_words <= {room}" if room >= 2 else
               f"use fewer --max_frames (now {args.max_frames}; the original recipes use 12)")
        raise ModelConfigError(
            f"the fusion sequence needs {fusion_extra_tokens} video positions + --max_words {args.max_words} "
            f"> {context_length} positions; {fix}"
        )


CLIP_FILE_NAME = "ViT-B-16.pt"


def resolve_clip_path(args: argparse.Namespace) -> str | None:
    """`--visual_pretrain_path`, or where the original scripts found CLIP: ./CLIP-modules (stages 1 and 2),
    ../CLIP-modules (the task scripts, run from their folder), or beside `--cross_config_path`. None when there is
    none but an --init_model may hold every weight (T2VLP.from_pretrained then says what the file lacks)."""
    if args.visual_pretrain_path:
        return args.visual_pretrain_path
    candidates = [os.path.join("CLIP-modules", CLIP_FILE_NAME), os.path.join("..", "CLIP-modules", CLIP_FILE_NAME),
                  os.path.join(args.cross_config_path, CLIP_FILE_NAME)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    if args.init_model:
        return None
    raise InputError(f"no CLIP checkpoint found: tried {', '.join(dict.fromkeys(candidates))} from {os.getcwd()}; "
                     f"fetch it with 'python CLIP-modules/fetch_clip.py' or pass --visual_pretrain_path")


def _ignored_flag_messages(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           read_by_task: frozenset[str]) -> list[str]:
    messages = []
    for action in parser._actions:
        hint = getattr(action, IGNORED_HINT, None)
        if hint is None or action.dest in read_by_task:
            continue
        if getattr(args, action.dest) != action.default:
            messages.append(f"--{action.dest} {getattr(args, action.dest)!r} is ignored: {hint}")
    if not args.loose_type:
        messages.append("--loose_type is not set, but the tight (cross-encoder) type is not implemented: "
                        "using loose meanP similarity")
    return messages


def report_ignored_flags(args: argparse.Namespace, log: logging.Logger | None = None) -> None:
    """Log one warning per ignored flag that was set (call once, after logging is configured)."""
    for message in getattr(args, "ignored_flags", []):
        (log or logger).warning(message)

