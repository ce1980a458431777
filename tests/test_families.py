"""Today's MoE families (issue 20): the group-limited sigmoid / softmax router with a
selection bias, router bias, input-scaled experts, shared experts, gated-FFN biases, the
clamped SwiGLU, the balance losses and aux-loss-free balancing.

References are float64 numpy, written from the formulas (DeepSeek-V2/V3, Qwen2-MoE,
GPT-OSS, Llama 4), never from jmoe's code: the router on hand-made cases and random
logits, and the whole layer as a loop over tokens and their experts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jmoe
from jmoe import parallel
from jmoe.experts import Activation, OutputNorm, Shared
from jmoe.options import layer_arguments
from jmoe.routing import GroupLimited, TokensChoose, group_limited_top_k
from tests.test_parallel import assert_tree_close

D, F = 16, 24


# ----------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------


def sigmoid64(z):
    return 1.0 / (1.0 + np.exp(-z))


def scores64(logits, score_function):
    logits = np.asarray(logits, np.float64)
    if score_function == "sigmoid":
        return sigmoid64(logits)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def group_limited_ref(logits, *, k, n_group=1, topk_group=1, group_score="top2_sum", score_function="sigmoid",
                      normalize=False, scale=1.0, bias=None):
    """One token at a time: (experts [T, k], weights [T, k]) by the DeepSeek recipe."""
    logits = np.asarray(logits, np.float64).reshape(-1, np.shape(logits)[-1])
    num_tokens, num_experts = logits.shape
    per = num_experts // n_group
    experts = np.zeros((num_tokens, k), np.int64)
    weights = np.zeros((num_tokens, k))
    for t in range(num_tokens):
        s = scores64(logits[t], score_function)
        c = s + (0.0 if bias is None else np.asarray(bias, np.float64))
        allowed = set(range(num_experts))
        if n_group > 1 and topk_group < n_group:
            group_scores = []
            for g in range(n_group):
                members = sorted(c[g * per:(g + 1) * per], reverse=True)
                group_scores.append(members[0] + members[1] if group_score == "top2_sum" else members[0])
            kept = sorted(range(n_group), key=lambda g: (-group_scores[g], g))[:topk_group]
            allowed = {e for g in kept for e in range(g * per, (g + 1) * per)}
        chosen = sorted(allowed, key=lambda e: (-c[e], e))[:k]
        w = s[chosen]
        if normalize:
            w = w / (w.sum() + 1e-20)
        experts[t], weights[t] = chosen, w * scale
    return experts, weights


def act64(name, up, gate, alpha=1.702, limit=7.0):
    from math import erf, sqrt
    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + erf(v / sqrt(2.0))))
    if name == "relu":
        return np.maximum(up, 0.0)
    if name == "relu2":
        return np.maximum(up, 0.0) ** 2
    if name == "gelu":
        return gelu(up)
    if name == "swiglu":
        return gate * sigmoid64(gate) * up
    if name == "geglu":
        return gelu(gate) * up
    gate = np.minimum(gate, limit)
    up = np.clip(up, -limit, limit)
    return (up + 1.0) * gate * sigmoid64(alpha * gate)


def ffn64(x, w, e, activation):
    """Expert e (or the shared expert, e=None) of weights ``w`` on one token x [d]; ``activation``
    a :class:`jmoe.experts.Activation` (its output norm: ``s_e * y / sqrt(mean(y^2) + eps)``)."""
    pick = (lambda a: a) if e is None else (lambda a: a[e])
    up = x @ pick(w["w_in"]) + (pick(w["b_in"]) if "b_in" in w else 0.0)
    gate = None
    if "w_gate" in w:
        gate = x @ pick(w["w_gate"]) + (pick(w["b_gate"]) if "b_gate" in w else 0.0)
    h = act64(activation.name, up, gate, activation.swiglu_alpha, activation.swiglu_limit)
    y = h @ pick(w["w_out"]) + (pick(w["b_out"]) if "b_out" in w else 0.0)
    if activation.output_norm is not None:  # each expert's own scale (per_expert=True)
        y = pick(w["norm_weight"]) * y / np.sqrt(np.mean(y ** 2) + activation.output_norm.eps)
    return y


def layer_ref(moe, x, route):
    """The layer as a loop over tokens and their chosen experts, float64. ``route(logits [E])
    -> (experts, weights)`` for one token."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), moe.params())
    activation = moe.experts.activation
    x = np.asarray(x, np.float64).reshape(-1, D)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ p["router"]["router_weight"] + p["router"].get("router_bias", 0.0)
        experts, weights = route(logits)
        for e, w in zip(experts, weights):
            if moe.router.scale_expert_input:
                y[t] += ffn64(w * x[t], p["experts"], e, activation)
            else:
                y[t] += w * ffn64(x[t], p["experts"], e, activation)
        if "shared" in p:
            shared = ffn64(x[t], p["shared"], None, moe.shared_expert.activation)
            if "gate_weight" in p["shared"]:
                shared = shared * sigmoid64(x[t] @ p["shared"]["gate_weight"])
            y[t] += shared
    return y


