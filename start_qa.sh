#!/usr/bin/env bash
# Video question answering fine-tuning and evaluation (MSRVTT-QA, MSVD-QA) with torchrun.
#
#   DATASET=msrvtt DATA_PATH=/data/msrvtt_qa INIT_MODEL=runs/stage2/ckpt/pytorch_model.bin.N NPROC_PER_NODE=8 \
#     bash start_qa.sh
#   bash start_qa.sh             # the embedded demo (CPU is fine): from the newest demo stage-2 checkpoint,
#                                # running the earlier demos first when there is none
#
# Environment:
#   DATASET          msrvtt (default) or msvd
#   DATA_PATH        MSRVTT-QA: the folder of train.jsonl, val.jsonl, test.jsonl, train_ans2label.json;
#                    MSVD-QA: the folder of train_qa.json, val_qa.json, test_qa.json, youtube_mapping.txt and a
#                    train_ans2label.json (README "QA data layout"); unset: run the demo
#   VIDEO_PATH       the video folder (default $DATA_PATH/MSRVTT_Videos or $DATA_PATH/MSVD_Videos)
#   INIT_MODEL       stage-2 checkpoint (ours or the original's), or a QA one; required with DATA_PATH
#   QA_HEAD          classifier (default) or first_token (the original's protocol; its released checkpoint)
#   OUTPUT_PATH      output folder (default ./output/qa_$DATASET, or ./output/demo_qa_<time>)
#   CLIP_PATH        OpenAI ViT-B-16.pt (default ./CLIP-modules/ViT-B-16.pt)
#   NPROC_PER_NODE   processes (GPUs) per node (default: number of visible GPUs, 1 without GPUs)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults 1, 0, 127.0.0.1, 29500)
#   BATCH_SIZE       GLOBAL batch over all processes (default 32 x NNODES: the original's 32 per node)
#   DEMO_DATA        where the demo data lives (default ./demo_data)
#   PYTHON           interpreter (default .venv/bin/python when present, else python3)
#   EVAL_ONLY        set to 1 to evaluate INIT_MODEL without training (--do_eval)
# Extra arguments are passed on to the entry script (e.g. --eval_split val, --max_steps 100).
set -euo pipefail
cd "$(dirname "$0")"

source tools/launch.sh

DATASET=${DATASET:-msrvtt}
case "$DATASET" in
  msrvtt|msvd) ;;
  *) echo "start_qa.sh: DATASET must be msrvtt or msvd, not '$DATASET'" >&2; exit 2 ;;
esac
SCRIPT=video_qa/main_task_qa_$DATASET.py
QA_HEAD=${QA_HEAD:-classifier}

qa_files() {  # qa_files FOLDER: the annotation flags of $DATASET in FOLDER
  if [[ "$DATASET" == msrvtt ]]; then
    echo --msrvtt_qa_train_json "$1/train.jsonl" --msrvtt_qa_val_json "$1/val.jsonl" \
      --msrvtt_qa_test_json "$1/test.jsonl" --msrvtt_qa_anslabel_json "$1/train_ans2label.json"
  else
    echo --msvd_qa_train_json "$1/train_qa.json" --msvd_qa_val_json "$1/val_qa.json" \
      --msvd_qa_test_json "$1/test_qa.json" --msvd_qa_anslabel_json "$1/train_ans2label.json" \
      --youtube_mapping "$1/youtube_mapping.txt"
  fi
}

if [[ -z "${DATA_PATH:-}" ]]; then
  demo_init_model 2
  if [[ "$DATASET" == msrvtt ]]; then QA_DIR=$DEMO_DATA/MSRVTT-QA; else QA_DIR=$DEMO_DATA/MSVD-QA; fi
  OUTPUT_PATH=${OUTPUT_PATH:-./output/demo_qa_$(date +%Y%m%d_%H%M%S)}
  echo "DATA_PATH is not set: fine-tuning $DATASET QA on the demo data in $DEMO_DATA from $INIT_MODEL -> $OUTPUT_PATH"
  # The demo model is tiny and far from converged, so it trains at much higher rates than the original recipe
  # (lr 2e-4, backbone 2e-7, fusion list 5e-6), which only polish a pre-trained ViT-B/16.
  # shellcheck disable=SC2046
  "${launch[@]}" "$SCRIPT" --do_train --num_thread_reader=2 --epochs=5 --batch_size=32 --n_display=20 \
    $(qa_files "$QA_DIR") --features_path "$DEMO_DATA/MSRVTT/videos/all" --qa_head "$QA_HEAD" \
    --output_dir "$OUTPUT_PATH" --warmup_proportion 0.1 --lr 1e-3 --coef_lr 0.1 --new_params_lr 1e-3 \
    --max_words 16 --max_frames 4 --batch_size_val 64 --feature_framerate 2 --freeze_layer_num -1 \
    --slice_framepos 2 --keep_checkpoints 2 --fusion_layers 3 --match_norm pair --init_model "$INIT_MODEL" \
    --loose_type --linear_patch 2d --sim_header meanP --visual_pretrain_path "$DEMO_DATA/ViT-demo.pt" \
    --cross_config_path ./CLIP-modules "$@"
  "$PYTHON" -m tools.demo summary --output_dir "$OUTPUT_PATH"
  exit 0
fi

check_real_run_inputs start_qa.sh
require_file start_qa.sh "${INIT_MODEL:-}" "set INIT_MODEL to the stage-2 checkpoint to fine-tune (or a QA one with EVAL_ONLY=1)"
OUTPUT_PATH=${OUTPUT_PATH:-./output/qa_$DATASET}
BATCH_SIZE=${BATCH_SIZE:-$(( 32 * NNODES ))}
if [[ "$DATASET" == msrvtt ]]; then VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSRVTT_Videos}; else VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSVD_Videos}; fi
require_folder start_qa.sh "$VIDEO_PATH" "set VIDEO_PATH"
# The original recipe (METHOD §8): 5 epochs, lr 2e-4, backbone 2e-4 x 1e-3, fusion list 5e-6, 12 frames at 1 fps,
# seed 2021, evaluated on test after each epoch.
MODE=--do_train
if [[ -n "${EVAL_ONLY:-}" ]]; then MODE=--do_eval; fi
# shellcheck disable=SC2046
"${launch[@]}" "$SCRIPT" "$MODE" --num_thread_reader=4 --epochs=5 --batch_size="$BATCH_SIZE" --n_display=50 \
  $(qa_files "$DATA_PATH") --features_path "$VIDEO_PATH" --qa_head "$QA_HEAD" --warmup_proportion 0.1 \
  --output_dir "$OUTPUT_PATH" --lr 2e-4 --max_words 32 --max_frames 12 --batch_size_val 32 \
  --feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 \
  --loose_type --linear_patch 2d --sim_header meanP --init_model "$INIT_MODEL" \
  --visual_pretrain_path "$CLIP_PATH" --cross_config_path ./CLIP-modules "$@"
