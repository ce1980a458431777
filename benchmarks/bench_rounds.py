"""The overhead of the dropless exchange's rounds machinery on one device (issue 25.7).

    PYTHONPATH=. python benchmarks/bench_rounds.py --scale gpu --dtype bfloat16 --out /tmp/rounds.json
    PYTHONPATH=. python benchmarks/bench_rounds.py            # CPU, small shape

Times fwd+bwd of the dropless experts on T tokens (top-k of E experts, SwiGLU, random
routing) two ways, in one run:

* ``local``: :func:`jmoe.dropless.dropless_experts` (what one device runs);
* ``rounds_<exchange>``: :func:`jmoe.parallel.dropless_exchange_experts` under
  ``jax.shard_map`` on a 1-device ``expert`` axis: the counts all-gather, the rounds
  ``while_loop`` (one round), the exchange (on a GPU XLA's own ``ragged_all_to_all``) and
  the custom VJP that re-runs the round in the backward (recomputing the experts' forward).

The ratio ``rounds / local`` is the price of the machinery where nothing needs to move.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import jax
import jax.numpy as jnp

from benchtools import median_time  # noqa: E402  (a script's own folder is on sys.path)
from jmoe import dropless, parallel

SHAPES = {"cpu": dict(tokens=1024, d=128, f=256, experts=16, k=4),
          "gpu": dict(tokens=8192, d=2048, f=1408, experts=64, k=6)}  # the DeepSeek-like layer of bench_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    s = SHAPES[args.scale]
    dtype = jnp.dtype(args.dtype)
    t, d, f, e, k = s["tokens"], s["d"], s["f"], s["experts"], s["k"]
    keys = jax.random.split(jax.random.key(0), 6)
    tokens = jax.random.normal(keys[0], (t, d), dtype)
    token_expert = jnp.argsort(jax.random.uniform(keys[1], (t, e)), axis=1)[:, :k].astype(jnp.int32)  # distinct
    token_weight = jax.random.uniform(keys[2], (t, k))
    params = {"w_in": (jax.random.normal(keys[3], (e, d, f)) / d**0.5).astype(dtype),
              "w_gate": (jax.random.normal(keys[4], (e, d, f)) / d**0.5).astype(dtype),
              "w_out": (jax.random.normal(keys[5], (e, f, d)) / f**0.5).astype(dtype)}
    cot = jax.random.normal(jax.random.key(1), (t, d), dtype)
    mesh = parallel.make_mesh(data=1, expert=1, devices=jax.devices()[:1])
    spec, whole = jax.sharding.PartitionSpec("expert"), jax.sharding.PartitionSpec()

    def local(x, p):
        return dropless.dropless_experts(x, token_expert, token_weight, p, "swiglu")

    def rounds(exchange):
        def fn(x, p):
            body = lambda x, te, tw, p: parallel.dropless_exchange_experts(  # noqa: E731
                x, te, tw, p, "swiglu", num_experts=e, expert_axes=("expert",), expert_size=1, exchange=exchange)[0]
            return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, whole), out_specs=spec)(
                x, token_expert, token_weight, p)
        return fn

    variants = {"local": local, "rounds_ragged": rounds("ragged"), "rounds_padded": rounds("padded")}
    results, base = {}, None
    for name, fn in variants.items():
        step = jax.jit(jax.value_and_grad(lambda x, p: jnp.sum((fn(x, p) * cot).astype(jnp.float32)), argnums=(0, 1)))
        seconds = median_time(step, tokens, params, iters=args.iters)
        base = base or seconds
        results[name] = {"fwd_bwd_ms": 1e3 * seconds, "vs_local": seconds / base}
        print(f"{name:>14}: fwd+bwd {1e3 * seconds:8.2f} ms  ({seconds / base:.2f}x local)", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"machine": {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                                   "python": platform.python_version(), "date": datetime.date.today().isoformat()},
                       "shape": s, "dtype": args.dtype, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
