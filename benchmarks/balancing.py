#!/usr/bin/env python
"""Aux-loss-free balancing at equal steps (issue 20): deepseek_tiny with and without its bias update, tiny and
tiny_dense; validation loss, expert load max / mean, ms per step.

Usage:
  python benchmarks/balancing.py                          # 200 steps each (CPU: minutes per run)
  python benchmarks/balancing.py steps=100 out=runs/bal   # any train.py key=value, applied to every run
  python benchmarks/balancing.py runs=deepseek_tiny,deepseek_tiny:bias_update_rate=0.03

A run is ``CONFIG[:key=value[:key=value...]]``; it trains from scratch into ``<out>/<run>`` (an existing run
there is resumed). Load max / mean is per MoE layer and step, ``max_e load_e / mean_e load_e`` of that step's
kept assignments (its global batch); the table gives the worst layer's mean over the last quarter of the steps
(and over all steps). ms/step is the median over the log's timed intervals (evaluation and saving excluded).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_RUNS = ("deepseek_tiny", "deepseek_tiny:bias_update_rate=0", "tiny", "tiny_dense")


def load_ratio(records: list[dict], first_step: int) -> float | None:
    """The worst MoE layer's mean over steps >= ``first_step`` of ``max_e load_e / mean_e load_e``."""
    tpe = np.asarray([r["tokens_per_expert"] for r in records if r["step"] >= first_step], np.float64)  # [T, L, E]
    if tpe.size == 0:
        return None
    ratio = tpe.max(-1) / np.maximum(tpe.mean(-1), 1e-9)  # [T, L]
    return float(ratio.mean(0).max())


def summarize(run_dir: str, steps: int) -> dict:
    from jmoe import training

    records = training.read_log(os.path.join(run_dir, "metrics.jsonl"))
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    start = [r for r in records if r["kind"] == "start"][0]
    tps = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s"))
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    return {
        "steps": steps, "val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"],
        "load_max_mean_last_quarter": load_ratio(train, steps - steps // 4 + 1),
        "load_max_mean_all": load_ratio(train, 1),
        "ms_per_step": 1e3 * tokens_per_step / tps[len(tps) // 2] if tps else None,
        "params_M": start["num_params"] / 1e6, "active_M": start["active_params"] / 1e6,
        "flops_per_token_M": start["flops_per_token"] / 1e6,
        "final_bias_range": (float(np.ptp(np.asarray(train[-1]["selection_bias"]), axis=-1).max())
                             if train and "selection_bias" in train[-1] else None),
    }


def main(argv: list[str]) -> int:
    from jmoe.training import config as config_lib
    from jmoe import training

    runs, out, rest = list(DEFAULT_RUNS), os.path.join("runs", "balancing"), []
    for arg in argv:
        if arg.startswith("runs="):
            runs = arg.split("=", 1)[1].split(",")
        elif arg.startswith("out="):
            out = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    shared = {"steps": 200, **config_lib.parse_overrides(rest)}
    rows = []
    for run in runs:
        name, *own = run.split(":")
        cfg = config_lib.load_config(name, {**shared, **config_lib.parse_overrides(own)})
        run_dir = os.path.join(out, run.replace(":", "_").replace("=", "-"))
        print(f"== {run} -> {run_dir}", flush=True)
        training.train(cfg, run_dir, print_fn=training.main_print)
        rows.append({"run": run, **summarize(run_dir, cfg.steps)})
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    print("\n| run | steps | val loss | val bpb | load max/mean, last quarter (worst layer) | over training | "
          "ms/step | MFLOP/token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['val_loss']:.4f} | {r['val_bpb']:.3f} | "
              f"{fmt(r['load_max_mean_last_quarter'], '.2f')} | {fmt(r['load_max_mean_all'], '.2f')} | "
              f"{fmt(r['ms_per_step'], '.0f')} | {r['flops_per_token_M']:.2f} |")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "balancing.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
