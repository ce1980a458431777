"""fairseq's Top2Gate: GShard's top-2 as NLLB-MoE trained it (Lepikhin et al. 2020; NLLB Team 2022,
fairseq ``moe/top2gate.py`` and ``moe_layer.py``).

Per group of S tokens, from float32 logits ``l [S, E]`` and ``p = softmax(l)``::

    e1   = argmax_e p_e
    e2   = argmax_{e != e1} (l_e + g_e)         g ~ Gumbel(0, 1) [E] per token with
                                                second_expert_policy="sampling" (train mode), else 0
    w_j  = p_{e_j}                              j = 1, 2
         = p_{e_j} / max(p_e1 + p_e2, eps)      normalize_before_dropping
    "random" (train mode): the 2nd choice is requested iff 2 w_2 > u, u ~ U[0, 1)
    slots: choice-major (every token's 1st choice, in token order, before any 2nd choice);
           batch_prioritized: the token order is descending p_e1 (V-MoE's BPR); an expert keeps
           the first C, the rest are dropped (weight 0)
    w_j  = w_j kept_j / max(sum_i w_i kept_i, eps)   after the drops, unless normalize_before_dropping
    expert output masking (EOM, m = expert_output_masking):
           train mode  w_j *= [v_j > m], v ~ U[0, 1) per (token, choice): the assignment's
                       output is zeroed (fairseq's MOELayer, NLLB's EOM; no 1 / (1 - m) rescale)
           eval mode   w_j *= 1 - m

with ``eps`` the float32 machine epsilon (fairseq's clamp). Eval mode is deterministic: no Gumbel
noise, every 2nd choice requested (fairseq and transformers draw them in eval mode too, when the
policy says so; NLLB-MoE's released model uses ``"all"``). Capacity is per group (fairseq: all
tokens of the call; jmoe: ``group_size``, a sequence by default). The losses and metrics are the
token-choice ones (:func:`jmoe.routing.token_choice.plan_from_choices`, on ``p``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jmoe.checks import non_negative_number
from jmoe.routing.plan import RoutingPlan, check_logits, router_probabilities
from jmoe.routing.router import Router
from jmoe.routing.token_choice import plan_from_choices

Array = jax.Array

TOP2_POLICIES = ("all", "sampling", "random")
EPS = float(jnp.finfo(jnp.float32).eps)  # fairseq's clamp of the normaliser


def top2_gate(logits: Array, *, capacity: int, token_mask: Array | None = None,
              normalize_before_dropping: bool = False, batch_prioritized: bool = False,
              expert_output_masking: float = 0.0, gumbel: Array | None = None, second_uniform: Array | None = None,
              eom_uniform: Array | None = None) -> RoutingPlan:
    """The module docstring's gate on float32 ``logits [G, S, E]``. Train-mode draws (None: eval
    mode): ``gumbel [G, S, E]`` (the sampled 2nd expert), ``second_uniform [G, S]`` (the random
    policy), ``eom_uniform [G, S, 2]`` (expert output masking). Returns a plan with K = 2."""
    mask = check_logits(logits, token_mask)  # [G, S]
    num_groups, group_size, num_experts = logits.shape
    logits = logits.astype(jnp.float32)
    probs = router_probabilities(logits)  # [G, S, E]
    first = jnp.argmax(probs, axis=-1)  # [G, S]
    candidates = logits if gumbel is None else logits + gumbel  # [G, S, E]
    is_first = jax.nn.one_hot(first, num_experts, dtype=jnp.bool_)  # [G, S, E]
    second = jnp.argmax(jnp.where(is_first, -jnp.inf, candidates), axis=-1)  # [G, S]
    experts = jnp.stack([first, second], axis=-1).astype(jnp.int32)  # [G, S, 2]
    chosen = jnp.take_along_axis(probs, experts, axis=-1)  # [G, S, 2]
    weights = chosen / jnp.maximum(jnp.sum(chosen, -1, keepdims=True), EPS) if normalize_before_dropping else chosen
    requested = jnp.broadcast_to(mask[..., None], experts.shape)  # [G, S, 2]
    if second_uniform is not None:  # the random policy: keep the 2nd choice with probability min(1, 2 w_2)
        requested = requested.at[..., 1].set(requested[..., 1] & (2.0 * weights[..., 1] > second_uniform))
    if batch_prioritized:
        order = jnp.argsort(-chosen[..., 0], axis=-1, stable=True)  # [G, S]
    else:
        order = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))  # [G, S]
    plan = plan_from_choices(logits, probs, experts, weights, requested, order, mask, capacity=capacity,
                             priority="choice")
    weight = plan.token_weight  # [G, S, 2], 0 where dropped
    if not normalize_before_dropping:
        weight = weight / jnp.maximum(jnp.sum(weight, -1, keepdims=True), EPS)
    if expert_output_masking > 0:
        keep = (1.0 - expert_output_masking) if eom_uniform is None else (eom_uniform > expert_output_masking)
        weight = weight * keep
    return plan.replace(token_weight=weight.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Top2Gate(Router):
    """:func:`top2_gate` as a router (k = 2). Options: ``second_expert_policy`` ("all",
    "sampling": a Gumbel-sampled 2nd expert, "random": the 2nd kept with probability 2 w_2; both
    in train mode only), ``normalize_before_dropping``, ``batch_prioritized``,
    ``expert_output_masking`` (EOM, in [0, 1): NLLB-MoE's ``moe_token_dropout``)."""

    name = "top2_gate"

    second_expert_policy: str = "all"
    normalize_before_dropping: bool = False
    batch_prioritized: bool = False
    expert_output_masking: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.k not in (None, 2):
            raise ValueError(f"router='top2_gate' chooses 2 experts per token: it needs k=2, got k={self.k}")
        if self.second_expert_policy not in TOP2_POLICIES:
            raise ValueError(f"second_expert_policy must be one of {TOP2_POLICIES} for router='top2_gate', "
                             f"got {self.second_expert_policy!r}")
        non_negative_number("expert_output_masking", self.expert_output_masking)
        if not self.expert_output_masking < 1:
            raise ValueError(f"expert_output_masking must be in [0, 1), got {self.expert_output_masking}")

    @property
    def draws_random(self) -> str:
        drawn = [super().draws_random,
                 {"sampling": "the sampled 2nd expert", "random": "the random 2nd expert"}.get(
                     self.second_expert_policy, ""),
                 "expert output masking" if self.expert_output_masking > 0 else ""]
        return ", ".join(d for d in drawn if d)

    def draw(self, key_fn: Callable[[], Array], groups_shape: tuple[int, ...], num_experts: int) -> dict[str, Array]:
        """Jitter, then ``gumbel [G, S, E]`` ("sampling"), ``second_uniform [G, S]`` ("random"),
        ``eom_uniform [G, S, 2]`` (expert output masking)."""
        draws = super().draw(key_fn, groups_shape, num_experts)
        tokens = tuple(groups_shape[:2])
        if self.second_expert_policy == "sampling":
            draws["gumbel"] = jax.random.gumbel(key_fn(), (*tokens, num_experts))  # [G, S, E]
        if self.second_expert_policy == "random":
            draws["second_uniform"] = jax.random.uniform(key_fn(), tokens)  # [G, S]
        if self.expert_output_masking > 0:
            draws["eom_uniform"] = jax.random.uniform(key_fn(), (*tokens, 2))  # [G, S, 2]
        return draws

    def plan(self, logits, router_in, params, draws, token_mask, capacity) -> RoutingPlan:
        return top2_gate(logits, capacity=capacity, token_mask=token_mask,
                         normalize_before_dropping=self.normalize_before_dropping,
                         batch_prioritized=self.batch_prioritized,
                         expert_output_masking=float(self.expert_output_masking), gumbel=draws.get("gumbel"),
                         second_uniform=draws.get("second_uniform"), eom_uniform=draws.get("eom_uniform"))
