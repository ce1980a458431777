#!/usr/bin/env bash
# One prepared GPU check, for a session that is lent a GPU (one device call of at most 9 minutes: the
# default steps' limits below add up to 505 s, plus ~15 s of archiving; use the device tool's timeout_s=540).
# GPU_CHECK_ONLY="device tests ..." runs only the named steps (the extra steps bench_pallas, bench_mixtral,
# bench_deepseek, bench_peers and bench_sweep run only when named, or in the smoke run); GPU_CHECK_TESTS overrides the test
# list. The smoke run (CPU) allows each step 3x its limit and lets Pallas interpret (JMOE_ALLOW_INTERPRET=1).
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine, from the repo root
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/gpu_smoke   # CPU dry run of every step
#
# Runs from the source tree (PYTHONPATH=.), installs nothing, downloads nothing. Steps, each
# under its own time limit so one slow step cannot eat the others' time, most wanted first:
#   1. device       the device (jax.devices, nvidia-smi)                                         15 s
#   2. bench_train  issue 16: train.py's step of configs/small_gpu per variant (xla vs cudnn     210 s
#                   attention, one-hot embedding, capacity 1.0, dropless per grouped matmul, 2x
#                   batch, dense, the combined winners): ms/step, tokens/s, MFU, profile by category
#   3. ragged_dot   issue 7: the card's matmul rate; ragged_dot vs the Mosaic (JAX's Hopper         100 s
#                   kernels), Pallas (Triton) and scan grouped matmuls at the Mixtral and E 64 shapes,
#                   correctness vs a loop
#   4. tests        the kernel / layer / dropless tests with Pallas compiled (not interpreted: they   75 s
#                   interpret only off GPU) and XLA's own ragged_all_to_all (one-device expert axis)
#   5. bench_dropless  dropless (each grouped matmul) vs capacity factors (one layer, GPU scale,      60 s
#                   bf16): issue 16's "dropless within 1.15x of its floor, faster than factor 1.25"
#   6. train        train.py with configs/small_gpu (attention=auto: cuDNN) for a few steps           45 s
#   extra (named only): bench_mixtral (the Mixtral-like layer per dispatch backend, 30 s), bench_deepseek
#   (issue 20: the DeepSeek-like layer beside it: 64 small experts, top-6, a shared expert, group-limited
#   sigmoid router; dropless and capacity 1.25, 40 s), bench_rounds (issue 25.7: the dropless exchange's
#   rounds machinery on a 1-device expert axis, one round, XLA's ragged_all_to_all, vs the one-device dropless
#   experts, fwd+bwd at the DeepSeek-like shape, 40 s), bench_pallas
#   (50 s), mosaic_dispatch (issue 17: Mosaic GPU vs Triton vs gather dispatch/combine at the Mixtral and
#   FastMoE shapes, % of copy bandwidth, 90 s), bench_peers (25 s), bench_sweep (20 s), sanitizer (issue 15: the Pallas kernel tests compiled
#   under compute-sanitizer memcheck, which catches a read or write past a buffer's end, 90 s)
# then a compact table (benchmarks/gpu_summary.py). Full JSON and logs land in OUT_DIR, and in one
# archive (default OUT_DIR.tgz), refreshed after every step (the device tool returns only 8 files).
# On the device machine: `bash benchmarks/gpu_check.sh /tmp/gpu_check $OUT/gpu_check.tgz`.
# The next call wanted (issue 16 first, then issue 7's grouped matmuls; 505 s of step limits; timeout_s=540):
#   GPU_CHECK_ONLY="device bench_train ragged_dot tests bench_dropless train" bash benchmarks/gpu_check.sh /tmp/g $OUT/g.tgz
# then issue 25.7's (55 s; timeout_s=90):
#   GPU_CHECK_ONLY="device bench_rounds" bash benchmarks/gpu_check.sh /tmp/r $OUT/r.tgz
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
  PALLAS="--small"; TESTS="tests/test_routing.py"; SWEEP_BACKENDS=einsum,gather; BENCH_TRAIN="--smoke"
  DEFAULT_STEPS=""  # the smoke run tries every step
  LIMIT_FACTOR=3; export JMOE_ALLOW_INTERPRET=1  # CPU: slower; the Pallas kernels run interpreted
