"""Product-key routing (``router="product_key"``; Doge's CDMoE) and single-neuron experts
(``d_ff=1``, plain ``silu``) against float64 references on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe.routing import ProductKey

G, S, K = 2, 6, 4  # E = K^2 = 16


def product_key64(router_out, k, key_split):
    """Per group: a, b (the token's halves, or rows t and S + t of the outputs read as [2S, K]),
    s_{iK+j} = a_i + b_j, the top k (ties: lower index) and the softmax over them."""
    experts, weights = [], []
    for r in router_out:  # [S, 2K]
        rows = r.reshape(2 * len(r), K)
        a, b = (r[:, :K], r[:, K:]) if key_split == "token" else (rows[:len(r)], rows[len(r):])
        s = (a[:, :, None] + b[:, None, :]).reshape(len(r), K * K)
        top = np.array([sorted(range(K * K), key=lambda e: (-row[e], e))[:k] for row in s])
        chosen = np.take_along_axis(s, top, -1)
        w = np.exp(chosen - chosen.max(-1, keepdims=True))
        experts.append(top)
        weights.append(w / w.sum(-1, keepdims=True))
    return np.array(experts), np.array(weights)


@pytest.mark.parametrize("key_split", ["token", "group"])
def test_product_key_plan_matches_float64(key_split):
    rng = np.random.default_rng(0)
    router_out = rng.normal(size=(G, S, 2 * K))
    plan = jax.jit(lambda r: ProductKey(k=3, key_split=key_split).plan(r, None, {}, {}, None, S))(
        jnp.asarray(router_out, jnp.float32))
    want_e, want_w = product_key64(router_out, 3, key_split)
    np.testing.assert_array_equal(np.asarray(plan.token_expert), want_e)
    np.testing.assert_allclose(np.asarray(plan.token_weight, np.float64), want_w, rtol=1e-5)
    other_e, _ = product_key64(router_out, 3, "group" if key_split == "token" else "token")
    assert np.any(other_e != want_e)  # the split decides


def test_doge_style_layer_matches_float64():
    """Single-neuron experts ``silu(x . w_in[e]) w_out[e]`` weighted by the product-key softmax, plus a
    SwiGLU shared expert: the layer against a float64 loop over its own weights."""
    moe = jmoe.MoE(8, 1, K * K, k=4, capacity_factor=4.0, activation="silu", router=ProductKey(key_split="token"),
                   shared=jmoe.Shared(12, activation="swiglu"), rngs=nnx.Rngs(0))
    assert moe.router_weight[...].shape == (8, 2 * K) and moe.experts.w_in[...].shape == (K * K, 8, 1)
    x = jax.random.normal(jax.random.key(1), (G, S, 8))
    y, aux = nnx.jit(lambda m, x: m(x))(moe, x)
    assert float(aux["dropped_fraction"]) == 0  # capacity S (factor E / k)
    xs = np.asarray(x, np.float64).reshape(-1, 8)
    p = {n: np.asarray(v, np.float64) for n, v in moe.experts.params().items()}
    sh = {n: np.asarray(v, np.float64) for n, v in moe.shared_expert.params().items()}
    experts, weights = product_key64((xs @ np.asarray(moe.router_weight[...], np.float64)).reshape(G, S, -1), 4,
                                     "token")
    silu = lambda v: v / (1.0 + np.exp(-v))  # noqa: E731
    want = silu(xs @ sh["w_gate"]) * (xs @ sh["w_in"]) @ sh["w_out"]
    for t, (es, ws) in enumerate(zip(experts.reshape(-1, 4), weights.reshape(-1, 4))):
        for e, w in zip(es, ws):
            want[t] += w * silu(xs[t] @ p["w_in"][e]) @ p["w_out"][e]
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, 8), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda: jmoe.MoE(4, 1, 12, k=2, router="product_key", rngs=nnx.Rngs(0)), "num_experts=12 is not a square"),
    (lambda: ProductKey(key_split="rows"), "key_split"),
])
def test_bad_product_key_options_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
