#!/usr/bin/env bash
# One prepared GPU check, for a session that is lent a GPU (one device call, < 8 minutes:
# the step limits below add up to 470 s; use the device tool's timeout_s=560).
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine, from the repo root
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/gpu_smoke   # CPU dry run of the same steps
#
# Runs from the source tree (PYTHONPATH=.), installs nothing, downloads nothing. Steps, each
# under its own time limit so one slow step cannot eat the others' time:
#   1. the device (jax.devices, nvidia-smi)
#   2. the kernel / layer tests with Pallas compiled (not interpreted: they interpret only off GPU)
#   3. layer benchmarks at GPU scale in bf16 (the peers' workloads, the E sweep, dropless vs capacity)
#   4. the Pallas dispatch/combine benchmark
#   5. train.py with the `small` config for a bounded number of steps
# then a compact table (benchmarks/gpu_summary.py). Full JSON and logs land in OUT_DIR.
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SMOKE=${GPU_CHECK_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  SCALE=cpu; DTYPE=float32; BACKENDS=einsum,gather; ITERS=2; TRAIN="config=tiny steps=6 log_every=2 eval_every=6 ckpt_every=6"
  PALLAS="--small"; TESTS="tests/test_routing.py"
else
  SCALE=gpu; DTYPE=bfloat16; BACKENDS=einsum,gather,pallas; ITERS=10; TRAIN="config=small steps=150 log_every=25 eval_every=150 ckpt_every=150"
  PALLAS=""; TESTS="tests/test_pallas.py tests/test_layer.py"
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/steps.txt"
  tail -n 5 "$OUT/$name.log"
}

: > "$OUT/steps.txt"
step device 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
  $PY -c 'import jax, jaxlib; print(\"jax\", jax.__version__, \"backend\", jax.default_backend(), jax.devices())'"
step tests 110 $PY -m pytest -x -q -p no:cacheprovider $TESTS
step bench_peers 90 $PY benchmarks/bench_layer.py --suite peers --scale $SCALE --dtype $DTYPE \
  --backends $BACKENDS --iters $ITERS --out "$OUT"
step bench_sweep 60 $PY benchmarks/bench_layer.py --suite sweep --scale $SCALE --dtype $DTYPE \
  --backends $BACKENDS --iters $ITERS --out "$OUT"
step bench_dropless 40 $PY benchmarks/bench_layer.py --suite dropless --scale $SCALE --dtype $DTYPE \
  --backends gather --iters $ITERS --out "$OUT"
step bench_pallas 60 $PY benchmarks/bench_pallas.py $PALLAS --out "$OUT/bench_pallas.json"
step train 80 $PY train.py $TRAIN out_dir="$OUT/train"
echo
$PY benchmarks/gpu_summary.py "$OUT"
