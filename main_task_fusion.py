"""Stage-2 pre-training of T2VLP: the fusion encoder with MLM + prefix LM + video-text matching with hard
negatives + local alignment (METHOD §6), from a stage-1 checkpoint.

One process:   python main_task_fusion.py --do_train --init_model STAGE1_CKPT --output_dir runs/x ...
Several:       torchrun --nproc_per_node=8 main_task_fusion.py --do_train ...   (flags as in the original README)

The fusion encoder's blocks and positional table start from the original CLIP text tower, read from
`--visual_pretrain_path` (default ./CLIP-modules/ViT-B-16.pt, the path the original hard-coded). `--batch_size`
is the global batch over all processes. Rerunning a command whose `--output_dir` holds a `restore.bin` resumes.
"""

from __future__ import annotations

import argparse
import sys

from dataloaders.lm_targets import WithLanguageModelTargets
from engine import distributed
from engine.args import resolve_precision
from engine.data import build_eval_dataset, build_train_dataset
from engine.entry import build_model, evaluate_before_training, run_main, train_or_evaluate
from engine.evaluation.retrieval import evaluated_checkpoint
from engine.run_logging import RunLogger
from engine.tasks.fusion_pretraining import FusionLossWeights, fusion_pretraining_task, make_fusion_evaluator


def run_stage2(args: argparse.Namespace, dist_info: distributed.DistInfo, run: RunLogger) -> int:
    precision = resolve_precision(args.precision, dist_info.device)
    model = build_model(args)
    image_size = model.image_resolution
    eval_dataset = build_eval_dataset(args, image_size)
    evaluate = None
    if eval_dataset is not None:
        evaluate = make_fusion_evaluator(
            eval_dataset, run, dist_info.device, precision, batch_size=args.batch_size_val,
            num_workers=args.num_thread_reader, rerank_top_k=args.rerank_top_k,
            rerank_batch_size=args.rerank_batch_size, mask_ratio=args.mask_ratio, seed=args.seed,
            extra=evaluated_checkpoint(args),
        )
    weights = FusionLossWeights(args.mlm_weight, args.plm_weight, args.vtm_weight, args.align_weight)
    task = fusion_pretraining_task(weights, detach_encoders=not args.train_encoders, evaluate=evaluate)
    evaluate_before_training(args, dist_info, evaluate, model)
    return train_or_evaluate(
        args, dist_info, run, model,
        lambda: WithLanguageModelTargets(build_train_dataset(args, image_size), args.mask_ratio, args.seed),
        task, precision,
    )


def main(argv: list[str] | None = None) -> int:
    return run_main("fusion", run_stage2, argv)


if __name__ == "__main__":
    sys.exit(main())
