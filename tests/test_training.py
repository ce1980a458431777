"""Training loop: learning, exact resumption, cross-mesh restore, NaN stop, config errors, sampling.

Each test trains a micro model (d_model 32, 2 blocks, 4 experts) for a few dozen
steps on a fixed text file; the whole module runs in about a minute on 2 cores.
"""

import dataclasses
import importlib.util
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe.training import config as config_lib
from jmoe.training import data as data_lib
from jmoe import parallel
from jmoe import training
from tests.processes import cpu_env, free_port, run_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = dict(
    d_model=32, num_layers=2, num_heads=2, d_ff=64, num_experts=4, expert_d_ff=64, seq_len=32,
    batch_size=8, steps=24, lr=1e-2, warmup_steps=4, eval_every=12, eval_batches=2, log_every=1,
    ckpt_every=8, num_devices=1,
)


def micro(text_file, **kw):
    return config_lib.from_dict({**MICRO, "data": text_file, **kw})


def losses(log_path, kind="train", key="lm_loss"):
    return {r["step"]: r[key] for r in training.read_log(log_path) if r.get("kind") == kind}


@pytest.fixture(scope="module")
def uninterrupted(text_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run_a"))
    result = training.train(micro(text_file), out, print_fn=lambda *a: None)
    return out, result


def test_loss_goes_down_and_outputs_are_written(uninterrupted):
    out, result = uninterrupted
    train_loss = losses(os.path.join(out, "metrics.jsonl"))
    val = losses(os.path.join(out, "metrics.jsonl"), "eval", "val_loss")
    assert sorted(train_loss) == list(range(1, 25))
    assert np.mean([train_loss[s] for s in (20, 21, 22, 23, 24)]) < 0.6 * np.mean([train_loss[s] for s in (1, 2, 3)])
    assert val[24] < 0.6 * val[0] and val[0] > 0.9 * math.log(256)  # starts near uniform
    rec = [r for r in training.read_log(os.path.join(out, "metrics.jsonl")) if r.get("step") == 24 and r["kind"] == "train"][0]
    assert len(rec["tokens_per_expert"]) == 1 and len(rec["tokens_per_expert"][0]) == 4
    # top-1: kept assignments = tokens - dropped
    assert sum(rec["tokens_per_expert"][0]) == pytest.approx(8 * 32 * (1 - rec["dropped_fraction"][0]), abs=0.5)
    assert rec["bits_per_byte"] == pytest.approx(rec["lm_loss"] / math.log(2))
    for name in ("loss.png", "expert_load.png", "config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert result["last_checkpoint"] == 24
    assert sorted(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit()) == [16, 24]


def test_resume_continues_exactly(uninterrupted, text_file, tmp_path):
    out_a, _ = uninterrupted
    out = str(tmp_path / "run_b")
    cfg = micro(text_file)
    training.train(cfg, out, print_fn=lambda *a: None, stop_after=13, plots=False)  # "killed" after step 13
    assert max(losses(os.path.join(out, "metrics.jsonl"))) == 13
    # A save killed midway leaves only orbax's temporary directory behind: it must be ignored.
    partial = os.path.join(out, "checkpoints", "12.orbax-checkpoint-tmp-0")
    os.makedirs(os.path.join(partial, "params"))
    training.train(cfg, out, print_fn=lambda *a: None, plots=False)  # resumes from step 8
    assert not os.path.exists(partial)  # and cleans the leftover up
    want = losses(os.path.join(out_a, "metrics.jsonl"))
    got = losses(os.path.join(out, "metrics.jsonl"))
    assert got == want  # exactly the same losses, step for step (steps 9..13 were re-run once)
    assert losses(os.path.join(out, "metrics.jsonl"), "eval", "val_loss") == \
        losses(os.path.join(out_a, "metrics.jsonl"), "eval", "val_loss")


def test_checkpoint_from_expert_parallel_mesh_restores_on_one_device(text_file, tmp_path):
    assert len(jax.devices()) >= 8, "conftest emulates 8 CPU devices"
    out = str(tmp_path / "run_ep")
    cfg = micro(text_file, steps=3, num_devices=8, expert_parallel=4, eval_every=3, ckpt_every=3)
    result = training.train(cfg, out, print_fn=lambda *a: None, plots=False)
    assert dict(result["setup"].mesh.shape) == {"data": 2, "expert": 4, "model": 1}
    assert parallel.uses_mesh(result["setup"].mesh)  # the MoE layers ran expert-parallel (shard_map)
    w = result["params"]["blocks"][1]["ffn"]["experts"]["w_in"]
    assert w.sharding.spec[0] == "expert"  # experts really were split over the expert axis
    val_8 = losses(os.path.join(out, "metrics.jsonl"), "eval", "val_loss")[3]

    s, params, step = training.load_for_inference(out, num_devices=1)
    assert step == 3 and s.mesh.size == 1
    corpus = data_lib.load_corpus(text_file, cfg.val_percent)
    val_1 = training.evaluate(s, params, corpus.val)["val_loss"]
    assert val_1 == pytest.approx(val_8, rel=1e-5)
    np.testing.assert_allclose(np.asarray(params["blocks"][1]["ffn"]["experts"]["w_in"]), np.asarray(w), rtol=0)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(text_file, tmp_path):
    out = str(tmp_path / "run_nan")
    cfg = micro(text_file, ckpt_every=2, nan_at_step=5)  # the step logged as 5 (steps are numbered from 1)
    with pytest.raises(training.NonFiniteLossError, match="at step 5: .*last good checkpoint is step 4"):
        training.train(cfg, out, print_fn=lambda *a: None, plots=False)
    logged = losses(os.path.join(out, "metrics.jsonl"), key="loss")
    assert sorted(logged) == [1, 2, 3, 4, 5] and math.isnan(logged[5]) and math.isfinite(logged[4])
    s, params, step = training.load_for_inference(out, num_devices=1)
    assert step == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    text = training.sample(s, params, "def ", 5, temperature=0.0)
    assert text.startswith("def ")


def test_resume_with_another_router_is_a_clear_error(text_file, tmp_path):
    """``router=noisy_top_k`` adds parameters: resuming a tokens_choose checkpoint with it must name the key,
    not fail inside orbax on the mismatched parameter tree."""
    out = str(tmp_path / "run_router")
    cfg = micro(text_file, steps=2, eval_every=2, ckpt_every=2)
    training.train(cfg, out, print_fn=lambda *a: None, plots=False)
    with pytest.raises(ValueError, match="checkpoint's model differs") as err:
        training.train(dataclasses.replace(cfg, steps=4, router="noisy_top_k"), out, print_fn=lambda *a: None,
                       plots=False)
    assert "router='tokens_choose' vs 'noisy_top_k'" in str(err.value) and len(str(err.value)) < 300


def test_sample_is_deterministic_and_extends_the_prompt(uninterrupted):
    out, _ = uninterrupted
    s, params, _ = training.load_for_inference(out, num_devices=1)
    a = training.sample(s, params, "def function_1", 40, temperature=0.0)
    b = training.sample(s, params, "def function_1", 40, temperature=0.0)
    assert a == b and a.startswith("def function_1") and len(a.encode()) == len("def function_1") + 40


# ----------------------------------------------------------------------------
# Config and command-line errors
# ----------------------------------------------------------------------------


def _train_main():
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_unknown_key_lists_valid_keys(capsys):
    assert _train_main()(["bogus_key=1"]) == 2
    err = capsys.readouterr().err
    assert "bogus_key" in err and "num_experts" in err and "capacity_factor" in err


@pytest.mark.parametrize("arg, message", [
    ("k=0", r"k=0 is out of range: must be in \[1, inf\]"),
    ("dtype=float16", "must be one of float32, bfloat16"),
    ("steps=many", "not a valid int"),
    ("lr=2.0", r"lr=2.0 is out of range: must be in \[0.0, 1.0\]"),
    ("num_heads=3", "divisible|even"),
    ("k=5", r"must be in \[1, num_experts=4\]"),
    ("nokeyvalue", "expected key=value"),
    ("dropless_buffer_factor=1.5", "needs dropless=1"),
    ("grouped_matmul=cublas", "must be one of auto, ragged_dot, scan, pallas, mosaic"),
    ("nan_at_step=0", "steps are numbered from 1"),
])
def test_bad_values_are_clear_errors(arg, message):
    with pytest.raises(ValueError, match=message):
        config_lib.load_config("tiny", config_lib.parse_overrides([arg]))


def test_dropless_keys_reach_the_layers_and_match_the_library():
    from jmoe import grouped_matmul, parallel
    from jmoe.options import DroplessOptions

    fields = {f.name: f for f in dataclasses.fields(config_lib.Config)}
    assert fields["grouped_matmul"].metadata["choices"] == grouped_matmul.GROUPED_MATMULS.names
    assert fields["dropless_exchange"].metadata["choices"] == parallel.DROPLESS_EXCHANGES.names
    cfg = config_lib.load_config("tiny", config_lib.parse_overrides(
        ["dropless=1", "grouped_matmul=ragged_dot", "dropless_exchange=padded", "dropless_buffer_factor=1.5"]))
    model = training.build_model(cfg, nnx.Rngs(0))
    moes = [b.ffn for b in model.blocks if isinstance(b.ffn, jmoe.MoE)]
    assert moes and all(m.dropless and m.dropless_options == DroplessOptions("ragged_dot", "padded", 1.5)
                        for m in moes)


def test_every_config_key_has_exactly_one_role():
    fields = dataclasses.fields(config_lib.Config)
    assert all(f.metadata["role"] in config_lib.ROLES for f in fields)
    by_role = {role: [f.name for f in fields if f.metadata["role"] == role] for role in config_lib.ROLES}
    assert sorted(sum(by_role.values(), [])) == sorted(config_lib.keys())  # a partition of the keys
    assert config_lib.Config.MODEL_KEYS == config_lib.MODEL_KEYS == tuple(by_role["model"])
    assert config_lib.RUN_ONLY_KEYS == tuple(by_role["run"]) and training.RUN_ONLY_KEYS == config_lib.RUN_ONLY_KEYS
    assert "router" in config_lib.MODEL_KEYS and "data" in config_lib.RUN_ONLY_KEYS


def test_a_choice_that_changes_the_parameter_tree_is_a_model_key():
    """Every value of every ``choices`` key, one at a time: those giving other parameter paths, shapes or dtypes
    than the default (a checkpoint would not restore) must be model keys, checked before restoring."""
    base = micro("unused")

    def tree(cfg):
        params = nnx.state(nnx.eval_shape(lambda: training.build_model(cfg, nnx.Rngs(0))), nnx.Param)
        return jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(params))

    needs = {("second_expert_policy", "random"): {"k": 2}, ("grouped_matmul", "mosaic"): {"dtype": "bfloat16"},
             ("score_function", "softmax"): {"router": "group_limited"},
             ("score_function", "sqrt_softplus"): {"router": "group_limited"},
             ("router", "sparsemixer"): {"k": 2}, ("router", "top2_gate"): {"k": 2},
             ("router", "shared_sink"): {"shared_d_ff": 64},
             ("group_score", "max"): {"router": "group_limited", "n_group": 2, "topk_group": 1}}
    want = tree(base)
    changing = set()
    for f in dataclasses.fields(config_lib.Config):
        for value in f.metadata["choices"] or ():
            if tree(dataclasses.replace(base, **{f.name: value, **needs.get((f.name, value), {})})) != want:
                changing.add(f.name)
    assert {"router", "activation"} <= changing  # noisy_top_k's noise weights, the gated activations' w_gate
    assert changing <= set(config_lib.MODEL_KEYS)


def test_missing_data_path_and_config_name_are_clear_errors(tmp_path, capsys):
    main = _train_main()
    assert main([f"data={tmp_path / 'missing'}", f"out_dir={tmp_path / 'o'}", "num_devices=1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["config=nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "nonexistent" in err and "tiny" in err and "small" in err


def test_named_configs_load_and_dense_baseline_matches_tiny_active_flops():
    from flax import nnx
    from jmoe.training import model as model_lib

    tiny, dense, small = (config_lib.load_config(n) for n in ("tiny", "tiny_dense", "small"))
    assert dense.num_experts == 0 and small.num_experts in range(8, 17) and small.k in (1, 2)
    build = lambda c: nnx.eval_shape(lambda: training.build_model(c, nnx.Rngs(0)))
    mt, md, ms = build(tiny), build(dense), build(small)
    ft, fd = model_lib.flops_per_token(mt, tiny.seq_len), model_lib.flops_per_token(md, dense.seq_len)
    assert abs(ft - fd) / fd < 0.01  # only the routers differ
    assert 80e6 < model_lib.count_params(ms) < 130e6


# ----------------------------------------------------------------------------
# Two processes (jax.distributed over gloo), bounded by a timeout
# ----------------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("JMOE_SLOW_TESTS"),
                    reason="about a minute on 2 cores; set JMOE_SLOW_TESTS=1 to run")
def test_two_process_run_matches_one_process(text_file, tmp_path):
    """``train.py`` on 2 processes x 2 CPU devices equals a 4-device run in this process, step for step;
    only process 0 writes the log; the checkpoint loads on one device."""
    import sys

    args = [f"{k}={v}" for k, v in {**MICRO, "steps": 4, "ckpt_every": 2, "eval_every": 4}.items()
            if k != "num_devices"] + [f"data={text_file}"]
    out = str(tmp_path / "multi")
    port = free_port()
    commands = [[sys.executable, os.path.join(ROOT, "train.py"), *args, f"out_dir={out}",
                 f"coordinator_address=127.0.0.1:{port}", "num_processes=2", f"process_id={i}"] for i in range(2)]
    results = run_all(commands, cpu_env(2), timeout_s=240)
    for code, log in results:
        assert code == 0, log[-4000:]
    logs = [log for _, log in results]
    assert "val loss" in logs[0] and "val loss" not in logs[1]  # process 1 prints nothing

    ref = str(tmp_path / "single")
    training.train(micro(text_file, steps=4, ckpt_every=2, eval_every=4, num_devices=4), ref,
                   print_fn=lambda *a: None, plots=False)
    got, want = losses(os.path.join(out, "metrics.jsonl")), losses(os.path.join(ref, "metrics.jsonl"))
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5)
    start = [r for r in training.read_log(os.path.join(out, "metrics.jsonl")) if r["kind"] == "start"][0]
    assert start["processes"] == 2 and start["devices"] == 4
    _, params, step = training.load_for_inference(out, num_devices=1)
    assert step == 4
