"""Grouped matmul implementations against one dense matmul: is ``jax.lax.ragged_dot`` a
grouped GEMM here, and how do jmoe's own versions compare?

    PYTHONPATH=. python benchmarks/ragged_dot_check.py --out results/ragged_dot.json          # GPU sizes
    PYTHONPATH=. python benchmarks/ragged_dot_check.py --cpu --out /tmp/ragged_dot.json       # CPU sizes
    PYTHONPATH=. python benchmarks/ragged_dot_check.py --small --out /tmp/ragged_dot.json     # smoke run

For N sorted rows, E experts with balanced group sizes, ``x [N, d] @ w[e] [d, f]``:

* the device's dense matmul rate (``[n, n] @ [n, n]``, random data; n = 8,192 at GPU
  sizes), the reference for every "% of matmul rate" in BENCHMARKS.md;
* the optimized HLO of the jitted ragged_dot: its custom calls and dots (a dense fallback
  shows E-sized dots; a grouped GEMM a ``ragged-dot`` or a grouped custom call);
* for each implementation — ``ragged_dot``, ``scan`` (:mod:`jmoe.grouped_matmul`, one
  entry per ``--scan-block-m``), ``pallas`` (:mod:`jmoe.pallas.grouped_matmul`, a few tile
  configs; GPU only unless ``--small``), ``mosaic`` (:mod:`jmoe.pallas.mosaic_grouped_matmul`,
  JAX's Hopper kernels, a few tile configs; GPU sizes on a GPU only) — its error against a per-group float32 loop and
  the median time of forward and forward+backward, against one plain matmul
  ``[N, d] @ [d, f]`` of the same useful FLOPs (``2 N d f``; x3 with the backward). The
  backward is of ``sum(sin(y) * dy)``: a loss linear in y would let XLA drop the forward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
from collections import Counter

import jax
import jax.numpy as jnp

from benchtools import matmul_tflops, median_time  # noqa: E402  (a script's own folder is on sys.path)
from jmoe.grouped_matmul import scan_grouped_matmul
from jmoe.pallas.grouped_matmul import GmmConfig, grouped_matmul
from jmoe.pallas.mosaic_grouped_matmul import MosaicGmmConfig, mosaic_grouped_matmul


def hlo_summary(text: str) -> dict:
    """Custom-call targets, op counts of interest and the biggest dot output in HLO text."""
    targets = Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    ops = Counter(re.findall(r"\s(ragged-dot|dot|fusion|custom-call|while)\(", text))
    dots = re.findall(r"=\s*\w+\[([\d,]+)\][^=]*?\s(?:dot|ragged-dot)\(", text)
    biggest = max(dots, key=lambda dims: math.prod(int(v) for v in dims.split(",")), default="")
    lines = [" ".join(line.split())[:240] for line in text.splitlines()
             if re.search(r"\s(dot|ragged-dot|custom-call)\(", line)]
    return {"custom_calls": dict(targets), "ops": dict(ops), "largest_dot_output": biggest, "dot_lines": lines[:6]}


def time_impl(matmul, x, w, sizes, dy, want, iters: int) -> dict:
    """Error vs the loop (rows of the first E - 1 groups), fwd and fwd+bwd medians, TFLOP/s."""
    fwd = jax.jit(matmul)
    fwd_bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(matmul(x, w, sizes).astype(jnp.float32)) * dy), argnums=(0, 1)))
    try:
        got = fwd(x, w, sizes)[: want.shape[0]].astype(jnp.float32)
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        t_f = median_time(fwd, x, w, sizes, iters=iters)
        t_fb = median_time(fwd_bwd, x, w, iters=iters)
    except Exception as failure:  # report, keep going
        return {"error": f"{type(failure).__name__}: {str(failure)[:300]}"}
    flops = 2 * x.shape[0] * x.shape[1] * w.shape[2]
    return {"rel_err_vs_loop": err, "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3,
            "tflops_fwd": flops / t_f / 1e12, "tflops_fwd_bwd": 3 * flops / t_fb / 1e12}


def run(num_rows: int, d: int, f: int, num_experts: int, dtype, iters: int, impls: dict) -> dict:
    kx, kw, kd = jax.random.split(jax.random.key(num_experts), 3)
    x = jax.random.normal(kx, (num_rows, d), dtype)
    w = (jax.random.normal(kw, (num_experts, d, f), jnp.float32) / d**0.5).astype(dtype)
    sizes = jnp.full((num_experts,), num_rows // num_experts, jnp.int32).at[-1].add(num_rows % num_experts)
    dy = jax.random.normal(kd, (num_rows, f), dtype)
    per = num_rows // num_experts
    want = jnp.concatenate([x[i * per:(i + 1) * per].astype(jnp.float32) @ w[i].astype(jnp.float32)
                            for i in range(num_experts - 1)], axis=0)  # per-group loop, float32
    w_dense = w[0]
    dense_f = jax.jit(lambda x, w: x @ w)
    dense_fb = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin((x @ w).astype(jnp.float32)) * dy), argnums=(0, 1)))
    dense = {"fwd_ms": 1e3 * median_time(dense_f, x, w_dense, iters=iters),
             "fwd_bwd_ms": 1e3 * median_time(dense_fb, x, w_dense, iters=iters)}
    results = {name: time_impl(fn, x, w, sizes, dy, want, iters) for name, fn in impls.items()}
    ragged = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g))
    ragged_fb = jax.jit(jax.grad(lambda x, w, g: jnp.sum(jnp.sin(jax.lax.ragged_dot(x, w, g).astype(jnp.float32)) * dy),
                                 argnums=(0, 1)))
    return {
        "rows": num_rows, "d": d, "f": f, "num_experts": num_experts, "dtype": jnp.dtype(dtype).name,
        "dense_same_flops": dense,
        "impls": results,
        "hlo_ragged_fwd": hlo_summary(ragged.lower(x, w, sizes).compile().as_text()),
        "hlo_ragged_fwd_bwd": hlo_summary(ragged_fb.lower(x, w, sizes).compile().as_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny float32 shapes (a smoke run)")
    parser.add_argument("--cpu", action="store_true", help="CPU-sized float32 shapes, no Pallas")
    parser.add_argument("--scan-block-m", default="128", help="comma-separated tile heights for 'scan'")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    mosaic = {}
    if args.small:
        shapes, dtype, peak_n = [(256, 64, 128, 8)], jnp.float32, 512
        pallas = {"16x16x16": GmmConfig(block_m=16, block_n=16, block_k=16)}
    elif args.cpu:
        shapes, dtype, peak_n, pallas = [(8192, 256, 1024, 16)], jnp.float32, 2048, {}
    else:
        shapes, dtype, peak_n = [(8192, 4096, 14336, 8), (8192, 1024, 4096, 64)], jnp.bfloat16, 8192
        pallas = {"default": GmmConfig(),
                  "128x128x64w8": GmmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
                  "64x256x64w8": GmmConfig(block_m=64, block_n=256, block_k=64, num_warps=8, num_stages=3)}
        # shared memory per config: stages * (bm * bk + bk * bn) * 2 B + bm * bn * 2 B (<= 227 KiB on
        # H100); the f32 accumulator bm x bn lives in one warpgroup's registers (128 x 128: 128 per thread)
        mosaic = {"default": MosaicGmmConfig(),  # 128x128x64, 4 stages: 160 KiB
                  "64x128x64s4": MosaicGmmConfig(block_m=64),  # 112 KiB; fewer wasted rows at group edges
                  "128x128x64s3g4": MosaicGmmConfig(max_concurrent_steps=3, grid_block_n=4)}  # 128 KiB
        if not on_gpu:
            pallas, mosaic = {}, {}  # interpreted at these sizes would take hours
    # most wanted first: a step cut at its time limit keeps the lines printed so far
    impls = {"ragged_dot": lambda x, w, g: jax.lax.ragged_dot(x, w, g)}
    for name, cfg in mosaic.items():
        impls[f"mosaic_{name}"] = lambda x, w, g, cfg=cfg: mosaic_grouped_matmul(x, w, g, cfg)
    for name, cfg in pallas.items():
        impls[f"pallas_{name}"] = lambda x, w, g, cfg=cfg: grouped_matmul(x, w, g, cfg)
    for bm in (int(v) for v in args.scan_block_m.split(",")):
        impls[f"scan_bm{bm}"] = lambda x, w, g, bm=bm: scan_grouped_matmul(x, w, g, bm)

    peak = matmul_tflops(peak_n, dtype, args.iters)
    print(f"dense matmul {peak_n}^3 {jnp.dtype(dtype).name}: {peak:.3g} TFLOP/s (this device's measured matmul rate)")
    rows = []
    for num_rows, d, f, e in shapes:
        row = run(num_rows, d, f, e, dtype, args.iters, impls)
        rows.append(row)
        base = row["dense_same_flops"]
        print(f"N={num_rows} d={d} f={f} E={e} {row['dtype']}: one dense matmul of the same FLOPs: "
              f"fwd {base['fwd_ms']:.2f} ms, fwd+bwd {base['fwd_bwd_ms']:.2f} ms")
        for name, r in row["impls"].items():
            text = r.get("error") or (f"fwd {r['fwd_ms']:.2f} ms ({r['tflops_fwd']:.3g} TFLOP/s), fwd+bwd "
                                      f"{r['fwd_bwd_ms']:.2f} ms ({r['tflops_fwd_bwd']:.3g}), err {r['rel_err_vs_loop']:.1e}")
            print(f"  {name:<22} {text}", flush=True)
        print(f"  ragged_dot HLO fwd: {row['hlo_ragged_fwd']['custom_calls']} {row['hlo_ragged_fwd']['ops']}")
        with open(args.out, "w") as fh:
            json.dump({"machine": {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                                   "python": platform.python_version(),
                                   "date": datetime.date.today().isoformat()},
                       "matmul_tflops": {"n": peak_n, "dtype": jnp.dtype(dtype).name, "tflops": peak},
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
