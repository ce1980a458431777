"""Dropless experts: grouped matmul over expert-sorted rows equals the capacity path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe.dropless import dropless_experts, sort_by_expert
from jmoe.experts import expert_ffn


def per_assignment_ref(x, token_expert, token_weight, params, activation):
    """y[t] = sum_k w[t, k] * FFN_{e[t, k]}(x[t]), one expert at a time (no sorting)."""
    num_experts = params["w_in"].shape[0]
    all_experts = expert_ffn(jnp.broadcast_to(x[None], (num_experts,) + x.shape), params, activation)  # [E, T, d]
    t = jnp.arange(x.shape[0])
    picked = jnp.stack([all_experts[token_expert[:, j], t] for j in range(token_expert.shape[1])], 1)  # [T, K, d]
    return jnp.sum(token_weight[..., None] * picked, axis=1)


def test_sort_by_expert_is_stable_and_counts():
    token_expert = jnp.asarray([[2, 0], [0, 1], [2, 1]])
    order, sizes = sort_by_expert(token_expert, 4)
    np.testing.assert_array_equal(order, [1, 2, 3, 5, 0, 4])  # expert 0: a1, a2; 1: a3, a5; 2: a0, a4
    np.testing.assert_array_equal(sizes, [2, 2, 2, 0])


@pytest.mark.parametrize("activation, bias, matmul", [("gelu", True, "ragged_dot"), ("swiglu", False, "ragged_dot"),
                                                     ("gelu", True, "pallas"), ("swiglu", False, "pallas")])
def test_dropless_experts_match_reference_with_empty_and_full_experts(activation, bias, matmul):
    T, K, E, d, f = 10, 2, 4, 6, 8
    keys = jax.random.split(jax.random.key(0), 6)
    bank = jmoe.ExpertBank(E, d, f, activation=activation, use_bias=bias, rngs=nnx.Rngs(0))
    params = bank.params()
    if bias:
        params["b_in"] = jax.random.normal(keys[4], params["b_in"].shape)
    x = jax.random.normal(keys[0], (T, d))
    # Expert 0 takes every token's 1st choice; experts 1 and 3 get nothing.
    token_expert = jnp.stack([jnp.zeros(T, jnp.int32), jnp.full(T, 2, jnp.int32)], axis=1)
    token_weight = jax.random.uniform(keys[1], (T, K))

    def loss(fn, x, w, p):
        return jnp.sum(jnp.sin(fn(x, token_expert, w, p, activation)))

    def ours(x, e, w, p, activation):
        return dropless_experts(x, e, w, p, activation, matmul)

    got = jax.jit(ours, static_argnums=4)(x, token_expert, token_weight, params, activation)
    np.testing.assert_allclose(got, per_assignment_ref(x, token_expert, token_weight, params, activation),
                               rtol=1e-5, atol=1e-5)
    g_got = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(x, token_weight, params)
    g_ref = jax.grad(lambda *a: loss(per_assignment_ref, *a), argnums=(0, 1, 2))(x, token_weight, params)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for name in ("w_in", "w_out"):  # experts with no tokens get exactly zero weight gradient
        assert np.all(np.asarray(g_got[2][name][np.array([1, 3])]) == 0.0)
        assert np.all(np.abs(np.asarray(g_got[2][name][np.array([0, 2])])).sum(axis=(1, 2)) > 0)


def moe_pair(k, router="tokens_choose", **kwargs):
    common = dict(k=k, router=router, activation="gelu", **kwargs)  # same seed: same weights
    dropless = jmoe.MoE(8, 16, 4, capacity_factor=None, rngs=nnx.Rngs(0), **common)
    roomy = jmoe.MoE(8, 16, 4, capacity_factor=4.0, rngs=nnx.Rngs(0), **common)  # C = S: no drops
    return dropless, roomy


@nnx.jit
def loss_and_grads(model, x):
    def loss(model, x):
        y, aux = model(x)
        return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"], (y, aux)

    (_, (y, aux)), (g_model, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, aux, g_model, g_x


@pytest.mark.parametrize("k, matmul", [(1, "auto"), (2, "auto"), (2, "pallas")])
def test_dropless_layer_equals_capacity_layer_without_drops(k, matmul):
    dropless, roomy = moe_pair(k, grouped_matmul=matmul)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8))
    y_d, aux_d, gm_d, gx_d = loss_and_grads(dropless, x)
    y_c, aux_c, gm_c, gx_c = loss_and_grads(roomy, x)
    assert float(aux_c["dropped_fraction"]) == 0.0  # the capacity path really keeps everything
    np.testing.assert_allclose(y_d, y_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx_d, gx_c, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.state(gm_d, nnx.Param)), jax.tree.leaves(nnx.state(gm_c, nnx.Param))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(aux_d["tokens_per_expert"], aux_c["tokens_per_expert"])
    np.testing.assert_allclose(aux_d["load_balancing_loss"], aux_c["load_balancing_loss"], rtol=1e-6)
    assert float(aux_d["padding_fraction"]) == 0.0


def test_dropless_never_drops_even_when_one_expert_gets_everything():
    dropless, _ = moe_pair(1)
    # Every token's top expert is expert 2: a capacity layer would drop most of them.
    dropless.router_weight[...] = jnp.zeros((8, 4)).at[:, 2].set(1.0)
    x = jnp.abs(jax.random.normal(jax.random.key(2), (2, 16, 8))) + 0.1
    y, aux, g_model, _ = loss_and_grads(dropless, x)
    assert float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_array_equal(aux["tokens_per_expert"], [0, 0, 32, 0])
    assert np.all(np.abs(np.asarray(y)).sum(-1) > 0)  # every token got its expert's output
    w_in_grad = np.asarray(g_model["experts"]["w_in"][...])
    assert np.all(w_in_grad[[0, 1, 3]] == 0.0) and np.any(w_in_grad[2] != 0.0)


def test_dropless_rejects_expert_choice():
    with pytest.raises(ValueError, match="dropless"):
        jmoe.MoE(8, 16, 4, capacity_factor=None, router="experts_choose", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weighted_sum_value_and_vjp_match_plain_jnp(dtype):
    """``weighted_sum``'s custom VJP (it keeps ``out`` in its own dtype for the backward)
    against autodiff of the plain float32 formula ``sum_k w[t, k] * out[t, k]``, on random
    inputs with some zero weights; the cotangent of ``out`` comes back in out's dtype."""
    from jmoe.dropless import weighted_sum

    keys = jax.random.split(jax.random.key(41), 3)
    out = jax.random.normal(keys[0], (12, 3, 8)).astype(dtype)
    weight = jax.random.uniform(keys[1], (12, 3)).at[::4, 1].set(0.0)
    dy = jax.random.normal(keys[2], (12, 8))

    def plain(out, weight):
        return jnp.sum(weight[..., None] * out.astype(jnp.float32), axis=1)

    y, pull = jax.vjp(weighted_sum, out, weight)
    y_ref, pull_ref = jax.vjp(plain, out, weight)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    (d_out, d_w), (d_out_ref, d_w_ref) = pull(dy), pull_ref(dy)
    assert d_out.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(d_out, np.float32), np.asarray(d_out_ref, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(d_w, d_w_ref, rtol=1e-5, atol=1e-5)
