#!/usr/bin/env bash
# Stage-2 pre-training (fusion encoder: MLM + prefix LM + video-text matching + alignment) with torchrun.
#
#   DATA_PATH=/data INIT_MODEL=runs/stage1/ckpt/pytorch_model.bin.N OUTPUT_PATH=runs/stage2 NPROC_PER_NODE=8 \
#     bash start_fusion.sh
#   bash start_fusion.sh      # the embedded demo (CPU is fine): from the newest demo stage-1 checkpoint,
#                             # running the stage-1 demo first when there is none
#
# Environment:
#   DATA_PATH        folder with WebVid_TFRecord/ (or WEBVID_PATH), MSRVTT_JSFUSION_test.csv and MSRVTT_Videos/
#                    (docs/data.md); unset: run the demo
#   INIT_MODEL       stage-1 checkpoint (ours or the original's); required with DATA_PATH
#   WEBVID_PATH      folder (or s3:// prefix) holding path.index and the shards (default $DATA_PATH/WebVid_TFRecord)
#   LABELS           the labels (default $DATA_PATH/frozen_train_labels.json when it exists, else the store's own)
#   OUTPUT_PATH      output folder (default ./output/stage2, or a fresh ./output/demo_stage2_<time> for the demo)
#   CLIP_PATH        OpenAI ViT-B-16.pt (default ./CLIP-modules/ViT-B-16.pt): the fusion encoder starts from its text tower
#   CLIP_MODEL       open_clip architecture of CLIP_PATH (e.g. ViT-B-16 for LAION-2B / DataComp weights);
#                    default: OpenAI's layout, or what INIT_MODEL records (docs/training.md §0.1)
#   NPROC_PER_NODE   processes (GPUs) per node (default: number of visible GPUs, 1 without GPUs)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults 1, 0, 127.0.0.1, 29500)
#   MAX_RESTARTS     restart the workers this many times when one dies (default 0); with it, and on several
#                    nodes, torchrun's c10d rendezvous at RDZV_ENDPOINT (default MASTER_ADDR:MASTER_PORT) under
#                    RDZV_ID (default t2vlp); each restart resumes from restore.bin
#   BATCH_SIZE       GLOBAL batch over all processes (default 32 x NNODES: the original's 32 per node)
#   DEMO_DATA        where the demo data lives (default ./demo_data)
#   PYTHON           interpreter (default .venv/bin/python when present, else python3)
# Extra arguments are passed on to main_task_fusion.py (e.g. --max_steps 100).
set -euo pipefail
cd "$(dirname "$0")"

source tools/launch.sh
run_recipe fusion start_fusion.sh "$@"
