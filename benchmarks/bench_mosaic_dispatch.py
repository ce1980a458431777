"""Mosaic GPU vs Triton vs XLA gather dispatch/combine (issue 17), fwd and fwd+bwd, as % of copy bandwidth.

    python benchmarks/bench_mosaic_dispatch.py OUT.json     # on a GPU: the Mixtral and FastMoE shapes, bf16
                                                            # elsewhere: a tiny shape, float32 (interpreted kernels:
                                                            # needs JMOE_ALLOW_INTERPRET=1; a smoke run, not a measurement)

``auto`` on a GPU moves to ``dispatch="mosaic"`` only once this shows it at or above the Triton
kernels' bandwidth (83-89% of copy bandwidth on the H100, BENCHMARKS.md).
"""
import json
import sys

sys.path.insert(0, "benchmarks")
import jax
import jax.numpy as jnp
import numpy as np

from benchtools import median_time  # noqa: E402  (the benchmarks folder is on sys.path)
from bench_pallas import copy_bandwidth, min_bytes, op_functions
from jmoe import dispatch as dispatch_lib, routing
from jmoe.pallas import KernelConfig, pallas_combine, pallas_dispatch
from jmoe.pallas.mosaic_dispatch import MosaicDispatchConfig, mosaic_combine, mosaic_dispatch

out, small = sys.argv[1], jax.default_backend() != "gpu"
dtype, iters = (jnp.float32, 2) if small else (jnp.bfloat16, 10)
shapes = ([("tiny", 1, 64, 128, 4, 2, 1.25)] if small else
          [("mixtral", 1, 4096, 4096, 8, 2, 1.25), ("fastmoe", 1, 4096, 1024, 64, 2, 1.25)])
backends = {"gather": (dispatch_lib.gather_dispatch, dispatch_lib.gather_combine),
            "triton_32x256": (lambda x, p: pallas_dispatch(x, p, config=KernelConfig()),
                              lambda o, p: pallas_combine(o, p, config=KernelConfig())),
            "mosaic_32x128": (mosaic_dispatch, mosaic_combine),
            "mosaic_64x256": (lambda x, p: mosaic_dispatch(x, p, config=MosaicDispatchConfig(64, 256)),
                              lambda o, p: mosaic_combine(o, p, config=MosaicDispatchConfig(64, 256)))}
copy_bw = copy_bandwidth((16 if small else 1024) << 20, dtype, iters)
print(f"{jax.devices()[0].device_kind}: copy bandwidth {copy_bw / 1e9:.0f} GB/s")
rows, rng = [], np.random.default_rng(0)
for name, G, S, d, E, k, factor in shapes:
    C = routing.expert_capacity(S, E, k=k, capacity_factor=factor)
    plan = routing.tokens_choose(jnp.asarray(rng.normal(size=(G, S, E)), jnp.float32), k=k, capacity=C)
    kept = int(jnp.sum(plan.token_slot >= 0))
    x = jnp.asarray(rng.normal(size=(G, S, d)), dtype)
    eo = jnp.asarray(rng.normal(size=(E, G * C, d)), dtype)
    for backend, (dfn, cfn) in backends.items():
        for (op, mode), fn in op_functions(dfn, cfn).items():
            try:
                t = median_time(fn, x, eo, plan, eo[::-1], x[::-1], iters=iters)
            except Exception as e:
                print(f"{name} {op} {mode} {backend} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            nbytes = min_bytes(op, mode, tokens=G * S, slots=E * G * C, kept=kept, d=d, itemsize=jnp.dtype(dtype).itemsize)
            rows.append(dict(shape=name, op=op, mode=mode, backend=backend, ms=t * 1e3, frac_copy_bw=nbytes / t / copy_bw))
            print(f"{name:8s} {op:8s} {mode:7s} {backend:14s} {t * 1e3:8.3f} ms {100 * nbytes / t / copy_bw:5.1f}% copy bw", flush=True)
        with open(out, "w") as fh:
            json.dump({"device": str(jax.devices()[0].device_kind), "copy_GBps": copy_bw / 1e9, "rows": rows}, fh, indent=1)
