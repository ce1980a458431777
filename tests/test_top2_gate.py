"""fairseq's Top2Gate (NLLB-MoE; ``router="top2_gate"``) against a float64 transcription of
fairseq's ``top2gating`` and ``MOELayer`` (dense masks, cumulative-sum slot locations) on random
inputs, in eval mode and in train mode with given draws."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jmoe
from jmoe.routing import Top2Gate

G, S, E = 2, 16, 8
EPS = np.finfo(np.float32).eps


def top2gating64(logits, capacity, *, valid, before, bpr, eom, gumbel=None, u2=None, v=None):
    """fairseq's top2gating for one group (``logits [S, E]``, ``valid [S]`` the non-padding tokens)
    and MOELayer's expert output masking, in float64: the combine weights ``[S, E]``."""
    gates = np.exp(logits - logits.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    eye = np.eye(E)
    mask1 = eye[gates.argmax(1)]
    noisy = logits if gumbel is None else logits + gumbel
    mask2 = eye[np.where(mask1 > 0, -np.inf, noisy).argmax(1)]
    g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
    if before:
        denom = np.maximum(g1 + g2, EPS)
        g1, g2 = g1 / denom, g2 / denom
    if u2 is not None:  # second_expert_policy="random"
        mask2 = mask2 * (2 * g2 > u2)[:, None]
    mask1, mask2 = mask1 * valid[:, None], mask2 * valid[:, None]
    if bpr:
        order = np.argsort(-gates.max(1), kind="stable")
        back = np.argsort(order)
        loc1 = ((np.cumsum(mask1[order], 0) - 1) * mask1[order])[back]
        loc2 = ((np.cumsum(mask2[order], 0) - 1) * mask2[order])[back]
    else:
        loc1, loc2 = np.cumsum(mask1, 0) - 1, np.cumsum(mask2, 0) - 1
    loc2 = loc2 + mask1.sum(0, keepdims=True)
    mask1, mask2 = mask1 * (loc1 < capacity), mask2 * (loc2 < capacity)
    if not before:
        g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
        denom = np.maximum(g1 + g2, EPS)
        g1, g2 = g1 / denom, g2 / denom
    combine1, combine2 = g1[:, None] * mask1, g2[:, None] * mask2  # [S, E] each
    if v is not None:  # train mode: each assignment's expert output zeroed with probability eom
        return combine1 * (v[:, :1] > eom) + combine2 * (v[:, 1:] > eom)
    return (combine1 + combine2) * (1 - eom)


def dense(plan) -> np.ndarray:
    """The plan's combine weights ``[G, S, E]`` (summed over its choices)."""
    onehot = np.eye(E)[np.asarray(plan.token_expert)]  # [G, S, 2, E]
    return np.einsum("gske,gsk->gse", onehot, np.asarray(plan.token_weight, np.float64))


@pytest.mark.parametrize("policy, before, bpr, eom, train", [
    ("all", False, False, 0.2, False),  # NLLB-MoE's released config (eval)
    ("all", True, True, 0.0, False),
    ("sampling", False, False, 0.2, False),  # eval mode: no sampling, the same as "all"
    ("sampling", False, True, 0.2, True),
    ("random", True, False, 0.0, True),
    ("random", False, False, 0.3, True),
])
def test_top2_gate_matches_fairseq_float64(policy, before, bpr, eom, train):
    rng = np.random.default_rng(sum(map(ord, f"{policy}{before}{bpr}{eom}{train}")))
    logits = rng.normal(size=(G, S, E)) * 1.5
    valid = rng.random((G, S)) > 0.15  # some padding
    capacity = 3  # 2 S = 32 assignments for E * C = 24 slots: drops
    draws = {}
    if train:
        draws = {"gumbel": rng.gumbel(size=(G, S, E)), "second_uniform": rng.random((G, S)),
                 "eom_uniform": rng.random((G, S, 2))}
        draws = {name: draws[name] for name in {"sampling": ["gumbel"], "random": ["second_uniform"]}[policy]
                 + (["eom_uniform"] if eom else [])}
    router = Top2Gate(k=2, second_expert_policy=policy, normalize_before_dropping=before, batch_prioritized=bpr,
                      expert_output_masking=eom)
    plan = router.plan(jnp.asarray(logits, jnp.float32), None, {},
                       {n: jnp.asarray(d, jnp.float32) for n, d in draws.items()}, jnp.asarray(valid), capacity)
    want = np.stack([top2gating64(logits[g], capacity, valid=valid[g], before=before, bpr=bpr, eom=eom,
                                  gumbel=draws["gumbel"][g] if "gumbel" in draws else None,
                                  u2=draws["second_uniform"][g] if "second_uniform" in draws else None,
                                  v=draws["eom_uniform"][g] if "eom_uniform" in draws else None) for g in range(G)])
    np.testing.assert_allclose(dense(plan), want, rtol=1e-5, atol=1e-7)
    slots = np.asarray(plan.token_slot)
    assert np.all(slots[~valid] < 0) and np.any((slots < 0) & valid[..., None])  # padding takes no slot; drops happen
    one_kept = ((slots >= 0).sum(-1) == 1) & valid
    assert one_kept.any()  # tokens whose other choice was dropped: renormalised to 1 (unless before)


def test_top2_gate_layer_is_deterministic_in_eval_and_samples_in_train():
    moe = jmoe.MoE(4, 6, 4, k=2, capacity_factor=2.0, eval_capacity_factor=2.0, activation="relu",
                   router=Top2Gate(second_expert_policy="sampling", expert_output_masking=0.2),
                   rngs=nnx.Rngs(params=0, router=1))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 4)), jnp.float32)
    forward = nnx.jit(lambda m, x: m(x)[0])
    moe.eval()
    first = forward(moe, x)
    np.testing.assert_array_equal(np.asarray(forward(moe, x)), np.asarray(first))
    moe.train()
    assert not np.allclose(np.asarray(forward(moe, x)), np.asarray(forward(moe, x)))


@pytest.mark.parametrize("make, match", [
    (lambda: Top2Gate(k=3), "needs k=2"),
    (lambda: Top2Gate(second_expert_policy="gumbel"), "second_expert_policy"),
    (lambda: Top2Gate(expert_output_masking=1.0), "expert_output_masking"),
    (lambda: jmoe.MoE(4, 6, 4, k=2, router=Top2Gate(expert_output_masking=0.1), rngs=nnx.Rngs(params=0)),
     "rngs a 'router'"),
])
def test_bad_top2_gate_options_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
