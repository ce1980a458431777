"""Routers and capacity against hand-computed examples and a slow reference."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import routing
from tests.reference import experts_choose_ref, plan_weights, softmax64, tokens_choose_ref


def logits_for(choices, num_experts, strength=None):
    """[1, S, E] logits where token s prefers experts in the order choices[s]."""
    S = len(choices)
    logits = np.zeros((1, S, num_experts), np.float32)
    for s, order in enumerate(choices):
        for rank, e in enumerate(order):
            logits[0, s, e] = (strength[s] if strength else 4.0) - rank
    return jnp.asarray(logits)


# ---------------------------------------------------------------- capacity


def test_capacity_switch_example():
    assert routing.expert_capacity(6, 3, capacity_factor=1.0) == 2
    assert routing.expert_capacity(6, 3, capacity_factor=1.5) == 3


@pytest.mark.parametrize(
    "tokens, experts, k, factor, min_cap, multiple, expected",
    [
        (4096, 8, 2, 1.25, 1, 1, 1280),
        (10, 3, 1, 1.0, 1, 1, 4),  # ceil(3.33)
        (10, 11, 1, 1.1, 1, 1, 1),  # exactly 1.0, no float noise
        (8, 64, 1, 1.0, 4, 1, 4),  # min_capacity wins
        (100, 8, 2, 1.0, 1, 8, 32),  # 25 -> multiple of 8
        (16, 4, 1, 0.1, 0, 1, 1),  # 0.4 -> ceil 1
    ],
)
def test_capacity_formula(tokens, experts, k, factor, min_cap, multiple, expected):
    got = routing.expert_capacity(
        tokens, experts, k=k, capacity_factor=factor, min_capacity=min_cap, multiple_of=multiple
    )
    assert got == expected


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(k=0), "k"),
        (dict(k=5), "k=5"),
        (dict(multiple_of=0), "multiple_of"),
        (dict(min_capacity=-1), "min_capacity"),
    ],
)
def test_capacity_errors_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        routing.expert_capacity(16, 4, **kwargs)


def test_capacity_zero_is_an_error():
    # A factor so small that the product rounds to 0, and no minimum to rescue it.
    with pytest.raises(ValueError, match="capacity came out 0"):
        routing.expert_capacity(1, 4, capacity_factor=1e-12, min_capacity=0)


# ---------------------------------------------------------------- hand examples


def switch_example_logits():
    # 6 tokens, 3 experts: tokens 0,1,2 -> expert 0; 3,4 -> expert 1; 5 -> expert 2.
    return logits_for([[0, 1, 2]] * 3 + [[1, 0, 2]] * 2 + [[2, 0, 1]], 3)


def test_switch_example_factor_1():
    logits = switch_example_logits()
    plan = routing.tokens_choose(logits, k=1, capacity=routing.expert_capacity(6, 3, capacity_factor=1.0))
    np.testing.assert_array_equal(plan.slot_token[0], [[0, 1], [3, 4], [5, -1]])
    np.testing.assert_array_equal(plan.token_slot[0, :, 0], [0, 1, -1, 0, 1, 0])
    assert float(plan.token_weight[0, 2, 0]) == 0.0  # the dropped token
    np.testing.assert_allclose(plan.dropped_fraction, 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(plan.padding_fraction, 1 / 6, rtol=1e-6)
    np.testing.assert_array_equal(plan.tokens_per_expert, [2, 2, 1])


def test_switch_example_factor_1_5():
    plan = routing.tokens_choose(
        switch_example_logits(), k=1, capacity=routing.expert_capacity(6, 3, capacity_factor=1.5)
    )
    np.testing.assert_array_equal(plan.slot_token[0], [[0, 1, 2], [3, 4, -1], [5, -1, -1]])
    assert float(plan.dropped_fraction) == 0.0
    np.testing.assert_allclose(plan.padding_fraction, 3 / 9, rtol=1e-6)
    probs = softmax64(np.asarray(switch_example_logits()))[0]
    np.testing.assert_allclose(plan.token_weight[0, :, 0], probs[np.arange(6), [0, 0, 0, 1, 1, 2]], rtol=1e-6)


def test_choice_major_vs_token_major():
    # t0 prefers A then B, t1 prefers B then A; capacity 1.
    logits = logits_for([[0, 1, 2], [1, 0, 2]], 3)
    choice = routing.tokens_choose(logits, k=2, capacity=1, priority="choice")
    token = routing.tokens_choose(logits, k=2, capacity=1, priority="token")
    # choice-major: both 1st choices win; both 2nd choices are dropped.
    np.testing.assert_array_equal(choice.slot_token[0], [[0], [1], [-1]])
    np.testing.assert_array_equal(choice.token_slot[0], [[0, -1], [0, -1]])
    # token-major: t0 takes A and B; t1 gets nothing.
    np.testing.assert_array_equal(token.slot_token[0], [[0], [0], [-1]])
    np.testing.assert_array_equal(token.token_slot[0], [[0, 0], [-1, -1]])
    np.testing.assert_allclose(choice.dropped_fraction, 0.5, rtol=1e-6)
    np.testing.assert_allclose(token.dropped_fraction, 0.5)


def test_batch_prioritized_changes_who_is_dropped():
    # Both tokens want expert 0; t1 is more confident.
    logits = jnp.asarray([[[1.0, 0.0], [3.0, 0.0]]])
    default = routing.tokens_choose(logits, k=1, capacity=1)
    bpr = routing.tokens_choose(logits, k=1, capacity=1, batch_prioritized=True)
    np.testing.assert_array_equal(default.slot_token[0, 0], [0])
    np.testing.assert_array_equal(bpr.slot_token[0, 0], [1])
    np.testing.assert_array_equal(bpr.token_slot[0, :, 0], [-1, 0])


def test_normalize_weights_sum_to_one_over_selected():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 4))
    plan = routing.tokens_choose(logits, k=2, capacity=10, normalize=True)
    np.testing.assert_allclose(plan.token_weight.sum(-1), 1.0, rtol=1e-6)


def test_expert_choice_hand_example():
    # probs for 3 tokens, 2 experts; capacity 2.
    logits = jnp.log(jnp.asarray([[[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]]]))
    plan = routing.experts_choose(logits, capacity=2)
    np.testing.assert_array_equal(plan.slot_token[0], [[0, 2], [1, 2]])
    np.testing.assert_array_equal(plan.token_slot[0], [[0, -1], [-1, 0], [1, 1]])
    np.testing.assert_allclose(plan.token_weight[0], [[0.7, 0], [0, 0.8], [0.6, 0.4]], rtol=1e-6)
    assert float(plan.load_balancing_loss) == 0.0
    assert float(plan.dropped_fraction) == 0.0


def test_token_mask_takes_no_slot_and_leaves_the_losses():
    logits = switch_example_logits()
    mask = jnp.asarray([[True, False, True, True, True, True]])
    plan = routing.tokens_choose(logits, k=1, capacity=2, token_mask=mask)
    np.testing.assert_array_equal(plan.slot_token[0], [[0, 2], [3, 4], [5, -1]])
    assert float(plan.token_weight[0, 1, 0]) == 0.0
    assert float(plan.dropped_fraction) == 0.0
    # Losses equal those of the 5 valid tokens alone.
    keep = np.array([0, 2, 3, 4, 5])
    alone = routing.tokens_choose(logits[:, keep], k=1, capacity=2)
    np.testing.assert_allclose(plan.load_balancing_loss, alone.load_balancing_loss, rtol=1e-6)
    np.testing.assert_allclose(plan.z_loss, alone.z_loss, rtol=1e-6)
    ec = routing.experts_choose(logits, capacity=2, token_mask=mask)
    assert not np.any(np.asarray(ec.slot_token) == 1)


def test_gshard_random_policy_keep_rate():
    # One group of many identical tokens: p1, p2 fixed -> keep rate min(1, 2 p2 / (p1 + p2)).
    S = 4000
    base = np.log(np.array([0.5, 0.2, 0.3, 0.0001]))
    logits = jnp.asarray(np.broadcast_to(base, (1, S, 4)).astype(np.float32))
    plan = routing.tokens_choose(
        logits, k=2, capacity=S, second_expert_policy="random", rng=jax.random.key(1)
    )
    p1, p2 = 0.5, 0.3
    expected = min(1.0, 2 * p2 / (p1 + p2))  # 0.75
    kept_second = np.mean(np.asarray(plan.token_slot[0, :, 1]) >= 0)
    assert abs(kept_second - expected) < 4 * np.sqrt(expected * (1 - expected) / S)
    assert np.all(np.asarray(plan.token_slot[0, :, 0]) >= 0)
    assert float(plan.dropped_fraction) == 0.0  # skipped 2nd choices are not drops


def test_random_policy_bad_input():
    logits = jnp.zeros((1, 4, 3))
    with pytest.raises(ValueError, match="k=2"):
        routing.tokens_choose(logits, k=1, capacity=2, second_expert_policy="random", rng=jax.random.key(0))
    with pytest.raises(ValueError, match="rng"):
        routing.tokens_choose(logits, k=2, capacity=2, second_expert_policy="random")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: routing.tokens_choose(jnp.zeros((4, 3)), k=1, capacity=2), r"\[G, S, E\]"),
        (lambda: routing.tokens_choose(jnp.zeros((1, 4, 3)), k=4, capacity=2), "k=4"),
        (lambda: routing.tokens_choose(jnp.zeros((1, 4, 3)), k=1, capacity=0), "capacity"),
        (lambda: routing.tokens_choose(jnp.zeros((1, 4, 3)), k=1, capacity=2, priority="x"), "priority"),
        (lambda: routing.tokens_choose(jnp.zeros((1, 4, 3)), k=1, capacity=2, token_mask=jnp.ones((4,))), "token_mask"),
        (lambda: routing.experts_choose(jnp.zeros((1, 4, 3)), capacity=5), "capacity"),
        (lambda: routing.tokens_choose(jnp.zeros((1, 4, 3), jnp.int32), k=1, capacity=2), "floating"),
    ],
)
def test_router_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- against the slow reference


def random_logits(rng, shape, ties):
    """Random logits; with ties, tokens share a few integer-valued rows, so equal
    probabilities are bit-identical (within a row and across tokens)."""
    if ties:
        rows = rng.integers(0, 3, size=(shape[0], 3, shape[2])).astype(np.float32)
        pick = rng.integers(0, 3, size=shape[:2])
        return np.take_along_axis(rows, pick[..., None], axis=1)
    return rng.normal(size=shape).astype(np.float32)


def seed_of(*args):
    return zlib.crc32(repr(args).encode())


TC_CASES = [
    # (G, S, E), k, capacity, priority, batch_prioritized, ties
    ((1, 6, 3), 1, 2, "choice", False, False),
    ((1, 6, 3), 1, 2, "choice", False, True),
    ((3, 8, 4), 2, 2, "choice", False, True),
    ((3, 8, 4), 2, 2, "token", False, True),
    ((3, 8, 4), 2, 3, "choice", True, True),
    ((3, 8, 4), 2, 3, "token", True, False),
    ((2, 16, 8), 3, 2, "choice", False, False),
    ((2, 16, 8), 3, 5, "token", True, True),
    ((2, 16, 8), 1, 1, "choice", True, False),
    ((2, 16, 8), 2, 5, "choice", False, True),
]


@pytest.mark.parametrize("shape, k, capacity, priority, bpr, ties", TC_CASES)
def test_tokens_choose_matches_reference(shape, k, capacity, priority, bpr, ties):
    fn = jax.jit(
        lambda l, m, normalize: routing.tokens_choose(
            l, k=k, capacity=capacity, priority=priority, batch_prioritized=bpr,
            normalize=normalize, token_mask=m,
        ),
        static_argnums=2,
    )
    rng = np.random.default_rng(seed_of(shape, k, capacity, priority, bpr, ties))
    for trial in range(3):  # fresh inputs, same compiled function
        logits = random_logits(rng, shape, ties)
        mask = rng.random(shape[:2]) > 0.2
        normalize = bool(trial % 2)
        plan = fn(jnp.asarray(logits), jnp.asarray(mask), normalize)
        slots, weights, dropped, requested = tokens_choose_ref(
            logits, k, capacity, priority, bpr, normalize, mask
        )
        np.testing.assert_array_equal(plan.slot_token, slots)
        got = plan_weights(plan)
        assert got.keys() == weights.keys()
        for key in weights:
            np.testing.assert_allclose(got[key], weights[key], rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(plan.dropped_fraction, dropped / max(requested, 1), rtol=1e-6)
        np.testing.assert_array_equal(plan.tokens_per_expert, (slots >= 0).sum(axis=(0, 2)))
        np.testing.assert_allclose(plan.padding_fraction, np.mean(slots < 0), rtol=1e-6)


@pytest.mark.parametrize(
    "shape, capacity, ties",
    [((1, 6, 3), 2, True), ((3, 8, 4), 3, False), ((3, 8, 4), 8, True), ((2, 16, 8), 1, True)],
)
def test_experts_choose_matches_reference(shape, capacity, ties):
    fn = jax.jit(lambda l, m: routing.experts_choose(l, capacity=capacity, token_mask=m))
    rng = np.random.default_rng(seed_of(shape, capacity, ties))
    for _ in range(3):
        logits = random_logits(rng, shape, ties)
        mask = rng.random(shape[:2]) > 0.2
        plan = fn(jnp.asarray(logits), jnp.asarray(mask))
        slots, weights = experts_choose_ref(logits, capacity, mask)
        np.testing.assert_array_equal(plan.slot_token, slots)
        got = plan_weights(plan)
        assert got.keys() == weights.keys()
        for key in weights:
            np.testing.assert_allclose(got[key], weights[key], rtol=2e-6)
        untaken = sum(
            1 for g in range(shape[0]) for s in range(shape[1])
            if mask[g, s] and not any((g, s, e) in weights for e in range(shape[2]))
        )
        np.testing.assert_allclose(plan.dropped_fraction, untaken / max(mask.sum(), 1), rtol=1e-6)


def test_gshard_random_policy_matches_reference_given_the_draws():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2, 12, 4)).astype(np.float32)
    key = jax.random.key(3)
    plan = routing.tokens_choose(jnp.asarray(logits), k=2, capacity=4, second_expert_policy="random", rng=key)
    probs = np.sort(softmax64(logits), axis=-1)[..., ::-1]
    keep_prob = np.minimum(1.0, 2 * probs[..., 1] / (probs[..., 0] + probs[..., 1]))
    draws = np.asarray(jax.random.uniform(key, (2, 12)))
    slots, weights, _, _ = tokens_choose_ref(logits, 2, 4, keep_second=draws < keep_prob)
    np.testing.assert_array_equal(plan.slot_token, slots)
    assert plan_weights(plan).keys() == weights.keys()


# ---------------------------------------------------------------- dense views and losses


@pytest.mark.parametrize("router", ["tokens", "experts"])
def test_dense_views_match_compact_form(router):
    rng = np.random.default_rng(11)
    logits = jnp.asarray(rng.normal(size=(2, 10, 4)).astype(np.float32))
    if router == "tokens":
        plan = routing.tokens_choose(logits, k=2, capacity=3)
    else:
        plan = routing.experts_choose(logits, capacity=3)
    mask = np.asarray(plan.dispatch_mask())
    combine = np.asarray(plan.combine_array())
    expected_mask = np.zeros((2, 10, 4, 3), bool)
    expected_combine = np.zeros((2, 10, 4, 3))
    slot_token = np.asarray(plan.slot_token)
    weights = plan_weights(plan)
    for g, e, c in itertools.product(range(2), range(4), range(3)):
        s = slot_token[g, e, c]
        if s >= 0:
            expected_mask[g, s, e, c] = True
            expected_combine[g, s, e, c] = weights[(g, int(s), e)]
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(combine, expected_combine, rtol=1e-6)


def test_load_balancing_and_z_loss_against_numpy():
    rng = np.random.default_rng(5)
    G, S, E, k = 3, 16, 5, 2
    logits = rng.normal(size=(G, S, E)).astype(np.float32) * 2
    plan = routing.tokens_choose(jnp.asarray(logits), k=k, capacity=2)  # drops must not matter
    probs = softmax64(logits)
    losses = []
    for g in range(G):
        f = np.zeros(E)
        for s in range(S):
            for e in np.argsort(-probs[g, s], kind="stable")[:k]:
                f[e] += 1 / S
        losses.append(E * np.sum(f * probs[g].mean(0)))
    np.testing.assert_allclose(plan.load_balancing_loss, np.mean(losses), rtol=1e-5)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(plan.z_loss, np.mean(lse**2), rtol=1e-5)
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    np.testing.assert_allclose(plan.router_entropy, entropy, rtol=1e-5)


def test_load_balancing_loss_is_k_when_balanced():
    # Uniform probabilities, and every expert chosen by exactly S*k/E tokens.
    E, k = 4, 2
    logits = np.zeros((1, 8, E), np.float32)
    for s in range(8):  # tiny nudges that rotate the top-2 but keep p ~ uniform
        logits[0, s, (2 * s) % E] += 1e-4
        logits[0, s, (2 * s + 1) % E] += 1e-4
    plan = routing.tokens_choose(jnp.asarray(logits), k=k, capacity=8)
    np.testing.assert_allclose(plan.load_balancing_loss, k, rtol=1e-3)


def test_router_probabilities_float32_for_bf16_logits():
    logits = jax.random.normal(jax.random.key(0), (2, 8, 4)).astype(jnp.bfloat16)
    plan = routing.tokens_choose(logits, k=2, capacity=4)
    assert plan.token_weight.dtype == jnp.float32
    expected = softmax64(np.asarray(logits.astype(jnp.float32)))
    got = plan_weights(plan)
    for (g, s, e), w in got.items():
        np.testing.assert_allclose(w, expected[g, s, e], rtol=1e-6)


@pytest.mark.parametrize("name", ["tokens_choose", "noisy_top_k"])
def test_jitter_draws_are_uniform_on_one_minus_to_one_plus_jitter(name):
    """Switch's multiplicative jitter x * U(1 - j, 1 + j): the draws fill that whole range and
    average 1 (a draw from U(1 - j, 1) would shrink every router input by j / 2 on average)."""
    j = 0.2
    router = routing.make_router(name, k=1, jitter=j)
    keys = iter(jax.random.split(jax.random.key(0), 4))
    u = np.asarray(router.draw(lambda: next(keys), (8, 64, 64), 4)["jitter"], np.float64)  # [G, S, d]
    assert u.shape == (8, 64, 64)
    assert u.min() >= 1 - j and u.max() <= 1 + j
    assert u.min() < 1 - 0.95 * j and u.max() > 1 + 0.95 * j  # both ends are reached
    assert abs(u.mean() - 1.0) < 0.005  # the mean of U(1 - j, 1 + j); standard error ~0.0004 here
    assert abs(np.mean(u > 1.0) - 0.5) < 0.02  # as many draws above 1 as below
    assert abs(u.var() - (2 * j) ** 2 / 12) < 0.1 * (2 * j) ** 2 / 12
    assert not np.asarray(router.draw(lambda: next(keys), (8, 64, 64), 4)["jitter"] == u).all()  # fresh draws
