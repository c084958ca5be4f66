#!/usr/bin/env bash
# Text-video retrieval fine-tuning and evaluation (MSR-VTT, MSVD, LSMDC, DiDeMo, ActivityNet Captions) with torchrun.
#
#   DATASET=msrvtt DATA_PATH=/data/msrvtt INIT_MODEL=runs/stage2/ckpt/pytorch_model.bin.N NPROC_PER_NODE=8 \
#     bash start_retrieval.sh
#   bash start_retrieval.sh      # the embedded demo (CPU is fine): from the newest demo stage-2 checkpoint,
#                                # running the earlier demos first when there is none
#
# Environment:
#   DATASET          msrvtt (default), msvd, lsmdc, didemo or activitynet
#   DATA_PATH        the dataset's annotation folder (docs/data.md §3); unset: run the demo
#   VIDEO_PATH       its video folder (default $DATA_PATH/MSRVTT_Videos, MSVD_Videos, LSMDC_Videos, DiDeMo_Videos or
#                    ActivityNet_Videos)
#   INIT_MODEL       stage-2 checkpoint (ours or the original's), or a downstream one; required with DATA_PATH
#   OUTPUT_PATH      output folder (default ./output/retrieval_$DATASET, or ./output/demo_retrieval_<time>)
#   CLIP_PATH        OpenAI ViT-B-16.pt (default ./CLIP-modules/ViT-B-16.pt)
#   CLIP_MODEL       open_clip architecture of CLIP_PATH (e.g. ViT-B-16 for LAION-2B / DataComp weights);
#                    default: OpenAI's layout, or what INIT_MODEL records (docs/training.md §0.1)
#   NPROC_PER_NODE   processes (GPUs) per node (default: number of visible GPUs, 1 without GPUs)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults 1, 0, 127.0.0.1, 29500)
#   MAX_RESTARTS     restart the workers this many times when one dies (default 0); with it, and on several
#                    nodes, torchrun's c10d rendezvous at RDZV_ENDPOINT (default MASTER_ADDR:MASTER_PORT) under
#                    RDZV_ID (default t2vlp); each restart resumes from restore.bin
#   BATCH_SIZE       GLOBAL batch over all processes (default 32 x NNODES: the original's 32 per node)
#   MAX_WORDS        caption tokens (default 32, ActivityNet 56: the most the fusion sequence holds with 12 frames;
#                    DiDeMo paragraphs may use up to 56 too)
#   DEMO_DATA        where the demo data lives (default ./demo_data)
#   PYTHON           interpreter (default .venv/bin/python when present, else python3)
#   EVAL_ONLY        set to 1 to evaluate INIT_MODEL without training (--do_eval)
# Extra arguments are passed on to the entry script (e.g. --dsl, --msrvtt_test full, --eval_split val, --max_steps 100).
set -euo pipefail
cd "$(dirname "$0")"

source tools/launch.sh
choose_dataset start_retrieval.sh msrvtt msvd lsmdc didemo activitynet
run_recipe retrieval start_retrieval.sh "$@"
