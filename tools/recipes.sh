# Every stage's and task's recipe, declared once: the original recipe (docs/method.md §8) that its launcher runs when
# DATA_PATH is set, and the demo recipe it runs on the embedded demo data when it is not. Sourced by
# tools/launch.sh; `run_recipe` there calls `original_<task>` or `demo_<task>`.
#
# A recipe sets SCRIPT (the entry script) and `flags` (its flags; the launcher's own arguments follow them, so they
# win), and the defaults of the variables it reads (OUTPUT_PATH, VIDEO_PATH, ...). It may check its inputs (exit 2
# with one line) and, for a demo, prepare the demo data and the checkpoint it starts from.

# What the original scripts always passed: meanP similarity without a cross encoder, 2-D patches, and where the
# cross config lives; then the CLIP file, and its open_clip architecture when CLIP_MODEL names one.
clip_options() {  # clip_options CLIP_FILE
  echo_flags --loose_type --linear_patch 2d --sim_header meanP --visual_pretrain_path "$1" \
    --cross_config_path ./CLIP-modules
  if [[ -n "${CLIP_MODEL:-}" ]]; then echo_flags --clip_model "$CLIP_MODEL"; fi
}
# The original recipes' common settings: 12 frames cut uniformly, backbone at lr x 1e-3, only the stem frozen.
ORIGINAL_FRAMES=(--max_frames 12 --batch_size_val 32 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2)
# The demo's: the tiny demo CLIP (4 frames of 32 px, 2 per second), two checkpoints kept.
demo_options() {
  echo_flags --max_frames 4 --feature_framerate 2 --slice_framepos 2 --keep_checkpoints 2
  clip_options "$DEMO_DATA/ViT-demo.pt"
}
# The downstream demos fine-tune the demo stage-2 model: its 3 fusion blocks, per-pair match normalisation.
DEMO_FUSION=(--fusion_layers 3 --match_norm pair)

# echo_flags ARG...: print the arguments one per line (recipes read them with `mapfile`; no path may hold a newline)
echo_flags() { printf '%s\n' "$@"; }
# append_flags COMMAND...: append the lines COMMAND prints to `flags`
append_flags() { local more; mapfile -t more < <("$@"); flags+=("${more[@]}"); }

