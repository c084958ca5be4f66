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
#                    MSRVTT_data.json (README "Captioning data layout"); unset: run the demo
#   VIDEO_PATH       its video folder (default $DATA_PATH/MSVD_Videos or $DATA_PATH/MSRVTT_Videos)
#   INIT_MODEL       stage-2 checkpoint (ours or the original's), or a captioning one; required with DATA_PATH
#   OUTPUT_PATH      output folder (default ./output/caption_$DATASET, or ./output/demo_caption_<time>)
#   CLIP_PATH        OpenAI ViT-B-16.pt (default ./CLIP-modules/ViT-B-16.pt)
#   NPROC_PER_NODE   processes (GPUs) per node (default: number of visible GPUs, 1 without GPUs)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults 1, 0, 127.0.0.1, 29500)
#   BATCH_SIZE       GLOBAL batch over all processes (default 32 x NNODES: the original's 32 per node)
#   DEMO_DATA        where the demo data lives (default ./demo_data)
#   PYTHON           interpreter (default .venv/bin/python when present, else python3)
#   EVAL_ONLY        set to 1 to evaluate INIT_MODEL on the test split without training (--do_eval)
# Extra arguments are passed on to the entry script (e.g. --beam_size 5, --caption_protocol original).
# The metrics need Java (METEOR, PTB tokenizer): apt-get install -y default-jre-headless.
set -euo pipefail
cd "$(dirname "$0")"

source tools/launch.sh

DATASET=${DATASET:-msvd}
case "$DATASET" in
  msvd|msrvtt) ;;
  *) echo "start_caption.sh: DATASET must be msvd or msrvtt, not '$DATASET'" >&2; exit 2 ;;
esac
SCRIPT=video_captioning/${DATASET}_captioning.py

if [[ -z "${DATA_PATH:-}" ]]; then
  demo_init_model 2
  if [[ "$DATASET" == msvd ]]; then DEMO_ANNOTATIONS=$DEMO_DATA/MSVD; else DEMO_ANNOTATIONS=$DEMO_DATA/MSRVTT/MSRVTT_data.json; fi
  OUTPUT_PATH=${OUTPUT_PATH:-./output/demo_caption_$(date +%Y%m%d_%H%M%S)}
  echo "DATA_PATH is not set: fine-tuning $DATASET captioning on the demo data in $DEMO_DATA from $INIT_MODEL -> $OUTPUT_PATH"
  # The demo model is tiny and far from converged, so it trains at much higher rates than the original recipe
  # (lr 5e-5, backbone 5e-8, new 1e-6), which only polish a pre-trained ViT-B/16.
  "${launch[@]}" "$SCRIPT" --do_train --num_thread_reader=2 --epochs=10 --batch_size=32 --n_display=50 \
    --data_path "$DEMO_ANNOTATIONS" --features_path "$DEMO_DATA/MSRVTT/videos/all" \
    --output_dir "$OUTPUT_PATH" --warmup_proportion 0.1 --lr 1e-4 --coef_lr 1 --new_params_lr 1e-3 \
    --max_words 16 --max_frames 4 --batch_size_val 32 --datatype "$DATASET" --expand_msrvtt_sentences \
    --feature_framerate 2 --freeze_layer_num -1 --slice_framepos 2 --eval_steps 0 --keep_checkpoints 2 \
    --fusion_layers 3 --match_norm pair --init_model "$INIT_MODEL" \
    --loose_type --linear_patch 2d --sim_header meanP --visual_pretrain_path "$DEMO_DATA/ViT-demo.pt" \
    --cross_config_path ./CLIP-modules "$@"
  "$PYTHON" -m tools.demo summary --output_dir "$OUTPUT_PATH"
  exit 0
fi

check_real_run_inputs start_caption.sh
require_file start_caption.sh "${INIT_MODEL:-}" "set INIT_MODEL to the stage-2 checkpoint to fine-tune (or a captioning one with EVAL_ONLY=1)"
OUTPUT_PATH=${OUTPUT_PATH:-./output/caption_$DATASET}
BATCH_SIZE=${BATCH_SIZE:-$(( 32 * NNODES ))}
case "$DATASET" in
  msvd)   VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSVD_Videos}; ANNOTATIONS=$DATA_PATH ;;
  msrvtt) VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSRVTT_Videos}; ANNOTATIONS=$DATA_PATH/MSRVTT_data.json ;;
esac
require_folder start_caption.sh "$VIDEO_PATH" "set VIDEO_PATH"
# The original recipe (METHOD §8): 10 epochs, lr 5e-5, backbone 5e-5 x 1e-3, fusion list + local_visual 1e-6,
# 12 frames at 1 fps, warmup 0.2, greedy decoding.
MODE=--do_train
if [[ -n "${EVAL_ONLY:-}" ]]; then MODE=--do_eval; fi
"${launch[@]}" "$SCRIPT" "$MODE" --num_thread_reader=4 --epochs=10 --batch_size="$BATCH_SIZE" --n_display=50 \
  --data_path "$ANNOTATIONS" --features_path "$VIDEO_PATH" --warmup_proportion 0.2 --output_dir "$OUTPUT_PATH" \
  --lr 5e-5 --max_words 32 --max_frames 12 --batch_size_val 32 --datatype "$DATASET" --expand_msrvtt_sentences \
  --feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 \
  --loose_type --linear_patch 2d --sim_header meanP --init_model "$INIT_MODEL" \
  --visual_pretrain_path "$CLIP_PATH" --cross_config_path ./CLIP-modules "$@"
