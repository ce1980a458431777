"""Noisy top-k gating (jmoe.routing.noisy, router="noisy_top_k") against hand values, numpy and Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.stats import norm

import jmoe
from jmoe import routing
from jmoe.options import layer_arguments
from jmoe.routing import noisy
from tests.reference import softmax64, tokens_choose_ref

BACKEND_NAMES = ["einsum", "gather"]


def inv_softplus(sigma):
    """The noise logit whose softplus is sigma."""
    return float(np.log(np.expm1(sigma)))


def kth_excluding_ref(v, k):
    """numpy loop: out[i] = k-th largest of v without entry i."""
    return np.array([np.sort(np.delete(v, i))[::-1][k - 1] for i in range(len(v))])


def cv2_ref(v):
    v = np.asarray(v, np.float64)
    return v.var() / (v.mean() ** 2 + 1e-10)


# ---------------------------------------------------------------- small pieces


def test_cv_squared_hand_values():
    cv2 = jax.jit(noisy.cv_squared)
    np.testing.assert_allclose(cv2(jnp.array([1.0, 2.0, 3.0])), 1 / 6, rtol=1e-6)  # var 2/3, mean 2
    np.testing.assert_allclose(cv2(jnp.array([2.0, 0.0, 0.0])), 2.0, rtol=1e-6)  # one expert: E - 1
    assert float(cv2(jnp.array([5.0, 5.0, 5.0, 5.0]))) == 0.0
    assert float(cv2(jnp.zeros(4))) == 0.0  # guarded mean 0: no NaN


@pytest.mark.parametrize("k", [1, 2, 4])
def test_kth_excluding_matches_loop(k):
    v = np.array(jax.random.normal(jax.random.key(k), (6, 5)))
    v[0] = [1.0, 1.0, 1.0, 0.0, 2.0]  # ties
    got = np.asarray(jax.jit(noisy.kth_excluding, static_argnums=1)(jnp.asarray(v), k))
    np.testing.assert_array_equal(got, np.stack([kth_excluding_ref(row, k) for row in v]))


def test_gates_are_softmax_over_top_k():
    h = jax.random.normal(jax.random.key(0), (2, 7, 5)) * 2
    g = np.asarray(jax.jit(noisy.gates, static_argnums=1)(h, 2))
    for row, gate in zip(np.asarray(h).reshape(-1, 5), g.reshape(-1, 5)):
        top = np.argsort(-row, kind="stable")[:2]
        expected = np.zeros(5)
        expected[top] = softmax64(row[top])
        np.testing.assert_allclose(gate, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the plan


def test_plan_is_tokens_choose_on_top_k_logits_with_drops():
    """Eval mode (no noise): slots follow the choice-major reference on KeepTopK(c); weights are G(x)."""
    clean = jax.random.normal(jax.random.key(1), (2, 10, 4)) * 2
    noise_logits = jax.random.normal(jax.random.key(2), (2, 10, 4))
    plan = noisy.noisy_top_k(clean, noise_logits, k=2, capacity=4)
    sparse = np.asarray(clean, np.float64)
    for idx in np.ndindex(sparse.shape[:2]):
        top = np.argsort(-sparse[idx], kind="stable")[:2]
        sparse[idx][np.setdiff1d(np.arange(4), top)] = -np.inf
    slot_token, weights, dropped, requested = tokens_choose_ref(sparse, 2, 4)
    assert dropped > 0  # the case exercises capacity drops
    np.testing.assert_array_equal(plan.slot_token, slot_token)
    gates = softmax64(sparse)  # G(x)
    for (g, s, e), w in weights.items():
        np.testing.assert_allclose(w, gates[g, s, e], rtol=1e-6)
        j = list(np.asarray(plan.token_expert[g, s])).index(e)
        np.testing.assert_allclose(plan.token_weight[g, s, j], gates[g, s, e], rtol=1e-5)
    np.testing.assert_allclose(plan.dropped_fraction, dropped / requested, rtol=1e-6)
    # z-loss from the clean logits (the -inf entries would otherwise be ignored).
    np.testing.assert_allclose(plan.z_loss, routing.z_loss(clean, jnp.ones((2, 10), bool)), rtol=1e-6)


def test_losses_hand_example():
    """2 tokens, 3 experts, k=1, sigma = 1, no noise: CV^2 by hand."""
    clean = jnp.array([[[1.0, 0.0, -1.0], [0.0, 1.0, -1.0]]])  # [1, 2, 3]
    noise_logits = jnp.full((1, 2, 3), inv_softplus(1.0))
    plan = noisy.noisy_top_k(clean, noise_logits, k=1, capacity=2, importance_weight=0.1, load_weight=0.2)
    # G is one-hot on the top expert: Importance = [1, 1, 0], mean 2/3, var 2/9 -> CV^2 = 1/2.
    np.testing.assert_allclose(plan.aux()["importance_loss"], 0.1 * 0.5, rtol=1e-5)
    # P(x, i) = Phi(c_i - max_{j != i} c_j): token 0 -> Phi([1, -1, -2]), token 1 -> Phi([-1, 1, -2]).
    load = np.array([norm.cdf(1) + norm.cdf(-1), norm.cdf(-1) + norm.cdf(1), 2 * norm.cdf(-2)])
    np.testing.assert_allclose(load, [1.0, 1.0, 0.0455], atol=1e-4)
    np.testing.assert_allclose(plan.aux()["load_loss"], 0.2 * cv2_ref(load), rtol=1e-5)
    # A masked-out token leaves both sums: Importance = [1, 0, 0] -> CV^2 = E - 1 = 2.
    masked = noisy.noisy_top_k(clean, noise_logits, k=1, capacity=2, token_mask=jnp.array([[True, False]]))
    np.testing.assert_allclose(masked.aux()["importance_loss"], 0.1 * 2.0, rtol=1e-5)
    np.testing.assert_allclose(masked.aux()["load_loss"], 0.1 * cv2_ref(norm.cdf([1, -1, -2])), rtol=1e-5)


def test_losses_random_example_against_numpy():
    """Train mode: losses recomputed in float64 numpy from the same eps draw."""
    clean = jax.random.normal(jax.random.key(3), (1, 8, 4))
    noise_logits = jax.random.normal(jax.random.key(4), (1, 8, 4))
    rng = jax.random.key(5)
    plan = noisy.noisy_top_k(clean, noise_logits, k=2, capacity=4, rng=rng)
    eps = np.asarray(jax.random.normal(rng, clean.shape, jnp.float32), np.float64)
    c, sigma = np.asarray(clean, np.float64), np.log1p(np.exp(np.asarray(noise_logits, np.float64)))
    h = (c + eps * sigma).reshape(-1, 4)
    gates = np.zeros_like(h)
    load = np.zeros(4)
    for t, row in enumerate(h):
        top = np.argsort(-row)[:2]
        gates[t, top] = softmax64(row[top])
        load += norm.cdf((c.reshape(-1, 4)[t] - kth_excluding_ref(row, 2)) / sigma.reshape(-1, 4)[t])
    np.testing.assert_allclose(plan.aux()["importance_loss"], 0.1 * cv2_ref(gates.sum(0)), rtol=1e-4)
    np.testing.assert_allclose(plan.aux()["load_loss"], 0.1 * cv2_ref(load), rtol=1e-4)


# ---------------------------------------------------------------- smooth load vs Monte Carlo


def test_smooth_load_matches_monte_carlo():
    """E_eps[P(x, i)] = Pr(i in noisy top k): mean smooth estimate vs counted membership, fixed x."""
    num_draws, k = 20000, 2
    clean = jnp.array([[[1.0, 0.5, 0.0, -0.5, 0.2], [0.0, 0.0, 0.3, 1.5, -1.0], [2.0, -2.0, 0.1, 0.1, 0.0]]])
    noise_logits = jnp.array([[[0.0, 0.5, -1.0, 0.0, 1.0], [-0.5, 0.0, 0.5, -2.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]]])

    @jax.jit
    def both(key):
        eps = jax.random.normal(key, (num_draws,) + clean.shape)  # [N, 1, S, E]
        h = noisy.noisy_logits(clean, noise_logits, eps)  # [N, 1, S, E]
        counted = jnp.mean(noisy.top_k_mask(h, k).astype(jnp.float32), axis=0)  # [1, S, E]
        smooth = jnp.mean(noisy.prob_in_top_k(clean, h, noise_logits, k), axis=0)  # [1, S, E]
        return counted[0], smooth[0]

    counted, smooth = (np.asarray(a, np.float64) for a in both(jax.random.key(0)))
    p = np.clip(smooth, 1e-3, 1 - 1e-3)
    stderr = np.sqrt(p * (1 - p) / num_draws)  # of the count; the smooth mean varies less
    assert np.all(np.abs(counted - smooth) < 5 * stderr + 1e-3), np.abs(counted - smooth) / stderr
    # Load = sum over tokens; each token's probabilities sum to k in expectation.
    np.testing.assert_allclose(smooth.sum(-1), k, atol=0.02)
    assert np.all(np.abs(counted.sum(0) - smooth.sum(0)) < 0.03)


def test_prob_in_top_k_is_the_conditional_probability():
    """With the other entries of H fixed, redraw eps_i only: membership frequency = P(x, i)."""
    num_draws, k = 20000, 2
    rng = np.random.default_rng(0)
    c, sigma = rng.normal(size=5), np.array([0.5, 1.0, 2.0, 0.8, 1.2])
    h = c + rng.normal(size=5) * sigma
    p = np.asarray(jax.jit(noisy.prob_in_top_k, static_argnums=3)(
        jnp.asarray(c, jnp.float32), jnp.asarray(h, jnp.float32),
        jnp.asarray(np.log(np.expm1(sigma)), jnp.float32), k))
    for i in range(5):
        draws = np.tile(h, (num_draws, 1))
        draws[:, i] = c[i] + rng.normal(size=num_draws) * sigma[i]
        rank = np.sum(draws > draws[:, i : i + 1], axis=1)  # entries above i
        freq = np.mean(rank < k)
        assert abs(freq - p[i]) < 5 * np.sqrt(max(p[i] * (1 - p[i]), 1e-4) / num_draws), (i, freq, p[i])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(k=5), "k=5"), (dict(k=0), "k=0"), (dict(importance_weight=-0.1), "importance_weight"),
     (dict(load_weight=-1.0), "load_weight")],
)
def test_router_bad_arguments(kwargs, match):
    logits = jnp.zeros((1, 4, 4))
    args = dict(k=2, capacity=2) | kwargs
    with pytest.raises(ValueError, match=match):
        noisy.noisy_top_k(logits, logits, **args)
    with pytest.raises(ValueError, match="noise_logits"):
        noisy.noisy_top_k(logits, jnp.zeros((1, 4, 3)), k=2, capacity=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(router="noisy_top_k", importance_loss_weight=-0.1), "importance_loss_weight"),
        (dict(router="noisy_top_k", load_loss_weight=-0.1), "load_loss_weight"),
        (dict(router="tokens_choose", load_loss_weight=0.1), "needs router='noisy_top_k'"),
        (dict(router="noisy_top_k", k=2, second_expert_policy="random"), "second_expert_policy"),
        (dict(router="noisy_top_k", k=3), "k=3"),
    ],
)
def test_layer_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jmoe.MoE(4, 8, 2, rngs=nnx.Rngs(0), **layer_arguments(kwargs))  # flat keys, as a config's


# ---------------------------------------------------------------- the layer


def make_layer(dispatch="gather", **kwargs):
    return jmoe.MoE(8, 12, 4, k=2, router="noisy_top_k", capacity_factor=1.0, activation="swiglu",
                    dispatch=dispatch, rngs=nnx.Rngs(0), **kwargs)


def test_aux_has_the_same_structure_for_every_router():
    """The layer returns ``complete_aux(plan.aux())``: same keys for every router, noisy losses 0 for the others."""
    logits = jax.random.normal(jax.random.key(0), (1, 8, 4))
    auxes = {
        "tokens_choose": routing.tokens_choose(logits, k=2, capacity=4).aux(),
        "experts_choose": routing.experts_choose(logits, capacity=4).aux(),
        "noisy_top_k": noisy.noisy_top_k(logits, logits, k=2, capacity=4, rng=jax.random.key(1)).aux(),
    }
    auxes = {router: routing.complete_aux(aux) for router, aux in auxes.items()}
    for router, aux in auxes.items():
        assert jax.tree.structure(aux) == jax.tree.structure(auxes["noisy_top_k"]), router
        if router != "noisy_top_k":
            assert float(aux["importance_loss"]) == 0.0 and float(aux["load_loss"]) == 0.0
        else:
            assert float(aux["importance_loss"]) > 0 and float(aux["load_loss"]) > 0


route = nnx.jit(lambda model, groups: model.route(groups))


def test_eval_is_deterministic_and_noise_free():
    """The router is the layer's only random part: in eval mode its plan is fixed and noise-free."""
    moe = make_layer()
    groups = jax.random.normal(jax.random.key(1), (2, 16, 8))
    train_1, train_2 = route(moe, groups), route(moe, groups)
    assert not np.allclose(train_1.token_weight, train_2.token_weight)  # fresh noise every train call
    moe.eval()
    eval_1, eval_2 = route(moe, groups), route(moe, groups)
    for a, b in zip(jax.tree.leaves(eval_1), jax.tree.leaves(eval_2)):
        np.testing.assert_array_equal(a, b)
    # Eval = the plan of the clean logits, no noise.
    plan = noisy.noisy_top_k(groups @ moe.router_weight[...], groups @ moe.noise_weight[...], k=2,
                             capacity=moe.capacity(16))
    np.testing.assert_array_equal(eval_1.slot_token, plan.slot_token)
    np.testing.assert_allclose(eval_1.token_weight, plan.token_weight, rtol=1e-6)
    np.testing.assert_allclose(eval_1.aux()["load_loss"], plan.aux()["load_loss"], rtol=1e-6)


