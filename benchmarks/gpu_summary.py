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
    for path in sorted(glob.glob(os.path.join(out, "bench_layer_*.json"))):
        data = json.load(open(path))
        print(f"\n{os.path.basename(path)}  {data['machine']}")
        print(f"{'workload':<18} {'backend':<7} {'E':>4} {'f+b ms':>9} {'f+b/floor':>9} {'TFLOP/s f+b':>11}")
        for r in data["rows"]:
            print(f"{r['workload']:<18} {r['backend']:<7} {r['num_experts']:>4} {r['fwd_bwd_ms']:>9.2f} "
                  f"{r['fwd_bwd_over_floor']:>9.2f} {r['useful_tflops_fwd_bwd']:>11.2f}")
    pallas = os.path.join(out, "bench_pallas.json")
    if os.path.exists(pallas):
        print(f"\nbench_pallas.json: {os.path.getsize(pallas)} bytes (see bench_pallas.log for its table)")
    metrics = os.path.join(out, "train", "metrics.jsonl")
    if os.path.exists(metrics):
        rows = [json.loads(line) for line in open(metrics)]
        last = [r for r in rows if "loss" in r][-1:] or rows[-1:]
        print("\ntrain (last logged):", json.dumps(last[0])[:400] if last else "none")


if __name__ == "__main__":
    main(sys.argv[1])
