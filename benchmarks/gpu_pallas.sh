#!/usr/bin/env bash
# The Pallas GPU check in one call: compiled kernel tests, then the timings.
#   bash benchmarks/gpu_pallas.sh            # results under $OUT (device tool) or ./results
# Runs from the source tree (PYTHONPATH=.), installs nothing. benchmarks/gpu_check.sh runs the
# same two steps among the project's other GPU checks; this one is the Pallas-only subset.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results}"
mkdir -p "$out"
export PYTHONPATH=.
PY=${PYTHON:-python3}
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$out/env.txt"
timeout 240 $PY -m pytest tests/test_pallas.py -q -p no:cacheprovider 2>&1 | tail -30 | tee "$out/test_pallas.txt"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$out/test_pallas.txt"
small=""
$PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" || small="--small"  # no GPU: prove the script only
timeout 300 $PY benchmarks/bench_pallas.py $small --out "$out/bench_pallas.json" 2>&1 | tee "$out/bench_pallas.txt"
