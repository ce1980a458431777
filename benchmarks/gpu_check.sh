#!/usr/bin/env bash
# One prepared GPU check, for a session that is lent a GPU (one device call, < 10 minutes:
# the step limits below add up to 600 s; use the device tool's timeout_s=600).
# GPU_CHECK_ONLY="device tests ..." runs only the named steps; GPU_CHECK_TESTS overrides the test list.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine, from the repo root
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/gpu_smoke   # CPU dry run of the same steps
#
# Runs from the source tree (PYTHONPATH=.), installs nothing, downloads nothing. Steps, each
# under its own time limit so one slow step cannot eat the others' time, most wanted first:
#   1. the device (jax.devices, nvidia-smi)
#   2. the card's dense matmul rate; ragged_dot vs the Mosaic (JAX's Hopper kernels), Pallas
#      (Triton) and scan grouped matmuls
#   3. the kernel / layer / dropless tests with Pallas compiled (not interpreted: they interpret
#      only off GPU) and XLA's own ragged_all_to_all (one-device expert axis)
#   4. dropless vs capacity factors (one layer, GPU scale, bf16)
#   5. the Pallas dispatch/combine benchmark
#   6. the peers' layer workloads (Mixtral-like first) and the E sweep, GPU scale, bf16
#   7. train.py with the `small` config for a bounded number of steps
# then a compact table (benchmarks/gpu_summary.py). Full JSON and logs land in OUT_DIR, and in one
# archive (default OUT_DIR.tgz), refreshed after every step (the device tool returns only 8 files).
# On the device machine: `bash benchmarks/gpu_check.sh /tmp/gpu_check $OUT/gpu_check.tgz`.
# The next call wanted (issue 7: which grouped matmul is right and fastest on the GPU; 465 s of
# step limits, timeout_s=500):
#   GPU_CHECK_ONLY="device ragged_dot tests bench_dropless bench_pallas" bash benchmarks/gpu_check.sh /tmp/g $OUT/g.tgz
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR [ARCHIVE.tgz]}
ARCHIVE=${2:-$OUT.tgz}
mkdir -p "$OUT"
TRAIN_DIR=$(mktemp -d)  # checkpoints stay out of OUT_DIR (the small model's are ~1 GB)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step killed at its limit keeps what it printed
PY=${PYTHON:-python3}
SMOKE=${GPU_CHECK_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  SCALE=cpu; DTYPE=float32; BACKENDS=einsum,gather; ITERS=2; TRAIN="config=tiny steps=6 log_every=2 eval_every=6 ckpt_every=6"
  PALLAS="--small"; TESTS="tests/test_routing.py"; SWEEP_BACKENDS=einsum,gather
else
  SCALE=gpu; DTYPE=bfloat16; BACKENDS=gather,pallas,einsum; ITERS=10; TRAIN="config=small steps=80 log_every=20 eval_every=80 ckpt_every=80"
  PALLAS=""; SWEEP_BACKENDS=gather,pallas
  TESTS="tests/test_mosaic_grouped_matmul.py tests/test_grouped_matmul.py tests/test_dropless.py tests/test_dropless_parallel.py::test_dropless_exchange_one_expert_device_matches_dropless tests/test_pallas.py tests/test_layer.py"
fi
TESTS=${GPU_CHECK_TESTS:-$TESTS}
ONLY=${GPU_CHECK_ONLY:-}  # space-separated step names to run (a follow-up call); empty: all

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/steps.txt"
  tail -n 5 "$OUT/$name.log"
  # one archive, refreshed after every step: a run cut short still returns what it measured
  tar czf "$ARCHIVE.part" -C "$OUT" . 2>/dev/null && mv "$ARCHIVE.part" "$ARCHIVE"
}

: > "$OUT/steps.txt"
step device 15 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
  $PY -c 'import jax, jaxlib, flax; print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"backend\", jax.default_backend(), jax.devices())'"
step ragged_dot 170 $PY benchmarks/ragged_dot_check.py $PALLAS --out "$OUT/ragged_dot.json"
step tests 140 $PY -m pytest -q -rfEs -p no:cacheprovider $TESTS
step bench_dropless 90 $PY benchmarks/bench_layer.py --suite dropless --scale $SCALE --dtype $DTYPE \
  --backends gather --iters $ITERS --out "$OUT"
step bench_pallas 50 $PY benchmarks/bench_pallas.py $PALLAS --out "$OUT/bench_pallas.json"
step bench_mixtral 60 $PY benchmarks/bench_layer.py --suite peers --only mixtral --tag mixtral --scale $SCALE \
  --dtype $DTYPE --backends $BACKENDS --iters $ITERS --out "$OUT"
step bench_peers 25 $PY benchmarks/bench_layer.py --suite peers --only fastmoe,tutel --scale $SCALE --dtype $DTYPE \
  --backends $BACKENDS --iters $ITERS --out "$OUT"
step bench_sweep 20 $PY benchmarks/bench_layer.py --suite sweep --scale $SCALE --dtype $DTYPE \
  --backends $SWEEP_BACKENDS --iters $ITERS --out "$OUT"
step train 30 $PY train.py $TRAIN out_dir="$TRAIN_DIR"
mkdir -p "$OUT/train" && cp "$TRAIN_DIR"/*.jsonl "$TRAIN_DIR"/*.png "$TRAIN_DIR"/*.json "$OUT/train/" 2>/dev/null
rm -rf "$TRAIN_DIR"
echo
$PY benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
tar czf "$ARCHIVE" -C "$OUT" .
