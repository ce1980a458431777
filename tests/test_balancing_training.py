"""Aux-loss-free balancing in the training app (issue 20): the selection biases are a third train-state
pytree beside params and opt_state, updated inside the train step from that step's global load, never in
the optimizer, kept by checkpoints and resumption, and the same on an expert mesh as on one device.
Also the new config keys (group_limited router options, shared expert, lb_loss) and configs/deepseek_tiny.

Micro models (d_model 32, 2 blocks, 8 experts, top-2); about a minute on 2 cores.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe.balancing import bias_update
from jmoe.training import config as config_lib
from jmoe.training import data as data_lib
from jmoe.training import model as model_lib
from jmoe import training
from jmoe.training.trees import flatten

DS_MICRO = dict(
    d_model=32, num_layers=2, num_heads=2, d_ff=64, num_experts=8, expert_d_ff=16, moe_every=2, k=2,
    router="group_limited", n_group=2, topk_group=1, normalize=1, selection_bias=1, bias_update_rate=0.05,
    shared_d_ff=16, dropless=1, lb_weight=0.1, lb_loss="global_load_balancing_loss", z_weight=0.01, seq_len=32, batch_size=8, steps=12, lr=1e-2,
    warmup_steps=2, eval_every=6, eval_batches=2, log_every=1, ckpt_every=4, num_devices=1,
)


def ds_micro(text_file, **kw):
    return config_lib.from_dict({**DS_MICRO, "data": text_file, **kw})


def train_records(out):
    return {r["step"]: r for r in training.read_log(os.path.join(out, "metrics.jsonl")) if r["kind"] == "train"}


def one_step_inputs(s, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (s.cfg.batch_size, s.cfg.seq_len + 1), 0, 256, jnp.int32)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.fixture(scope="module")
def ds_run(text_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds_run"))
    result = training.train(ds_micro(text_file), out, print_fn=lambda *a: None, plots=False)
    return out, result


def test_train_step_updates_the_biases_by_the_steps_load(text_file):
    cfg = ds_micro(text_file)
    s, params = training.setup(cfg, training.training_mesh(1, 1))
    opt_state = training.init_opt_state(s, params)
    assert jax.tree.structure(s.balance) == jax.tree.structure(
        {"blocks": {1: {"ffn": {"selection_bias": 0}}}})  # one MoE layer, its bias a separate pytree
    assert not any("selection_bias" in k or "expert_load" in k for k in flatten(params))
    assert not any("selection_bias" in k or "expert_load" in k for k in flatten(opt_state))  # the optimizer never sees it

    # non-zero biases going in: the step chooses with them and returns them moved by its own load
    bias = jnp.linspace(-0.3, 0.3, 8, dtype=jnp.float32)
    balance = {"blocks": {1: {"ffn": {"selection_bias": bias}}}}
    inputs, targets = one_step_inputs(s)
    _, _, new, metrics = s.train_step(params, opt_state, balance, jnp.int32(0), inputs, targets, jnp.int32(-1))
    load = np.asarray(metrics["tokens_per_expert"])[0]  # [E]: this step's (global) load
    assert load.sum() == 8 * 32 * 2  # dropless: every (token, choice) kept
    want = bias_update(bias, jnp.asarray(load), cfg.bias_update_rate)
    np.testing.assert_allclose(np.asarray(new["blocks"][1]["ffn"]["selection_bias"]), np.asarray(want), rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(metrics["selection_bias"])[0], np.asarray(bias))  # what it chose with
    assert float(metrics["load_max_over_mean"][0]) == pytest.approx(load.max() / load.mean())
    # lb_weight multiplies the balance loss lb_loss names (here the global-batch one)
    want_loss = float(metrics["lm_loss"]) + 0.1 * float(metrics["global_load_balancing_loss"]) \
        + 0.01 * float(metrics["z_loss"])
    assert float(metrics["loss"]) == pytest.approx(want_loss, rel=1e-6)
    assert float(metrics["global_load_balancing_loss"]) != pytest.approx(float(metrics["load_balancing_loss"]))

    # the biases steer the choice: a large bias on expert 0 gives it (almost) every token's first choice
    push = {"blocks": {1: {"ffn": {"selection_bias": jnp.zeros(8).at[0].set(10.0)}}}}
    params = s.init_fn()[0]
    _, _, _, pushed = s.train_step(params, training.init_opt_state(s, params), push, jnp.int32(0), inputs, targets,
                                   jnp.int32(-1))
    assert float(pushed["tokens_per_expert"][0][0]) == 8 * 32


def test_no_gradient_reaches_the_biases(text_file):
    cfg = ds_micro(text_file)
    s, params = training.setup(cfg, training.training_mesh(1, 1))
    inputs, targets = one_step_inputs(s)
    balance = jax.tree.map(lambda b: b + jnp.linspace(-0.1, 0.1, b.shape[0]), s.balance)

    def loss(balance, rest):
        model = nnx.merge(s.graphdef, params, balance, training.fold_rngs(rest, 0))  # as the train step does
        logits, aux = model(inputs)
        return model_lib.total_loss(model_lib.lm_loss(logits, targets), aux, 0.01, 0.001, "global_load_balancing_loss")

    grads = jax.jit(jax.grad(loss))(balance, s.rngs_state)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_checkpoint_round_trip_keeps_the_biases(ds_run, text_file):
    out, result = ds_run
    final = np.asarray(result["balance"]["blocks"][1]["ffn"]["selection_bias"])
    assert np.abs(final).max() > 0  # they moved
    assert sorted(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit()) == [8, 12]
    s, params, step = training.load_for_inference(out, num_devices=1)
    assert step == 12
    np.testing.assert_array_equal(np.asarray(s.balance["blocks"][1]["ffn"]["selection_bias"]), final)
    # evaluation uses the restored biases: the same loss as the run's own last evaluation
    corpus = data_lib.load_corpus(text_file, s.cfg.val_percent)
    val = [r for r in training.read_log(os.path.join(out, "metrics.jsonl")) if r["kind"] == "eval"][-1]
    assert training.evaluate(s, params, corpus.val)["val_loss"] == pytest.approx(val["val_loss"], rel=1e-6)
    zero = jax.tree.map(jnp.zeros_like, s.balance)
    assert training.evaluate(s, params, corpus.val, zero)["val_loss"] != pytest.approx(val["val_loss"], rel=1e-6)


def test_resume_continues_exactly_biases_included(ds_run, text_file, tmp_path):
    out_a, result_a = ds_run
    out = str(tmp_path / "resumed")
    cfg = ds_micro(text_file)
    training.train(cfg, out, print_fn=lambda *a: None, stop_after=7, plots=False)  # "killed" after step 7
    result = training.train(cfg, out, print_fn=lambda *a: None, plots=False)  # resumes from step 4
    want, got = train_records(out_a), train_records(out)
    assert sorted(got) == list(range(1, 13))
    assert [got[i]["lm_loss"] for i in got] == [want[i]["lm_loss"] for i in got]
    assert [got[i]["selection_bias"] for i in got] == [want[i]["selection_bias"] for i in got]
    np.testing.assert_array_equal(np.asarray(result["balance"]["blocks"][1]["ffn"]["selection_bias"]),
                                  np.asarray(result_a["balance"]["blocks"][1]["ffn"]["selection_bias"]))


def test_expert_mesh_run_has_the_biases_of_one_device(ds_run, text_file, tmp_path):
    """8 emulated devices, experts split 4 ways: the load is counted over the global batch, so every step's
    biases equal the one-device run's."""
    assert len(jax.devices()) >= 8, "conftest emulates 8 CPU devices"
    out_a, _ = ds_run
    out = str(tmp_path / "mesh")
    result = training.train(ds_micro(text_file, steps=4, num_devices=8, expert_parallel=4, eval_every=4,
                                     ckpt_every=4),
                            out, print_fn=lambda *a: None, plots=False)
    assert dict(result["setup"].mesh.shape) == {"data": 2, "expert": 4, "model": 1}
    want, got = train_records(out_a), train_records(out)
    for step in (1, 2, 3, 4):
        assert got[step]["tokens_per_expert"] == want[step]["tokens_per_expert"]
        np.testing.assert_allclose(got[step]["selection_bias"], want[step]["selection_bias"], rtol=0, atol=1e-7)
    bias = result["balance"]["blocks"][1]["ffn"]["selection_bias"]
    assert bias.sharding.is_fully_replicated


