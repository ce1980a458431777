#!/usr/bin/env bash
# One prepared TPU check (the counterpart of gpu_check.sh), for the day a TPU host is lent: nothing
# in jmoe has run on a TPU yet. One call, < 10 minutes: the step limits below add up to 540 s.
# TPU_CHECK_ONLY="device tests ..." runs only the named steps; TPU_CHECK_TESTS overrides the test list.
#
#   bash benchmarks/tpu_check.sh OUT_DIR [ARCHIVE.tgz]              # on the TPU host, from the repo root
#   TPU_CHECK_SMOKE=1 bash benchmarks/tpu_check.sh /tmp/tpu_smoke   # CPU dry run of the same steps (tiny)
#
# Runs from the source tree (PYTHONPATH=.), installs nothing, downloads nothing. Steps, each under
# its own time limit, most wanted first:
#   1. device     jax.devices(), the TPU kind
#   2. tests      the TPU kernel tests with megablox compiled (tests/test_tpu_kernels.py: the kernels
#                 against float64 loops, the layer against scan; "auto" is megablox on TPU, so the
#                 dropless tests run it too)
#   3. gmm        grouped matmul fwd / fwd+bwd: ragged_dot (XLA:TPU's native grouped matmul), megablox
#                 at three tilings (jmoe's default 128^3 and MaxText-like larger tiles), scan; against
#                 one dense matmul of the same FLOPs and the measured dense matmul rate
#                 (benchmarks/ragged_dot_check.py's timing rule, Mixtral and fine-grained shapes)
#   4. dispatch   dispatch/combine fwd and fwd+bwd, gather and einsum, as a fraction of the copy
#                 bandwidth (benchmarks/bench_pallas.py without Pallas kernels): the on-paper choice of
#                 gather on TPU (jmoe/dispatch.py) holds if gather's fwd+bwd is near the copy bandwidth
#   5. layer      the dropless layer ("auto" = megablox) vs capacity factors 1.0 / 1.25 / 2.0 and the
#                 scan grouped matmul, GPU scale, bf16 (benchmarks/bench_layer.py)
# Full logs and JSON land in OUT_DIR, and in one archive refreshed after every step.
set -u
OUT=${1:?usage: tpu_check.sh OUT_DIR [ARCHIVE.tgz]}
ARCHIVE=${2:-$OUT.tgz}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=${TPU_CHECK_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  # off TPU megablox runs in Pallas's TPU interpret mode: an explicit opt-in (jmoe.platform.interpret)
  export JMOE_ALLOW_INTERPRET=1
  GMM_SHAPES="256,128,256,4"; GMM_DTYPE=float32; ITERS=2; PALLAS_ARGS="--small"; SCALE=cpu; DTYPE=float32
  TESTS="tests/test_tpu_kernels.py -k kernels_match_loop"
else
  GMM_SHAPES="8192,4096,14336,8 8192,1024,4096,64"; GMM_DTYPE=bfloat16; ITERS=10; PALLAS_ARGS=""; SCALE=gpu
  DTYPE=bfloat16
  TESTS="tests/test_tpu_kernels.py tests/test_dropless.py"
fi
TESTS=${TPU_CHECK_TESTS:-$TESTS}
ONLY=${TPU_CHECK_ONLY:-}

TAIL_LINES=12
. "$(dirname "$0")/check_steps.sh"  # step NAME SECONDS COMMAND...

: > "$OUT/steps.txt"
step device 20 $PY -c 'import jax, jaxlib, flax; d = jax.devices(); print("jax", jax.__version__, "flax", flax.__version__, "backend", jax.default_backend(), len(d), "x", d[0].device_kind)'
# shellcheck disable=SC2086
step tests 200 $PY -m pytest -q -rfEs -p no:cacheprovider $TESTS
step gmm 150 $PY - "$OUT/gmm.json" "$GMM_DTYPE" "$ITERS" $GMM_SHAPES <<'PYEOF'
import json, sys
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp
from benchtools import matmul_tflops
from ragged_dot_check import run
from jmoe.grouped_matmul import scan_grouped_matmul
from jmoe.pallas.megablox_grouped_matmul import MegabloxConfig, megablox_grouped_matmul

out, dtype, iters = sys.argv[1], jnp.dtype(sys.argv[2]), int(sys.argv[3])
shapes = [tuple(int(v) for v in s.split(",")) for s in sys.argv[4:]]
small = jax.default_backend() != "tpu"
tilings = {"128x128x128": MegabloxConfig()} if small else {
    "128x128x128": MegabloxConfig(), "512x512x512": MegabloxConfig(512, 512, 512),
    "512x1024x1024": MegabloxConfig(512, 1024, 1024)}
impls = {"ragged_dot": lambda x, w, g: jax.lax.ragged_dot(x, w, g)}
for name, cfg in tilings.items():
    impls[f"megablox_{name}"] = lambda x, w, g, cfg=cfg: megablox_grouped_matmul(x, w, g, cfg)
impls["scan_bm128"] = lambda x, w, g: scan_grouped_matmul(x, w, g, 128)
peak_n = 512 if small else 8192
peak = matmul_tflops(peak_n, dtype, iters)
print(f"device {jax.devices()[0].device_kind}: dense matmul {peak_n}^3 {dtype.name}: {peak:.3g} TFLOP/s")
rows = []
for n, d, f, e in shapes:
    row = run(n, d, f, e, dtype, iters, impls)
    rows.append(row)
    base = row["dense_same_flops"]
    print(f"N={n} d={d} f={f} E={e}: dense of the same FLOPs fwd {base['fwd_ms']:.2f} ms, fwd+bwd {base['fwd_bwd_ms']:.2f} ms")
    for name, r in row["impls"].items():
        text = r.get("error") or (f"fwd {r['fwd_ms']:.2f} ms ({r['tflops_fwd']:.3g} TFLOP/s), fwd+bwd "
                                  f"{r['fwd_bwd_ms']:.2f} ms ({r['tflops_fwd_bwd']:.3g}), err {r['rel_err_vs_loop']:.1e}")
        print(f"  {name:<24} {text}", flush=True)
    with open(out, "w") as fh:
        json.dump({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                   "matmul_tflops": peak, "rows": rows}, fh, indent=1)
PYEOF
# --tiles ",": no Pallas (Triton) configs, only the XLA backends; its metadata asks the interpret
# policy about the Triton kernels, which off GPU needs the opt-in (nothing is interpreted)
step dispatch 90 env JMOE_ALLOW_INTERPRET=1 $PY benchmarks/bench_pallas.py $PALLAS_ARGS --tiles , --out "$OUT/dispatch.json"
# dropless ("auto": megablox on TPU) vs capacity factors, and the scan grouped matmul; --only leaves out
# the GPU kernels' rows (an error on TPU: no silent interpreter)
step layer 80 $PY benchmarks/bench_layer.py --suite dropless --only cf,scan --scale $SCALE --dtype $DTYPE \
  --backends gather --iters $ITERS --out "$OUT"
tar czf "$ARCHIVE" -C "$OUT" .
