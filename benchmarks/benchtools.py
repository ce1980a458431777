"""What the benchmark scripts share: the timing rule."""

import statistics
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