def test_total_loss_weights_the_balance_loss_lb_loss_names():
    aux = {name: jnp.float32(0.0) for name in model_lib.AUX_LOSSES}
    aux.update(load_balancing_loss=jnp.float32(2.0), sequence_balance_loss=jnp.float32(0.5),
               global_load_balancing_loss=jnp.float32(1.5), z_loss=jnp.float32(3.0))
    assert set(config_lib.BALANCE_LOSSES) <= set(model_lib.AUX_LOSSES)
    for name in config_lib.BALANCE_LOSSES:
        assert float(model_lib.total_loss(jnp.float32(1.0), aux, 0.1, 0.01, name)) == \
            pytest.approx(1.0 + 0.1 * float(aux[name]) + 0.03)
    with pytest.raises(ValueError, match="lb_loss='z_loss'"):
        model_lib.total_loss(jnp.float32(1.0), aux, 0.1, 0.01, "z_loss")


def test_old_checkpoint_config_without_the_new_keys_is_compatible():
    saved = {k: v for k, v in config_lib.Config().to_dict().items()
             if k not in ("selection_bias", "shared_d_ff", "shared_gate", "router_bias", "score_function")}
    training.check_compatible(saved, config_lib.Config())
    with pytest.raises(training.IncompatibleCheckpointError, match="selection_bias=0 vs 1"):
        training.check_compatible(saved, config_lib.Config(router="group_limited", selection_bias=1))


