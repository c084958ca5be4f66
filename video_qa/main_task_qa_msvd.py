"""Video question answering fine-tuning and evaluation on MSVD-QA (answer classifier, or the original's first-token
head with --qa_head first_token).

Runs from the repository root or from this folder (as the original did, with --cross_config_path ../CLIP-modules):
    torchrun --nproc_per_node=8 video_qa/main_task_qa_msvd.py --do_train ...
    python video_qa/main_task_qa_msvd.py --do_eval --init_model CKPT ...
The implementation is engine/tasks/video_qa.py; flags in docs/training.md, data layout in docs/data.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.entry import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main("qa", argv, dataset="msvd")


if __name__ == "__main__":
    sys.exit(main())
