"""Zero-computation experts (LongCat-Flash): identity and constant experts routed like the FFN
experts, against a float64 loop over tokens; one device == a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe import parallel
from jmoe.routing import TokensChoose

D, F, E = 4, 6, 4


def zero_layer(capacity_factor, mesh=None):
    moe = jmoe.MoE(D, F, E, k=2, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor or 1.0,
                   zero_experts=jmoe.ZeroExperts(identity=1, constant=2), activation="relu", deterministic=True,
                   router=TokensChoose(normalize=True, router_bias=True), mesh=mesh, rngs=nnx.Rngs(0))
    moe.router_bias[...] = jnp.array([0.0, 0.0, 0.0, 0.0, 0.8, 0.8, 0.8])  # the zero-computation experts get chosen
    moe.zero_constants[...] = jax.random.normal(jax.random.key(9), (2, D))
    return moe


def reference(moe, x):
    """y[t] = sum over the top-2 of softmax(x W_r + b) of w_e * (FFN_e(x) | x | c_{e - 5})."""
    p = {n: np.asarray(v, np.float64) for n, v in moe.params()["router"].items()}
    w = {n: np.asarray(v, np.float64) for n, v in moe.experts.params().items()}
    xs = np.asarray(x, np.float64).reshape(-1, D)
    want = np.zeros_like(xs)
    counts = np.zeros(E + 3)
    for t, xt in enumerate(xs):
        logits = xt @ p["router_weight"] + p["router_bias"]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = np.argsort(-probs, kind="stable")[:2]
        for e in top:
            counts[e] += 1
            weight = probs[e] / probs[top].sum()
            out = (np.maximum(xt @ w["w_in"][e], 0.0) @ w["w_out"][e] if e < E else
                   xt if e == E else p["zero_constants"][e - E - 1])
            want[t] += weight * out
    return want.reshape(x.shape), counts


@pytest.mark.parametrize("capacity_factor", [3.5, None], ids=["capacity", "dropless"])
def test_zero_computation_experts_match_float64(capacity_factor):
    moe = zero_layer(capacity_factor)
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    y, aux = moe(x)
    want, counts = reference(moe, x)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), counts)  # [E + 3]: zero experts counted
    assert counts[E] > 0 and counts[E + 1:].sum() > 0 and counts[:E].sum() > 0  # every kind was chosen
    assert float(aux["dropped_fraction"]) == 0.0


def test_zero_computation_experts_on_a_mesh_match_one_device():
    x = jax.random.normal(jax.random.key(2), (8, 8, D))
    forward = nnx.jit(lambda m, x: m(x))
    want, _ = forward(zero_layer(1.0), x)  # the capacity path: the plan sliced to the FFN experts, sharded over the mesh
    got, _ = forward(zero_layer(1.0, mesh=parallel.make_mesh(data=2, expert=4)), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bad_zero_experts_are_clear_errors():
    with pytest.raises(ValueError, match="identity >= 1 or constant >= 1"):
        jmoe.ZeroExperts()
    with pytest.raises(ValueError, match="ZeroExperts.constant must be"):
        jmoe.ZeroExperts(identity=1, constant=-1)
