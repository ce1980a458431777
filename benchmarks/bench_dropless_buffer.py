"""Dropless expert parallelism: the receive-buffer bound (``dropless_buffer_factor``) on an
(emulated) device mesh: time, memory and what it drops.

    PYTHONPATH=. python benchmarks/bench_dropless_buffer.py --out /tmp/buffer.json    # 8 emulated CPU devices

Mesh ``{data: 1, expert: n}``, a dropless ``jmoe.MoE`` (E experts, top-k, SwiGLU), its
own (untrained, so naturally imbalanced) router. Per device A = T_l * k assignments.
For each factor c (None = the worst case, R = n * A rows; else R = ceil(c * A)):

* ``fwd_bwd_ms``: median time of the layer's forward + backward (loss ``sum(y * r)``);
* ``temp_mib``: XLA's temporary buffer size of that compiled step (all devices), where
  the backend reports it;
* ``dropped_fraction``: the share of assignments the bounded buffer dropped (0 for None);
* ``receive_rows``: R; ``ragged_buffer_mib``: R * d * itemsize, one device's ragged
  receive buffer (the padded exchange, CPU's default, always moves [n, A, d]; the bound
  cuts its compute, not its all-to-all).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchtools import median_time  # noqa: E402  (a script's own folder is on sys.path)
import jmoe  # noqa: E402
from jmoe import parallel  # noqa: E402


def measure(factor, args, mesh, x, r) -> dict:
    layer = jmoe.MoE(args.d_model, args.d_ff, num_experts=args.experts, k=args.k, capacity_factor=None,
                     activation="swiglu", mesh=mesh, dropless_exchange=args.exchange,
                     dropless_buffer_factor=factor, deterministic=True, rngs=nnx.Rngs(0))
    parallel.shard_moe_params(layer, mesh)
    graphdef, state, rest = nnx.split(layer, nnx.Param, ...)

    def step(state, x):
        def loss(state, x):
            y, aux = nnx.merge(graphdef, state, rest)(x)
            return jnp.sum(y * r), aux

        (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
        return grads, aux["dropped_fraction"]

    fn = jax.jit(step)
    compiled = fn.lower(state, x).compile()
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    _, dropped = fn(state, x)
    n = parallel.expert_parallel_size(mesh)
    a = x.shape[0] * x.shape[1] * args.k // n
    rows = parallel.receive_buffer_rows(a, n, factor)
    return {"factor": factor, "receive_rows": rows, "worst_case_rows": n * a,
            "ragged_buffer_mib": rows * args.d_model * 4 / 2**20,
            "temp_mib": None if temp is None else temp / 2**20,
            "dropped_fraction": float(dropped),
            "fwd_bwd_ms": 1e3 * median_time(fn, state, x, iters=args.iters)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--tokens-per-device", type=int, default=512)
    parser.add_argument("--exchange", default="auto", choices=parallel.DROPLESS_EXCHANGES)
    parser.add_argument("--factors", default="none,2.0,1.5,1.25,1.0")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    mesh = parallel.make_mesh(data=1)  # every device on the expert axis
    n = parallel.expert_parallel_size(mesh)
    seq = 128
    kx, kr = jax.random.split(jax.random.key(0))
    shape = (n * args.tokens_per_device // seq, seq, args.d_model)
    x, r = jax.random.normal(kx, shape), jax.random.normal(kr, shape)
    rows = []
    for text in args.factors.split(","):
        factor = None if text == "none" else float(text)
        row = measure(factor, args, mesh, x, r)
        rows.append(row)
        temp = "n/a" if row["temp_mib"] is None else f"{row['temp_mib']:.1f}"
        print(f"factor {str(factor):>5}: R = {row['receive_rows']:>5} of {row['worst_case_rows']} rows, "
              f"fwd+bwd {row['fwd_bwd_ms']:.1f} ms, dropped {100 * row['dropped_fraction']:.2f}%, "
              f"XLA temp {temp} MiB, ragged buffer {row['ragged_buffer_mib']:.2f} MiB/device", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": {"device": str(jax.devices()[0].device_kind), "devices": n, "jax": jax.__version__,
                               "python": platform.python_version(), "date": datetime.date.today().isoformat()},
                   "args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
