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