def test_checkpoint_without_biases_is_a_clear_error_for_a_model_with_them(ds_run, tmp_path):
    import shutil

    out_a, _ = ds_run
    out = str(tmp_path / "nobias")
    shutil.copytree(out_a, out)
    shutil.rmtree(os.path.join(out, "checkpoints", "12", "balance"))
    mgr = training.checkpoint_manager(out)
    cfg = config_lib.from_dict({**training.read_checkpoint_config(mgr, 12), "num_devices": 1})
    s = training.cached_setup(cfg, training.training_mesh(1, 1))
    with pytest.raises(training.IncompatibleCheckpointError, match="holds no selection biases"):
        training.restore_checkpoint(mgr, 12, s.abstract_params, None, s.abstract_balance)
    mgr.close()


@pytest.mark.parametrize("overrides, message", [
    ({"selection_bias": 1}, "need router=group_limited"),
    ({"score_function": "softmax"}, "need router=group_limited"),
    ({"bias_update_rate": 0.01}, "needs selection_bias=1"),
    ({"router": "group_limited", "n_group": 3}, "must divide num_experts"),
    ({"router": "group_limited", "n_group": 2, "topk_group": 3}, "must be <= n_group"),
    ({"shared_gate": 1}, "needs shared_d_ff"),
    ({"scale_expert_input": 1, "k": 2}, "needs k=1"),
    ({"lb_loss": "importance_loss"}, "must be one of load_balancing_loss"),
    ({"bias_update_rate": -0.1}, "out of range"),
])
def test_bad_balancing_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.load_config("tiny", overrides)


def test_flags_that_change_the_parameter_tree_are_model_keys():
    base = config_lib.from_dict({k: v for k, v in DS_MICRO.items()})

    def tree(cfg):
        model = nnx.eval_shape(lambda: training.build_model(cfg, nnx.Rngs(0)))
        return jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(nnx.state(model)))

    want = tree(base)
    for key, value in (("selection_bias", 0), ("router_bias", 1), ("shared_d_ff", 0), ("shared_gate", 1)):
        assert tree(dataclasses.replace(base, **{key: value, **({"bias_update_rate": 0.0} if key == "selection_bias"
                                                                 else {})})) != want, key
        assert key in config_lib.MODEL_KEYS


def test_deepseek_tiny_is_tiny_sized_and_deepseek_shaped():
    tiny, ds = config_lib.load_config("tiny"), config_lib.load_config("deepseek_tiny")
    assert ds.router == "group_limited" and ds.score_function == "sigmoid" and ds.n_group > 1
    assert ds.num_experts >= 16 and ds.k >= 4 and ds.shared_d_ff > 0 and ds.dropless == 1
    assert ds.selection_bias == 1 and ds.bias_update_rate > 0 and ds.lb_weight == 0
    build = lambda c: nnx.eval_shape(lambda: training.build_model(c, nnx.Rngs(0)))  # noqa: E731
    mt, md = build(tiny), build(ds)
    ft, fd = model_lib.flops_per_token(mt, tiny.seq_len), model_lib.flops_per_token(md, ds.seq_len)
    assert abs(fd - ft) / ft < 0.02  # only the routers differ (d x 16 vs d x 4)
    moes = [b.ffn for b in md.blocks if isinstance(b.ffn, jmoe.MoE)]
    assert moes and all(hasattr(m, "shared_expert") and m.selection_bias.shape == (16,) for m in moes)
