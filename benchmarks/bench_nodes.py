"""One send per node (issue 25.3): the dropless node exchange (``hierarchical_a2a=True``)
against the flat one on ``expert_outer`` x ``expert`` meshes of n = 16 ... 64 emulated
devices, 8 devices a node, at DeepSeek-V3's routing shape (bench_scale.py's layer).

    PYTHONPATH=. python benchmarks/bench_nodes.py --out benchmarks/results/cpu-DATE/nodes.json

Per n (its own process) and exchange (flat, node), padded cells, c = the default:

* ``rows``: per token, the rows that cross the outer axis (to another node): flat = its
  assignments on other nodes, node = its other nodes (``node_rows``, the rows the node
  exchange builds); and the most any token sends (group-limited routing with the groups on
  the nodes bounds it by ``topk_group``);
* ``temp_mib``: XLA's temp bytes of the compiled fwd+bwd step per device;
* ``a2a_rows``: rows per device and direction in each all-to-all of the compiled forward
  (padded cells: the buffers, whatever is in them), split into outer and inner hops;
* ``exchange_rounds`` and fwd+bwd ms (median, CPU: the emulated devices share 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

NODE = 8


def worker(args) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_scale import route
    from benchtools import median_time

    import jmoe
    from jmoe import parallel
    from jmoe.parallel.node_exchange import node_rows

    n = args.devices
    mesh = parallel.make_mesh(expert_outer=n // NODE, expert=NODE)
    seq = 128
    kx, kr = jax.random.split(jax.random.key(0))
    shape = (n * args.tokens_per_device // seq, seq, args.d_model)
    x, r = jax.random.normal(kx, shape), jax.random.normal(kr, shape)

    def make(hierarchical):
        router = jmoe.routing.GroupLimited(score_function="sigmoid", n_group=8, topk_group=4, normalize=True,
                                           routed_scaling_factor=2.5, router_bias=True)
        layer = jmoe.MoE(args.d_model, args.d_ff, num_experts=256, k=8, capacity_factor=None, router=router,
                         activation="swiglu", mesh=mesh, hierarchical_a2a=hierarchical,
                         dropless_exchange="padded", deterministic=True, rngs=nnx.Rngs(0))
        parallel.shard_moe_params(layer, mesh)
        return layer

    out = {"devices": n, "nodes": n // NODE}
    layer = make(False)
    plan = route(layer, x)
    expert = np.asarray(plan.token_expert).reshape(-1, 8)  # [T, k]
    home = (np.arange(expert.shape[0]) // args.tokens_per_device)[:, None] // NODE  # [T, 1] home node
    node, _, first = (np.asarray(a) for a in node_rows(jnp.asarray(expert), jnp.ones(expert.shape), 256 // (n // NODE)))
    crossing = first & (node != home)
    out["rows"] = {"flat": float(np.mean(np.sum(node != home, axis=1))), "node": float(np.mean(np.sum(crossing, 1))),
                   "node_max": int(np.max(np.sum(crossing, 1))), "nodes_per_token": float(np.mean(np.sum(first, 1)))}
    print(json.dumps(out["rows"]), flush=True)
    for name, hierarchical in (("flat", False), ("node", True)):
        layer = make(hierarchical)
        graphdef, state, rest = nnx.split(layer, nnx.Param, ...)

        def loss(state, x):
            y, aux = nnx.merge(graphdef, state, rest)(x)
            return jnp.sum(y * r), aux

        def step(state, x):
            (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
            return grads, {k: aux[k] for k in ("dropped_fraction", "exchange_rounds")}

        fn = jax.jit(step)
        memory = fn.lower(state, x).compile().memory_analysis()
        forward = jax.jit(lambda s, x: nnx.merge(graphdef, s, rest)(x)).lower(state, x).compile().as_text()
        _, aux = fn(state, x)
        row = {"exchange": name, "temp_mib": memory.temp_size_in_bytes / 2**20, "a2a_rows": a2a_rows(forward, n),
               **{k: float(v) for k, v in aux.items()},
               "fwd_bwd_ms": 1e3 * median_time(fn, state, x, iters=args.iters, warmup=1)}
        out[name] = row
        print(json.dumps(row), flush=True)
    return out


def a2a_rows(hlo_text: str, n: int) -> list[list[int]]:
    """[peers, rows per peer] of each d-wide all-to-all result in compiled HLO (CPU: a tuple of
    per-peer blocks [1, P, d] or [P, d])."""
    found = []
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(.*?)\s+all-to-all(?:-start)?\(", line)
        if match:
            shapes = [[int(v) for v in dims.split(",") if v] for _, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))]
            if shapes and shapes[0][-1] > 16:  # rows of d, not the ids / weights of K = 8
                found.append([len(shapes), int(shapes[0][-2])])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="*", default=[16, 32, 64])
    parser.add_argument("--tokens-per-device", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        args.devices = args.devices[0]
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchtools import per_device_count, write_record

    worker_args = ["--tokens-per-device", str(args.tokens_per_device), "--d-model", str(args.d_model),
                   "--d-ff", str(args.d_ff), "--iters", str(args.iters)]
    write_record(args, per_device_count(__file__, args.devices, worker_args))


if __name__ == "__main__":
    main()
