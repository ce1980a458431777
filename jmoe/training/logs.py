"""What a run reports: the JSON-lines metrics log, the progress line, MFU against the device's peak
FLOP/s (:data:`PEAK_FLOPS`), and the loss / expert-load / dropped-fraction plots drawn from the log."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

# bf16 dense peak FLOP/s per device (no sparsity), matched against jax's device_kind (lower case), the first
# name contained in it wins: the H100 PCIe ("NVIDIA H100 PCIe") 756 and NVL 835 before the SXM's 989
# ("NVIDIA H100 80GB HBM3"); H200 (and GH200) 989.
PEAK_FLOPS = (
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12), ("a10g", 125e12),
    ("l4", 121e12), ("v100", 125e12), ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12), ("tpu v5", 459e12), ("tpu v4", 275e12),
)


def peak_flops(device) -> float | None:
    """The device's bf16 dense peak FLOP/s if known (MFU is reported against it), else None."""
    kind = getattr(device, "device_kind", "").lower()
    for name, peak in PEAK_FLOPS:
        if name in kind:
            return peak
    return None


class MetricsLog:
    """JSON lines at ``path`` (process 0 only). On resume from step N, lines after N are dropped, and so is a
    partial last line (a run killed while writing it), with a warning naming the file."""

    def __init__(self, path: str, resume_step: int, enabled: bool, warn=None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        kept = []
        if resume_step > 0 and os.path.exists(path):
            kept = [json.dumps(r) + "\n" for r in read_log(path, warn) if r.get("step", 0) <= resume_step]
        with open(path, "w") as fh:
            fh.writelines(kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


def read_log(path: str, warn=None) -> list[dict]:
    """The records of a metrics log. A last line that does not parse (a run killed while writing it) is
    dropped, with ``warn(message)`` when given; a bad line before it is a ValueError naming the file and line."""
    with open(path) as fh:
        lines = [(n, line) for n, line in enumerate(fh, 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path}, line {n}: not a JSON record ({e}); fix or remove the line") from None
            if warn is not None:
                warn(f"{path}, line {n}: dropped a partial last record ({len(line)} bytes, {e})")
    return records


def progress_line(step: int, total: int, rec: dict, width: int = 20) -> str:
    done = int(width * step / total)
    tps = rec.get("tokens_per_s")
    drop = rec.get("dropped_fraction") or []
    parts = [f"step {step:>6}/{total} [{'#' * done}{'.' * (width - done)}]", f"loss {rec['loss']:.4f}",
             f"lm {rec['lm_loss']:.4f}"]
    if drop:
        parts.append(f"drop {np.mean(drop):.3f}")
    rounds = rec.get("exchange_rounds") or []
    if rounds:  # the most rounds any MoE layer's dropless exchange took this step
        parts.append(f"rounds {int(np.max(rounds))}")
    parts.append(f"{tps / 1e3:.1f}k tok/s" if tps else "- tok/s")
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)


def main_print(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True, file=sys.stdout)


def main_warn(message: str) -> None:
    """``warning: message`` on stderr."""
    print(f"warning: {message}", flush=True, file=sys.stderr)


def load_data(loads: list[dict]) -> dict[str, np.ndarray]:
    """From the train records with ``tokens_per_expert``: ``steps`` [T], ``share`` [T, L, E] (each
    expert's share of the layer's kept assignments) and ``dropped_fraction`` [T, L] (the share of
    the layer's assignments dropped over capacity; 0 where a record lacks it)."""
    tpe = np.asarray([r["tokens_per_expert"] for r in loads], np.float64)  # [T, L, E]
    dropped = np.zeros(tpe.shape[:2])
    for t, r in enumerate(loads):
        dropped[t, :len(r.get("dropped_fraction") or [])] = r.get("dropped_fraction") or []
    return {"steps": np.asarray([r["step"] for r in loads], np.int64),
            "share": tpe / np.maximum(tpe.sum(-1, keepdims=True), 1e-9), "dropped_fraction": dropped}


def load_figure(data: dict[str, np.ndarray]):
    """One row per MoE layer: the experts' load share over steps (a heat map, left) beside the
    fraction of its assignments dropped over steps (a line, right)."""
    import matplotlib.pyplot as plt

    steps, share, dropped = data["steps"], data["share"], data["dropped_fraction"]
    num_layers = share.shape[1]
    fig, axes = plt.subplots(num_layers, 2, figsize=(12, 2.2 * num_layers), squeeze=False,
                             gridspec_kw={"width_ratios": (3, 2)})
    for layer in range(num_layers):
        ax = axes[layer, 0]
        im = ax.imshow(share[:, layer].T, aspect="auto", origin="lower", cmap="viridis",
                       extent=(steps[0], steps[-1], -0.5, share.shape[2] - 0.5), vmin=0)
        ax.set_ylabel(f"MoE layer {layer}\nexpert")
        fig.colorbar(im, ax=ax, label="share of tokens")
        ax = axes[layer, 1]
        ax.plot(steps, dropped[:, layer], lw=1, color="tab:red", label=f"layer {layer} dropped")
        ax.set_ylim(0, max(0.05, 1.1 * float(dropped[:, layer].max(initial=0.0))))
        ax.set_ylabel("dropped fraction")
        ax.grid(alpha=0.3)
    axes[0, 1].set_title("assignments dropped (over capacity)")
    axes[-1, 0].set_xlabel("step")
    axes[-1, 1].set_xlabel("step")
    fig.tight_layout()
    return fig


def write_plots(log_path: str) -> list[str]:
    """``loss.png`` (train / validation loss) and, for MoE runs, ``expert_load.png`` (per MoE layer,
    the experts' share of kept assignments over steps beside the fraction of assignments dropped)
    with its numbers in ``expert_load.npz`` (:func:`load_data`), next to the log. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out_dir, paths = os.path.dirname(log_path), []

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="train LM loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "loss.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    loads = [r for r in train if r.get("tokens_per_expert")]
    if loads:
        data = load_data(loads)
        fig = load_figure(data)
        paths.append(os.path.join(out_dir, "expert_load.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
        paths.append(os.path.join(out_dir, "expert_load.npz"))
        np.savez(paths[-1], **data)
    return paths
