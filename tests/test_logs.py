"""What train.py draws from its metrics log: the expert-load figure holds, per MoE layer, the
experts' load share beside the fraction of assignments dropped (issue 22.4), and its numbers are
saved next to it. Also: the library does not load the training app."""

import json
import os
import subprocess
import sys

import numpy as np

from jmoe.training import logs
from tests.processes import ROOT, cpu_env

LAYERS, EXPERTS, STEPS = 3, 4, 6


def fake_log(path):
    """Train records as train.py writes them: per MoE layer tokens_per_expert [E] and dropped_fraction."""
    rng = np.random.default_rng(0)
    records = [{"kind": "start", "step": 0}]
    for step in range(1, STEPS + 1):
        records.append({"kind": "train", "step": step, "loss": 3.0 / step, "lm_loss": 3.0 / step,
                        "tokens_per_expert": rng.integers(0, 50, (LAYERS, EXPERTS)).tolist(),
                        "dropped_fraction": [0.1 * layer + 0.01 * step for layer in range(LAYERS)]})
    records.append({"kind": "eval", "step": STEPS, "val_loss": 0.6})
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return records


def test_expert_load_figure_plots_the_dropped_fraction_of_every_layer(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    records = [r for r in fake_log(path) if r["kind"] == "train"]
    want = np.asarray([r["dropped_fraction"] for r in records])  # [T, L]

    paths = logs.write_plots(path)
    assert [os.path.basename(p) for p in paths] == ["loss.png", "expert_load.png", "expert_load.npz"]
    assert os.path.getsize(paths[1]) > 0
    saved = np.load(paths[2])
    np.testing.assert_array_equal(saved["steps"], np.arange(1, STEPS + 1))
    np.testing.assert_allclose(saved["dropped_fraction"], want)
    tpe = np.asarray([r["tokens_per_expert"] for r in records], np.float64)
    np.testing.assert_allclose(saved["share"], tpe / tpe.sum(-1, keepdims=True))

    fig = logs.load_figure(logs.load_data(records))
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 * LAYERS  # a load map and a dropped-fraction line per layer
    dropped_axes = [ax for ax in panels if ax.get_ylabel() == "dropped fraction"]
    assert len(dropped_axes) == LAYERS
    for layer, ax in enumerate(dropped_axes):
        (line,) = ax.get_lines()
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, STEPS + 1))
        np.testing.assert_allclose(line.get_ydata(), want[:, layer])
        assert ax.get_ylim()[1] >= want[:, layer].max()  # the line is not clipped


def test_a_record_without_dropped_fraction_counts_as_zero():
    records = [{"kind": "train", "step": 1, "tokens_per_expert": [[1, 2]]}]
    data = logs.load_data(records)
    np.testing.assert_array_equal(data["dropped_fraction"], [[0.0]])


def test_import_jmoe_loads_no_training_module():
    """The library is the layer; the LM app (jmoe.training: loop, orbax checkpoints, plots) is apart."""
    code = ("import sys, jmoe, jmoe.parallel, jmoe.grouped_matmul; "
            "print(sorted(m for m in sys.modules if m == 'jmoe.training' or m.startswith('jmoe.training.') "
            "or m.split('.')[0] in ('orbax', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], env=cpu_env(1), cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # nor the app's checkpointing and plotting packages
