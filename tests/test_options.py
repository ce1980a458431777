"""The layer's options as objects: a router object or name, an activation, a shared expert; a
user-written router plugged in without editing jmoe; flat options (a config's) translated by
``layer_arguments``; ``sow_aux`` without Flax's deprecation warning."""

import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe.options import layer_arguments
from jmoe.routing import GroupLimited, TokensChoose

D = 16


def readme_namespace() -> dict:
    """The README snippet that defines the user-written ``PositionHash`` router, run as written."""
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    snippet = next(s for s in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "class PositionHash" in s)
    namespace = {"jax": jax, "jmoe": jmoe, "nnx": nnx}
    exec(compile(snippet, "README.md", "exec"), namespace)
    return namespace


def gelu64(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def test_a_user_written_hash_router_plugs_into_the_layer():
    """README's PositionHash (expert (s k + j) mod E, weight 1 / k) in jmoe.MoE, against a float64
    loop over tokens with the layer's own expert weights; a masked token gets 0 and takes no slot."""
    router = readme_namespace()["PositionHash"]()
    num_experts, k, seq = 4, 2, 8
    moe = jmoe.MoE(D, 24, num_experts, k=k, router=router, capacity_factor=1.0, rngs=nnx.Rngs(3))
    assert moe.router.k == k  # bound by the layer
    x = jax.random.normal(jax.random.key(1), (3, seq, D))
    mask = jnp.ones((3, seq), bool).at[1, 5].set(False)
    y, aux = nnx.jit(lambda m, x, mask: m(x, token_mask=mask))(moe, x, mask)
    w_in = np.asarray(moe.experts.w_in[...], np.float64)  # [E, d, f]
    w_out = np.asarray(moe.experts.w_out[...], np.float64)  # [E, f, d]
    xs = np.asarray(x, np.float64)
    want = np.zeros_like(xs)
    for b in range(3):
        for s in range(seq):
            if not mask[b, s]:
                continue
            for j in range(k):
                e = (s * k + j) % num_experts
                want[b, s] += gelu64(xs[b, s] @ w_in[e]) @ w_out[e] / k
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0  # C = k S / E: every expert's slots exactly filled


def test_a_router_object_and_its_flat_options_make_the_same_layer():
    flat = dict(router="group_limited", n_group=2, topk_group=1, normalize=True, routed_scaling_factor=2.0,
                selection_bias=True, shared_d_ff=8, shared_gate=True, shared_activation="relu2",
                activation="clamped_swiglu", swiglu_limit=3.0, zero_identity=2)
    objects = dict(router=GroupLimited(n_group=2, topk_group=1, normalize=True, routed_scaling_factor=2.0,
                                       selection_bias=True),
                   shared=jmoe.Shared(8, gate=True, activation="relu2"),
                   activation=jmoe.Activation("clamped_swiglu", swiglu_limit=3.0),
                   zero_experts=jmoe.ZeroExperts(identity=2))
    assert layer_arguments(flat) == objects
    x = jax.random.normal(jax.random.key(0), (2, 4, D))
    forward = nnx.jit(lambda m, x: m(x))  # one compile: both layers have one structure
    y1, _ = forward(jmoe.MoE(D, 12, 8, k=2, rngs=nnx.Rngs(0), **layer_arguments(flat)), x)
    y2, _ = forward(jmoe.MoE(D, 12, 8, k=2, rngs=nnx.Rngs(0), **objects), x)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


def test_k_is_the_layers_and_the_objects_are_checked():
    moe = jmoe.MoE(D, 12, 4, k=2, router=TokensChoose(normalize=True), rngs=nnx.Rngs(0))
    assert moe.router == TokensChoose(k=2, normalize=True)
    jmoe.MoE(D, 12, 4, k=2, router=moe.router, rngs=nnx.Rngs(0))  # the same k: fine
    with pytest.raises(ValueError, match="k is the layer's"):
        jmoe.MoE(D, 12, 4, k=2, router=TokensChoose(k=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs k=2"):  # the router's own k checks run once it is bound
        jmoe.MoE(D, 12, 4, k=1, router=TokensChoose(second_expert_policy="random"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="router must be one of"):
        jmoe.MoE(D, 12, 4, router="hash", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="router must be a name"):
        jmoe.MoE(D, 12, 4, router=object(), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="activation must be"):
        jmoe.MoE(D, 12, 4, activation=3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="shared must be a jmoe.experts.Shared"):
        jmoe.MoE(D, 12, 4, shared=32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="go on the router object"):
        layer_arguments(dict(router=TokensChoose(), normalize=True))


def test_a_shared_expert_with_its_own_activation():
    """Shared(F, activation="relu") beside swiglu experts: the layer's output minus the same layer's
    without a shared expert (same seed: same router and expert weights) is relu(x W_in) W_out."""
    x = jax.random.normal(jax.random.key(2), (2, 6, D))
    with_shared = jmoe.MoE(D, 12, 4, k=2, activation="swiglu", shared=jmoe.Shared(10, activation="relu"),
                           rngs=nnx.Rngs(0))
    without = jmoe.MoE(D, 12, 4, k=2, activation="swiglu", rngs=nnx.Rngs(0))
    assert not hasattr(with_shared.shared_expert, "w_gate")  # relu: not gated
    y1, _ = with_shared(x)
    y0, _ = without(x)
    xs = np.asarray(x, np.float64).reshape(-1, D)
    w_in = np.asarray(with_shared.shared_expert.w_in[...], np.float64)
    w_out = np.asarray(with_shared.shared_expert.w_out[...], np.float64)
    want = (np.maximum(xs @ w_in, 0.0) @ w_out).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y1, np.float64) - np.asarray(y0, np.float64), want, rtol=1e-5, atol=1e-5)


def test_sow_aux_raises_no_deprecation_warning():
    """Under nnx.capture (Flax's way), outside it, and through nnx.bridge.ToLinen: no warning, and the
    sown values are the returned aux."""
    x = jax.random.normal(jax.random.key(1), (2, 4, D))
    model = nnx.Sequential(jmoe.MoE(D, 12, 4, k=2, sow_aux=True, rngs=nnx.Rngs(params=0)))
    _, aux = jmoe.MoE(D, 12, 4, k=2, rngs=nnx.Rngs(params=0))(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        _, sown = nnx.capture(model, nnx.Intermediate)(x)
        captured = jmoe.sown_aux(sown)
        model(x)
        model(x)  # two calls outside a capture: two entries each, summed
        kept = jmoe.sown_aux(model)
        linen = nnx.bridge.ToLinen(jmoe.MoE, args=(D, 12, 4), kwargs={"sow_aux": True})
        variables = linen.init({"params": jax.random.key(0)}, x)
        linen.apply(variables, x, mutable=["intermediates"])
    np.testing.assert_allclose(captured["z_loss"], aux["z_loss"], rtol=1e-6)
    np.testing.assert_allclose(kept["z_loss"], 2 * aux["z_loss"], rtol=1e-6)
    assert jmoe.sown_aux(model) == {}  # popped
