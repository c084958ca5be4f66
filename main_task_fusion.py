"""Stage-2 pre-training of T2VLP: the fusion encoder with MLM + prefix LM + video-text matching with hard
negatives + local alignment (docs/method.md §6), from a stage-1 checkpoint.

One process:   python main_task_fusion.py --do_train --init_model STAGE1_CKPT --output_dir runs/x ...
Several:       torchrun --nproc_per_node=8 main_task_fusion.py --do_train ...   (flags as in the original README)

The fusion encoder's blocks and positional table start from the original CLIP text tower, read from
`--visual_pretrain_path` (default ./CLIP-modules/ViT-B-16.pt, the path the original hard-coded). `--batch_size`
is the global batch over all processes. Rerunning a command whose `--output_dir` holds a `restore.bin` resumes.
The implementation is engine/tasks/fusion_pretraining.py.
"""

from __future__ import annotations

import sys

from engine.entry import run_main


def main(argv: list[str] | None = None) -> int:
    return run_main("fusion", argv)


if __name__ == "__main__":
    sys.exit(main())
