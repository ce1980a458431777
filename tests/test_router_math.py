"""The router math of the newest families against float64 references on random inputs:
sqrt(softplus) scores, the selection bias on the logits, the renormalisation epsilon, a tanh
softcap on the router logits (any router), hash routing by token id, and shared experts
weighted by the router (Inkling's shared-expert sink)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe import parallel
from jmoe.experts import Shared
from jmoe.routing import GroupLimited, SharedSink, TokenHash, TokensChoose, group_limited_top_k

G, S, E = 2, 16, 8


def scores64(logits, score_function):
    if score_function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if score_function == "sqrt_softplus":
        return np.sqrt(np.log1p(np.exp(logits)))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def group_limited64(logits, *, k, score_function, bias, bias_on, normalize, eps, scale, n_group=1, topk_group=1,
                    fill=-np.inf):
    """Per token: choice c (s + b or l + b), groups by the sum of their top-2 c, top-k of c in the
    kept groups, weights s_e (/ (sum s + eps)) * scale. Returns experts, weights [T, k]."""
    s = scores64(logits, score_function)  # [T, E]
    c = (s if bias_on == "scores" else logits) + bias
    experts, weights = [], []
    for t in range(len(c)):
        per_group = E // n_group
        group_scores = [np.sort(c[t, g * per_group:(g + 1) * per_group])[-2:].sum() for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: (-group_scores[g], g))[:topk_group]
        allowed = np.array([e // per_group in kept for e in range(E)])
        ct = np.where(allowed, c[t], fill)
        top = sorted(range(E), key=lambda e: (-ct[e], e))[:k]
        w = s[t, top]
        if normalize:
            w = w / (w.sum() + eps)
        experts.append(top)
        weights.append(w * scale)
    return np.array(experts), np.array(weights)


@pytest.mark.parametrize("score_function, bias_on, normalize, eps, n_group", [
    ("sqrt_softplus", "scores", True, 1e-20, 1),  # DeepSeek-V4's scores
    ("sqrt_softplus", "scores", False, 1e-20, 4),
    ("sigmoid", "logits", True, 1e-20, 1),  # the bias on the logits (Kolibri)
    ("sigmoid", "logits", False, 1e-20, 4),
    ("sigmoid", "scores", True, 0.5, 1),  # a large epsilon, so its place in the formula shows
    ("sigmoid", "scores", True, 1e-6, 2),  # LFM2-MoE's
])
def test_group_limited_math_matches_float64(score_function, bias_on, normalize, eps, n_group):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(G, S, E)) * 2.0
    bias = rng.normal(size=E) * (2.0 if bias_on == "logits" else 0.3)  # large enough to change choices
    k, scale = 3, 2.5
    plan = group_limited_top_k(jnp.asarray(logits, jnp.float32), k=k, capacity=S, score_function=score_function,
                               n_group=n_group, topk_group=2 if n_group > 1 else 1, normalize=normalize,
                               routed_scaling_factor=scale, selection_bias=jnp.asarray(bias, jnp.float32),
                               bias_on=bias_on, normalize_epsilon=eps)
    want_e, want_w = group_limited64(logits.reshape(-1, E), k=k, score_function=score_function, bias=bias,
                                     bias_on=bias_on, normalize=normalize, eps=eps, scale=scale, n_group=n_group,
                                     topk_group=2 if n_group > 1 else 1)
    np.testing.assert_array_equal(np.asarray(plan.token_expert).reshape(-1, k), want_e)
    np.testing.assert_allclose(np.asarray(plan.token_weight, np.float64).reshape(-1, k), want_w, rtol=1e-5)
    unbiased_e, _ = group_limited64(logits.reshape(-1, E), k=k, score_function=score_function, bias=0 * bias,
                                    bias_on=bias_on, normalize=normalize, eps=eps, scale=scale, n_group=n_group,
                                    topk_group=2 if n_group > 1 else 1)
    assert (unbiased_e != want_e).any()  # the bias changed some choices: the test sees where it goes


def test_excluded_groups_filled_with_zero():
    """excluded_fill="zero" (transformers' DeepSeek-V2, AXK-2): with a negative selection bias, a kept
    group's expert whose biased score is < 0 loses to an excluded group's expert (0.0); "-inf" never."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(G, S, E))
    bias = np.where(np.arange(E) % 2 == 0, -1.2, 0.0)  # half the experts' biased scores go negative
    options = dict(k=3, score_function="sigmoid", bias_on="scores", normalize=True, eps=1e-20, scale=1.0, n_group=4,
                   topk_group=2)
    results = {}
    for fill, value in (("zero", 0.0), ("-inf", -np.inf)):
        plan = group_limited_top_k(jnp.asarray(logits, jnp.float32), k=3, capacity=S, score_function="sigmoid",
                                   n_group=4, topk_group=2, normalize=True, excluded_fill=fill,
                                   selection_bias=jnp.asarray(bias, jnp.float32))
        want_e, want_w = group_limited64(logits.reshape(-1, E), bias=bias, fill=value, **options)
        np.testing.assert_array_equal(np.asarray(plan.token_expert).reshape(-1, 3), want_e)
        np.testing.assert_allclose(np.asarray(plan.token_weight, np.float64).reshape(-1, 3), want_w, rtol=1e-5)
        results[fill] = want_e
    assert (results["zero"] != results["-inf"]).any()  # the fill decides some choices


@pytest.mark.parametrize("router", [TokensChoose(k=2, normalize=True, logit_softcap=1.5),
                                    GroupLimited(k=2, score_function="softmax", logit_softcap=1.5)])
def test_logit_softcap_caps_the_logits_every_router_reads(router):
    """logits = c tanh((x W) / c): the choice, the weights and the z-loss read the capped logits."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(G, S, 4))
    w = rng.normal(size=(4, E)) * 2.0  # logits up to ~10: the cap binds
    cap = 1.5
    plan = router.route({"router_weight": jnp.asarray(w, jnp.float32)}, jnp.asarray(x, jnp.float32), {}, None, S)
    capped = cap * np.tanh((x @ w) / cap)  # [G, S, E]
    p = scores64(capped, "softmax").reshape(-1, E)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    want = np.take_along_axis(p, top, -1)
    want = want / want.sum(-1, keepdims=True) if router.normalize else want
    np.testing.assert_array_equal(np.sort(np.asarray(plan.token_expert).reshape(-1, 2), -1), np.sort(top, -1))
    np.testing.assert_allclose(np.sort(np.asarray(plan.token_weight, np.float64).reshape(-1, 2), -1),
                               np.sort(want, -1), rtol=1e-5)
    lse = np.log(np.exp(capped).sum(-1))
    np.testing.assert_allclose(float(plan.z_loss), np.mean(lse ** 2), rtol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: TokensChoose(logit_softcap=0.0), "logit_softcap"),
    (lambda: GroupLimited(logit_softcap=-2.0), "logit_softcap"),
    (lambda: GroupLimited(bias_on="weights"), "bias_on"),
    (lambda: GroupLimited(normalize_epsilon=-1e-6), "normalize_epsilon"),
    (lambda: GroupLimited(score_function="sqrt"), "sqrt_softplus"),
    (lambda: GroupLimited(excluded_fill="0"), "excluded_fill"),
])
def test_bad_router_math_options_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- hash routing by token id


CALL_WITH_IDS = nnx.jit(lambda m, x, ids: m(x, token_ids=ids))  # compiled once a layer structure (not op by op)


def hash_layer(mesh=None, vocab=11, num_experts=8, k=2):
    moe = jmoe.MoE(4, 6, num_experts, k=k, capacity_factor=None, mesh=mesh, activation="relu",
                   router=TokenHash(vocab_size=vocab, score_function="sqrt_softplus", normalize=True,
                                    routed_scaling_factor=1.5), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)  # a table of the checkpoint's kind: k distinct experts per id, not the initial one
    table = np.stack([rng.choice(num_experts, size=k, replace=False) for _ in range(vocab)])
    moe.token_experts[...] = jnp.asarray(table, jnp.int32)
    return moe, table


def test_token_hash_layer_matches_float64():
    """TokenHash: experts = the table's row of the token id, weights = normalised sqrt(softplus)
    scores at those experts x 1.5, against a float64 loop with the layer's weights."""
    moe, table = hash_layer()
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    ids = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    y, aux = CALL_WITH_IDS(moe, x, ids)
    xs, w_r = np.asarray(x, np.float64).reshape(-1, 4), np.asarray(moe.router_weight[...], np.float64)
    w_in, w_out = (np.asarray(getattr(moe.experts, n)[...], np.float64) for n in ("w_in", "w_out"))
    want = np.zeros_like(xs)
    for t, token in enumerate(np.asarray(ids).reshape(-1)):
        s = np.sqrt(np.log1p(np.exp(xs[t] @ w_r)))
        experts = table[token]
        weights = 1.5 * s[experts] / (s[experts].sum() + 1e-20)
        for e, w in zip(experts, weights):
            want[t] += w * np.maximum(xs[t] @ w_in[e], 0.0) @ w_out[e]
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, 4), want, rtol=1e-5, atol=1e-6)
    assert "token_experts" not in nnx.state(moe, nnx.Param)  # a buffer, not a parameter


