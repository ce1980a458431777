"""Time one MoE layer, forward and forward+backward, against its floor.

    PYTHONPATH=. python benchmarks/bench_layer.py --suite core            # issue 2's E sweep (CPU)
    PYTHONPATH=. python benchmarks/bench_layer.py --suite peers --scale cpu
    PYTHONPATH=. python benchmarks/bench_layer.py --suite dropless --backends gather   # issue 7
    PYTHONPATH=. python benchmarks/bench_layer.py --suite peers --scale gpu --dtype bfloat16 --out results/
    PYTHONPATH=. python benchmarks/bench_layer.py --suite peers --only mixtral,deepseek   # issue 20's pair

For each workload and dispatch backend: the median of ``--iters`` timed runs after
warm-up (``block_until_ready``), useful TFLOP/s, the compiled program's temporary
memory (XLA's memory analysis; peak device memory on GPU), and the ratio to the
*floor*: the expert matmuls alone on pre-dispatched inputs ``[E, G * C, d]`` of the
same shapes (plus the shared expert on every token, where the layer has one), measured in
the same run.

Useful FLOPs (GUIDE section 6): ``2 * tokens * (k * f * (1 - dropped) + F) * d * m``,
F the shared expert's width (0 without), m = 2 for a plain FFN, 3 for a gated one;
forward+backward counts 3x.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform

import jax
import jax.numpy as jnp
from flax import nnx

from benchtools import median_time  # noqa: E402  (a script's own folder is on sys.path)
import jmoe
from jmoe import routing
from jmoe.experts import GATED, expert_ffn, shared_ffn
from jmoe.options import layer_arguments


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch: int  # sequences; one routing group per sequence
    seq: int
    d_model: int
    d_ff: int
    num_experts: int
    k: int
    capacity_factor: float | None  # None: dropless
    activation: str = "gelu"
    use_bias: bool = False
    balanced: bool = False  # force perfectly balanced routing (Megatron-Core's case)
    grouped_matmul: str = "auto"  # dropless only: jmoe.grouped_matmul.GROUPED_MATMULS
    shared_d_ff: int | None = None  # a shared expert every token goes through (DeepSeek)
    router: str = "tokens_choose"
    router_options: tuple = ()  # (name, value) pairs for jmoe.MoE (e.g. group_limited's)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def core_suite() -> list[Workload]:
    """Issue 2: 4,096 tokens, d 256, f 1,024, k 2, factor 1.25, E in {8, 32, 128}."""
    return [Workload(f"core-E{e}", 16, 256, 256, 1024, e, 2, 1.25) for e in (8, 32, 128)]


def dropless_suite(scale: str) -> list[Workload]:
    """Issue 7: dropless (capacity_factor=None) vs capacity factors 1.0 / 1.25 / 2.0, same tokens."""
    d, f = (256, 1024) if scale == "cpu" else (2048, 8192)
    rows = [Workload(f"dropless-cf{cf}", 16, 256, d, f, 16, 2, cf) for cf in (None, 1.0, 1.25, 2.0)]
    dropless = lambda name, matmul: Workload(name, 16, 256, d, f, 16, 2, None, grouped_matmul=matmul)  # noqa: E731
    if scale == "gpu":  # the Pallas grouped matmuls (interpreted off GPU: far too slow for a CPU run)
        # ragged_dot's GPU row was measured (BENCHMARKS.md: 13x its floor); the newcomers go first
        rows[1:1] = [dropless("dropless-mosaic", "mosaic"), dropless("dropless-scan", "scan")]
        rows.append(dropless("dropless-pallas-gmm", "pallas"))
    else:
        rows[1:1] = [dropless("dropless-ragged-dot", "ragged_dot"), dropless("dropless-scan", "scan")]
    return rows


def sweep_suite(scale: str) -> list[Workload]:
    """E in {8, ..., 128} at fixed tokens."""
    d, f = (256, 1024) if scale == "cpu" else (2048, 8192)
    return [Workload(f"sweep-E{e}", 16, 256, d, f, e, 2, 1.25) for e in (8, 16, 32, 64, 128)]


def peers_suite(scale: str) -> list[Workload]:
    """The peers' published workloads (``gpu``) and CPU-sized versions (``cpu``: dims / 8)."""
    s = 8 if scale == "cpu" else 1
    return [
        # Mixtral-like (Megatron-Core's MoE case): 4,096 tokens, d 4,096, ffn 14,336, 8 experts, top-2, SwiGLU.
        Workload("mixtral-balanced", 1, 4096 // s, 4096 // s, 14336 // s, 8, 2, 1.0, "swiglu", False, True),
        Workload("mixtral-natural", 1, 4096 // s, 4096 // s, 14336 // s, 8, 2, 1.25, "swiglu"),
        # FastMoE: 4,096 tokens, d 1,024, hidden 4,096, 64 experts, top-2, GELU.
        Workload("fastmoe", 1, 4096 // s, 1024 // s, 4096 // s, 64, 2, 1.25, "gelu"),
        # Tutel "helloworld": 16 x 512 tokens, d = f = 2048, 2 experts per device, top-2, factor 1.0, ReLU + biases.
        Workload("tutel-helloworld", 16, 512 // (2 if s > 1 else 1), 2048 // s, 2048 // s,
                 2 * jax.device_count(), 2, 1.0, "relu", True),
        # DeepSeek-like (issue 20; DeepSeek-V2-Lite's shapes with V3's router): 4,096 tokens, d 2,048,
        # 64 fine-grained experts of f 1,408, top-6, SwiGLU, 2 shared experts (one FFN of 2 x 1,408),
        # sigmoid scores, group-limited (8 groups, the best 4), weights renormalised; dropless (its mode)
        # and capacity 1.25 (the bias is 0: a fresh router's natural imbalance)
        *(Workload(f"deepseek-{mode}", 1, 4096 // s, 2048 // s, 1408 // s, 64, 6, cf, "swiglu",
                   shared_d_ff=2816 // s, router="group_limited", router_options=DEEPSEEK_ROUTER)
          for mode, cf in (("dropless", None), ("natural", 1.25))),
    ]


DEEPSEEK_ROUTER = (("score_function", "sigmoid"), ("n_group", 8), ("topk_group", 4), ("normalize", True),
                   ("selection_bias", True))


@dataclasses.dataclass(frozen=True)
class BalancedRouter(routing.TokensChoose):
    """Token choice on router logits that send token t to experts t, t+1, ... (mod E)."""

    def plan(self, logits, *args):
        S, E = logits.shape[1:]
        rank = (jnp.arange(E)[None, :] - jnp.arange(S)[:, None]) % E  # [S, E]
        balanced = 0.0 * logits - rank.astype(jnp.float32)  # 0 * logits keeps the router in the graph
        return super().plan(balanced, *args)


def temp_bytes(jitted, *args) -> int | None:
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
        return int(analysis.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def bench_workload(w: Workload, backend: str, dtype, iters: int) -> dict:
    options = layer_arguments(dict(router=w.router, shared_d_ff=w.shared_d_ff, **dict(w.router_options)))
    if w.balanced:
        options["router"] = BalancedRouter()
    moe = jmoe.MoE(w.d_model, w.d_ff, w.num_experts, k=w.k, capacity_factor=w.capacity_factor,
                   activation=w.activation, use_bias=w.use_bias, dispatch=backend, dtype=dtype,
                   param_dtype=dtype, grouped_matmul=w.grouped_matmul, rngs=nnx.Rngs(0), **options)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (w.batch, w.seq, w.d_model), dtype)

    def forward(params, x):
        # a copy of the rest: a layer with a selection bias counts its load (expert_load) in train mode, and
        # NNX mutates only variables made inside this trace
        y, aux = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))(x)
        return y, aux

    def loss(params, x):
        y, aux = forward(params, x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux["load_balancing_loss"]

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    # The floor: the same expert matmuls on already-dispatched inputs.
    capacity = moe.capacity(w.seq)
    if moe.dropless:  # the floor is the balanced grouped matmul: S * k / E rows per expert and sequence
        capacity = w.seq * w.k // w.num_experts
    expert_in = jax.random.normal(jax.random.key(2), (w.num_experts, w.batch * capacity, w.d_model), dtype)
    expert_params = moe.experts.params()
    shared_in = x.reshape(-1, w.d_model)
    if w.shared_d_ff:  # the shared expert's matmuls belong to the floor too
        expert_params = {"experts": expert_params, "shared": moe.shared_expert.params()}

    def floor(p, h):  # the expert outputs (and the shared expert's)
        if not w.shared_d_ff:
            return expert_ffn(h, p, w.activation)
        return expert_ffn(h, p["experts"], w.activation), shared_ffn(shared_in, p["shared"], w.activation)

    floor_fwd = jax.jit(floor)
    floor_fwd_bwd = jax.jit(jax.grad(
        lambda p, h: sum(jnp.sum(y.astype(jnp.float32) ** 2) for y in jax.tree.leaves(floor(p, h))), argnums=(0, 1)))

    _, aux = fwd(params, x)
    dropped = float(aux["dropped_fraction"])
    m = 3 if w.activation in GATED else 2
    useful_flops = 2 * w.tokens * w.d_model * m * (w.k * w.d_ff * (1 - dropped) + (w.shared_d_ff or 0))

    t_fwd = median_time(fwd, params, x, iters=iters)
    t_fwd_bwd = median_time(fwd_bwd, params, x, iters=iters)
    t_floor_fwd = median_time(floor_fwd, expert_params, expert_in, iters=iters)
    t_floor_fwd_bwd = median_time(floor_fwd_bwd, expert_params, expert_in, iters=iters)
    return {
        "workload": w.name, "backend": backend, **dataclasses.asdict(w), "tokens": w.tokens,
        "capacity": capacity, "dropped_fraction": dropped,
        "padding_fraction": float(aux["padding_fraction"]),
        "fwd_ms": 1e3 * t_fwd, "fwd_bwd_ms": 1e3 * t_fwd_bwd,
        "floor_fwd_ms": 1e3 * t_floor_fwd, "floor_fwd_bwd_ms": 1e3 * t_floor_fwd_bwd,
        "fwd_over_floor": t_fwd / t_floor_fwd, "fwd_bwd_over_floor": t_fwd_bwd / t_floor_fwd_bwd,
        "useful_tflops_fwd": useful_flops / t_fwd / 1e12,
        "useful_tflops_fwd_bwd": 3 * useful_flops / t_fwd_bwd / 1e12,
        "fwd_bwd_temp_bytes": temp_bytes(fwd_bwd, params, x),
        "peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    device = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(), "jax": jax.__version__,
        "device": getattr(device, "device_kind", str(device)), "platform": device.platform,
        "cpu": cpu_model(), "cores": os.cpu_count(),
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'workload':<18} {'backend':<7} {'E':>4} {'C':>5} {'drop':>5} {'fwd ms':>9} {'f+b ms':>9} "
          f"{'f+b/floor':>9} {'TFLOP/s f+b':>11} {'temp MiB':>9}")
    for r in rows:
        temp = r["fwd_bwd_temp_bytes"]
        print(f"{r['workload']:<18} {r['backend']:<7} {r['num_experts']:>4} {r['capacity']:>5} "
              f"{r['dropped_fraction']:>5.2f} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>9.2f} "
              f"{r['fwd_bwd_over_floor']:>9.2f} {r['useful_tflops_fwd_bwd']:>11.4f} "
              f"{(temp or 0) / 2**20:>9.1f}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["core", "sweep", "peers", "dropless"], default="core")
    parser.add_argument("--scale", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--backends", default="einsum,gather", help="comma-separated dispatch backends")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--only", default=None,
                        help="run only workloads whose name contains one of these (comma-separated)")
    parser.add_argument("--out", default=None, help="directory for a JSON results file")
    parser.add_argument("--tag", default="", help="suffix of the JSON file's name (runs of one suite in parts)")
    args = parser.parse_args(argv)

    workloads = {"core": core_suite, "sweep": lambda: sweep_suite(args.scale),
                 "dropless": lambda: dropless_suite(args.scale),
                 "peers": lambda: peers_suite(args.scale)}[args.suite]()
    if args.only:
        workloads = [w for w in workloads if any(part in w.name for part in args.only.split(","))]
    dtype = jnp.dtype(args.dtype)
    path = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = f"_{args.tag}" if args.tag else ""
        path = os.path.join(args.out, f"bench_layer_{args.suite}_{args.scale}{tag}.json")
    rows = []
    for w in workloads:
        for backend in args.backends.split(","):
            rows.append(bench_workload(w, backend, dtype, args.iters))
            r = rows[-1]
            print(f"  {w.name} {backend}: fwd {r['fwd_ms']:.2f} ms, fwd+bwd {r['fwd_bwd_ms']:.2f} ms "
                  f"({r['fwd_bwd_over_floor']:.2f}x floor)", flush=True)
            if path:  # after every row, so a run cut short by a time limit keeps what it measured
                with open(path, "w") as f:
                    json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=1)
    print()
    print(json.dumps(machine()))
    print_table(rows)
    if path:
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
