"""Dispatch backends, the expert bank and the MoE layer against slow references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe import dispatch, routing
from jmoe.options import layer_arguments
from jmoe.routing import TokensChoose

BACKEND_NAMES = ["einsum", "gather"]


@nnx.jit
def apply(model, x):
    """The layer under nnx.jit (eager op-by-op dispatch is slow on CPU)."""
    return model(x)


def random_plan(key, G, S, E, k, capacity, router="tokens"):
    logits = jax.random.normal(key, (G, S, E)) * 2
    if router == "tokens":
        return routing.tokens_choose(logits, k=k, capacity=capacity)
    return routing.experts_choose(logits, capacity=capacity)


# ---------------------------------------------------------------- backends


def dispatch_ref(x, plan):
    x, slot_token = np.asarray(x, np.float64), np.asarray(plan.slot_token)
    G, E, C = slot_token.shape
    out = np.zeros((E, G * C, x.shape[-1]))
    for g in range(G):
        for e in range(E):
            for c in range(C):
                if slot_token[g, e, c] >= 0:
                    out[e, g * C + c] = x[g, slot_token[g, e, c]]
    return out


def combine_ref(expert_out, plan):
    out = np.asarray(expert_out, np.float64)
    expert, slot, weight = (np.asarray(a) for a in (plan.token_expert, plan.token_slot, plan.token_weight))
    G, S, K = expert.shape
    C = plan.capacity
    y = np.zeros((G, S, out.shape[-1]))
    for g in range(G):
        for s in range(S):
            for j in range(K):
                if slot[g, s, j] >= 0:
                    y[g, s] += weight[g, s, j] * out[expert[g, s, j], g * C + slot[g, s, j]]
    return y


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("router, k, capacity", [("tokens", 1, 2), ("tokens", 2, 3), ("experts", 1, 4)])
def test_backend_matches_loop_reference(backend, router, k, capacity):
    G, S, E, d = 3, 8, 4, 5
    keys = jax.random.split(jax.random.key(hash((router, k, capacity)) % 1000), 3)
    plan = random_plan(keys[0], G, S, E, k, capacity, router)
    x = jax.random.normal(keys[1], (G, S, d))
    out = jax.random.normal(keys[2], (E, G * capacity, d))
    impl = dispatch.BACKENDS[backend]
    np.testing.assert_allclose(jax.jit(impl.dispatch)(x, plan), dispatch_ref(x, plan), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(impl.combine)(out, plan), combine_ref(out, plan), rtol=1e-5, atol=1e-6)


def test_backends_agree_on_gradients_of_dispatch_and_combine():
    G, S, E, d, k, C = 2, 10, 4, 6, 2, 3
    keys = jax.random.split(jax.random.key(3), 4)
    logits = jax.random.normal(keys[0], (G, S, E))
    x = jax.random.normal(keys[1], (G, S, d))
    expert_w = jax.random.normal(keys[2], (E, d, d)) / np.sqrt(d)

    def f(backend, x, logits, expert_w):
        impl = dispatch.BACKENDS[backend]
        plan = routing.tokens_choose(logits, k=k, capacity=C)
        h = impl.dispatch(x, plan)  # [E, G*C, d]
        h = jnp.tanh(jnp.einsum("end,edf->enf", h, expert_w))
        return jnp.sum(jnp.sin(impl.combine(h, plan)))

    grads = {b: jax.jit(jax.grad(functools.partial(f, b), argnums=(0, 1, 2)))(x, logits, expert_w) for b in BACKEND_NAMES}
    for a, b in zip(grads["einsum"], grads["gather"]):
        assert float(jnp.max(jnp.abs(a))) > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_backend_and_bad_shapes():
    with pytest.raises(ValueError, match="dispatch must be"):
        dispatch.resolve_backend("magic")
    plan = random_plan(jax.random.key(0), 2, 4, 3, 1, 2)
    with pytest.raises(ValueError, match=r"\[G, S, d\]"):
        dispatch.gather_dispatch(jnp.zeros((2, 5, 3)), plan)
    with pytest.raises(ValueError, match=r"\[E, G \* C, d\]"):
        dispatch.gather_combine(jnp.zeros((3, 5, 3)), plan)


# ---------------------------------------------------------------- expert bank


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "geglu"])
def test_expert_bank_matches_per_expert_numpy(activation):
    E, N, d, f = 3, 5, 4, 6
    bank = jmoe.ExpertBank(E, d, f, activation=activation, use_bias=activation in ("relu", "gelu"), rngs=nnx.Rngs(0))
    if hasattr(bank, "b_in"):  # non-zero biases so they are checked
        bank.b_in[...] = jax.random.normal(jax.random.key(1), bank.b_in.shape)
        bank.b_out[...] = jax.random.normal(jax.random.key(2), bank.b_out.shape)
    x = jax.random.normal(jax.random.key(3), (E, N, d))
    y = np.asarray(bank(x), np.float64)
    p = {name: np.asarray(v, np.float64) for name, v in bank.params().items()}
    act = {
        "relu": lambda h: np.maximum(h, 0),
        "gelu": lambda h: np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32)), np.float64),
        "swiglu": lambda h: h / (1 + np.exp(-h)),
        "geglu": lambda h: np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32)), np.float64),
    }[activation]
    for e in range(E):
        xe = np.asarray(x[e], np.float64)
        h = xe @ p["w_in"][e] + (p["b_in"][e] if "b_in" in p else 0)
        h = act(xe @ p["w_gate"][e]) * h if activation in ("swiglu", "geglu") else act(h)
        expected = h @ p["w_out"][e] + (p["b_out"][e] if "b_out" in p else 0)
        np.testing.assert_allclose(y[e], expected, rtol=1e-4, atol=1e-5)


def test_expert_init_scale_like_dense_ffn():
    bank = jmoe.ExpertBank(4, 256, 1024, activation="relu", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.std(bank.w_in[...]), 1 / np.sqrt(256), rtol=0.05)
    np.testing.assert_allclose(np.std(bank.w_out[...]), 1 / np.sqrt(1024), rtol=0.05)
    per_expert = np.std(np.asarray(bank.w_in[...]), axis=(1, 2))
    assert np.all(np.abs(per_expert * np.sqrt(256) - 1) < 0.05)  # each expert, not just the stack


def test_expert_bank_errors():
    with pytest.raises(ValueError, match="activation"):
        jmoe.ExpertBank(2, 4, 8, activation="tanh", rngs=nnx.Rngs(0))
    bank = jmoe.ExpertBank(2, 4, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[E=2, N, d=4\]"):
        bank(jnp.zeros((3, 5, 4)))


# ---------------------------------------------------------------- the layer


def layer_ref(moe, x, capacity):
    """float64 reference: route with the slow reference, y[t] = sum_kept w * FFN_e(x[t])."""
    from tests.reference import tokens_choose_ref

    x = np.asarray(x, np.float64)
    B, S, d = x.shape
    logits = x @ np.asarray(moe.router_weight[...], np.float64)  # one group per sequence
    _, weights, dropped, requested = tokens_choose_ref(logits, moe.k, capacity)
    params = {n: np.asarray(v, np.float64) for n, v in moe.experts.params().items()}
    y = np.zeros_like(x)
    for (g, s, e), w in weights.items():
        h = np.asarray(jax.nn.gelu(jnp.asarray(x[g, s] @ params["w_in"][e], jnp.float32)), np.float64)
        y[g, s] += w * (h @ params["w_out"][e])
    return y, dropped / requested


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_layer_matches_float64_reference(backend):
    moe = jmoe.MoE(8, 16, 4, k=2, capacity_factor=0.75, dispatch=backend, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 12, 8))
    y, aux = apply(moe, x)
    expected, dropped = layer_ref(moe, x, moe.capacity(12))
    assert dropped > 0  # the case exercises drops
    np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(aux["dropped_fraction"], dropped, rtol=1e-6)


@pytest.mark.parametrize("router, k", [("tokens_choose", 1), ("tokens_choose", 2), ("experts_choose", 2)])
def test_layer_backends_agree_forward_and_gradients(router, k):
    x = jax.random.normal(jax.random.key(7), (2, 16, 8))
    models = {
        b: jmoe.MoE(8, 12, 4, k=k, router=router, capacity_factor=1.0, activation="swiglu", use_bias=False,
                    dispatch=b, rngs=nnx.Rngs(0))
        for b in BACKEND_NAMES
    }

    @nnx.jit
    def loss_and_grads(model, x):
        def loss(model, x):
            y, aux = model(x)
            return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"] + aux["z_loss"], y

        (value, y), (g_model, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        return y, g_model, g_x

    y_e, gm_e, gx_e = loss_and_grads(models["einsum"], x)
    y_g, gm_g, gx_g = loss_and_grads(models["gather"], x)
    np.testing.assert_allclose(y_e, y_g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx_e, gx_g, rtol=1e-4, atol=1e-6)
    for name in ("router_weight",):
        a, b = gm_e[name][...], gm_g[name][...]
        assert float(jnp.max(jnp.abs(a))) > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for name in ("w_in", "w_gate", "w_out"):
        a, b = gm_e["experts"][name][...], gm_g["experts"][name][...]
        assert float(jnp.max(jnp.abs(a))) > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_one_expert_with_room_is_a_dense_ffn(backend):
    moe = jmoe.MoE(8, 16, 1, k=1, capacity_factor=1.0, activation="relu", use_bias=True, dispatch=backend,
                   rngs=nnx.Rngs(0))
    moe.experts.b_in[...] = jax.random.normal(jax.random.key(5), moe.experts.b_in.shape)
    x = jax.random.normal(jax.random.key(1), (2, 6, 8))
    y, aux = apply(moe, x)
    p = moe.experts.params()
    dense = jax.nn.relu(x @ p["w_in"][0] + p["b_in"][0]) @ p["w_out"][0] + p["b_out"][0]
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_token_dropped_by_every_expert_gets_exactly_zero(backend):
    # Router weight 0: every token ties, top-k = experts (0, 1); capacity 1: only token 0
    # gets slots (as 1st choice in expert 0, 2nd choice in expert 1).
    moe = jmoe.MoE(4, 8, 3, k=2, capacity_factor=0.1, dispatch=backend, rngs=nnx.Rngs(0))
    moe.router_weight[...] = jnp.zeros_like(moe.router_weight[...])
    x = jax.random.normal(jax.random.key(2), (1, 5, 4)) + 10.0
    y, aux = apply(moe, x)
    assert moe.capacity(5) == 1
    assert np.all(np.asarray(y[0, 1:]) == 0.0)
    assert np.all(np.abs(np.asarray(y[0, 0])) > 0)
    np.testing.assert_allclose(aux["dropped_fraction"], 8 / 10, rtol=1e-6)


def test_layer_grouping_2d_input_and_group_size():
    moe = jmoe.MoE(4, 8, 2, group_size=3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 6, 4))
    y3, _ = apply(moe, x)
    y2, _ = apply(moe, x.reshape(12, 4))  # same tokens, same row-major groups of 3
    np.testing.assert_allclose(y3.reshape(12, 4), y2, rtol=1e-6)
    with pytest.raises(ValueError, match="not divisible by group_size=5"):
        jmoe.MoE(4, 8, 2, group_size=5, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="d_model=4"):
        moe(jnp.zeros((2, 6, 5)))
    with pytest.raises(ValueError, match=r"\[B, S, d\] or \[T, d\]"):
        moe(jnp.zeros((1, 2, 6, 4)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=3), "k=3"),
        (dict(router="hash"), "router"),
        (dict(dispatch="magic"), "dispatch"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
        (dict(second_expert_policy="random"), "k=2"),
        (dict(jitter=1.5), "jitter"),
        (dict(priority="random"), "priority"),
    ],
)
def test_layer_bad_arguments(kwargs, match):
    """As flat keys (a config's): the router options reach the router object that checks them."""
    with pytest.raises(ValueError, match=match):
        jmoe.MoE(4, 8, 2, rngs=nnx.Rngs(0), **layer_arguments(kwargs))


def test_train_eval_switch_capacity_and_noise():
    moe = jmoe.MoE(8, 16, 4, k=2, capacity_factor=1.0, eval_capacity_factor=2.0,
                   router=TokensChoose(jitter=0.1, second_expert_policy="random"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 8))
    assert moe.capacity(16) == 8
    y_train_1, _ = apply(moe, x)
    y_train_2, _ = apply(moe, x)
    assert not np.allclose(y_train_1, y_train_2)  # jitter and random policy draw fresh noise
    moe.eval()
    assert moe.capacity(16) == 16
    y_eval_1, _ = apply(moe, x)
    y_eval_2, _ = apply(moe, x)
    np.testing.assert_array_equal(y_eval_1, y_eval_2)
    moe.train()
    assert moe.capacity(16) == 8


def test_bf16_activations_keep_float32_router():
    moe = jmoe.MoE(8, 16, 4, k=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8)).astype(jnp.bfloat16)
    y, aux = apply(moe, x)
    assert y.dtype == jnp.bfloat16
    assert moe.router_weight[...].dtype == jnp.float32
    assert aux["load_balancing_loss"].dtype == jnp.float32
    moe32 = jmoe.MoE(8, 16, 4, k=2, rngs=nnx.Rngs(0))
    y32, _ = apply(moe32, x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.1, atol=0.05)