# webvid_labels: the pre-training labels: LABELS, else $DATA_PATH/frozen_train_labels.json (the original's layout)
# when it exists, else the labels the converter wrote beside the store
webvid_labels() {
  if [[ -n "${LABELS:-}" ]]; then echo "$LABELS"
  elif [[ -f "$DATA_PATH/frozen_train_labels.json" || "$WEBVID_PATH" == s3://* ]]; then
    echo "$DATA_PATH/frozen_train_labels.json"
  else echo "$WEBVID_PATH/frozen_train_labels.json"; fi
}
# require_labels LABELS: the labels must exist before anything is launched (the converter writes them beside the
# store; the original's layout has them in DATA_PATH)
require_labels() {
  [[ "$1" == s3://* ]] && return
  require_file "$LAUNCHER" "$1" "convert a corpus into \$DATA_PATH/WebVid_TFRecord with frozen_tfrecord.py (its labels go \
beside the store), or set LABELS / WEBVID_PATH"
}

# train_or_eval: --do_eval with EVAL_ONLY set (evaluate INIT_MODEL without training), else --do_train
train_or_eval() { if [[ -n "${EVAL_ONLY:-}" ]]; then echo --do_eval; else echo --do_train; fi; }

# ----------------------------------------------------------------------------------------------- stage 1

original_clip() {
  SCRIPT=main_task_clip.py
  OUTPUT_PATH=${OUTPUT_PATH:-./output/stage1}
  WEBVID_PATH=${WEBVID_PATH:-$DATA_PATH/WebVid_TFRecord}
  local labels; labels=$(webvid_labels)
  require_labels "$labels"
  flags=("$(train_or_eval)" --num_thread_reader=2 --epochs=5 --batch_size="$BATCH_SIZE" --n_display=50
    --train_csv "$DATA_PATH/MSRVTT_train.9k.csv" --val_csv "$DATA_PATH/MSRVTT_JSFUSION_test.csv"
    --data_path "$labels" --dir_path "$WEBVID_PATH"
    --features_path "$DATA_PATH/MSRVTT_Videos" --output_dir "$OUTPUT_PATH"
    --lr 1e-4 --max_words 32 --datatype msrvtt --expand_msrvtt_sentences --feature_framerate 1
    "${ORIGINAL_FRAMES[@]}" --pretrained_clip_name ViT-B/16)
  if [[ -n "${EVAL_ONLY:-}" ]]; then
    require_file "$LAUNCHER" "${INIT_MODEL:-}" "set INIT_MODEL to the checkpoint to evaluate (EVAL_ONLY=1)"
    flags+=(--init_model "$INIT_MODEL")
  fi
  append_flags clip_options "$CLIP_PATH"
}

demo_clip() {
  SCRIPT=main_task_clip.py
  DEMO_DATA=${DEMO_DATA:-./demo_data}
  OUTPUT_PATH=${OUTPUT_PATH:-./output/demo_stage1_$(date +%Y%m%d_%H%M%S)}
  echo "DATA_PATH is not set: running the stage-1 demo on synthetic data in $DEMO_DATA -> $OUTPUT_PATH"
  "$PYTHON" -m tools.demo prepare --out "$DEMO_DATA"
  flags=(--do_train --num_thread_reader=2 --epochs=6 --batch_size=32 --n_display=50
    --train_csv "$DEMO_DATA/MSRVTT/MSRVTT_train.9k.csv" --val_csv "$DEMO_DATA/MSRVTT/MSRVTT_JSFUSION_test.csv"
    --data_path "$DEMO_DATA/WebVid_TFRecord/frozen_train_labels.json" --dir_path "$DEMO_DATA/WebVid_TFRecord"
    --features_path "$DEMO_DATA/MSRVTT/videos/all" --output_dir "$OUTPUT_PATH"
    --lr 1e-3 --coef_lr 1 --new_params_lr 1e-3 --max_words 32 --batch_size_val 50 --datatype msrvtt
    --freeze_layer_num -1 --eval_steps 0)
  append_flags demo_options
}

# ----------------------------------------------------------------------------------------------- stage 2

original_fusion() {
  SCRIPT=main_task_fusion.py
  require_file "$LAUNCHER" "${INIT_MODEL:-}" \
    "set INIT_MODEL to the stage-1 checkpoint to start from (e.g. runs/stage1/ckpt/pytorch_model.bin.N)"
  OUTPUT_PATH=${OUTPUT_PATH:-./output/stage2}
  WEBVID_PATH=${WEBVID_PATH:-$DATA_PATH/WebVid_TFRecord}
  local labels; labels=$(webvid_labels)
  require_labels "$labels"
  flags=(--do_train --num_thread_reader=4 --epochs=10 --batch_size="$BATCH_SIZE" --n_display=50
    --train_csv "$labels" --val_csv "$DATA_PATH/MSRVTT_JSFUSION_test.csv"
    --data_path "$labels" --dir_path "$WEBVID_PATH"
    --features_path "$DATA_PATH/MSRVTT_Videos" --warmup_proportion 0.2 --output_dir "$OUTPUT_PATH"
    --lr 1e-5 --max_words 32 --datatype msrvtt --expand_msrvtt_sentences --feature_framerate 2
    "${ORIGINAL_FRAMES[@]}" --init_model "$INIT_MODEL")
  append_flags clip_options "$CLIP_PATH"
}

demo_fusion() {
  SCRIPT=main_task_fusion.py
  demo_init_model 1
  OUTPUT_PATH=${OUTPUT_PATH:-./output/demo_stage2_$(date +%Y%m%d_%H%M%S)}
  echo "DATA_PATH is not set: running the stage-2 demo on synthetic data in $DEMO_DATA from $INIT_MODEL -> $OUTPUT_PATH"
  flags=(--do_train --num_thread_reader=2 --epochs=6 --batch_size=16 --n_display=50
    --val_csv "$DEMO_DATA/MSRVTT/MSRVTT_JSFUSION_test.csv"
    --data_path "$DEMO_DATA/WebVid_TFRecord/frozen_train_labels.json" --dir_path "$DEMO_DATA/WebVid_TFRecord"
    --features_path "$DEMO_DATA/MSRVTT/videos/all" --output_dir "$OUTPUT_PATH" --warmup_proportion 0.1
    --lr 1e-3 --coef_lr 1e-3 --new_params_lr 3e-3 --max_words 32 --batch_size_val 50 --datatype msrvtt
    --freeze_layer_num 0 --eval_steps 0 "${DEMO_FUSION[@]}" --vtm_weight 2 --rerank_top_k 10
    --init_model "$INIT_MODEL")
  append_flags demo_options
}

# ----------------------------------------------------------------------------------------------- retrieval

original_retrieval() {
  SCRIPT=video_text_retrieval/main_task_retrieval_$DATASET.py
  require_file "$LAUNCHER" "${INIT_MODEL:-}" \
    "set INIT_MODEL to the stage-2 checkpoint to fine-tune (or a downstream one with EVAL_ONLY=1)"
  OUTPUT_PATH=${OUTPUT_PATH:-./output/retrieval_$DATASET}
  # ActivityNet paragraphs are long (CLIP4Clip reads 64 words); T2VLP's fusion sequence holds the words, the 12
  # frames, the 8 tube tokens and [CLS] in CLIP's 77 text positions: 56 words fill it.
  if [[ "$DATASET" == activitynet ]]; then MAX_WORDS=${MAX_WORDS:-56}; else MAX_WORDS=${MAX_WORDS:-32}; fi
  local data_flags
  case "$DATASET" in
    msrvtt) VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSRVTT_Videos}
            data_flags=(--train_csv "$DATA_PATH/MSRVTT_train.9k.csv" --val_csv "$DATA_PATH/MSRVTT_JSFUSION_test.csv"
                        --data_path "$DATA_PATH/MSRVTT_data.json" --expand_msrvtt_sentences) ;;
    msvd)   VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSVD_Videos}; data_flags=(--data_path "$DATA_PATH") ;;
    lsmdc)  VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/LSMDC_Videos}; data_flags=(--data_path "$DATA_PATH") ;;
    didemo) VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/DiDeMo_Videos}; data_flags=(--data_path "$DATA_PATH") ;;
    activitynet) VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/ActivityNet_Videos}; data_flags=(--data_path "$DATA_PATH") ;;
  esac
  require_folder "$LAUNCHER" "$VIDEO_PATH" "set VIDEO_PATH"
  # 5 epochs, lr 5e-5, backbone 5e-5 x 1e-3, fusion list 5e-6, 12 frames at 2 fps
  flags=("$(train_or_eval)" --num_thread_reader=4 --epochs=5 --batch_size="$BATCH_SIZE" --n_display=50
    "${data_flags[@]}" --features_path "$VIDEO_PATH" --warmup_proportion 0.1 --output_dir "$OUTPUT_PATH"
    --lr 5e-5 --max_words "$MAX_WORDS" --datatype "$DATASET" --feature_framerate 2 "${ORIGINAL_FRAMES[@]}"
    --init_model "$INIT_MODEL")
  append_flags clip_options "$CLIP_PATH"
}

