"""benchmarks/bench_train.py's CPU smoke run (issue 16): every variant that runs on CPU is timed, the
profile of the base and the fastest variant maps ops to source lines, and the category sums add up."""

import json
import os
import subprocess
import sys

import pytest

from jmoe.training import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_train")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.load(open(out / "bench_train.json")), proc.stdout



def test_smoke_json_fields_and_category_sums(smoke):
    out, result, stdout = smoke
    assert result["smoke"] and "NOT A MEASUREMENT" in result["what"]
    assert result["machine"]["platform"] == "cpu" and result["machine"]["peak_flops"] is None
    assert result["matmul_tflops"]["tflops"] > 0
    # cuDNN and the GPU grouped-matmul kernels are skipped on CPU, with the reason
    for name in ("cudnn", "dropless_mosaic", "dropless_pallas", "dropless_megablox", "batch_2x"):
        assert name in result["skipped"], result["skipped"]
    rows = result["variants"]
    for name in ("base", "onehot", "capacity_1.0", "dropless_ragged_dot", "dropless_scan", "dense"):
        r = rows[name]
        assert "error" not in r, (name, r)
        for key in ("ms_per_step", "tokens_per_s", "compile_s", "lower_s", "flops_per_token", "achieved_tflops",
                    "of_matmul", "program_bytes", "loss_after", "attention_impl"):
            assert key in r, (name, key)
        assert r["mfu"] is None  # no peak for a CPU: no MFU claimed
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["ms_per_step"] / 1e3))
        assert r["attention_impl"] == "xla"
    assert rows["base"]["overrides"] == {} and rows["onehot"]["overrides"] == {"embedding": "onehot"}
    assert "batch_2x" in result["skipped"]  # smoke saves its compile (it is the base step at twice the batch)
    assert rows["dense"]["active_params"] < rows["base"]["params"]
    assert "combined" in rows or "combined" in result["skipped"]
    assert result["fastest"] in rows and result["fastest"] != "dense"

    profiled = {"base", result["fastest"]}
    assert set(result["profiles"]) == profiled
    for name in profiled:
        p = result["profiles"][name]
        assert "error" not in p and p["events"] == "host", p  # XLA:CPU thunk events
        cats = p["categories_ms"]
        assert set(cats) == {"attention", "norm_rope", "embedding", "loss", "routing", "dispatch_combine", "experts",
                             "dense_ffn", "moe_other", "optimizer", "other"}
        assert sum(cats.values()) == pytest.approx(p["op_ms_per_step"], rel=1e-9)
        assert sum(p["categories_share"].values()) == pytest.approx(1.0)
        table = json.load(open(out / p["ops_file"]))
        assert sum(r["ms"] for r in table) == pytest.approx(p["op_ms_per_step"], rel=1e-9)
        for cat in cats:
            assert sum(r["ms"] for r in table if r["category"] == cat) == pytest.approx(cats[cat], rel=1e-9, abs=1e-12)
        assert [r["ms"] for r in p["top_ops"]] == sorted((r["ms"] for r in p["top_ops"]), reverse=True)
        assert p["unmapped_ms"] == 0  # every traced op is an instruction of the compiled step
        # the mapping works: the model's parts are found, and little is left unnamed
        for cat in ("attention", "norm_rope", "loss", "optimizer", "embedding"):
            assert cats[cat] > 0, (name, cat, cats)
        assert cats["other"] < 0.25 * p["op_ms_per_step"], cats
        assert any(r["source"].startswith("jmoe/training/model.py:") for r in p["top_source_lines"])
    base = result["profiles"]["base"]["categories_ms"]
    if rows["base"]["overrides"] == {}:  # MoE base: its parts are found
        assert base["experts"] > 0 and base["routing"] > 0 and base["dispatch_combine"] > 0
    assert "profile base" in stdout


def test_small_gpu_config_is_small_and_its_dense_baseline_is_flop_matched():
    from flax import nnx

    from jmoe.training import model as model_lib
    from jmoe.training import build_model

    cfg = config_lib.load_config("small_gpu")
    dense = config_lib.load_config("small_gpu", {"num_experts": 0})
    assert cfg.dtype == "bfloat16" and cfg.seq_len >= 1024 and cfg.d_model // cfg.num_heads in (64, 128)
    assert cfg.batch_size * cfg.seq_len > 64 * 512  # more tokens per step than small
    moe = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    den = nnx.eval_shape(lambda: build_model(dense, nnx.Rngs(0)))
    assert model_lib.count_params(moe) < 200e6
    fm, fd = model_lib.flops_per_token(moe, cfg.seq_len), model_lib.flops_per_token(den, cfg.seq_len)
    assert abs(fm - fd) / fd < 0.01  # only the routers differ


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("cpu", None)])
def test_peak_flops_by_exact_device_kind(kind, peak):
    from jmoe.training.logs import peak_flops

    class Device:
        device_kind = kind

    assert peak_flops(Device()) == peak
