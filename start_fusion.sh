#!/usr/bin/env bash
# Stage-2 pre-training (fusion encoder: MLM + prefix LM + video-text matching + alignment) with torchrun.
#
#   DATA_PATH=/data INIT_MODEL=runs/stage1/ckpt/pytorch_model.bin.N OUTPUT_PATH=runs/stage2 NPROC_PER_NODE=8 \
#     bash start_fusion.sh
#   bash start_fusion.sh      # the embedded demo (CPU is fine): from the newest demo stage-1 checkpoint,
#                             # running the stage-1 demo first when there is none
#
# Environment:
#   DATA_PATH        folder with frozen_train_labels.json, WebVid_TFRecord/ (or WEBVID_PATH), MSRVTT_JSFUSION_test.csv
#                    and MSRVTT_Videos/ (see README "Data layout"); unset: run the demo
#   INIT_MODEL       stage-1 checkpoint (ours or the original's); required with DATA_PATH
#   WEBVID_PATH      folder (or s3:// prefix) holding path.index and the shards (default $DATA_PATH/WebVid_TFRecord)
#   OUTPUT_PATH      output folder (default ./output/stage2, or a fresh ./output/demo_stage2_<time> for the demo)
#   CLIP_PATH        OpenAI ViT-B-16.pt (default ./CLIP-modules/ViT-B-16.pt): the fusion encoder starts from its text tower
#   NPROC_PER_NODE   processes (GPUs) per node (default: number of visible GPUs, 1 without GPUs)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults 1, 0, 127.0.0.1, 29500)
#   BATCH_SIZE       GLOBAL batch over all processes (default 32 x NNODES: the original's 32 per node)
#   DEMO_DATA        where the demo data lives (default ./demo_data)
#   PYTHON           interpreter (default .venv/bin/python when present, else python3)
# Extra arguments are passed on to main_task_fusion.py (e.g. --max_steps 100).
set -euo pipefail
cd "$(dirname "$0")"

source tools/launch.sh

if [[ -z "${DATA_PATH:-}" ]]; then
  demo_init_model 1
  OUTPUT_PATH=${OUTPUT_PATH:-./output/demo_stage2_$(date +%Y%m%d_%H%M%S)}
  echo "DATA_PATH is not set: running the stage-2 demo on synthetic data in $DEMO_DATA from $INIT_MODEL -> $OUTPUT_PATH"
  "${launch[@]}" main_task_fusion.py --do_train --num_thread_reader=2 --epochs=6 --batch_size=16 --n_display=50 \
    --val_csv "$DEMO_DATA/MSRVTT/MSRVTT_JSFUSION_test.csv" \
    --data_path "$DEMO_DATA/WebVid_TFRecord/frozen_train_labels.json" --dir_path "$DEMO_DATA/WebVid_TFRecord" \
    --features_path "$DEMO_DATA/MSRVTT/videos/all" --output_dir "$OUTPUT_PATH" --warmup_proportion 0.1 \
    --lr 1e-3 --coef_lr 1e-3 --new_params_lr 3e-3 --max_words 32 --max_frames 4 --batch_size_val 50 \
    --datatype msrvtt --feature_framerate 2 --freeze_layer_num 0 --slice_framepos 2 --eval_steps 0 \
    --keep_checkpoints 2 --fusion_layers 3 --match_norm pair --vtm_weight 2 --rerank_top_k 10 \
    --init_model "$INIT_MODEL" \
    --loose_type --linear_patch 2d --sim_header meanP --visual_pretrain_path "$DEMO_DATA/ViT-demo.pt" \
    --cross_config_path ./CLIP-modules "$@"
  "$PYTHON" -m tools.demo summary --output_dir "$OUTPUT_PATH"
  exit 0
fi

check_real_run_inputs start_fusion.sh
if [[ ! -f "${INIT_MODEL:-}" ]]; then
  echo "start_fusion.sh: INIT_MODEL '${INIT_MODEL:-}' is not a file: set it to the stage-1 checkpoint to start from (e.g. runs/stage1/ckpt/pytorch_model.bin.N)" >&2
  exit 2
fi
OUTPUT_PATH=${OUTPUT_PATH:-./output/stage2}
WEBVID_PATH=${WEBVID_PATH:-$DATA_PATH/WebVid_TFRecord}
BATCH_SIZE=${BATCH_SIZE:-$(( 32 * NNODES ))}
"${launch[@]}" main_task_fusion.py --do_train --num_thread_reader=4 --epochs=10 --batch_size="$BATCH_SIZE" --n_display=50 \
  --train_csv "$DATA_PATH/frozen_train_labels.json" --val_csv "$DATA_PATH/MSRVTT_JSFUSION_test.csv" \
  --data_path "$DATA_PATH/frozen_train_labels.json" --dir_path "$WEBVID_PATH" \
  --features_path "$DATA_PATH/MSRVTT_Videos" --warmup_proportion 0.2 --output_dir "$OUTPUT_PATH" \
  --lr 1e-5 --max_words 32 --max_frames 12 --batch_size_val 32 --datatype msrvtt --expand_msrvtt_sentences \
  --feature_framerate 2 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 \
  --loose_type --linear_patch 2d --sim_header meanP --init_model "$INIT_MODEL" \
  --visual_pretrain_path "$CLIP_PATH" --cross_config_path ./CLIP-modules "$@"