demo_retrieval() {
  SCRIPT=video_text_retrieval/main_task_retrieval_$DATASET.py
  if [[ "$DATASET" != msrvtt ]]; then
    echo "$LAUNCHER: the demo data is laid out as MSR-VTT; unset DATASET (or set DATA_PATH)" >&2
    exit 2
  fi
  demo_init_model 2
  OUTPUT_PATH=${OUTPUT_PATH:-./output/demo_retrieval_$(date +%Y%m%d_%H%M%S)}
  echo "DATA_PATH is not set: fine-tuning retrieval on the demo data in $DEMO_DATA from $INIT_MODEL -> $OUTPUT_PATH"
  # The demo model is tiny and its backbone is far from converged, so it trains at much higher rates than the
  # original recipe (lr 5e-5, backbone 5e-8, new 5e-6), which only polish a pre-trained ViT-B/16.
  flags=(--do_train --num_thread_reader=2 --epochs=3 --batch_size=32 --n_display=50
    --train_csv "$DEMO_DATA/MSRVTT/MSRVTT_train.9k.csv" --val_csv "$DEMO_DATA/MSRVTT/MSRVTT_JSFUSION_test.csv"
    --data_path "$DEMO_DATA/MSRVTT/MSRVTT_data.json" --features_path "$DEMO_DATA/MSRVTT/videos/all"
    --output_dir "$OUTPUT_PATH" --warmup_proportion 0.1 --lr 1e-4 --coef_lr 1 --new_params_lr 1e-3
    --max_words 32 --batch_size_val 50 --datatype msrvtt --expand_msrvtt_sentences --freeze_layer_num -1
    --eval_steps 0 "${DEMO_FUSION[@]}" --rerank_top_k 10 --init_model "$INIT_MODEL")
  append_flags demo_options
}