def test_token_hash_on_a_mesh_matches_one_device():
    """The ids travel with the tokens: on a 2 x 4 (data, expert) mesh, the same output."""
    x = jax.random.normal(jax.random.key(2), (8, 4, 4))
    ids = jax.random.randint(jax.random.key(3), (8, 4), 0, 11)
    one, _ = hash_layer()
    ep, _ = hash_layer(mesh=parallel.make_mesh(data=2, expert=4))
    np.testing.assert_allclose(np.asarray(CALL_WITH_IDS(ep, x, ids)[0]), np.asarray(CALL_WITH_IDS(one, x, ids)[0]),
                               rtol=1e-5, atol=1e-6)


def test_token_hash_needs_token_ids():
    moe, _ = hash_layer()
    x = jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match="routes by token id: call the layer with token_ids="):
        moe(x)
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, vocab_size=11\)"):
        moe(x, token_ids=jnp.full((2, 5), 11))
    with pytest.raises(ValueError, match="token_ids must be integers"):
        moe(x, token_ids=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="token_ids must have shape"):
        moe(x, token_ids=jnp.zeros((2, 4), jnp.int32))
    y, _ = jmoe.MoE(4, 6, 8, k=2, rngs=nnx.Rngs(0))(x, token_ids=jnp.zeros((2, 5), jnp.int32))  # others ignore them
    assert y.shape == x.shape


