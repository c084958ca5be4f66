#!/usr/bin/env bash
# Stage-1 pre-training (contrastive + local alignment) with torchrun.
#
#   DATA_PATH=/data OUTPUT_PATH=runs/stage1 NPROC_PER_NODE=8 bash start_clip.sh      # one node, 8 GPUs
#   bash start_clip.sh                                                             # the embedded demo (CPU is fine)
#
# Environment:
#   DATA_PATH        folder with WebVid_TFRecord/ (or WEBVID_PATH), MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv
#                    and MSRVTT_Videos/ (docs/data.md); unset: run the demo
#   WEBVID_PATH      folder (or s3:// prefix) holding path.index and the shards (default $DATA_PATH/WebVid_TFRecord)
#   LABELS           the labels (default $DATA_PATH/frozen_train_labels.json when it exists, else the store's own)
#   OUTPUT_PATH      output folder (default ./output/stage1, or a fresh ./output/demo_stage1_<time> for the demo)
#   CLIP_PATH        OpenAI ViT-B-16.pt (default ./CLIP-modules/ViT-B-16.pt; fetch with CLIP-modules/fetch_clip.py)
#   CLIP_MODEL       open_clip architecture of CLIP_PATH (e.g. ViT-B-16 for LAION-2B / DataComp weights);
#                    default: OpenAI's layout, or what INIT_MODEL records (docs/training.md §0.1)
#   NPROC_PER_NODE   processes (GPUs) per node (default: number of visible GPUs, 1 without GPUs)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults 1, 0, 127.0.0.1, 29500)
#   MAX_RESTARTS     restart the workers this many times when one dies (default 0); with it, and on several
#                    nodes, torchrun's c10d rendezvous at RDZV_ENDPOINT (default MASTER_ADDR:MASTER_PORT) under
#                    RDZV_ID (default t2vlp); each restart resumes from restore.bin
#   EVAL_ONLY        set to 1 to evaluate INIT_MODEL (a stage-1 checkpoint) on MSR-VTT 1k-A without training
#   INIT_MODEL       the checkpoint EVAL_ONLY evaluates
#   BATCH_SIZE       GLOBAL batch over all processes (default 32 x NNODES: the original's 32 per node)
#   DEMO_DATA        where the demo data lives (default ./demo_data)
#   PYTHON           interpreter (default .venv/bin/python when present, else python3)
# Extra arguments are passed on to main_task_clip.py (e.g. --max_steps 100).
set -euo pipefail
cd "$(dirname "$0")"

source tools/launch.sh
run_recipe clip start_clip.sh "$@"
