"""What the benchmark scripts share: the timing rule, one process per emulated device count,
the JSON record."""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax


def median_time(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median seconds of ``fn(*args)`` over ``iters`` calls, after ``warmup`` calls
    (each synchronised with ``jax.block_until_ready``)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(n: int, dtype, iters: int) -> float:
    """Measured dense matmul rate: ``[n, n] @ [n, n]`` (2 n^3 FLOPs) on random data, TFLOP/s."""
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    return 2 * n**3 / median_time(jax.jit(jnp.matmul), a, b, iters=iters) / 1e12


def per_device_count(script: str, devices, worker_args: list[str]) -> list[dict]:
    """``script --worker --devices n *worker_args`` for each n, each in its own process (the
    emulated device count is fixed when jax starts): the JSON each prints after ``RESULT``,
    in order; its other output is echoed."""
    results = []
    for n in devices:
        print(f"== n = {n}", flush=True)
        cmd = [sys.executable, script, "--worker", "--devices", str(n), *worker_args]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")) + "\n")
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"n = {n} failed (exit code {proc.returncode})")
        results.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
    return results


def write_record(args, results: list[dict]) -> None:
    """``{"machine", "args", "results"}`` to ``args.out`` (if given)."""
    record = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "jax": jax.__version__, "python": platform.python_version(),
                          "date": datetime.date.today().isoformat()},
              "args": {k: v for k, v in vars(args).items() if k not in ("worker", "out")}, "results": results}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(record, fh, indent=1)