# ---------------------------------------------------------------- SparseMixer (Phi-3.5-MoE), eval forward


def sparsemixer64(logits, eps):
    """transformers' sparsemixer in eval mode, per token, in float64."""
    experts, weights = [], []
    for scores in logits:
        candidates, chosen, ws = scores.copy(), [], []
        for _ in range(2):
            top = candidates.max()
            e = int(np.argmax(candidates))
            factor = np.maximum(np.abs(scores), top)
            masked = np.where((top - scores) / factor > 2 * eps, -np.inf, candidates)
            p = np.exp(masked - masked.max())
            ws.append(p[e] / p.sum())
            chosen.append(e)
            candidates = candidates.copy()
            candidates[e] = -np.inf
        experts.append(chosen)
        weights.append(ws)
    return np.array(experts), np.array(weights)


@pytest.mark.parametrize("eps", [0.01, 0.2])
def test_sparsemixer_matches_float64(eps):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(G, S, E)) * 0.5 + 1.0  # near each other: the relative threshold matters
    plan = jmoe.routing.SparseMixer(k=2, jitter_eps=eps).plan(jnp.asarray(logits, jnp.float32), None, {}, {}, None, S)
    want_e, want_w = sparsemixer64(logits.reshape(-1, E), eps)
    np.testing.assert_array_equal(np.asarray(plan.token_expert).reshape(-1, 2), want_e)
    np.testing.assert_allclose(np.asarray(plan.token_weight, np.float64).reshape(-1, 2), want_w, rtol=1e-5)
    assert np.any(want_w < 1.0) and (eps > 0.01 or np.any(want_w == 1.0))  # the threshold keeps 1 or several


def test_sparsemixer_needs_k2():
    with pytest.raises(ValueError, match="needs k=2"):
        jmoe.MoE(4, 6, 8, k=1, router="sparsemixer", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="jitter_eps"):
        jmoe.routing.SparseMixer(jitter_eps=0.0)


# ---------------------------------------------------------------- the router's own input, its norm, its scales