# ----------------------------------------------------------------------------------------------- captioning

original_caption() {
  SCRIPT=video_captioning/${DATASET}_captioning.py
  require_file "$LAUNCHER" "${INIT_MODEL:-}" \
    "set INIT_MODEL to the stage-2 checkpoint to fine-tune (or a captioning one with EVAL_ONLY=1)"
  OUTPUT_PATH=${OUTPUT_PATH:-./output/caption_$DATASET}
  local annotations
  case "$DATASET" in
    msvd)   VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSVD_Videos}; annotations=$DATA_PATH ;;
    msrvtt) VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSRVTT_Videos}; annotations=$DATA_PATH/MSRVTT_data.json ;;
  esac
  require_folder "$LAUNCHER" "$VIDEO_PATH" "set VIDEO_PATH"
  # 10 epochs, lr 5e-5, backbone 5e-5 x 1e-3, fusion list + local_visual 1e-6, 12 frames at 1 fps, warmup 0.2,
  # greedy decoding
  flags=("$(train_or_eval)" --num_thread_reader=4 --epochs=10 --batch_size="$BATCH_SIZE" --n_display=50
    --data_path "$annotations" --features_path "$VIDEO_PATH" --warmup_proportion 0.2 --output_dir "$OUTPUT_PATH"
    --lr 5e-5 --max_words 32 --datatype "$DATASET" --expand_msrvtt_sentences --feature_framerate 1
    "${ORIGINAL_FRAMES[@]}" --init_model "$INIT_MODEL")
  append_flags clip_options "$CLIP_PATH"
}

demo_caption() {
  SCRIPT=video_captioning/${DATASET}_captioning.py
  demo_init_model 2
  local annotations=$DEMO_DATA/MSVD
  if [[ "$DATASET" == msrvtt ]]; then annotations=$DEMO_DATA/MSRVTT/MSRVTT_data.json; fi
  OUTPUT_PATH=${OUTPUT_PATH:-./output/demo_caption_$(date +%Y%m%d_%H%M%S)}
  echo "DATA_PATH is not set: fine-tuning $DATASET captioning on the demo data in $DEMO_DATA from $INIT_MODEL -> $OUTPUT_PATH"
  # The demo model is tiny and far from converged, so it trains at much higher rates than the original recipe
  # (lr 5e-5, backbone 5e-8, new 1e-6), which only polish a pre-trained ViT-B/16.
  flags=(--do_train --num_thread_reader=2 --epochs=10 --batch_size=32 --n_display=50
    --data_path "$annotations" --features_path "$DEMO_DATA/MSRVTT/videos/all"
    --output_dir "$OUTPUT_PATH" --warmup_proportion 0.1 --lr 1e-4 --coef_lr 1 --new_params_lr 1e-3
    --max_words 16 --batch_size_val 32 --datatype "$DATASET" --expand_msrvtt_sentences --freeze_layer_num -1
    --eval_steps 0 "${DEMO_FUSION[@]}" --init_model "$INIT_MODEL")
  append_flags demo_options
}

