#!/usr/bin/env bash
# Every GPU measurement of the speed targets in one call (estimated at 8 to 10 minutes on an H100/H200; each part
# prints its duration), each printed as it finishes and kept in $OUT (default bench/out/): copy the tables into
# bench/RESULTS.md with card, date, command.
#
#   bash bench/gpu_suite.sh            # on the GPU machine
#   TINY=1 bash bench/gpu_suite.sh     # the same steps with tiny models on a CPU, in about a minute
#   PARTS="eval largest" bash bench/gpu_suite.sh   # only some parts (default: all, in this order):
#     table (bf16, bf16 + compile, bf16 + compile + checkpointing; stage 1 and 2), eval (encoding, rerank),
#     feed (loader-fed vs device-resident steps), eval_compiled, largest (largest batch with checkpointing),
#     fp32 (the fp32 baseline beside bf16)
# Every part prints as it goes, in the order of the targets it measures, so a run cut short (the device tool's
# per-call limit) keeps the figures that matter most; the open-ended batch search and the fp32 baseline come last.
#
# A machine without the project's requirements and without PyPI (the feed part needs crc32c, tfrecord, open_clip,
# ftfy): download their wheels elsewhere into .whl/ (ignored by git) and bring that folder along; they are installed
# into /tmp/site first when those imports fail. For Python 3.12 on x86-64, in the repository root:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 -d .whl \
#     crc32c==2.9.post0 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
#   pip wheel --no-deps -w .whl tfrecord==1.14.6     # published as source only; the wheel is pure Python
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
if ! "$PYTHON" -c "import crc32c, tfrecord, open_clip, ftfy" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [[ -n "${TINY:-}" ]]; then
  tiny=(--tiny) configs=(bf16 fp32+ckpt) largest=(fp32+ckpt --largest_batch_limit 4) feed=()
else  # the loader is held to the fastest step, the compiled one
  tiny=() configs=(bf16 bf16+compile bf16+compile+ckpt) largest=(bf16+ckpt) feed=(--config bf16+compile)
fi
ALL_PARTS="table eval feed eval_compiled largest fp32"
PARTS=${PARTS:-$ALL_PARTS}
for part in $PARTS; do
  [[ " $ALL_PARTS " == *" $part "* ]] || { echo "gpu_suite.sh: unknown part '$part' (parts: $ALL_PARTS)" >&2; exit 2; }
done
run() {  # run NAME COMMAND...: print and keep the output, go on when one part fails
  [[ " $PARTS " == *" $1 "* ]] || return 0
  echo "== $1: ${*:2}" | tee "$OUT/$1.txt"
  local start=$SECONDS
  "${@:2}" 2>&1 | tee -a "$OUT/$1.txt" || echo "== $1 failed (exit ${PIPESTATUS[0]})" | tee -a "$OUT/$1.txt"
  echo "== $1 took $((SECONDS - start)) s" | tee -a "$OUT/$1.txt"
}
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/device.txt"
run table "$PYTHON" bench/train_step.py "${tiny[@]}" --configs "${configs[@]}"
run eval "$PYTHON" bench/bench_eval.py "${tiny[@]}"
run feed "$PYTHON" bench/feed_rate.py "${tiny[@]}" "${feed[@]}"
run eval_compiled "$PYTHON" bench/bench_eval.py "${tiny[@]}" --compile
# its table row is the eager checkpointed step (the table part has plain bf16 already), then the search
run largest "$PYTHON" bench/train_step.py "${tiny[@]}" --configs "${largest[0]}" --repeats 1 --largest_batch "${largest[@]}"
run fp32 "$PYTHON" bench/train_step.py "${tiny[@]}" --configs fp32 bf16
echo "== done; outputs in $OUT. Summary:"  # the figures again, last, where a cut-off reply still shows them
for part in $PARTS; do
  grep -hE "^(stage[12] |encoding:|rerank:|largest batch|DataLoader alone|training |loader-fed|== $part (took|failed))" \
    "$OUT/$part.txt" | sed "s/^/$part: /" || true
done
