"""Stage-1 pre-training of T2VLP: video-text contrastive + local alignment (METHOD §5).

One process:   python main_task_clip.py --do_train --output_dir runs/x ...
Several:       torchrun --nproc_per_node=8 main_task_clip.py --do_train ...   (flags as in the original README)

`--batch_size` is the global batch over all processes. Rerunning a command whose `--output_dir` holds a
`restore.bin` resumes exactly where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from typing import Any

import numpy as np
import torch

from engine import distributed
from engine.args import (
    check_model_limits,
    local_batch_sizes,
    parse_args,
    report_ignored_flags,
    resolve_precision,
)
from engine.data import build_eval_dataset, build_train_dataset
from engine.evaluation import evaluate_retrieval, log_retrieval_rows
from engine.run_logging import RunLogger
from engine.trainer import Trainer, TrainSettings
from modules.model import T2VLP, T2VLPConfig

logger = logging.getLogger("t2vlp")

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(args: argparse.Namespace) -> T2VLP:
    config = T2VLPConfig(
        num_centers=args.num_centers, split_layer=args.split_layer, tube_layers=args.tube_layers,
        detach_tube_input=False,
    )
    model = T2VLP.from_pretrained(args.visual_pretrain_path, init_model=args.init_model, config=config)
    check_model_limits(args, context_length=model.clip_config.context_length)
    return model


def make_evaluator(args: argparse.Namespace, dataset, run: RunLogger, device: torch.device, precision: str):
    def evaluate(model: torch.nn.Module, step: int, epoch: int) -> dict[str, Any]:
        result = evaluate_retrieval(
            model, dataset, batch_size=args.batch_size_val, device=device, precision=precision,
            num_workers=args.num_thread_reader,
        )
        return log_retrieval_rows(run, [result], step, epoch)[0]

    return evaluate


def run_stage1(args: argparse.Namespace, dist_info: distributed.DistInfo, run: RunLogger) -> None:
    report_ignored_flags(args)
    logger.info("command line: %s", " ".join(sys.argv))
    set_seed(args.seed)
    precision = resolve_precision(args.precision, dist_info.device)
    model = build_model(args)
    image_size = model.image_resolution
    eval_dataset = build_eval_dataset(args, image_size)
    evaluate = make_evaluator(args, eval_dataset, run, dist_info.device, precision) if eval_dataset else None
    if args.do_train:
        _, micro_batch = local_batch_sizes(args.batch_size, dist_info.world_size, args.gradient_accumulation_steps)
        settings = TrainSettings(
            epochs=args.epochs, micro_batch_size=micro_batch,
            accumulation_steps=args.gradient_accumulation_steps, lr=args.lr, coef_lr=args.coef_lr,
            new_params_lr=args.new_params_lr, weight_decay=args.weight_decay,
            warmup_proportion=args.warmup_proportion, max_grad_norm=args.max_grad_norm, precision=precision,
            seed=args.seed, num_workers=args.num_thread_reader, n_display=args.n_display,
            eval_steps=args.eval_steps, save_steps=args.save_steps, max_steps=args.max_steps,
            max_bad_steps=args.max_bad_steps, keep_checkpoints=args.keep_checkpoints,
        )
        trainer = Trainer(
            model, build_train_dataset(args, image_size), settings, run, dist_info, args.output_dir, evaluate,
            freeze_layer_num=args.freeze_layer_num,
        )
        trainer.resume_if_possible(args.resume_model)
        trainer.fit()
    elif evaluate is not None and dist_info.is_main:
        evaluate(model.to(dist_info.device), step=0, epoch=0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, task="clip")
    dist_info = distributed.init_distributed()
    run = RunLogger(args.output_dir, dist_info.is_main, tensorboard=args.tensorboard)
    try:
        run_stage1(args, dist_info, run)  # returns before cleanup, so the trainer is out of scope there
        return 0
    finally:
        run.close()
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
