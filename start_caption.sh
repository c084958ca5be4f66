#!/usr/bin/env bash
# Video captioning fine-tuning and evaluation (MSVD, MSR-VTT) with torchrun.
#
#   DATASET=msvd DATA_PATH=/data/msvd INIT_MODEL=runs/stage2/ckpt/pytorch_model.bin.N NPROC_PER_NODE=8 \
#     bash start_caption.sh
#   bash start_caption.sh        # the embedded demo (CPU is fine): from the newest demo stage-2 checkpoint,
#                                # running the earlier demos first when there is none
#
# Environment:
#   DATASET          msvd (default) or msrvtt
#   DATA_PATH        MSVD: the folder of {train,val,test}_list.txt + raw-captions.pkl; MSR-VTT: the folder of
#                    MSRVTT_data.json (docs/data.md §4); unset: run the demo
#   VIDEO_PATH       its video folder (default $DATA_PATH/MSVD_Videos or $DATA_PATH/MSRVTT_Videos)
#   INIT_MODEL       stage-2 checkpoint (ours or the original's), or a captioning one; required with DATA_PATH
#   OUTPUT_PATH      output folder (default ./output/caption_$DATASET, or ./output/demo_caption_<time>)
#   CLIP_PATH        OpenAI ViT-B-16.pt (default ./CLIP-modules/ViT-B-16.pt)
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
#   EVAL_ONLY        set to 1 to evaluate INIT_MODEL on the test split without training (--do_eval)
# Extra arguments are passed on to the entry script (e.g. --beam_size 5, --caption_protocol original).
# The metrics need Java (METEOR, PTB tokenizer): apt-get install -y default-jre-headless.
set -euo pipefail
cd "$(dirname "$0")"

source tools/launch.sh
choose_dataset start_caption.sh msvd msrvtt
run_recipe caption start_caption.sh "$@"