# ----------------------------------------------------------------------------------------------- video QA

qa_files() {  # qa_files FOLDER: the annotation flags of $DATASET in FOLDER
  if [[ "$DATASET" == msrvtt ]]; then
    echo_flags --msrvtt_qa_train_json "$1/train.jsonl" --msrvtt_qa_val_json "$1/val.jsonl" \
      --msrvtt_qa_test_json "$1/test.jsonl" --msrvtt_qa_anslabel_json "$1/train_ans2label.json"
  else
    echo_flags --msvd_qa_train_json "$1/train_qa.json" --msvd_qa_val_json "$1/val_qa.json" \
      --msvd_qa_test_json "$1/test_qa.json" --msvd_qa_anslabel_json "$1/train_ans2label.json" \
      --youtube_mapping "$1/youtube_mapping.txt"
  fi
}

original_qa() {
  SCRIPT=video_qa/main_task_qa_$DATASET.py
  QA_HEAD=${QA_HEAD:-classifier}
  require_file "$LAUNCHER" "${INIT_MODEL:-}" \
    "set INIT_MODEL to the stage-2 checkpoint to fine-tune (or a QA one with EVAL_ONLY=1)"
  OUTPUT_PATH=${OUTPUT_PATH:-./output/qa_$DATASET}
  if [[ "$DATASET" == msrvtt ]]; then VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSRVTT_Videos}; else VIDEO_PATH=${VIDEO_PATH:-$DATA_PATH/MSVD_Videos}; fi
  require_folder "$LAUNCHER" "$VIDEO_PATH" "set VIDEO_PATH"
  # 5 epochs, lr 2e-4, backbone 2e-4 x 1e-3, fusion list 5e-6, 12 frames at 1 fps, seed 2021, evaluated on test
  # after each epoch
  flags=("$(train_or_eval)" --num_thread_reader=4 --epochs=5 --batch_size="$BATCH_SIZE" --n_display=50)
  append_flags qa_files "$DATA_PATH"
  flags+=(--features_path "$VIDEO_PATH" --qa_head "$QA_HEAD" --warmup_proportion 0.1 --output_dir "$OUTPUT_PATH"
    --lr 2e-4 --max_words 32 --feature_framerate 1 "${ORIGINAL_FRAMES[@]}" --init_model "$INIT_MODEL")
  append_flags clip_options "$CLIP_PATH"
}

demo_qa() {
  SCRIPT=video_qa/main_task_qa_$DATASET.py
  QA_HEAD=${QA_HEAD:-classifier}
  demo_init_model 2
  local questions=$DEMO_DATA/MSRVTT-QA
  if [[ "$DATASET" == msvd ]]; then questions=$DEMO_DATA/MSVD-QA; fi
  OUTPUT_PATH=${OUTPUT_PATH:-./output/demo_qa_$(date +%Y%m%d_%H%M%S)}
  echo "DATA_PATH is not set: fine-tuning $DATASET QA on the demo data in $DEMO_DATA from $INIT_MODEL -> $OUTPUT_PATH"
  # The demo model is tiny and far from converged, so it trains at much higher rates than the original recipe
  # (lr 2e-4, backbone 2e-7, fusion list 5e-6), which only polish a pre-trained ViT-B/16.
  flags=(--do_train --num_thread_reader=2 --epochs=5 --batch_size=32 --n_display=20)
  append_flags qa_files "$questions"
  flags+=(--features_path "$DEMO_DATA/MSRVTT/videos/all" --qa_head "$QA_HEAD"
    --output_dir "$OUTPUT_PATH" --warmup_proportion 0.1 --lr 1e-3 --coef_lr 0.1 --new_params_lr 1e-3
    --max_words 16 --batch_size_val 64 --freeze_layer_num -1 "${DEMO_FUSION[@]}" --init_model "$INIT_MODEL")
  append_flags demo_options
}
