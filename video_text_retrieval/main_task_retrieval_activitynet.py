"""Text-video retrieval fine-tuning and evaluation on ActivityNet Captions (paragraph retrieval, as CLIP4Clip).

Runs from the repository root or from this folder (as the original did, with --cross_config_path ../CLIP-modules):
    torchrun --nproc_per_node=8 video_text_retrieval/main_task_retrieval_activitynet.py --do_train ...
    python video_text_retrieval/main_task_retrieval_activitynet.py --do_eval --init_model CKPT ...
The implementation is engine/tasks/retrieval.py; flags in docs/training.md, data layout in docs/data.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.entry import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main("retrieval", argv, dataset="activitynet")


if __name__ == "__main__":
    sys.exit(main())