def test_normed_router_input_and_per_expert_scales_match_float64():
    """Gemma 4's router: logits = (r / sqrt(mean(r^2) + eps) * g / sqrt(d_r)) W, softmax top-k
    renormalised, each weight times its expert's learned scale ``expert_scale[e]``; r the layer's
    ``router_input`` (here of another width than x), against float64 with the layer's weights."""
    d, d_r, eps = 4, 6, 1e-6
    router = TokensChoose(normalize=True, input_norm_eps=eps, per_expert_scale=True)
    moe = jmoe.MoE(d, 5, E, k=2, capacity_factor=None, activation="relu", router=router, router_d_model=d_r,
                   rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    moe.router_input_scale[...] = jnp.asarray(rng.normal(size=d_r) + 1.0, jnp.float32)
    moe.expert_scale[...] = jnp.asarray(rng.uniform(0.2, 3.0, size=E), jnp.float32)
    moe.router_weight[...] = jnp.asarray(rng.normal(size=(d_r, E)) * 3.0, jnp.float32)
    x = jax.random.normal(jax.random.key(5), (G, S, d))
    r = jax.random.normal(jax.random.key(6), (G, S, d_r)) * 3.0
    y, _ = nnx.jit(lambda m, x, r: m(x, router_input=r))(moe, x, r)
    r64 = np.asarray(r, np.float64).reshape(-1, d_r)
    g, scale = (np.asarray(v[...], np.float64) for v in (moe.router_input_scale, moe.expert_scale))
    logits = (r64 / np.sqrt(np.mean(r64 ** 2, -1, keepdims=True) + eps) * g / np.sqrt(d_r)) @ np.asarray(
        moe.router_weight[...], np.float64)
    p = scores64(logits, "softmax")
    xs = np.asarray(x, np.float64).reshape(-1, d)
    w_in, w_out = (np.asarray(getattr(moe.experts, n)[...], np.float64) for n in ("w_in", "w_out"))
    want = np.zeros_like(xs)
    for t in range(len(xs)):
        top = sorted(range(E), key=lambda e: (-p[t, e], e))[:2]
        for e in top:
            want[t] += p[t, e] / p[t, top].sum() * scale[e] * np.maximum(xs[t] @ w_in[e], 0.0) @ w_out[e]
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, d), want, rtol=1e-5, atol=1e-6)
    plan = moe.route(x, router_input=r)  # the losses read the unscaled probabilities
    np.testing.assert_allclose(float(plan.z_loss), np.mean(np.log(np.exp(logits).sum(-1)) ** 2), rtol=1e-5)


def test_logit_multiplier_scales_the_logits_every_router_reads():
    """Muse Spark: logits = m (x W); sigmoid + selection bias renormalised (epsilon 1e-15) x 1.5."""
    rng = np.random.default_rng(4)
    x, w, bias = rng.normal(size=(G, S, 4)), rng.normal(size=(4, E)), rng.normal(size=E) * 0.3
    router = GroupLimited(k=2, score_function="sigmoid", selection_bias=True, normalize=True,
                          normalize_epsilon=1e-15, routed_scaling_factor=1.5, logit_multiplier=0.7)
    params = {"router_weight": jnp.asarray(w, jnp.float32), "selection_bias": jnp.asarray(bias, jnp.float32)}
    plan = router.route(params, jnp.asarray(x, jnp.float32), {}, None, S)
    experts, weights = group_limited64(0.7 * (x @ w).reshape(-1, E), k=2, score_function="sigmoid", bias=bias,
                                       bias_on="scores", normalize=True, eps=1e-15, scale=1.5)
    np.testing.assert_array_equal(np.sort(np.asarray(plan.token_expert).reshape(-1, 2), -1), np.sort(experts, -1))
    np.testing.assert_allclose(np.sort(np.asarray(plan.token_weight, np.float64).reshape(-1, 2), -1),
                               np.sort(weights, -1), rtol=1e-5)