@nnx.jit
def loss_and_grads(model, x):
    def loss(model, x):
        y, aux = model(x)
        return jnp.sum(jnp.sin(y)) + aux["importance_loss"] + aux["load_loss"] + aux["z_loss"], y

    (_, y), (g_model, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, g_model, g_x


def test_backends_agree_forward_and_gradients_train_mode():
    x = jax.random.normal(jax.random.key(7), (2, 16, 8))
    results = {b: loss_and_grads(make_layer(dispatch=b), x) for b in BACKEND_NAMES}  # same seed: same noise
    (y_e, gm_e, gx_e), (y_g, gm_g, gx_g) = results["einsum"], results["gather"]
    np.testing.assert_allclose(y_e, y_g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx_e, gx_g, rtol=1e-4, atol=1e-6)
    for name in ("router_weight", "noise_weight"):
        a, b = gm_e[name][...], gm_g[name][...]
        assert np.all(np.isfinite(a)) and float(jnp.max(jnp.abs(a))) > 0, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for name in ("w_in", "w_gate", "w_out"):
        np.testing.assert_allclose(gm_e["experts"][name][...], gm_g["experts"][name][...], rtol=1e-4, atol=1e-6)


def test_load_loss_alone_reaches_both_logits():
    """d load_loss / d (x W_g) and d (x W_noise) are finite and non-zero (so are the weight gradients)."""
    clean = jax.random.normal(jax.random.key(3), (1, 8, 4))
    noise_logits = jax.random.normal(jax.random.key(4), (1, 8, 4))
    grad = jax.jit(jax.grad(
        lambda c, n: noisy.noisy_top_k(c, n, k=2, capacity=4, rng=jax.random.key(5)).aux()["load_loss"], argnums=(0, 1)))
    for name, g in zip(("clean", "noise"), grad(clean, noise_logits)):
        assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0, name


# ---------------------------------------------------------------- the losses even out the load


def test_losses_even_out_a_skewed_load():
    """Inputs clustered around one point send nearly every token to the same 2 of 4 experts.

    60 Adam steps on a regression task, with and without the two losses (same
    seeds): CV^2 of the hard (clean top-k) load must fall much lower with them.
    """
    d, num_experts, k, n, steps = 8, 4, 2, 256, 60
    mu = 2.0 * jax.random.normal(jax.random.key(2), (d,))
    x = mu + 0.5 * jax.random.normal(jax.random.key(1), (n, d))  # [N, d]
    target = jnp.tanh(0.5 * x @ jax.random.normal(jax.random.key(3), (d, d)))  # [N, d]
    tx = optax.adam(1e-2)

    def hard_load_cv2(params):
        chosen = noisy.top_k_mask(x @ params["router_weight"][...], k).astype(jnp.float32)  # [N, E]
        return noisy.cv_squared(jnp.sum(chosen, axis=0))

    @jax.jit(static_argnames="graphdef")
    def train(graphdef, params, rest, use_losses):
        def loss_fn(model):
            y, aux = model(x)
            return jnp.mean((y - target) ** 2) + use_losses * (aux["importance_loss"] + aux["load_loss"])

        def step(carry, _):
            params, rest, opt_state = carry
            model = nnx.merge(graphdef, params, rest)
            grads = nnx.grad(loss_fn)(model)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, rest, opt_state), hard_load_cv2(params)

        _, history = jax.lax.scan(step, (params, rest, tx.init(params)), length=steps)
        return jnp.concatenate([hard_load_cv2(params)[None], history])  # [steps + 1]

    finals = {True: [], False: []}
    for seed in range(3):
        for use_losses in (True, False):
            moe = jmoe.MoE(d, 16, num_experts, k=k, router="noisy_top_k", capacity_factor=2.0, group_size=n,
                           rngs=nnx.Rngs(seed))
            history = np.asarray(train(*nnx.split(moe, nnx.Param, ...), jnp.float32(use_losses)))
            assert history[0] > 0.5  # skewed at the start
            finals[use_losses].append(history[-1])
    with_losses, without = np.mean(finals[True]), np.mean(finals[False])
    print(f"hard-load CV^2 after {steps} steps: with losses {finals[True]}, without {finals[False]}")
    assert with_losses < 0.25 * without, (finals[True], finals[False])


