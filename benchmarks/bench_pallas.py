"""Time dispatch and combine: the Pallas kernels vs the XLA gather and einsum backends.

    PYTHONPATH=. python benchmarks/bench_pallas.py --out results/bench_pallas.json          # GPU sizes
    PYTHONPATH=. python benchmarks/bench_pallas.py --small --out /tmp/bench_pallas.json     # CPU smoke run

For each workload (tokens T = G * S, width d, E experts, top-k, capacity factor),
op (dispatch, combine), mode (fwd, fwd+bwd) and backend: the median of
``--iters`` timed calls of a jitted function after warm-up (``block_until_ready``).

Achieved bandwidth counts the bytes an op must move at least (indices ignored):

* dispatch fwd:  read the kept token rows, write all R = E * G * C slot rows;
* combine fwd:   read the kept slot rows, write the T token rows;
* dispatch bwd:  read the kept slot-gradient rows, write T rows;
* combine bwd:   d expert_out: read kept dy rows, write R rows; d weight: read
  kept dy rows and kept expert_out rows;

each ``x d x itemsize``; fwd+bwd is the sum. It is reported in GB/s and as a
fraction of the device's copy bandwidth measured in the same run (``2 * a`` on
a large array: read + write). The ratios are backend time / gather time and
backend time / einsum time (einsum only where its [G, S, E, C] one-hot fits
``--einsum-limit-gib``).

``--small`` runs tiny shapes; off GPU the Pallas kernels run in *interpret
mode*, so CPU timings of ``pallas`` say nothing about its speed: the mode only
proves that the script works.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchtools import median_time  # noqa: E402  (a script's own folder is on sys.path)
from jmoe import dispatch as dispatch_lib
from jmoe import routing
from jmoe.pallas import KernelConfig, pallas_combine, pallas_dispatch


def parse_tiles(text: str) -> list[KernelConfig]:
    """"16x512,32x256" -> KernelConfig(block_rows=16, block_d=512), ..."""
    configs = []
    for item in filter(None, text.split(",")):
        rows, d = item.lower().split("x")
        configs.append(KernelConfig(block_rows=int(rows), block_d=int(d)))
    return configs


def copy_bandwidth(num_bytes: int, dtype, iters: int) -> float:
    """Bytes/s of ``2 * a`` over an array of ``num_bytes`` (counts read + write)."""
    n = num_bytes // jnp.dtype(dtype).itemsize
    a = jnp.ones((n,), dtype)
    seconds = median_time(jax.jit(lambda a: a * 2), a, iters=iters)
    return 2 * n * jnp.dtype(dtype).itemsize / seconds


def backends(tiles: list[KernelConfig]) -> dict[str, tuple]:
    out = {"gather": (dispatch_lib.gather_dispatch, dispatch_lib.gather_combine),
           "einsum": (dispatch_lib.einsum_dispatch, dispatch_lib.einsum_combine)}
    for cfg in tiles:
        name = f"pallas[{cfg.block_rows}x{cfg.block_d}]"
        out[name] = (
            lambda x, p, cfg=cfg: pallas_dispatch(x, p, config=cfg),
            lambda o, p, cfg=cfg: pallas_combine(o, p, config=cfg),
        )
    return out


def op_functions(dispatch_fn, combine_fn):
    """The four timed functions: (op, mode) -> jitted f(x, expert_out, plan, ct_slots, ct_y)."""

    def dispatch_fwd(x, expert_out, plan, ct_slots, ct_y):
        return dispatch_fn(x, plan)

    def dispatch_fwd_bwd(x, expert_out, plan, ct_slots, ct_y):
        slots, vjp = jax.vjp(lambda x: dispatch_fn(x, plan), x)
        return slots, vjp(ct_slots)

    def combine_fwd(x, expert_out, plan, ct_slots, ct_y):
        return combine_fn(expert_out, plan)

    def combine_fwd_bwd(x, expert_out, plan, ct_slots, ct_y):
        y, vjp = jax.vjp(lambda o, w: combine_fn(o, plan.replace(token_weight=w)), expert_out, plan.token_weight)
        return y, vjp(ct_y)

    return {
        ("dispatch", "fwd"): jax.jit(dispatch_fwd),
        ("dispatch", "fwd+bwd"): jax.jit(dispatch_fwd_bwd),
        ("combine", "fwd"): jax.jit(combine_fwd),
        ("combine", "fwd+bwd"): jax.jit(combine_fwd_bwd),
    }


def min_bytes(op: str, mode: str, *, tokens: int, slots: int, kept: int, d: int, itemsize: int) -> int:
    """The bytes an op must move (see the module docstring)."""
    row = d * itemsize
    if op == "dispatch":
        fwd, bwd = (kept + slots) * row, (kept + tokens) * row
    else:
        fwd, bwd = (kept + tokens) * row, (kept + slots + 2 * kept) * row
    return fwd if mode == "fwd" else fwd + bwd


def workloads(small: bool) -> list[dict]:
    if small:
        return [dict(name=f"small-E{e}", G=2, S=128, d=96, E=e, k=2, factor=1.25) for e in (4, 8)]
    # 16,384 tokens x d 4,096 in 4 groups of 4,096 tokens
    return [dict(name=f"T16k-d4096-E{e}", G=4, S=4096, d=4096, E=e, k=2, factor=1.25) for e in (8, 64)]


def run(args) -> dict:
    dtype = jnp.dtype(args.dtype)
    itemsize = dtype.itemsize
    tiles = parse_tiles(args.tiles)
    on_gpu = jax.default_backend() == "gpu"
    copy_bw = copy_bandwidth(args.copy_mib << 20, dtype, args.iters)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "dtype": dtype.name,
        "pallas_interpret": not on_gpu,  # off GPU the kernels run interpreted (JMOE_ALLOW_INTERPRET=1 needed)
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "iters": args.iters,
        "note": None if on_gpu else "not a GPU: pallas runs in interpret mode; its times are meaningless",
    }
    rows = []
    rng = np.random.default_rng(0)
    for w in workloads(args.small):
        G, S, d, E, k = w["G"], w["S"], w["d"], w["E"], w["k"]
        C = routing.expert_capacity(S, E, k=k, capacity_factor=w["factor"])
        plan = routing.tokens_choose(jnp.asarray(rng.normal(size=(G, S, E)), jnp.float32), k=k, capacity=C)
        kept = int(jnp.sum(plan.token_slot >= 0))
        tokens, slots = G * S, E * G * C
        x = jnp.asarray(rng.normal(size=(G, S, d)), dtype)
        expert_out = jnp.asarray(rng.normal(size=(E, G * C, d)), dtype)
        ct_slots, ct_y = expert_out[::-1], x[::-1]
        # The einsum backend's one-hot [G, S, E, C] (float32 combine array) and its products.
        einsum_gib = G * S * E * C * 4 / 2**30
        print(f"# {w['name']}: T={tokens} d={d} E={E} k={k} C={C} slots={slots} kept={kept} "
              f"(dropped {1 - kept / (tokens * k):.3f}, einsum one-hot {einsum_gib:.2f} GiB)", flush=True)
        times: dict[tuple, float] = {}
        for backend, (dfn, cfn) in backends(tiles).items():
            if backend == "einsum" and einsum_gib > args.einsum_limit_gib:
                continue
            for (op, mode), fn in op_functions(dfn, cfn).items():
                entry = dict(workload=w["name"], tokens=tokens, d=d, E=E, k=k, C=C, kept=kept,
                             op=op, mode=mode, backend=backend)
                try:
                    seconds = median_time(fn, x, expert_out, plan, ct_slots, ct_y, iters=args.iters)
                except Exception as e:  # e.g. out of memory: record it, go on
                    entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(entry)
                    print(f"  {op:8s} {mode:7s} {backend:18s} FAILED {entry['error']}", flush=True)
                    continue
                nbytes = min_bytes(op, mode, tokens=tokens, slots=slots, kept=kept, d=d, itemsize=itemsize)
                entry.update(ms=seconds * 1e3, GBps=nbytes / seconds / 1e9, frac_copy_bw=nbytes / seconds / copy_bw)
                times[(op, mode, backend)] = seconds
                rows.append(entry)
                print(f"  {op:8s} {mode:7s} {backend:18s} {entry['ms']:9.3f} ms {entry['GBps']:8.1f} GB/s", flush=True)
        for entry in rows:
            if entry["workload"] != w["name"] or "ms" not in entry:
                continue
            for ref in ("gather", "einsum"):
                base = times.get((entry["op"], entry["mode"], ref))
                entry[f"vs_{ref}"] = entry["ms"] / 1e3 / base if base else None
        if args.out:  # after each workload, so a run cut short by a time limit leaves its results
            write_json(args.out, {"meta": meta, "rows": rows})
    return {"meta": meta, "rows": rows}


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(f"\ndevice {meta['device']} ({meta['backend']}), jax {meta['jax']}, {meta['dtype']}, "
          f"copy bandwidth {meta['copy_bandwidth_GBps']:.1f} GB/s")
    if meta["note"]:
        print(f"NOTE: {meta['note']}")
    header = f"{'workload':18s} {'op':8s} {'mode':7s} {'backend':18s} {'ms':>9s} {'GB/s':>8s} {'%copy':>6s} {'/gather':>8s} {'/einsum':>8s}"
    print(header)
    print("-" * len(header))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['workload']:18s} {r['op']:8s} {r['mode']:7s} {r['backend']:18s} {r['error']}")
            continue
        print(f"{r['workload']:18s} {r['op']:8s} {r['mode']:7s} {r['backend']:18s} {r['ms']:9.3f} "
              f"{r['GBps']:8.1f} {100 * r['frac_copy_bw']:6.1f} {fmt(r['vs_gather'], '8.2f')} {fmt(r['vs_einsum'], '8.2f')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on GPU) or float32 (default --small)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per measurement (median)")
    parser.add_argument("--tiles", default=None,
                        help="Pallas tile configs 'ROWSxD,...' (default 32x256,16x512,64x256,32x512,64x128; --small: 16x32)")
    parser.add_argument("--copy-mib", type=int, default=None, help="array size for the copy bandwidth")
    parser.add_argument("--einsum-limit-gib", type=float, default=8.0, help="skip einsum above this one-hot size")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.small else "bfloat16")
    args.iters = args.iters or (3 if args.small else 10)
    args.tiles = args.tiles or ("16x32" if args.small else "32x256,16x512,64x256,32x512,64x128")
    args.copy_mib = args.copy_mib or (16 if args.small else 1024)
    result = run(args)
    print_table(result)
    if args.out:
        write_json(args.out, result)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
