#!/usr/bin/env python
"""Quality at matched compute: the tiny MoE LM vs its dense baseline (same active FLOPs per token).

Usage:
  python benchmarks/quality.py                      # both configs, their full step counts (CPU: minutes)
  python benchmarks/quality.py steps=100            # any train.py key=value override, applied to both
  python benchmarks/quality.py configs=tiny,tiny_dense out=runs/quality

Each run trains from scratch into ``<out>/<config>`` (an existing run there is resumed), then a
table compares final validation loss / bits per byte, parameters (total and active per token),
training FLOPs per token and tokens/s; ``<out>/quality.png`` overlays the validation curves.
CPU numbers are ratios within one run of this script; time only means something on one machine.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    from jmoe.training import config as config_lib
    from jmoe import training

    names, out, rest = ["tiny", "tiny_dense"], os.path.join("runs", "quality"), []
    for arg in argv:
        if arg.startswith("configs="):
            names = arg.split("=", 1)[1].split(",")
        elif arg.startswith("out="):
            out = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    overrides = config_lib.parse_overrides(rest)
    rows = []
    for name in names:
        cfg = config_lib.load_config(name, overrides)
        run_dir = os.path.join(out, name)
        print(f"== {name} -> {run_dir}", flush=True)
        training.train(cfg, run_dir, print_fn=training.main_print)
        records = training.read_log(os.path.join(run_dir, "metrics.jsonl"))
        start = [r for r in records if r["kind"] == "start"][0]
        evals = [r for r in records if r["kind"] == "eval"]
        tps = [r["tokens_per_s"] for r in records if r["kind"] == "train" and r.get("tokens_per_s")]
        rows.append({
            "config": name, "steps": cfg.steps, "val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"],
            "params_M": start["num_params"] / 1e6, "active_M": start["active_params"] / 1e6,
            "flops_per_token_M": start["flops_per_token"] / 1e6,
            "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
            "curve": [(r["step"], r["val_loss"]) for r in evals],
        })
    print(f"\n{'config':<12} {'steps':>6} {'val loss':>9} {'val bpb':>8} {'params M':>9} {'active M':>9} "
          f"{'MFLOP/tok':>10} {'tok/s':>8}")
    for r in rows:
        print(f"{r['config']:<12} {r['steps']:>6} {r['val_loss']:>9.4f} {r['val_bpb']:>8.3f} {r['params_M']:>9.2f} "
              f"{r['active_M']:>9.2f} {r['flops_per_token_M']:>10.2f} {r['tokens_per_s'] or 0:>8.0f}")
    with open(os.path.join(out, "quality.json"), "w") as fh:
        json.dump(rows, fh, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(*zip(*r["curve"]), "o-", label=f"{r['config']} ({r['params_M']:.1f}M params, {r['active_M']:.1f}M active)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality.png"), dpi=100)
    print(f"wrote {os.path.join(out, 'quality.json')} and quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
