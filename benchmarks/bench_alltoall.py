"""Expert-parallel exchange on an (emulated) device mesh: flat vs hierarchical all-to-all.

    PYTHONPATH=. python benchmarks/bench_alltoall.py                      # 8 emulated CPU devices
    PYTHONPATH=. python benchmarks/bench_alltoall.py --out /tmp/a2a.json

Mesh ``{data: 1, expert_outer: O, expert: I}`` (n = O * I devices, all experts
split over both axes). For each variant (flat, hierarchical, and each with
``a2a_chunks``), two timings, each the median of ``--iters`` calls after warm-up:

* ``exchange``: dispatched slots ``[E, G_l * C, d]`` per device to the experts and
  back (the two exchanges of one layer's forward, nothing else);
* ``layer``: the whole ``jmoe.MoE`` forward on the mesh.

Bytes each device sends per layer forward, from shapes (P = E * G_l * C * d *
itemsize, one direction's payload per device; the block a device keeps for itself
is not sent):

* flat:          2 directions x (n - 1)/n x P, in n - 1 messages of P/n each;
* hierarchical:  2 x [(I - 1)/I + (O - 1)/O] x P, in (I - 1) messages of P/I
  (within a host) + (O - 1) messages of P/O (across hosts).

The hierarchical exchange sends more bytes in total but fewer, larger
messages across the slow (outer) links: (O - 1) instead of (n - 1) - (I - 1)
across hosts, each I times larger. On emulated CPU devices all "links" are
memory copies, so the times only show the cost of the extra step, not the
network benefit: measure on real hosts.
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
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchtools import median_time  # noqa: E402  (a script's own folder is on sys.path)
import jmoe  # noqa: E402
from jmoe import parallel  # noqa: E402


def bytes_sent(payload: int, outer: int, inner: int, hierarchical: bool) -> tuple[int, int]:
    """(bytes each device sends per layer forward, messages per device), both directions."""
    n = outer * inner
    if hierarchical:
        per_direction = payload * (inner - 1) // inner + payload * (outer - 1) // outer
        messages = (inner - 1) + (outer - 1)
    else:
        per_direction = payload * (n - 1) // n
        messages = n - 1
    return 2 * per_direction, 2 * messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outer", type=int, default=2, help="expert_outer size (hosts)")
    parser.add_argument("--inner", type=int, default=4, help="expert size (devices per host)")
    parser.add_argument("--batch", type=int, default=64, help="sequences (groups) in total")
    parser.add_argument("--seq", type=int, default=256, help="tokens per group")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--chunks", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    outer, inner = args.outer, args.inner
    n = outer * inner
    devices = jax.devices()[:n]
    mesh = parallel.make_mesh(data=1, expert_outer=outer, expert=inner, devices=devices)
    axes = parallel.MeshAxes.of(mesh)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, args.d_model))

    common = dict(num_experts=args.experts, k=args.k, capacity_factor=args.capacity_factor,
                  dispatch="gather", rngs=nnx.Rngs(0))
    capacity = jmoe.MoE(args.d_model, args.d_ff, **common).capacity(args.seq)
    g_local = args.batch // n
    rows = g_local * capacity
    itemsize = jnp.dtype(jnp.float32).itemsize
    payload = args.experts * rows * args.d_model * itemsize  # bytes, one direction, per device

    print(f"jax {jax.__version__}, {jax.default_backend()}, {len(devices)} devices "
          f"({devices[0].device_kind}), {platform.node()}, {datetime.date.today()}")
    print(f"mesh {dict(mesh.shape)}; E={args.experts} k={args.k} S={args.seq} C={capacity} "
          f"d={args.d_model} f={args.d_ff}; per device G_l={g_local}, payload P = E*G_l*C*d*4 = "
          f"{payload / 2**20:.2f} MiB per direction")
    header = (f"{'variant':<22}{'chunks':>7}{'sent/dev MiB':>14}{'msgs/dev':>10}"
              f"{'exchange ms':>13}{'layer ms':>10}")
    print(header)
    results = []
    for hierarchical in (False, True):
        sent, messages = bytes_sent(payload, outer, inner, hierarchical)

        def exchange(slots, hierarchical=hierarchical):
            there = parallel.exchange_to_experts(slots, axes, hierarchical)
            return parallel.exchange_to_tokens(there, axes, hierarchical)

        slots = jax.random.normal(jax.random.key(1), (n * args.experts, rows, args.d_model))  # per device [E, G_l*C, d]
        exchange_fn = jax.jit(jax.shard_map(exchange, mesh=mesh, in_specs=P(axes.token_axes),
                                            out_specs=P(axes.token_axes)))
        t_exchange = median_time(exchange_fn, slots, iters=args.iters)
        for chunks in args.chunks:
            if capacity % chunks:
                continue
            layer = jmoe.MoE(args.d_model, args.d_ff, mesh=mesh, hierarchical_a2a=hierarchical,
                             a2a_chunks=chunks, **common)
            parallel.shard_moe_params(layer, mesh)
            forward = nnx.jit(lambda layer, x: layer(x)[0])
            t_layer = median_time(forward, layer, x, iters=args.iters)
            name = "hierarchical (2DH)" if hierarchical else "flat"
            row = dict(variant=name, chunks=chunks, bytes_sent_per_device=sent, messages_per_device=messages,
                       exchange_s=t_exchange, layer_s=t_layer)
            results.append(row)
            print(f"{name:<22}{chunks:>7}{sent / 2**20:>14.2f}{messages:>10}"
                  f"{t_exchange * 1e3:>13.2f}{t_layer * 1e3:>10.2f}")
    if args.out:
        meta = dict(jax=jax.__version__, backend=jax.default_backend(), devices=len(devices),
                    host=platform.node(), date=str(datetime.date.today()), mesh=dict(mesh.shape),
                    args=vars(args), capacity=capacity, payload_bytes=payload)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)


if __name__ == "__main__":
    main()
