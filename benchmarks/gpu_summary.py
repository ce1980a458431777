"""Compact table of what benchmarks/gpu_check.sh wrote to OUT_DIR (the last thing it prints)."""

import glob
import json
import os
import sys


def main(out: str) -> None:
    steps = os.path.join(out, "steps.txt")
    if os.path.exists(steps):
        print("steps:", " | ".join(line.strip() for line in open(steps)))
    device = os.path.join(out, "device.log")
    if os.path.exists(device):
        print("device:", " ".join(open(device).read().split())[:200])
    bench_train(out)
    peak = None
    ragged = os.path.join(out, "ragged_dot.json")
    if os.path.exists(ragged):
        data = json.load(open(ragged))
        peak = data.get("matmul_tflops", {}).get("tflops")
        print(f"\nmatmul rate: {peak:.1f} TFLOP/s ({data['machine']})" if peak else "\nmatmul rate: not measured")
        for r in data["rows"]:
            if "dense_same_flops" not in r:  # the first H100 run's format (before the impl comparison)
                print(f"ragged_dot N={r['rows']} E={r['num_experts']}: fwd {r['ragged_fwd_ms']:.2f} ms vs dense "
                      f"{r['dense_fwd_ms']:.2f} ms")
                continue
            base = r["dense_same_flops"]
            print(f"grouped matmul N={r['rows']} d={r['d']} f={r['f']} E={r['num_experts']}: dense same FLOPs "
                  f"fwd {base['fwd_ms']:.2f} ms, f+b {base['fwd_bwd_ms']:.2f} ms; ragged_dot custom calls "
                  f"{r['hlo_ragged_fwd']['custom_calls']}")
            for name, p in r["impls"].items():
                text = p.get("error") or (f"fwd {p['fwd_ms']:.2f} ms ({p['tflops_fwd']:.0f} TFLOP/s), f+b "
                                          f"{p['fwd_bwd_ms']:.2f} ms ({p['tflops_fwd_bwd']:.0f}), err {p['rel_err_vs_loop']:.1e}")
                print(f"  {name:<22} {text}")
    for path in sorted(glob.glob(os.path.join(out, "bench_layer_*.json"))):
        data = json.load(open(path))
        print(f"\n{os.path.basename(path)}  {data['machine']}")
        print(f"{'workload':<18} {'backend':<7} {'E':>4} {'fwd ms':>8} {'f+b ms':>9} {'f+b/floor':>9} "
              f"{'TFLOP/s f+b':>11} {'% matmul':>8}")
        for r in data["rows"]:
            share = f"{100 * r['useful_tflops_fwd_bwd'] / peak:>8.1f}" if peak else f"{'-':>8}"
            print(f"{r['workload']:<18} {r['backend']:<7} {r['num_experts']:>4} {r['fwd_ms']:>8.2f} {r['fwd_bwd_ms']:>9.2f} "
                  f"{r['fwd_bwd_over_floor']:>9.2f} {r['useful_tflops_fwd_bwd']:>11.2f} {share}")
    pallas = os.path.join(out, "bench_pallas.json")
    if os.path.exists(pallas):
        log = os.path.join(out, "bench_pallas.log")
        print("\nbench_pallas:")
        if os.path.exists(log):
            print("".join(open(log).readlines()[-24:]))
    metrics = os.path.join(out, "train", "metrics.jsonl")
    if os.path.exists(metrics):
        rows = [json.loads(line) for line in open(metrics)]
        last = [r for r in rows if "loss" in r][-1:] or rows[-1:]
        print("\ntrain (last logged):", json.dumps(last[0])[:400] if last else "none")


def bench_train(out: str) -> None:
    """bench_train.json (issue 16): one line per variant, the skipped ones, the profiles by category."""
    path = os.path.join(out, "bench_train.json")
    if not os.path.exists(path):
        return
    data = json.load(open(path))
    m, mm = data["machine"], data.get("matmul_tflops") or {}
    peak = f"{m['peak_flops'] / 1e12:.0f} TFLOP/s" if m.get("peak_flops") else "unknown"
    print(f"\nbench_train {data['config']} {data.get('set') or ''} on {m['device_kind']} (jax {m['jax']}; peak "
          f"{peak}; measured matmul {mm.get('tflops') or 0:.3g} TFLOP/s)"
          + ("  CPU SMOKE, NOT A MEASUREMENT" if data.get("smoke") else ""))
    print(f"{'variant':<20} {'ms/step':>9} {'k tok/s':>9} {'MFU':>6} {'/matmul':>7} {'compile s':>9} {'GiB':>6}")
    for name, r in data["variants"].items():
        if "error" in r:
            print(f"{name:<20} error: {r['error'][:150]}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else f"{'-':>6}"
        print(f"{name:<20} {r['ms_per_step']:>9.2f} {r['tokens_per_s'] / 1e3:>9.1f} {mfu} "
              f"{100 * (r.get('of_matmul') or 0):>6.1f}% {r['compile_s']:>9.1f} "
              f"{r.get('program_bytes', 0) / 2**30:>6.2f}")
    for name, why in data.get("skipped", {}).items():
        print(f"{name:<20} skipped: {why}")
    for name, p in data.get("profiles", {}).items():
        if "error" in p:
            print(f"profile {name}: {p['error'][:200]}")
            continue
        cats = ", ".join(f"{c} {100 * v:.0f}%" for c, v in sorted(p["categories_share"].items(), key=lambda kv: -kv[1])
                         if v >= 0.005)
        print(f"profile {name} ({p['events']} op time {p['op_ms_per_step']:.2f} ms/step, wall "
              f"{p['wall_ms_per_step']:.2f}): {cats}")
        for r in p["top_ops"][:5]:
            print(f"    {r['ms']:8.3f} ms {r['category']:<16} {r['op'][:32]:<32} {r['source'][:60]}")


if __name__ == "__main__":
    main(sys.argv[1])