def randomize(moe, seed):
    """Every parameter and the selection bias random, 0.3 * N(0, 1) (the zero-initialised
    biases too, so each of them changes the output)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for _, var in nnx.iter_graph(moe):
        if isinstance(var, (nnx.Param, jmoe.SelectionBias)):
            var[...] = 0.3 * jax.random.normal(next(keys), var[...].shape, var[...].dtype)


# ----------------------------------------------------------------------------
# The router
# ----------------------------------------------------------------------------


def plan_choices(plan):
    return np.asarray(plan.token_expert).reshape(-1, plan.token_expert.shape[-1]), \
        np.asarray(plan.token_weight, np.float64).reshape(-1, plan.token_weight.shape[-1])


def test_a_selection_bias_flips_a_choice_but_not_the_weight():
    logits = jnp.array([[[2.0, 1.0, 0.0, -1.0]]])  # s = sigmoid: expert 0 best
    bias = jnp.array([0.0, 0.0, 0.0, 0.9])  # s_3 + 0.9 = 1.169 > s_0 = 0.881
    plan = group_limited_top_k(logits, k=1, capacity=1, selection_bias=bias)
    experts, weights = plan_choices(plan)
    assert experts.tolist() == [[3]]
    np.testing.assert_allclose(weights, [[sigmoid64(-1.0)]], rtol=1e-6)  # the unbiased score
    plan = group_limited_top_k(logits, k=1, capacity=1)
    assert plan_choices(plan)[0].tolist() == [[0]]


def test_the_group_limit_excludes_a_higher_scoring_expert():
    # 3 groups of 2: group scores (top-2 sums) 1.0+0.0, 0.9+0.8, 0.1+0.1 -> keep group 1 only;
    # expert 0 (score 1.0) is the best expert but its group loses.
    c = np.array([1.0, 0.0, 0.9, 0.8, 0.1, 0.1])
    logits = jnp.asarray(np.log(c + 1e-9) - np.log1p(-c + 1e-9))[None, None].astype(jnp.float32)  # sigmoid^-1
    plan = group_limited_top_k(logits, k=2, capacity=1, n_group=3, topk_group=1)
    assert sorted(plan_choices(plan)[0][0].tolist()) == [2, 3]
    # group_score="max": group 0 (max 1.0) wins instead.
    plan = group_limited_top_k(logits, k=2, capacity=1, n_group=3, topk_group=1, group_score="max")
    assert sorted(plan_choices(plan)[0][0].tolist()) == [0, 1]


def test_ties_go_to_the_lower_group_and_expert():
    logits = jnp.zeros((1, 1, 8))  # every score 0.5
    plan = group_limited_top_k(logits, k=3, capacity=1, n_group=4, topk_group=2)
    assert plan_choices(plan)[0][0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_a_kept_expert_with_a_negative_biased_score_beats_every_excluded_group(group_score):
    """The excluded groups' experts are -inf before the top-k, not 0: once a negative
    selection bias makes a kept expert's biased score c = s + b negative, an excluded expert
    at 0 would beat it. By hand (8 experts, 4 groups of 2, keep 1 group, k=2):

      token 0: s = [.9 .3 | .6 .5 | .2 .1 | .4 .3],  b = [0 -.5 | -.3 -.3 | -.4 -.4 | -.5 -.5]
               c = [.9 -.2 | .3 .2 | -.2 -.3 | -.1 -.2]
               group scores top2_sum .7, .5, -.5, -.3 / max .9, .3, -.2, -.1 -> group 0 kept
               -> experts [0, 1] (c .9 and -.2), weights the unbiased s [.9, .3]
      token 1: s = [.2 .3 | .4 .1 | .8 .3 | .6 .5], same b
               c = [.2 -.2 | .1 -.2 | .4 -.1 | .1 0]
               group scores top2_sum 0, -.1, .3, .1 / max .2, .1, .4, .1 -> group 2 kept
               -> experts [4, 5], weights [.8, .3]
      token 2: s = [.1 .2 | .3 .35 | .45 .3 | .2 .4], same b
               c = [.1 -.3 | 0 .05 | .05 -.1 | -.3 -.1]
               top2_sum -.2, .05, -.05, -.4 -> group 1 -> experts [3, 2], weights [.35, .3];
               max .1, .05, .05, -.1 -> group 0 -> experts [0, 1], weights [.1, .2]

    (with 0 for the excluded experts token 0 would get [0, 2], token 1 [4, 0], token 2 under
    max [0, 2]). Also against the float64 reference."""
    s = np.array([[.9, .3, .6, .5, .2, .1, .4, .3],
                  [.2, .3, .4, .1, .8, .3, .6, .5],
                  [.1, .2, .3, .35, .45, .3, .2, .4]])
    bias = np.array([0.0, -0.5, -0.3, -0.3, -0.4, -0.4, -0.5, -0.5])
    logits = np.log(s) - np.log1p(-s)  # sigmoid^-1
    plan = group_limited_top_k(jnp.asarray(logits, jnp.float32)[None], k=2, capacity=3, n_group=4, topk_group=1,
                               group_score=group_score, selection_bias=jnp.asarray(bias, jnp.float32))
    experts, weights = plan_choices(plan)
    want = [[0, 1], [4, 5], [3, 2] if group_score == "top2_sum" else [0, 1]]
    assert experts.tolist() == want
    np.testing.assert_allclose(weights, np.take_along_axis(s, np.array(want), axis=-1), rtol=1e-6)
    ref_experts, ref_weights = group_limited_ref(logits, k=2, n_group=4, topk_group=1, group_score=group_score,
                                                 bias=bias)
    assert ref_experts.tolist() == want
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6)


@pytest.mark.parametrize("options", [
    dict(k=4, n_group=4, topk_group=2, normalize=True, scale=2.5),  # DeepSeek-V3
    dict(k=3, n_group=4, topk_group=3, group_score="max", score_function="softmax", scale=16.0),  # DeepSeek-V2
    dict(k=2, n_group=1),  # plain top-k of sigmoid scores
    dict(k=6, n_group=8, topk_group=4, normalize=True),
])
def test_router_equals_the_float64_reference(options):
    kl, kb = jax.random.split(jax.random.key(len(str(options))))
    logits = jax.random.normal(kl, (3, 40, 16))
    bias = 0.2 * jax.random.normal(kb, (16,))
    ref_options = dict(options)
    scale = ref_options.pop("scale", 1.0)
    plan = group_limited_top_k(logits, capacity=40, selection_bias=bias, routed_scaling_factor=scale, **ref_options)
    experts, weights = plan_choices(plan)
    want_experts, want_weights = group_limited_ref(logits, bias=np.asarray(bias), scale=scale, **ref_options)
    np.testing.assert_array_equal(experts, want_experts)
    np.testing.assert_allclose(weights, want_weights, rtol=2e-6, atol=1e-7)
    assert float(plan.dropped_fraction) == 0.0


def test_capacity_drops_by_choice_major_priority():
    # 4 tokens all prefer expert 0 (k=1, capacity 2): tokens 0 and 1 keep it, 2 and 3 are dropped.
    logits = jnp.array([[[3.0, 0.0], [2.5, 0.0], [2.0, 0.0], [1.5, 0.0]]])
    plan = group_limited_top_k(logits, k=1, capacity=2)
    assert np.asarray(plan.token_slot)[0, :, 0].tolist() == [0, 1, -1, -1]
    assert float(plan.dropped_fraction) == 0.5
    assert np.asarray(plan.token_weight)[0, 2:, 0].tolist() == [0.0, 0.0]


def test_balance_losses_equal_their_formulas():
    kl, km = jax.random.split(jax.random.key(3))
    logits = jax.random.normal(kl, (4, 10, 8))
    mask = jax.random.bernoulli(km, 0.7, (4, 10))
    k = 3
    plan = group_limited_top_k(logits, k=k, capacity=10, n_group=2, topk_group=1, token_mask=mask)
    aux = plan.aux()
    s = scores64(logits, "sigmoid")
    p = s / s.sum(-1, keepdims=True)  # normalised scores
    experts = np.asarray(plan.token_expert)
    m = np.asarray(mask)
    seq = []
    counts_all, p_all = np.zeros(8), np.zeros(8)
    for g in range(4):
        counts = np.zeros(8)
        for t in np.flatnonzero(m[g]):
            counts[experts[g, t]] += 1
        n = m[g].sum()
        f = 8 / (k * n) * counts  # DeepSeek-V3: f_i = E / (K T) * count_i
        P = p[g][m[g]].mean(0)
        seq.append(np.sum(f * P))
        counts_all += counts
        p_all += p[g][m[g]].sum(0)
    n_all = m.sum()
    np.testing.assert_allclose(float(aux["sequence_balance_loss"]), np.mean(seq), rtol=1e-5)
    np.testing.assert_allclose(float(aux["global_load_balancing_loss"]),
                               8 * np.sum(counts_all / n_all * p_all / n_all), rtol=1e-5)


# ----------------------------------------------------------------------------
# The layer, per family
# ----------------------------------------------------------------------------

FAMILIES = {
    "deepseek_v3": (dict(num_experts=16, k=4, router=GroupLimited(n_group=4, topk_group=2, normalize=True,
                                                                  routed_scaling_factor=2.5, selection_bias=True),
                         shared=Shared(32), activation="swiglu"),
                    dict(k=4, n_group=4, topk_group=2, normalize=True, scale=2.5)),
    "deepseek_v2": (dict(num_experts=8, k=2, router=GroupLimited(score_function="softmax", n_group=4, topk_group=2,
                                                                 group_score="max", routed_scaling_factor=3.0),
                         shared=Shared(16), activation="swiglu"),
                    dict(k=2, n_group=4, topk_group=2, group_score="max", score_function="softmax", scale=3.0)),
    "qwen2_moe": (dict(num_experts=8, k=2, router=TokensChoose(normalize=True), shared=Shared(40, gate=True),
                       activation="swiglu"),
                  dict(k=2, score_function="softmax", normalize=True)),
    "gpt_oss": (dict(num_experts=8, k=2, router=TokensChoose(normalize=True, router_bias=True), use_bias=True,
                     activation="clamped_swiglu"),
                dict(k=2, score_function="softmax", normalize=True)),
    "llama4": (dict(num_experts=8, k=1, router=GroupLimited(scale_expert_input=True), shared=Shared(32),
                    activation="swiglu"),
               dict(k=1)),
    "all_options": (dict(num_experts=16, k=4, router=GroupLimited(n_group=4, topk_group=2, normalize=True,
                                                                  routed_scaling_factor=2.5, selection_bias=True,
                                                                  router_bias=True),
                         use_bias=True, activation="clamped_swiglu", shared=Shared(32, gate=True)),
                    dict(k=4, n_group=4, topk_group=2, normalize=True, scale=2.5)),
    # Ergo: squared-ReLU experts and shared expert, each output RMS-normalised with its own scale
    "ergo": (dict(num_experts=8, k=2, router=GroupLimited(normalize=True, routed_scaling_factor=1.5,
                                                          selection_bias=True),
                  activation=Activation("relu2", output_norm=OutputNorm(0.05, per_expert=True)), shared=Shared(32)),
             dict(k=2, normalize=True, scale=1.5)),
}


def family_layer(name, dropless, seed=0, mesh=None, **extra):
    options, _ = FAMILIES[name]
    cf = None if dropless else float(options["num_experts"]) / options["k"]  # C = S: nothing dropped
    options = {"capacity_factor": cf, "eval_capacity_factor": cf or 1.0, **options, **extra}
    moe = jmoe.MoE(D, F, deterministic=True, mesh=mesh, rngs=nnx.Rngs(seed), **options)
    randomize(moe, seed + 100)
    return moe


@pytest.mark.parametrize("dropless", [False, True], ids=["capacity", "dropless"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_layer_equals_a_loop_over_tokens_and_experts(name, dropless):
    moe = family_layer(name, dropless)
    _, route_options = FAMILIES[name]
    bias = np.asarray(moe.selection_bias[...]) if hasattr(moe, "selection_bias") else None

    def route(logits):
        experts, weights = group_limited_ref(logits[None], bias=bias, **route_options)
        return experts[0], weights[0]

    x = jax.random.normal(jax.random.key(7), (2, 12, D))
    y, aux = nnx.jit(lambda m, x: m(x))(moe, x)
    want = layer_ref(moe, x, route)
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, D), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert float(aux["dropped_fraction"]) == 0.0


def test_clamped_swiglu_clamps():
    act = jmoe.experts.Activation("clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=7.0)
    up = jnp.array([-9.0, -3.0, 0.5, 8.0])
    gate = jnp.array([10.0, -2.0, 0.3, 7.5])
    np.testing.assert_allclose(np.asarray(act(up, gate)), act64("clamped_swiglu", np.asarray(up, np.float64),
                                                                 np.asarray(gate, np.float64)), rtol=1e-6)
    # the clamps bind: gate 10 -> 7, up -9 -> -7
    np.testing.assert_allclose(float(act(up, gate)[0]), (-7.0 + 1.0) * 7.0 * sigmoid64(1.702 * 7.0), rtol=1e-6)


def test_a_masked_token_gets_zero_even_with_a_shared_expert():
    moe = family_layer("qwen2_moe", dropless=False)
    x = jax.random.normal(jax.random.key(1), (2, 12, D))
    mask = jnp.ones((2, 12), bool).at[0, 3].set(False)
    y, _ = moe(x.at[0, 3].set(jnp.nan), token_mask=mask)
    assert np.all(np.asarray(y[0, 3]) == 0.0)
    assert np.all(np.isfinite(np.asarray(y)))


def test_shared_expert_weights_are_parameters_with_gradients():
    moe = family_layer("qwen2_moe", dropless=True)
    x = jax.random.normal(jax.random.key(2), (2, 12, D))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2)))(moe)
    for name in ("w_in", "w_gate", "w_out", "gate_weight"):
        assert float(jnp.abs(getattr(grads.shared_expert, name)[...]).sum()) > 0, name


@pytest.mark.parametrize("bad, match", [
    (dict(router="group_limited", num_experts=8, k=2, n_group=3), "divisible by n_group"),
    (dict(router="group_limited", num_experts=8, k=2, n_group=2, topk_group=3), "topk_group=3 must be <= n_group"),
    (dict(router="group_limited", num_experts=8, k=5, n_group=4, topk_group=2), "cannot be chosen"),
    (dict(router="group_limited", num_experts=8, k=2, n_group=8, topk_group=2), "top2_sum"),
    (dict(router="group_limited", num_experts=8, score_function="tanh"), "score_function"),
    (dict(router="group_limited", num_experts=8, routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(num_experts=8, k=2, scale_expert_input=True), "needs k=1"),
    (dict(num_experts=8, router="experts_choose", scale_expert_input=True), "tokens choose one expert"),
    (dict(num_experts=8, n_group=2), "needs router='group_limited'"),
    (dict(num_experts=8, selection_bias=True), "needs router='group_limited'"),
    (dict(num_experts=8, shared_gate=True), "needs shared_d_ff"),
    (dict(num_experts=8, shared_d_ff=0), "d_ff must be"),
    (dict(num_experts=8, activation="clamped_swiglu", swiglu_limit=-1.0), "swiglu_limit"),
])
def test_bad_options_are_clear_errors(bad, match):
    """Each option as a flat key (a config's), translated to the router / activation / shared objects
    that check it (or the layer, for the checks that need the expert count)."""
    with pytest.raises(ValueError, match=match):
        jmoe.MoE(D, F, rngs=nnx.Rngs(0), **layer_arguments(bad))


# ----------------------------------------------------------------------------
# One device == mesh, for every new option, in both paths
# ----------------------------------------------------------------------------


def all_grads_loss(moe, x, mask, r):
    def loss(model, x):
        y, aux = model(x, token_mask=mask)
        total = (jnp.sum(y * r) + aux["load_balancing_loss"] + aux["z_loss"] + aux["global_load_balancing_loss"]
                 + aux["sequence_balance_loss"])
        return total, (y, aux)

    (_, (y, aux)), (g_model, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(moe, x)
    return y, aux, {"x": g_x, "params": nnx.to_pure_dict(nnx.state(g_model, nnx.Param))}


# Every new option in both paths: one layer with all of them but input scaling (k = 4), and
# Llama 4's input scaling (k = 1), each on an Explicit and an Auto mesh.
MESH_CASES = [
    pytest.param("all_options", False, lambda: jax.make_mesh((2, 2, 2), ("data", "expert", "model")), True,
                 id="all-options-capacity-explicit-2x2x2"),
    pytest.param("all_options", True, lambda: parallel.make_mesh(data=2, expert=4), False,
                 id="all-options-dropless-auto-2x4"),
    pytest.param("llama4", False, lambda: parallel.make_mesh(data=4, expert=2), True,
                 id="llama4-capacity-auto-4x2"),
    pytest.param("llama4", True, lambda: jax.make_mesh((2, 2, 2), ("data", "expert", "model")), False,
                 id="llama4-dropless-explicit-2x2x2"),
]


@pytest.mark.parametrize("name, dropless, make_mesh, with_mask", MESH_CASES)
def test_mesh_equals_one_device(name, dropless, make_mesh, with_mask):
    mesh = make_mesh()
    kx, kr, km = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (8, 8, D))
    r = jax.random.normal(kr, (8, 8, D))
    mask = jax.random.bernoulli(km, 0.8, (8, 8)) if with_mask else None
    # Capacity below the no-drop level, so the mesh must drop exactly as one device does.
    extra = {} if dropless else dict(eval_capacity_factor=1.0)
    expected = jax.device_get(nnx.jit(all_grads_loss)(family_layer(name, dropless, **extra), x, mask, r))
    with jax.set_mesh(mesh):  # created in place: the weights carry the mesh's shardings
        ep = family_layer(name, dropless, **extra)
        assert ep.experts.w_in[...].sharding.spec[0] == "expert"
        actual = jax.device_get(nnx.jit(all_grads_loss)(ep, x, mask, r))
    assert_tree_close(actual, expected)
    if not dropless:
        assert float(actual[1]["dropped_fraction"]) > 0  # the capacity binds
    if getattr(FAMILIES[name][0]["router"], "selection_bias", False):
        assert "selection_bias" not in actual[2]["params"]  # state: no gradient


def test_shared_expert_is_placed_like_a_dense_layer():
    mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "model"))
    with jax.set_mesh(mesh):
        moe = jmoe.MoE(D, F, 8, k=2, shared=Shared(32, gate=True), activation="swiglu", rngs=nnx.Rngs(0))
    assert moe.shared_expert.w_in[...].sharding.spec == jax.P(None, "model")
    assert moe.shared_expert.w_out[...].sharding.spec == jax.P("model", None)
    assert moe.experts.w_in[...].sharding.spec == jax.P("expert", None, "model")
    specs = nnx.get_partition_spec(nnx.state(moe))
    assert tuple(specs["shared_expert"]["w_gate"].get_value()) == (None, "model")
    assert parallel.placement.moe_param_spec(("moe", "shared_expert", "w_in"), mesh) == jax.P(None, "model")
    # an output norm's scales (Ergo): per expert on the expert axis, the shared expert's replicated
    assert parallel.placement.moe_param_spec(("moe", "experts", "norm_weight"), mesh) == jax.P("expert", None)
    assert parallel.placement.moe_param_spec(("moe", "shared_expert", "norm_weight"), mesh) == jax.P(None)


# ----------------------------------------------------------------------------
# Aux-loss-free balancing
# ----------------------------------------------------------------------------


def test_bias_update_formula():
    bias = jnp.array([0.0, 0.1, -0.2, 0.0])
    load = jnp.array([10.0, 2.0, 4.0, 4.0])  # mean 5
    np.testing.assert_allclose(np.asarray(jmoe.balancing.bias_update(bias, load, 0.01)),
                               [-0.01, 0.11, -0.19, 0.01], rtol=1e-6)


def skewed_layer(mesh=None):
    moe = jmoe.MoE(D, F, 16, k=4, router=GroupLimited(n_group=4, topk_group=2, selection_bias=True),
                   capacity_factor=None, mesh=mesh, rngs=nnx.Rngs(0))
    # A router that strongly prefers experts 0-3 (one group) for every token.
    moe.router_weight[...] = moe.router_weight[...].at[:, :4].add(0.8)
    return moe


def skewed_batch(step):
    x = jax.random.normal(jax.random.key(step), (8, 16, D))
    return x + 1.0  # a shared offset: with the router above, experts 0-3 win for almost every token


def max_over_mean(load):
    load = np.asarray(load, np.float64)
    return load.max() / load.mean()


def test_bias_updates_balance_a_skewed_stream_without_any_loss():
    moe = skewed_layer()

    @nnx.jit
    def step(moe, x):
        _, aux = moe(x)
        load = moe.expert_load[...]
        jmoe.update_selection_biases(moe, rate=0.02)
        return load

    first = max_over_mean(step(moe, skewed_batch(0)))
    loads = [step(moe, skewed_batch(i)) for i in range(1, 120)]
    last = max_over_mean(np.sum(loads[-20:], axis=0))
    assert first > 2.5, first  # skewed to begin with
    assert last < 1.5, last  # balanced by the biases alone
    assert np.all(np.asarray(moe.expert_load[...]) == 0)  # reset by the update


def test_bias_update_on_a_mesh_equals_one_device_and_the_optimizer_never_sees_it():
    mesh = jax.make_mesh((2, 4), ("data", "expert"))

    def run(mesh):
        moe = skewed_layer(mesh)
        opt = nnx.Optimizer(moe, optax.adam(1e-2), wrt=nnx.Param)
        assert not any("selection_bias" in "/".join(map(str, p)) or "expert_load" in "/".join(map(str, p))
                       for p, _ in nnx.to_flat_state(nnx.state(opt, nnx.optimizer.OptState)))

        @nnx.jit
        def step(moe, opt, x):
            grads = nnx.grad(lambda m: jnp.mean(m(x)[0] ** 2))(moe)
            opt.update(moe, grads)
            jmoe.update_selection_biases(moe, rate=0.01)

        for i in range(4):
            x = skewed_batch(i)
            if mesh is not None:
                x = jax.device_put(x, jax.NamedSharding(mesh, jax.P(("data", "expert"))))
            step(moe, opt, x)
        return np.asarray(moe.selection_bias[...]), np.asarray(moe.router_weight[...])

    want_bias, want_w = run(None)
    with jax.set_mesh(mesh):
        got_bias, got_w = run(mesh)
    assert np.any(want_bias != 0)
    np.testing.assert_allclose(got_bias, want_bias, atol=1e-7)  # a multiple of the rate: exact
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-6)


def test_selection_bias_survives_a_checkpoint_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    moe = skewed_layer()
    moe(skewed_batch(0))
    jmoe.update_selection_biases(moe, rate=0.05)
    state = nnx.state(moe)
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, state)
    fresh = skewed_layer()
    assert np.all(np.asarray(fresh.selection_bias[...]) == 0)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path, nnx.state(fresh))
    nnx.update(fresh, restored)
    np.testing.assert_array_equal(np.asarray(fresh.selection_bias[...]), np.asarray(moe.selection_bias[...]))
    assert np.any(np.asarray(fresh.selection_bias[...]) != 0)


def test_eval_mode_counts_no_load():
    moe = skewed_layer()
    moe.eval()
    moe(skewed_batch(0))
    assert np.all(np.asarray(moe.expert_load[...]) == 0)
    moe.train()
    moe(skewed_batch(0))
    assert float(np.sum(moe.expert_load[...])) == 8 * 16 * 4


def test_the_load_accumulates_over_the_calls_between_two_bias_updates():
    """Gradient accumulation, or a layer called twice in a step: every train-mode call *adds*
    its tokens_per_expert to ``expert_load`` (a call that overwrote it would balance on the
    last micro-batch alone), and the update then moves the bias by
    ``rate * sign(mean(load) - load)`` of the summed load (numpy, from the calls' aux)."""
    moe = skewed_layer()
    moe.selection_bias[...] = jnp.linspace(-0.05, 0.05, 16)  # the update adds to whatever is there
    bias0 = np.asarray(moe.selection_bias[...], np.float64)
    x1 = skewed_batch(0)[:2]  # skewed towards experts 0-3
    x2 = -skewed_batch(1)[:2]  # the opposite offset: other experts win
    call = nnx.jit(lambda moe, x: moe(x)[1]["tokens_per_expert"])  # a train-mode call writes expert_load
    counts = [np.asarray(call(moe, x), np.float64) for x in (x1, x2)]
    assert all(c.sum() == 2 * 16 * 4 for c in counts)  # dropless: every assignment kept
    load = counts[0] + counts[1]
    np.testing.assert_array_equal(np.asarray(moe.expert_load[...]), load)
    rate = 0.01
    want = bias0 + rate * np.sign(load.mean() - load)
    # the calls disagree: the last call's load alone would move some bias the other way
    assert np.any(np.sign(load.mean() - load) != np.sign(counts[1].mean() - counts[1]))
    assert jmoe.update_selection_biases(moe, rate=rate) == 1
    np.testing.assert_allclose(np.asarray(moe.selection_bias[...]), want, atol=1e-7)
    assert np.all(np.asarray(moe.expert_load[...]) == 0)
    after = call(moe, x2)  # the next step counts from zero (under the new bias)
    np.testing.assert_array_equal(np.asarray(moe.expert_load[...]), np.asarray(after))


def test_stacked_layers_under_scan_count_their_own_load_and_update_their_own_bias():
    """nnx.vmap-stacked layers run by nnx.scan inside nnx.value_and_grad: each layer counts
    its load (= its aux tokens_per_expert) and gets its own bias update."""

    class Block(nnx.Module):
        def __init__(self, *, rngs):
            self.moe = jmoe.MoE(D, F, 8, k=2, router=GroupLimited(n_group=2, topk_group=1, selection_bias=True),
                                capacity_factor=None, shared=Shared(D), rngs=rngs)

        def __call__(self, x):
            y, aux = self.moe(x)
            return x + y, aux

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make_blocks(rngs):
        return Block(rngs=rngs)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def run_blocks(x, block):
        x, aux = block(x)
        return x, aux["tokens_per_expert"]

    blocks = make_blocks(nnx.Rngs(0))
    opt = nnx.Optimizer(blocks, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(blocks, opt, x):
        def loss(b):
            h, per_layer = run_blocks(x, b)
            return jnp.mean(h ** 2), per_layer

        (_, per_layer), grads = nnx.value_and_grad(loss, has_aux=True)(blocks)
        opt.update(blocks, grads)
        load = blocks.moe.expert_load[...]
        jmoe.update_selection_biases(blocks, 0.01)
        return per_layer, load

    per_layer, load = step(blocks, opt, jax.random.normal(jax.random.key(1), (4, 8, D)))
    assert load.shape == (3, 8)
    np.testing.assert_array_equal(np.asarray(load), np.asarray(per_layer))
    np.testing.assert_allclose(np.asarray(blocks.moe.selection_bias[...]),
                               0.01 * np.sign(np.asarray(load).mean(-1, keepdims=True) - np.asarray(load)), atol=1e-9)
    assert np.all(np.asarray(blocks.moe.expert_load[...]) == 0)


def test_a_shared_width_the_model_axis_does_not_divide_is_a_clear_error():
    mesh = parallel.make_mesh(data=2, expert=2, model=2)
    with pytest.raises(ValueError, match="shared_d_ff=33 is not divisible by the 'model' axis size 2"):
        jmoe.MoE(D, F, 8, shared=Shared(33), mesh=mesh, rngs=nnx.Rngs(0))
    moe = jmoe.MoE(D, F, 8, shared=Shared(33), rngs=nnx.Rngs(0))  # no mesh known at construction
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="shared_d_ff=33 is not divisible"):
        moe(jnp.ones((8, 4, D)))
