"""SparseMixer (Phi-3.5-MoE, ``router="sparsemixer"``) in train mode: each round's expert sampled,
Heun's third-order weight scale and the gradient estimator; against transformers' train-mode
``sparsemixer`` with its recorded draws (tests/data/hf/phimoe_train/), a float64 reference on fresh
random inputs, and the sampling distribution the paper defines."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe.routing import SparseMixer, TokensChoose
from jmoe.routing.sparsemixer import sparsemixer_top2

RECORD = pathlib.Path(__file__).parent / "data" / "hf" / "phimoe_train" / "sparsemixer_train.npz"


def weights_and_grad(logits, eps, gumbel, uniform, cotangent):
    """jmoe's experts, weights and d sum(weights * cotangent) / d logits (float32)."""
    def loss(l):
        experts, weights = sparsemixer_top2(l, eps, gumbel, uniform)
        return jnp.sum(weights * cotangent), (experts, weights)
    grad, (experts, weights) = jax.jit(jax.grad(loss, has_aux=True))(jnp.asarray(logits, jnp.float32))
    return np.asarray(experts), np.asarray(weights, np.float64), np.asarray(grad, np.float64)


def test_train_mode_matches_transformers_with_its_draws():
    """transformers 5.25's ``sparsemixer(training=True)``: the same sampled experts, weights and
    gradient (``PhimoeMultiplier``'s backward) given the Gumbel noise and uniforms it drew."""
    r = np.load(RECORD)
    experts, weights, grad = weights_and_grad(r["logits"], float(r["jitter_eps"]), jnp.asarray(r["gumbel"]),
                                              jnp.asarray(r["uniform"]), jnp.asarray(r["cotangent"]))
    np.testing.assert_array_equal(experts, r["experts"])
    np.testing.assert_allclose(weights, r["weights"], rtol=2e-6)
    np.testing.assert_allclose(grad, r["grad"], rtol=1e-5, atol=1e-7)
    assert np.any(experts[:, 0] != r["logits"].argmax(-1))  # sampled off the argmax: the draws matter


def sparsemixer_train64(logits, eps, gumbel, uniform, cotangent):
    """The train-mode rounds per token in float64: experts, weights (forward) and the estimator's
    gradient sum_r cot_r pi_r[e_r] (onehot(e_r) - pi_r) with respect to the logits."""
    experts, weights, grads = [], [], []
    for l, g, u, c in zip(logits, gumbel, uniform, cotangent):
        candidates, chosen, ws, grad = l.copy(), [], [], np.zeros_like(l)
        for r in range(2):
            top, best = candidates.max(), int(np.argmax(candidates))
            masked = np.where((top - l) / np.maximum(np.abs(l), top) > 2 * eps, -np.inf, candidates)
            pi = np.exp(masked - masked.max())
            pi /= pi.sum()
            e = int(np.argmax(masked + g[r]))
            scale = 1.0 if (e == best or u[r] > 0.75) else 0.3333
            ws.append(scale * pi[e])
            grad += c[r] * pi[e] * (np.eye(len(l))[e] - pi)
            chosen.append(e)
            candidates = candidates.copy()
            candidates[e] = -np.inf
        experts.append(chosen)
        weights.append(ws)
        grads.append(grad)
    return np.array(experts), np.array(weights), np.array(grads)


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_train_mode_matches_float64(eps):
    rng = np.random.default_rng(7)
    T, E = 256, 8
    logits = rng.normal(size=(T, E)) * 0.5 + 1.0
    gumbel, uniform, cotangent = rng.gumbel(size=(T, 2, E)), rng.random((T, 2)), rng.normal(size=(T, 2))
    experts, weights, grad = weights_and_grad(logits, eps, jnp.asarray(gumbel, jnp.float32),
                                              jnp.asarray(uniform, jnp.float32), jnp.asarray(cotangent, jnp.float32))
    want_e, want_w, want_g = sparsemixer_train64(logits, eps, gumbel, uniform, cotangent)
    np.testing.assert_array_equal(experts, want_e)
    np.testing.assert_allclose(weights, want_w, rtol=1e-5)
    np.testing.assert_allclose(grad, want_g, rtol=1e-4, atol=1e-6)
    if eps > 0.01:  # the estimator at work: sampled off the best, weights scaled by 0.3333
        off_best = want_e[:, 0] != logits.argmax(-1)
        assert np.any(off_best & (uniform[:, 0] <= 0.75)) and np.any(off_best & (uniform[:, 0] > 0.75))