def test_layer_token_mask():
    moe = jmoe.MoE(8, 16, 4, k=1, capacity_factor=4.0, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8))
    mask = jnp.arange(8)[None, :] < jnp.asarray([[5], [8]])  # [B, S]: first row padded after 5
    y, aux = nnx.jit(lambda m, x, mask: m(x, token_mask=mask))(moe, x, mask)
    assert np.all(np.asarray(y[0, 5:]) == 0)
    y_short, _ = apply(moe, x[:1, :5])  # the 5 valid tokens alone, capacity from S=5
    assert moe.capacity(5) >= 5 and moe.capacity(8) >= 5  # no drops either way
    np.testing.assert_allclose(y[0, :5], y_short[0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="token_mask"):
        moe(x, token_mask=mask[:, :4])


def test_layer_under_jit_grad_and_vmap():
    moe = jmoe.MoE(8, 16, 4, k=2, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def run(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return y

    xs = jax.random.normal(jax.random.key(1), (3, 2, 8, 8))  # vmap over a leading axis
    ys = jax.jit(jax.vmap(run, in_axes=(None, 0)))(params, xs)
    one = jax.jit(run)
    for i in range(3):
        np.testing.assert_allclose(ys[i], one(params, xs[i]), rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p, x: jnp.sum(run(p, x) ** 2)))(params, xs[0])
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 3  # router, w_in, w_out
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in leaves)