def test_router_input_on_a_mesh_matches_one_device():
    """The router's own input travels with the tokens: on a 2 x 4 (data, expert) mesh, the same
    output as one device; the layer that needs one says so."""
    router = GroupLimited(score_function="sigmoid", normalize=True, input_norm_eps=1e-6, per_expert_scale=True)
    x = jax.random.normal(jax.random.key(7), (8, 4, 4))
    r = jax.random.normal(jax.random.key(8), (8, 4, 6))

    def make(mesh=None):
        moe = jmoe.MoE(4, 6, E, k=2, capacity_factor=None, router=router, router_d_model=6, mesh=mesh,
                       rngs=nnx.Rngs(0))
        moe.expert_scale[...] = jnp.linspace(0.5, 2.0, E)
        return moe

    one = make()
    forward = nnx.jit(lambda m, x, r: m(x, router_input=r)[0])
    np.testing.assert_allclose(np.asarray(forward(make(parallel.make_mesh(data=2, expert=4)), x, r)),
                               np.asarray(forward(one, x, r)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"router reads an input of its own .*router_input="):
        one(x)
    with pytest.raises(ValueError, match=r"router_input must have shape \(8, 4, 6\)"):
        one(x, router_input=x)


@pytest.mark.parametrize("make, match", [
    (lambda: TokensChoose(input_norm_eps=0.0), "input_norm_eps"),
    (lambda: GroupLimited(logit_multiplier=-1.0), "logit_multiplier"),
    (lambda: jmoe.MoE(4, 6, E, router_d_model=0, rngs=nnx.Rngs(0)), "router_d_model"),
])
def test_bad_router_input_options_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- shared experts weighted by the router


def shared_sink64(logits, shared_logits, *, k, bias, normalize, eps, scale):
    """Per token: top-k of sigmoid(l) + b; D = the k chosen scores + the n shared ones' sigmoid
    (+ eps); routed weights c s_e / D, shared weights c t_i / D (no D without normalize)."""
    s, t = scores64(logits, "sigmoid"), scores64(shared_logits, "sigmoid")  # [T, E], [T, n]
    experts, weights, shared = [], [], []
    for j in range(len(s)):
        top = sorted(range(s.shape[1]), key=lambda e: (-(s[j, e] + bias[e]), e))[:k]
        d = s[j, top].sum() + t[j].sum() + eps if normalize else 1.0
        experts.append(top)
        weights.append(scale * s[j, top] / d)
        shared.append(scale * t[j] / d)
    return np.array(experts), np.array(weights), np.array(shared)


@pytest.mark.parametrize("normalize, eps", [(True, 0.0), (True, 0.5), (False, 0.0)])
def test_shared_sink_weights_match_float64(normalize, eps):
    """SharedSink: the k routed and n shared experts' weights from one normalisation (a large
    epsilon too, so its place shows), times the scaling factor and the learned scale."""
    rng = np.random.default_rng(6)
    x, w, w_s = rng.normal(size=(G, S, 4)), rng.normal(size=(4, E)), rng.normal(size=(4, 3))
    bias = rng.normal(size=E) * 0.3
    router = SharedSink(k=2, shared_experts=3, normalize=normalize, normalize_epsilon=eps, selection_bias=True,
                        learned_scale=True, routed_scaling_factor=1.5)
    params = {"router_weight": w, "shared_router_weight": w_s, "selection_bias": bias, "router_scale": np.array([0.8])}
    route = jax.jit(lambda params, x: router.route(params, x, {}, None, S))
    plan = route(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params), jnp.asarray(x, jnp.float32))
    want_e, want_w, want_s = shared_sink64((x @ w).reshape(-1, E), (x @ w_s).reshape(-1, 3), k=2, bias=bias,
                                           normalize=normalize, eps=eps, scale=1.5 * 0.8)
    np.testing.assert_array_equal(np.asarray(plan.token_expert).reshape(-1, 2), want_e)
    np.testing.assert_allclose(np.asarray(plan.token_weight, np.float64).reshape(-1, 2), want_w, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(plan.shared_weight, np.float64).reshape(-1, 3), want_s, rtol=1e-5)
    if normalize and eps == 0.0:  # the k + n weights share c = 1.5 x 0.8
        np.testing.assert_allclose(want_w.sum(-1) + want_s.sum(-1), 1.2, rtol=1e-12)


