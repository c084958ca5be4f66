"""Stage-1 pre-training of T2VLP: video-text contrastive + local alignment (docs/method.md §5).

One process:   python main_task_clip.py --do_train --output_dir runs/x ...
Several:       torchrun --nproc_per_node=8 main_task_clip.py --do_train ...   (flags as in the original README)

`--batch_size` is the global batch over all processes. Rerunning a command whose `--output_dir` holds a
`restore.bin` resumes exactly where it stopped. The implementation is engine/tasks/clip_pretraining.py.
"""

from __future__ import annotations

import sys

from engine.entry import run_main


def main(argv: list[str] | None = None) -> int:
    return run_main("clip", argv)


if __name__ == "__main__":
    sys.exit(main())
