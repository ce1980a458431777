"""Dropless expert parallelism at DeepSeek-V3's routing shape on n = 8 ... 64 emulated devices:
memory per device vs n, rounds and step time vs router skew, rows per token, residuals.

    PYTHONPATH=. python benchmarks/bench_scale.py --out benchmarks/results/cpu-DATE/scale.json

Each n runs in its own process (the emulated device count is fixed at jax's start):
``XLA_FLAGS=--xla_force_host_platform_device_count=n``, mesh ``{data: 1, expert: n}``.
The layer: 256 routed experts, top-8, ``group_limited`` sigmoid router (8 groups, keep 4,
normalised, x 2.5), SwiGLU experts, tiny widths (d 64, f 32), T_l tokens per device.

* ``memory``: XLA's temp bytes of the compiled fwd+bwd step, per device, for each
  exchange and c (``dropless_overflow="rounds"``); ``residual_bytes``: what the forward
  keeps for the backward, per device (``jax.ad_checkpoint.print_saved_residuals`` of the
  layer's loss). The ragged exchange on CPU is ``ragged_all_to_all_emulated`` (an
  all-gather of every operand): its memory is the emulation's, not the op's, so it is
  reported on paper only (R rows).
* ``skew``: router bias ``b_e = -s log(1 + rank_e)`` (Zipf s logit offsets; ranks a fixed
  random permutation of the experts): ``exchange_rounds``, fwd+bwd ms (median), and what
  one round would drop (``dropless_overflow="drop"``) at the same c.
* ``rows``: per token, the rows a flat exchange sends (k), the distinct devices and the
  distinct 8-device nodes its experts live on, the rows that cross nodes when every
  assignment is a row and when a token is sent once per node.

``--legacy`` measures with only the options an older jmoe has (for the "before" numbers:
run this file against a checkout of the older commit).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
import sys

NODE = 8  # devices per node for the inter-node statistics


def worker(args) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchtools import median_time

    from jax.ad_checkpoint import print_saved_residuals

    import jmoe
    from jmoe import parallel

    n = args.devices
    mesh = parallel.make_mesh(data=1, expert=n)
    seq = 128
    kx, kr = jax.random.split(jax.random.key(0))
    shape = (n * args.tokens_per_device // seq, seq, args.d_model)
    x, r = jax.random.normal(kx, shape), jax.random.normal(kr, shape)
    has_overflow = "dropless_overflow" in inspect.signature(jmoe.MoE.__init__).parameters
    router_options = dict(score_function="sigmoid", n_group=8, topk_group=4, normalize=True, routed_scaling_factor=2.5,
                          router_bias=True)
    if hasattr(jmoe.routing, "as_router"):  # router options on the router object
        router_args = dict(router=jmoe.routing.GroupLimited(**router_options))
    else:  # an older jmoe: flat layer keywords
        router_args = dict(router="group_limited", **router_options)

    def make(exchange, factor, overflow="rounds", skew=0.0):
        extra = {"dropless_overflow": overflow} if has_overflow else {}
        layer = jmoe.MoE(args.d_model, args.d_ff, num_experts=256, k=8, capacity_factor=None, **router_args,
                         activation="swiglu", mesh=mesh, dropless_exchange=exchange,
                         dropless_buffer_factor=factor, deterministic=True, rngs=nnx.Rngs(0), **extra)
        if skew:
            rank = np.random.default_rng(0).permutation(256)
            layer.router_bias[...] = jnp.asarray(-skew * np.log1p(rank), jnp.float32)
        parallel.shard_moe_params(layer, mesh)
        return layer

    def step_fn(layer):
        graphdef, state, rest = nnx.split(layer, nnx.Param, ...)

        def loss(state, x):
            y, aux = nnx.merge(graphdef, state, rest)(x)
            return jnp.sum(y * r), aux

        def step(state, x):
            (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
            return grads, {k: aux[k] for k in ("dropped_fraction", "exchange_rounds") if k in aux}

        return jax.jit(step), state, loss

    def residual_bytes(loss, state) -> int:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            print_saved_residuals(lambda s, x: loss(s, x)[0], state, x)
        total = 0
        for line in text.getvalue().splitlines():
            m = re.match(r"\s*(\w+)\[([\d,]*)\]", line)
            if m and "from the argument" not in line:
                size = int(np.prod([int(v) for v in m.group(2).split(",") if v]))
                total += size * jnp.dtype(m.group(1).replace("f32", "float32").replace("i32", "int32")
                                          .replace("bf16", "bfloat16").replace("bool", "bool_")).itemsize
        return total // n  # the global arrays of shard_map's residuals, per device

    out = {"devices": n, "memory": [], "skew": [], "rows": None}
    for exchange, factor in [("padded", c) for c in args.factors]:
        fn, state, loss = step_fn(make(exchange, factor))
        memory = fn.lower(state, x).compile().memory_analysis()
        row = {"exchange": exchange, "factor": factor, "temp_mib": memory.temp_size_in_bytes / 2**20,
               "residual_mib": residual_bytes(loss, state) / 2**20}
        out["memory"].append(row)
        print(json.dumps(row), flush=True)
    a = args.tokens_per_device * 8
    if has_overflow:
        for exchange in ("padded", "ragged"):
            sizes = parallel.exchange_sizes(a, n, args.skew_factor, k=8, local_experts=256 // n)
            out.setdefault("paper_rows", {})[exchange] = (sizes.cell_rows * n if exchange == "padded"
                                                          else sizes.receive_rows)
    if args.legacy:
        return out
    for skew in args.skews:
        row = {"skew": skew}
        for overflow in ("rounds", "drop"):
            fn, state, _ = step_fn(make("padded", args.skew_factor, overflow, skew))
            _, aux = fn(state, x)
            row[overflow] = {k: float(v) for k, v in aux.items()}
            if overflow == "rounds":
                row["fwd_bwd_ms"] = 1e3 * median_time(fn, state, x, iters=args.iters, warmup=1)
        layer = make("padded", args.skew_factor, "rounds", skew)
        row["rows"] = rows_per_token(layer, x, n, np)
        row["rounds_by_counts"] = rounds_by_counts(layer, x, n, args.skew_factor, parallel, np)
        out["skew"].append(row)
        print(json.dumps(row), flush=True)
    return out


def route(layer, x):
    """The layer's routing plan of every token (groups of 4 tokens, capacity 4: dropless, and
    the plan's per-group arrays stay small), tokens in x's order."""
    import jax
    import numpy as np

    one = jax.devices()[0]  # host copies: the layer's weights live on every device of the mesh
    params = jax.tree.map(lambda a: jax.device_put(np.asarray(a), one), layer.params()["router"])
    groups = jax.device_put(np.asarray(x).reshape(-1, 4, x.shape[-1]), one)  # [T / 4, 4, d]
    return jax.jit(lambda p, g: layer.router.route(p, g, {}, None, 4))(params, groups)


def rows_per_token(layer, x, n, np) -> dict:
    """Per token (mean): rows of a flat exchange, distinct devices / nodes reached, rows
    crossing nodes (flat: one per assignment; once per node: one per distinct other node)."""
    plan = route(layer, x)
    expert = np.asarray(plan.token_expert).reshape(-1, 8)  # [T, k]
    t = expert.shape[0]
    device = expert // (256 // n)
    home = np.repeat(np.arange(n), t // n)[:, None]  # token t lives on device t // T_l
    node, home_node = device // NODE, home // NODE
    distinct = lambda a: np.mean([len(set(row)) for row in a])  # noqa: E731
    other_nodes = [len(set(row) - {h}) for row, h in zip(node, home_node[:, 0])]
    return {"rows": 8.0, "devices": float(distinct(device)), "nodes": float(distinct(node)),
            "inter_node_flat": float(np.mean(np.sum(node != home_node, axis=1))),
            "inter_node_once_per_node": float(np.mean(other_nodes))}


def rounds_by_counts(layer, x, n, factor, parallel, np) -> dict:
    """Each exchange's rounds from the routing's counts alone (exact: a round fills a
    receiver's R rows (ragged) or a cell's P rows (padded) while any are left): ragged
    ``max_j ceil(rows to j / R)``, padded ``max_(i, j) ceil(rows i sends j / P)``."""
    plan = route(layer, x)
    expert = np.asarray(plan.token_expert).reshape(n, -1)  # [source, T_l * k]
    e_l = 256 // n
    cells = np.stack([np.bincount(row // e_l, minlength=n) for row in expert])  # [source, destination]
    sizes = parallel.exchange_sizes(expert.shape[1], n, factor, k=8, local_experts=e_l)
    return {"ragged": int(np.max(np.ceil(cells.sum(0) / sizes.receive_rows))),
            "padded": int(np.max(np.ceil(cells / sizes.cell_rows))),
            "receiver_max_over_mean": float(cells.sum(0).max() / cells.sum(0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="*", default=[8, 16, 32, 64])
    parser.add_argument("--tokens-per-device", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=32)
    parser.add_argument("--factors", type=float, nargs="*", default=[1.0, 1.25, 2.0])
    parser.add_argument("--skews", type=float, nargs="*", default=[0.0, 0.1, 0.2, 0.5])
    parser.add_argument("--skew-factor", type=float, default=1.25)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--legacy", action="store_true")
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
                   "--d-ff", str(args.d_ff), "--factors", *map(str, args.factors), "--skews", *map(str, args.skews),
                   "--skew-factor", str(args.skew_factor), "--iters", str(args.iters)] + (["--legacy"] if args.legacy else [])
    write_record(args, per_device_count(__file__, args.devices, worker_args))


if __name__ == "__main__":
    main()
