#!/usr/bin/env bash
# Text-video retrieval fine-tuning and evaluation (MSR-VTT, MSVD, LSMDC, DiDeMo) with torchrun.
#
#   DATASET=msrvtt DATA_PATH=/data/msrvtt INIT_MODEL=runs/stage2/ckpt/pytorch_model.bin.N NPROC_PER_NODE=8 \
#     bash start_retrieval.sh
#   bash start_retrieval.sh      # the embedded demo (CPU is fine): from the newest demo stage-2 checkpoint,
#                                # running the earlier demos first when there is none
#
# Environment:
#   DATASET          msrvtt (default), msvd, lsmdc or didemo
#   DATA_PATH        the dataset's annotation folder (README "Retrieval data layout"); unset: run the demo
#   VIDEO_PATH       its video folder (default $DATA_PATH/MSRVTT_Videos, MSVD_Videos, LSMDC_Videos or DiDeMo_Videos)
#   INIT_MODEL       stage-2 checkpoint (ours or the original's), or a downstream one; required with DATA_PATH
#   OUTPUT_PATH      output folder (default ./output/retrieval_$DATASET, or ./output/demo_retrieval_<time>)
#   CLIP_PATH        OpenAI ViT-B-16.pt (default ./CLIP-modules/ViT-B-16.pt)
#   NPROC_PER_NODE   processes (GPUs) per node (default: number of visible GPUs, 1 without GPUs)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults 1, 0, 127.0.0.1, 29500)
#   BATCH_SIZE       GLOBAL batch over all processes (default 32 x NNODES: the original's 32 per node)
#   MAX_WORDS        caption tokens (default 32; DiDeMo paragraphs may use up to 56 with 12 frames)
#   DEMO_DATA        where the demo data lives (default ./demo_data)
#   PYTHON           interpreter (default .venv/bin/python when present, else python3)
#   EVAL_ONLY        set to 1 to evaluate INIT_MODEL without training (--do_eval)
# Extra arguments are passed on to the entry script (e.g. --dsl, --msrvtt_test full, --eval_split val, --max_steps 100).
set -euo pipefail
cd "$(dirname "$0")"

source tools/launch.sh

DATASET=${DATASET:-msrvtt}
case "$DATASET" in
  msrvtt|msvd|lsmdc|didemo) ;;
  *) echo "start_retrieval.sh: DATASET must be msrvtt, msvd, lsmdc or didemo, not '$DATASET'" >&2; exit 2 ;;
esac
SCRIPT=video_text_retrieval/main_task_retrieval_$DATASET.py

if [[ -z "${DATA_PATH:-}" ]]; then
  if [[ "$DATASET" != msrvtt ]]; then
    echo "start_retrieval.sh: the demo data is laid out as MSR-VTT; unset DATASET (or set DATA_PATH)" >&2
    exit 2
  fi
  demo_init_model 2
  OUTPUT_PATH=${OUTPUT_PATH:-./output/demo_retrieval_$(date +%Y%m%d_%H%M%S)}
  echo "DATA_PATH is not set: fine-tuning retrieval on the demo data in $DEMO_DATA from $INIT_MODEL -> $OUTPUT_PATH"
  # The demo model is tiny and its backbone is far from converged, so it trains at much higher rates than the
  # original recipe (lr 5e-5, backbone 5e-8, new 5e-6), which only polish a pre-trained ViT-B/16.
  "${launch[@]}" "$SCRIPT" --do_train --num_thread_reader=2 --epochs=3 --batch_size=32 --n_display=50 \
    --train_csv "$DEMO_DATA/MSRVTT/MSRVTT_train.9k.csv" --val_csv "$DEMO_DATA/MSRVTT/MSRVTT_JSFUSION_test.csv" \
    --data_path "$DEMO_DATA/MSRVTT/MSRVTT_data.json" --features_path "$DEMO_DATA/MSRVTT/videos/all" \
    --output_dir "$OUTPUT_PATH" --warmup_proportion 0.1 --lr 1e-4 --coef_lr 1 --new_params_lr 1e-3 \
    --max_words 32 --max_frames 4 --batch_size_val 50 --datatype msrvtt --expand_msrvtt_sentences \
    --feature_framerate 2 --freeze_layer_num -1 --slice_framepos 2 --eval_steps 0 --keep_checkpoints 2 \
    --fusion_layers 3 --match_norm pair --rerank_top_k 10 --init_model "$INIT_MODEL" \
    --loose_type --linear_patch 2d --sim_header meanP --visual_pretrain_path "$DEMO_DATA/ViT-demo.pt" \
    --cross_config_path ./CLIP-modules "$@"
  "$PYTHON" -m tools.demo summary --output_dir "$OUTPUT_PATH"
  exit 0
fi

check_real_run_inputs start_retrieval.sh
require_file start_retrieval.sh "${INIT_MODEL:-}" "set INIT_MODEL to the stage-2 checkpoint to fine-tune (or a downstream one with EVAL_ONLY=1)"
OUTPUT_PATH=${OUTPUT_PATH:-./output/retrieval_$DATASET}
BATCH_SIZE=${BATCH_SIZE:-$(( 32 * NNODES ))}
MAX_WORDS=${MAX_WORDS:-32}
case "$DATASET" in
  msrvtt) VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSRVTT_Videos}
          data_flags=(--train_csv "$DATA_PATH/MSRVTT_train.9k.csv" --val_csv "$DATA_PATH/MSRVTT_JSFUSION_test.csv"
                      --data_path "$DATA_PATH/MSRVTT_data.json" --expand_msrvtt_sentences) ;;
  msvd)   VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSVD_Videos}; data_flags=(--data_path "$DATA_PATH") ;;
  lsmdc)  VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/LSMDC_Videos}; data_flags=(--data_path "$DATA_PATH") ;;
  didemo) VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/DiDeMo_Videos}; data_flags=(--data_path "$DATA_PATH") ;;
esac
require_folder start_retrieval.sh "$VIDEO_PATH" "set VIDEO_PATH"
# The original recipe (METHOD §8): 5 epochs, lr 5e-5, backbone 5e-5 x 1e-3, fusion list 5e-6, 12 frames at 2 fps.
MODE=--do_train
if [[ -n "${EVAL_ONLY:-}" ]]; then MODE=--do_eval; fi
"${launch[@]}" "$SCRIPT" "$MODE" --num_thread_reader=4 --epochs=5 --batch_size="$BATCH_SIZE" --n_display=50 \
  "${data_flags[@]}" --features_path "$VIDEO_PATH" --warmup_proportion 0.1 --output_dir "$OUTPUT_PATH" \
  --lr 5e-5 --max_words "$MAX_WORDS" --max_frames 12 --batch_size_val 32 --datatype "$DATASET" \
  --feature_framerate 2 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 \
  --loose_type --linear_patch 2d --sim_header meanP --init_model "$INIT_MODEL" \
  --visual_pretrain_path "$CLIP_PATH" --cross_config_path ./CLIP-modules "$@"