def test_z_loss_is_from_the_clean_logits_in_train_mode():
    """With noise drawn, the z-loss is still mean(logsumexp(c)^2) of the clean logits c = x W_g,
    computed here by hand in float64; the noisy logits H would give another value."""
    clean = jax.random.normal(jax.random.key(11), (2, 16, 4)) * 2
    noise_logits = jnp.full((2, 16, 4), inv_softplus(3.0))  # sigma = 3: H far from c
    eps = jax.random.normal(jax.random.key(12), (2, 16, 4))
    plan = noisy.noisy_top_k(clean, noise_logits, k=2, capacity=16, eps=eps)
    c = np.asarray(clean, np.float64)
    h = c + np.asarray(eps, np.float64) * 3.0

    def z(v):
        m = v.max(-1, keepdims=True)
        return float(np.mean((np.log(np.exp(v - m).sum(-1)) + m[..., 0]) ** 2))

    assert abs(z(h) - z(c)) > 0.1 * z(c)  # the case tells the two apart
    np.testing.assert_allclose(float(plan.z_loss), z(c), rtol=1e-5)


def test_load_loss_stays_finite_where_the_noise_std_underflows():
    """A noise weight driven far negative makes softplus(x W_noise) underflow to 0 in float32:
    the load loss divides by sigma, so sigma is held at MIN_NOISE_STD or more. The loss, P(x, i)
    and the gradients to both logits stay finite, with a token whose clean logit ties the
    threshold (0 / 0 without the floor)."""
    clean = jnp.array([[[1.0, 1.0, 0.0, -1.0], [2.0, 0.5, 0.5, 0.5], [0.3, -0.2, 0.1, 0.0]]])  # [1, 3, 4], ties
    noise_logits = jnp.full(clean.shape, -200.0)  # softplus(-200) == 0 in float32
    assert float(noisy.noise_std(noise_logits).max()) == 0.0  # the case: sigma has underflowed

    def load_loss(clean, noise_logits):
        h = noisy.noisy_logits(clean, noise_logits, jnp.zeros_like(clean))
        return noisy.balance_loss(noisy.smooth_load(clean, h, noise_logits, 2), 0.1)

    p = noisy.prob_in_top_k(clean, clean, noise_logits, 2)
    assert np.isfinite(np.asarray(p)).all() and (np.asarray(p) >= 0).all() and (np.asarray(p) <= 1).all()
    value, grads = jax.value_and_grad(load_loss, (0, 1))(clean, noise_logits)
    assert np.isfinite(float(value))
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
