"""How many exchange rounds a trained router needs, per buffer factor c (issue 25: the default c).

    PYTHONPATH=. python train.py config=deepseek_tiny steps=200 log_every=1 out_dir=/tmp/ds
    PYTHONPATH=. python benchmarks/rounds_vs_factor.py /tmp/ds/metrics.jsonl --devices 8 --out rounds.json

From each logged train step's ``tokens_per_expert`` [L, E] (the whole batch's kept
assignments per MoE layer) it computes the rounds of the ``ragged`` exchange (GPU / TPU)
on an expert mesh of n devices: device j receives ``T_j = sum of tokens_per_expert over
its E / n experts`` rows; each round it takes ``R = ceil(c * A)`` (rounded up to 8, A =
the batch's assignments / n), so it needs ``ceil(T_j / R)`` rounds and the layer the max
over j. (The routing is the same function on one device and on a mesh, so a one-device
run's log serves any n.) The padded exchange's cells split R per source: it needs at
least as many rounds (``bench_scale.py`` measures it).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def ragged_rounds(tokens_per_expert: np.ndarray, devices: int, factor: float) -> np.ndarray:
    """[..., E] kept assignments -> [...] rounds of the ragged exchange on ``devices``."""
    e = tokens_per_expert.shape[-1]
    per_device = tokens_per_expert.reshape(*tokens_per_expert.shape[:-1], devices, e // devices).sum(-1)  # [..., n]
    a = tokens_per_expert.sum(-1, keepdims=True) / devices  # [..., 1]: assignments per device
    rows = np.minimum(np.ceil(np.ceil(factor * a) / 8) * 8, devices * a)  # R, at most the worst case
    return np.max(np.ceil(per_device / np.maximum(rows, 1)), axis=-1).clip(min=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--factors", type=float, nargs="*", default=[1.0, 1.1, 1.25, 1.5, 2.0])
    parser.add_argument("--from-step", type=int, default=0, help="only steps after this one (0: the second half)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    records = [json.loads(line) for line in open(args.metrics) if line.strip()]
    train = [r for r in records if r.get("tokens_per_expert")]
    start = args.from_step or train[-1]["step"] // 2
    tpe = np.asarray([r["tokens_per_expert"] for r in train if r["step"] > start], np.float64)  # [steps, L, E]
    rows = []
    for c in args.factors:
        rounds = ragged_rounds(tpe, args.devices, c)  # [steps, L]
        step_rounds = rounds.max(-1)  # a step's rounds: its slowest layer
        rows.append({"factor": c, "one_round_layers": float(np.mean(rounds == 1)),
                     "one_round_steps": float(np.mean(step_rounds == 1)), "mean_rounds": float(rounds.mean()),
                     "max_rounds": int(rounds.max())})
        print(f"c {c:5.2f}: {100 * rows[-1]['one_round_steps']:5.1f}% of steps and "
              f"{100 * rows[-1]['one_round_layers']:5.1f}% of layer-steps in one round; mean "
              f"{rows[-1]['mean_rounds']:.3f}, max {rows[-1]['max_rounds']} (steps {start + 1}-{train[-1]['step']}, "
              f"n = {args.devices})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"metrics": args.metrics, "devices": args.devices, "steps": [start + 1, train[-1]["step"]],
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
