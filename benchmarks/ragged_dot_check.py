"""Does ``jax.lax.ragged_dot`` run as a grouped GEMM here, or fall back to dense work?

    PYTHONPATH=. python benchmarks/ragged_dot_check.py --out results/ragged_dot.json
    PYTHONPATH=. python benchmarks/ragged_dot_check.py --small --out /tmp/ragged_dot.json   # CPU smoke run

For N sorted rows, E experts with balanced group sizes, ``x [N, d] @ w[e] [d, f]``:

* the optimized HLO of the jitted ragged_dot: its custom calls and the largest dot's
  output shape (a dense fallback shows a dot with an E-sized output dimension, E x the
  FLOPs; a grouped GEMM shows a ``ragged-dot`` or a custom call);
* the card's dense matmul rate (``[8192, 8192] @ [8192, 8192]``, random bf16), the
  reference for every "% of matmul rate" in BENCHMARKS.md;
* jmoe's Pallas grouped matmul (:mod:`jmoe.pallas.grouped_matmul`) on the same inputs,
  for a few tile configs: error against the loop, time, TFLOP/s;
* the median time of ragged_dot forward and forward+backward, against one plain matmul
  ``[N, d] @ [d, f]`` of the same useful FLOPs (``2 N d f``; x3 with the backward), in
  useful TFLOP/s. A ratio near 1 means grouped compute costs what dense compute does.
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
from jmoe.pallas.grouped_matmul import GmmConfig, grouped_matmul


def hlo_summary(text: str) -> dict:
    """Custom-call targets, op counts of interest and the biggest dot output in HLO text."""
    targets = Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    ops = Counter(re.findall(r"\s(ragged-dot|dot|fusion|custom-call|while)\(", text))
    dots = re.findall(r"=\s*\w+\[([\d,]+)\][^=]*?\s(?:dot|ragged-dot)\(", text)
    biggest = max(dots, key=lambda dims: math.prod(int(v) for v in dims.split(",")), default="")
    lines = [" ".join(line.split())[:240] for line in text.splitlines()
             if re.search(r"\s(dot|ragged-dot|custom-call)\(", line)]
    return {"custom_calls": dict(targets), "ops": dict(ops), "largest_dot_output": biggest, "dot_lines": lines[:6]}


def run(num_rows: int, d: int, f: int, num_experts: int, dtype, iters: int, gmm_configs: dict) -> dict:
    kx, kw, kd = jax.random.split(jax.random.key(num_experts), 3)
    x = jax.random.normal(kx, (num_rows, d), dtype)
    w = (jax.random.normal(kw, (num_experts, d, f), jnp.float32) / d**0.5).astype(dtype)
    w_dense = w[0]
    sizes = jnp.full((num_experts,), num_rows // num_experts, jnp.int32).at[-1].add(num_rows % num_experts)
    dy = jax.random.normal(kd, (num_rows, f), dtype)

    ragged = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g))
    dense = jax.jit(lambda x, w: x @ w)
    ragged_fb = jax.jit(jax.grad(lambda x, w, g: jnp.sum((jax.lax.ragged_dot(x, w, g) * dy).astype(jnp.float32)),
                                 argnums=(0, 1)))
    dense_fb = jax.jit(jax.grad(lambda x, w: jnp.sum(((x @ w) * dy).astype(jnp.float32)), argnums=(0, 1)))
    hlo = ragged.lower(x, w, sizes).compile().as_text()
    hlo_bwd = ragged_fb.lower(x, w, sizes).compile().as_text()
    # correctness spot check against a per-group loop (float32)
    want = jnp.concatenate([x[i * (num_rows // num_experts):(i + 1) * (num_rows // num_experts)].astype(jnp.float32)
                            @ w[i].astype(jnp.float32) for i in range(num_experts - 1)], axis=0)
    got = ragged(x, w, sizes)[: want.shape[0]].astype(jnp.float32)
    rel_err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    t = {
        "ragged_fwd": median_time(ragged, x, w, sizes, iters=iters),
        "dense_fwd": median_time(dense, x, w_dense, iters=iters),
        "ragged_fwd_bwd": median_time(ragged_fb, x, w, sizes, iters=iters),
        "dense_fwd_bwd": median_time(dense_fb, x, w_dense, iters=iters),
    }
    flops = 2 * num_rows * d * f
    pallas = {}
    for name, cfg in gmm_configs.items():  # jmoe's Pallas grouped matmul, same inputs
        fwd = jax.jit(lambda x, w, g, cfg=cfg: grouped_matmul(x, w, g, cfg))
        fb = jax.jit(jax.grad(lambda x, w, g, cfg=cfg: jnp.sum((grouped_matmul(x, w, g, cfg) * dy).astype(jnp.float32)),
                              argnums=(0, 1)))
        try:
            err = float(jnp.linalg.norm(fwd(x, w, sizes)[: want.shape[0]].astype(jnp.float32) - want)
                        / jnp.linalg.norm(want))
            t_f, t_fb = median_time(fwd, x, w, sizes, iters=iters), median_time(fb, x, w, sizes, iters=iters)
            pallas[name] = {"rel_err_vs_loop": err, "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                            "tflops_fwd": flops / t_f / 1e12, "tflops_fwd_bwd": 3 * flops / t_fb / 1e12}
        except Exception as err:  # report, keep going
            pallas[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"  pallas gmm {name}: {pallas[name]}", flush=True)
    return {
        "rows": num_rows, "d": d, "f": f, "num_experts": num_experts, "dtype": jnp.dtype(dtype).name,
        "rel_err_vs_loop": rel_err,
        **{f"{k}_ms": v * 1e3 for k, v in t.items()},
        "ragged_tflops_fwd": flops / t["ragged_fwd"] / 1e12,
        "dense_tflops_fwd": flops / t["dense_fwd"] / 1e12,
        "ragged_tflops_fwd_bwd": 3 * flops / t["ragged_fwd_bwd"] / 1e12,
        "dense_tflops_fwd_bwd": 3 * flops / t["dense_fwd_bwd"] / 1e12,
        "hlo_fwd": hlo_summary(hlo), "hlo_fwd_bwd": hlo_summary(hlo_bwd),
        "pallas_gmm": pallas,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.small:
        shapes, dtype = [(256, 64, 128, 8)], jnp.float32
    else:
        shapes, dtype = [(8192, 4096, 14336, 8), (8192, 1024, 4096, 64)], jnp.bfloat16
    if args.small:
        gmm_configs = {"16x16x16": GmmConfig(block_m=16, block_n=16, block_k=16)}
    else:
        gmm_configs = {"default": GmmConfig(),
                       "128x128x64w8": GmmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
                       "64x256x64w8": GmmConfig(block_m=64, block_n=256, block_k=64, num_warps=8, num_stages=3)}
    peak_n = 512 if args.small else 8192
    peak = matmul_tflops(peak_n, dtype, args.iters)
    print(f"dense matmul {peak_n}^3 {jnp.dtype(dtype).name}: {peak:.0f} TFLOP/s (the card's measured matmul rate)")
    rows = []
    for num_rows, d, f, e in shapes:
        row = run(num_rows, d, f, e, dtype, args.iters, gmm_configs)
        rows.append(row)
        print(f"N={num_rows} d={d} f={f} E={e}: ragged fwd {row['ragged_fwd_ms']:.2f} ms "
              f"({row['ragged_tflops_fwd']:.0f} TFLOP/s) vs dense {row['dense_fwd_ms']:.2f} ms "
              f"({row['dense_tflops_fwd']:.0f}); fwd+bwd {row['ragged_fwd_bwd_ms']:.2f} vs "
              f"{row['dense_fwd_bwd_ms']:.2f} ms; rel err {row['rel_err_vs_loop']:.1e}")
        print(f"  hlo fwd {row['hlo_fwd']}")
        print(f"  hlo fwd+bwd {row['hlo_fwd_bwd']}")
        with open(args.out, "w") as fh:
            json.dump({"machine": {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                                   "python": platform.python_version(),
                                   "date": datetime.date.today().isoformat()},
                       "matmul_tflops": {"n": peak_n, "dtype": jnp.dtype(dtype).name, "tflops": peak},
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
