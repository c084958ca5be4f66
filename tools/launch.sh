# Sourced by the start_*.sh launchers (run from the repository root): the interpreter, the torchrun command for
# this node (the plain interpreter for one process on one node), checks of the launcher's inputs, and
# `run_recipe`, which runs a stage's or task's recipe (tools/recipes.sh). Sets PYTHON, NPROC_PER_NODE,
# OMP_NUM_THREADS and `launch`.

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [[ ! "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
  echo "$(basename "$0"): MAX_RESTARTS must be a whole number (restarts after a worker dies), not '$MAX_RESTARTS'" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}

if [[ "$NNODES" == 1 && "$NPROC_PER_NODE" == 1 && "$MAX_RESTARTS" == 0 ]]; then
  # One process: run the script itself, so its one-line errors and exit codes reach the user without torchrun's
  # failure report, and SIGTERM reaches it directly.
  launch=("$PYTHON")
elif [[ "$NNODES" != 1 || "$MAX_RESTARTS" != 0 ]]; then
  # Several nodes, or restarts after a worker dies: torchrun's c10d rendezvous, whose every round (the first
  # start and each restart) forms a new group; the restarted workers resume from restore.bin.
  RDZV_ENDPOINT=${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}
  RDZV_ID=${RDZV_ID:-t2vlp}
  launch=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE"
          --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" --max-restarts="$MAX_RESTARTS")
else
  launch=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK"
          --nproc_per_node="$NPROC_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
fi

# check_real_run_inputs SCRIPT: DATA_PATH must be a folder and CLIP_PATH (default ./CLIP-modules/ViT-B-16.pt) a file.
check_real_run_inputs() {
  if [[ ! -d "$DATA_PATH" ]]; then
    echo "$1: DATA_PATH $DATA_PATH is not a folder (unset DATA_PATH to run the demo)" >&2
    exit 2
  fi
  CLIP_PATH=${CLIP_PATH:-./CLIP-modules/ViT-B-16.pt}
  if [[ ! -f "$CLIP_PATH" ]]; then
    echo "$1: CLIP checkpoint $CLIP_PATH not found: fetch it with 'python CLIP-modules/fetch_clip.py' or set CLIP_PATH" >&2
    exit 2
  fi
}

# demo_init_model STAGE: prepare the demo data (DEMO_DATA, default ./demo_data) and set INIT_MODEL (unless given) to
# the newest demo checkpoint of STAGE, running that stage's demo launcher first when there is none.
demo_init_model() {
  local stage=$1 launcher
  if [[ "$stage" == 1 ]]; then launcher=start_clip.sh; else launcher=start_fusion.sh; fi
  DEMO_DATA=${DEMO_DATA:-./demo_data}
  export DEMO_DATA
  "$PYTHON" -m tools.demo prepare --out "$DEMO_DATA" > /dev/null
  INIT_MODEL=${INIT_MODEL:-$("$PYTHON" -m tools.demo latest --stage "$stage" || true)}
  if [[ -z "$INIT_MODEL" ]]; then
    echo "no demo stage-$stage checkpoint yet: running the stage-$stage demo first (bash $launcher)"
    env -u OUTPUT_PATH PYTHON="$PYTHON" NPROC_PER_NODE="$NPROC_PER_NODE" bash "$launcher"
    INIT_MODEL=$("$PYTHON" -m tools.demo latest --stage "$stage")
  fi
}

# require_file SCRIPT PATH WHAT: exit 2 naming WHAT unless PATH is a file.
require_file() {
  if [[ ! -f "$2" ]]; then
    echo "$1: '$2' is not a file: $3" >&2
    exit 2
  fi
}

# require_folder SCRIPT PATH WHAT: exit 2 naming WHAT unless PATH is a folder.
require_folder() {
  if [[ ! -d "$2" ]]; then
    echo "$1: folder $2 not found: $3" >&2
    exit 2
  fi
}

# choose_dataset LAUNCHER DEFAULT OTHER...: DATASET (default DEFAULT) must be one of the names; exit 2 naming them.
choose_dataset() {
  local launcher=$1; shift
  DATASET=${DATASET:-$1}
  local name
  for name in "$@"; do
    if [[ "$DATASET" == "$name" ]]; then return 0; fi
  done
  local names=("$@") last=${*: -1}
  local listed; listed=$(IFS=,; echo "${names[*]:0:$# - 1}")
  echo "$launcher: DATASET must be ${listed//,/, } or $last, not '$DATASET'" >&2
  exit 2
}

# run_recipe TASK LAUNCHER ARG...: without DATA_PATH the demo recipe of TASK on the embedded demo data, then its
# summary; with DATA_PATH (checked, with CLIP_PATH) the original recipe. ARG... go after the recipe's flags.
run_recipe() {
  local task=$1
  LAUNCHER=$2
  shift 2
  if [[ -z "${DATA_PATH:-}" ]]; then
    "demo_$task"
    "${launch[@]}" "$SCRIPT" "${flags[@]}" "$@"
    "$PYTHON" -m tools.demo summary --output_dir "$OUTPUT_PATH"
    exit 0
  fi
  check_real_run_inputs "$LAUNCHER"
  BATCH_SIZE=${BATCH_SIZE:-$(( 32 * NNODES ))}
  "original_$task"
  "${launch[@]}" "$SCRIPT" "${flags[@]}" "$@"
}

source tools/recipes.sh