def sink_layer(dropless=True):
    """8 SwiGLU experts (k 2) and 3 shared experts of width 2 side by side (Shared(6)), the router
    weighting both; every weight random, the learned scale 0.8."""
    moe = jmoe.MoE(4, 5, E, k=2, capacity_factor=None if dropless else 4.0, eval_capacity_factor=4.0,
                   activation="swiglu", shared=Shared(6), deterministic=True, rngs=nnx.Rngs(0),
                   router=SharedSink(shared_experts=3, normalize=True, normalize_epsilon=0.0, selection_bias=True,
                                     learned_scale=True, routed_scaling_factor=1.5))
    keys = iter(jax.random.split(jax.random.key(9), 16))
    for _, var in nnx.iter_graph(moe):
        if isinstance(var, (nnx.Param, jmoe.SelectionBias)):
            var[...] = 0.5 * jax.random.normal(next(keys), var[...].shape)
    moe.router_scale[...] = jnp.array([0.8])
    return moe


def test_shared_sink_layer_matches_a_float64_loop():
    """y = sum_k w_k FFN_{e_k}(x) + sum_i gamma_i FFN_i^shared(x), shared expert i the hidden units
    2i, 2i + 1 of the shared FFN; against a float64 loop over tokens with the layer's weights (the
    capacity path, nothing dropped; the dropless path's shared expert is the same code, and
    tests/test_hf.py's Inkling record runs it)."""
    moe = sink_layer(dropless=False)
    x = jax.random.normal(jax.random.key(8), (2, 6, 4))
    y, aux = nnx.jit(lambda m, x: m(x))(moe, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), moe.params())
    r, ex, sh = p["router"], p["experts"], p["shared"]
    xs = np.asarray(x, np.float64).reshape(-1, 4)
    experts, weights, gammas = shared_sink64(xs @ r["router_weight"], xs @ r["shared_router_weight"], k=2,
                                             bias=r["selection_bias"], normalize=True, eps=0.0, scale=1.5 * 0.8)

    def swiglu(v, w_gate, w_in, w_out):
        g = v @ w_gate
        return (g / (1.0 + np.exp(-g)) * (v @ w_in)) @ w_out

    want = np.zeros_like(xs)
    for t in range(len(xs)):
        for e, w in zip(experts[t], weights[t]):
            want[t] += w * swiglu(xs[t], ex["w_gate"][e], ex["w_in"][e], ex["w_out"][e])
        for i in range(3):
            units = slice(2 * i, 2 * i + 2)
            want[t] += gammas[t, i] * swiglu(xs[t], sh["w_gate"][:, units], sh["w_in"][:, units], sh["w_out"][units])
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, 4), want, rtol=1e-5, atol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0


def test_shared_expert_weights_on_a_split_hidden_dim():
    """With the shared FFN's hidden dim split over ``model`` (2 devices, 3 shared experts of
    width 2: expert 1's units straddle the devices), each unit still gets its own expert's weight."""
    from jax.sharding import PartitionSpec as P
    from jmoe.experts import shared_ffn
    rng = np.random.default_rng(7)
    params = {n: jnp.asarray(rng.normal(size=shape), jnp.float32)
              for n, shape in (("w_in", (4, 6)), ("w_gate", (4, 6)), ("w_out", (6, 4)))}
    x, weight = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), jnp.asarray(rng.random((5, 3)), jnp.float32)
    mesh = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    specs = {"w_in": P(None, "model"), "w_gate": P(None, "model"), "w_out": P("model", None)}
    split = jax.jit(jax.shard_map(lambda x, p, w: shared_ffn(x, p, "swiglu", "model", w), mesh=mesh,
                                  in_specs=(P(), specs, P()), out_specs=P()))
    one = shared_ffn(x, params, "swiglu", None, weight)
    np.testing.assert_allclose(np.asarray(split(x, params, weight)), np.asarray(one), rtol=1e-5, atol=1e-6)
    unweighted = shared_ffn(x, params, "swiglu")
    assert np.abs(np.asarray(one) - np.asarray(unweighted)).max() > 1e-2


@pytest.mark.parametrize("make, match", [
    (lambda: SharedSink(score_function="softmax"), "elementwise score_function"),
    (lambda: SharedSink(shared_experts=0), "shared_experts"),
    (lambda: jmoe.MoE(4, 5, E, k=2, router=SharedSink(shared_experts=2), rngs=nnx.Rngs(0)), "needs shared=Shared"),
    (lambda: jmoe.MoE(4, 5, E, k=2, router=SharedSink(shared_experts=2), shared=Shared(5), rngs=nnx.Rngs(0)),
     "a multiple of 2"),
])
def test_bad_shared_sink_options_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