def test_sampling_follows_the_masked_softmax():
    """The paper's sampling: round 1's expert is distributed as pi = softmax over the logits within
    2 eps of the best (the others never chosen); the Heun scale is 1 w.p. 1/4 off the best."""
    logits = np.array([1.0, 0.98, 0.95, 0.5, 0.2, 1.0 - 1e-3, -0.3, 0.85])  # 0.85: just outside 2 eps
    eps, T = 0.05, 20_000
    keys = iter(jax.random.split(jax.random.key(0), 8))
    draws = SparseMixer(k=2, jitter_eps=eps).draw(lambda: next(keys), (1, T, 4), 8)  # the router's own draws
    experts, weights = jax.jit(sparsemixer_top2, static_argnums=1)(
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (1, T, 8)), eps, draws["gumbel"], draws["heun_uniform"])
    first = np.asarray(experts)[0, :, 0]
    kept = (logits.max() - logits) / np.maximum(np.abs(logits), logits.max()) <= 2 * eps
    pi = np.where(kept, np.exp(logits), 0.0)
    pi /= pi.sum()
    frequency = np.bincount(first, minlength=8) / T
    np.testing.assert_allclose(frequency, pi, atol=4 * np.sqrt(0.25 / T))
    assert np.all(frequency[~kept] == 0) and kept.sum() >= 3
    off_best = first != 0
    w = np.asarray(weights)[0, :, 0]
    full = np.isclose(w[off_best], pi[first[off_best]], rtol=1e-5)
    assert abs(full.mean() - 0.25) < 0.03  # the rest are scaled by 0.3333
    np.testing.assert_allclose(w[off_best][~full], 0.3333 * pi[first[off_best]][~full], rtol=1e-5)


def test_layer_samples_in_train_mode():
    """A layer in train mode draws its routing (two calls differ) and its router gets a finite,
    nonzero gradient through the estimator."""
    moe = jmoe.MoE(4, 6, 8, k=2, capacity_factor=2.0, activation="relu", router=SparseMixer(jitter_eps=0.2),
                   rngs=nnx.Rngs(params=0, router=1))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 4)), jnp.float32)
    step = nnx.jit(nnx.value_and_grad(lambda m, x: jnp.sum(m(x)[0] ** 2)))
    (first, grads), (second, _) = step(moe, x), step(moe, x)
    assert float(first) != float(second)
    assert np.all(np.isfinite(np.asarray(grads.router_weight[...])))
    assert np.any(np.asarray(grads.router_weight[...]) != 0)


def test_jitter_experts_jitters_the_experts_input_with_the_routers_draw():
    """``jitter_experts=True`` (Phi-3.5-MoE's input_jitter_noise): the experts read x * j, j the
    router's own jitter draw; eval mode (no draws) reads x; an error without jitter."""
    router = SparseMixer(k=2, jitter=0.1, jitter_experts=True)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 3)), jnp.float32)
    keys = iter(jax.random.split(jax.random.key(2), 8))
    draws = router.draw(lambda: next(keys), x.shape, 8)
    plan = None  # returned as it is (no scale_expert_input)
    seen, _ = router.expert_inputs(x, plan, draws)
    np.testing.assert_allclose(np.asarray(seen), np.asarray(x * draws["jitter"]), rtol=1e-6)
    assert not np.allclose(np.asarray(seen), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(router.expert_inputs(x, plan, {})[0]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(TokensChoose(k=1, jitter=0.1).expert_inputs(x, plan, draws)[0]),
                                  np.asarray(x))  # the router's input alone, by default
    with pytest.raises(ValueError, match="jitter_experts=True .* needs jitter > 0"):
        SparseMixer(jitter_experts=True)


def test_phimoe_input_jitter_is_the_blocks():
    """Phi-3.5-MoE's ``input_jitter_noise`` jitters the block's input in train mode: the router's
    jitter with ``jitter_experts`` (``router_jitter_noise`` stays SparseMixer's eps)."""
    import json

    import jmoe.hf as hf
    config = json.loads((RECORD.parent.parent / "phimoe" / "config.json").read_text())
    router = hf.moe_kwargs(dict(config, input_jitter_noise=0.01))["router"]
    assert (router.jitter, router.jitter_experts, router.jitter_eps) == (0.01, True, 0.2)
    assert hf.moe_kwargs(dict(config, input_jitter_noise=0.0))["router"].jitter == 0.0