else
  SCALE=gpu; DTYPE=bfloat16; BACKENDS=gather,pallas,einsum; ITERS=10
  TRAIN="config=small_gpu steps=30 log_every=10 eval_every=30 eval_batches=2 ckpt_every=30"
  PALLAS=""; SWEEP_BACKENDS=gather,pallas; BENCH_TRAIN="--config small_gpu --budget 190"
  DEFAULT_STEPS="device bench_train ragged_dot tests bench_dropless train"; LIMIT_FACTOR=1
  TESTS="tests/test_mosaic_grouped_matmul.py tests/test_grouped_matmul.py tests/test_dropless.py tests/test_dropless_parallel.py::test_dropless_exchange_one_expert_device_matches_dropless tests/test_pallas.py tests/test_layer.py tests/test_mosaic_dispatch.py"
fi
TESTS=${GPU_CHECK_TESTS:-$TESTS}
ONLY=${GPU_CHECK_ONLY:-$DEFAULT_STEPS}  # space-separated step names to run; empty (smoke): all

. "$(dirname "$0")/check_steps.sh"  # step NAME SECONDS COMMAND...

: > "$OUT/steps.txt"
step device 15 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
  $PY -c 'import jax, jaxlib, flax; print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"backend\", jax.default_backend(), jax.devices())'"
step bench_train 210 $PY benchmarks/bench_train.py $BENCH_TRAIN --out "$OUT"
step ragged_dot 100 $PY benchmarks/ragged_dot_check.py $PALLAS --out "$OUT/ragged_dot.json"
step tests 75 $PY -m pytest -q -rfEs -p no:cacheprovider $TESTS
step bench_dropless 60 $PY benchmarks/bench_layer.py --suite dropless --scale $SCALE --dtype $DTYPE \
  --backends gather --iters $ITERS --out "$OUT"
step bench_pallas 50 $PY benchmarks/bench_pallas.py $PALLAS --out "$OUT/bench_pallas.json"
step mosaic_dispatch 90 $PY benchmarks/bench_mosaic_dispatch.py "$OUT/mosaic_dispatch.json"
step bench_mixtral 30 $PY benchmarks/bench_layer.py --suite peers --only mixtral --tag mixtral --scale $SCALE \
  --dtype $DTYPE --backends $BACKENDS --iters $ITERS --out "$OUT"
step bench_deepseek 40 $PY benchmarks/bench_layer.py --suite peers --only deepseek --tag deepseek --scale $SCALE \
  --dtype $DTYPE --backends $BACKENDS --iters $ITERS --out "$OUT"
step bench_rounds 40 $PY benchmarks/bench_rounds.py --scale $SCALE --dtype $DTYPE --iters $ITERS \
  --out "$OUT/bench_rounds.json"
step bench_peers 25 $PY benchmarks/bench_layer.py --suite peers --only fastmoe,tutel --scale $SCALE --dtype $DTYPE \
  --backends $BACKENDS --iters $ITERS --out "$OUT"
step bench_sweep 20 $PY benchmarks/bench_layer.py --suite sweep --scale $SCALE --dtype $DTYPE \
  --backends $SWEEP_BACKENDS --iters $ITERS --out "$OUT"
step train 45 $PY train.py $TRAIN out_dir="$TRAIN_DIR"
# issue 15: the Pallas kernels' tail masks are invisible in interpret mode (the interpreter clamps reads and
# drops out-of-range writes): run their tests compiled under CUDA's memory checker, which flags any access
# past a buffer (named only; skipped where the machine has no compute-sanitizer)
step sanitizer 90 bash -c "if command -v compute-sanitizer >/dev/null; then compute-sanitizer --tool memcheck \
  --error-exitcode 3 $PY -m pytest -q -x -p no:cacheprovider tests/test_pallas.py tests/test_grouped_matmul.py \
  -k 'not shard_map and not lowers'; else echo 'compute-sanitizer not found: skipped'; fi"
mkdir -p "$OUT/train" && cp "$TRAIN_DIR"/*.jsonl "$TRAIN_DIR"/*.png "$TRAIN_DIR"/*.json "$OUT/train/" 2>/dev/null
rm -rf "$TRAIN_DIR"
echo
$PY benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
tar czf "$ARCHIVE" -C "$OUT" .
