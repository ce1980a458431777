"""SparseMixer's top-2 (Phi-3.5-MoE; Liu et al. 2024, arXiv 2409.12136), its inference forward.

Per token, from float32 logits ``l [E]`` and ``eps`` = ``jitter_eps``, two rounds::

    round 1: m = max_e l_e, e1 = argmax_e l_e
             keep_e = (m - l_e) / max(|l_e|, m) <= 2 eps       (the others' logits -> -inf)
             w1 = softmax(l over the kept)[e1]
    round 2: l' = l with l'_{e1} = -inf; m' = max l', e2 = argmax l'
             keep_e = (m' - l_e) / max(|l_e|, m') <= 2 eps
             w2 = softmax(l' over the kept)[e2]

as transformers' ``sparsemixer`` computes it in eval mode (``router_jitter_noise`` is eps). The
weights are not renormalised. Train mode here is the same forward with its autodiff gradient:
the paper's sampled routing and Heun's third-order gradient estimator are not implemented.
Slots and losses are the token-choice ones (losses on ``softmax(l)``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.checks import positive_number
from jmoe.routing.plan import RoutingPlan, check_logits, router_probabilities
from jmoe.routing.router import Router
from jmoe.routing.token_choice import plan_from_choices

Array = jax.Array


def sparsemixer_round(candidates: Array, logits: Array, jitter_eps: float) -> tuple[Array, Array]:
    """One round: the best of ``candidates [..., E]`` (the logits, -inf where already chosen) and
    its weight, the softmax over the candidates within ``2 eps`` of it (relative, on ``logits``).
    Returns ``expert [...]`` int32 and ``weight [...]`` float32."""
    top = jnp.max(candidates, axis=-1, keepdims=True)  # [..., 1]
    expert = jnp.argmax(candidates, axis=-1).astype(jnp.int32)  # [...]
    factor = jnp.maximum(jnp.abs(logits), top)  # [..., E]
    masked = jnp.where((top - logits) / factor > 2.0 * jitter_eps, -jnp.inf, candidates)  # [..., E]
    weight = jnp.take_along_axis(jax.nn.softmax(masked, axis=-1), expert[..., None], axis=-1)[..., 0]
    return expert, weight


def sparsemixer_top2(logits: Array, jitter_eps: float) -> tuple[Array, Array]:
    """The module docstring's two rounds: ``experts [..., 2]`` int32, ``weights [..., 2]`` float32."""
    logits = logits.astype(jnp.float32)
    e1, w1 = sparsemixer_round(logits, logits, jitter_eps)
    rest = jnp.where(jax.nn.one_hot(e1, logits.shape[-1], dtype=jnp.bool_), -jnp.inf, logits)  # [..., E]
    e2, w2 = sparsemixer_round(rest, logits, jitter_eps)
    return jnp.stack([e1, e2], axis=-1), jnp.stack([w1, w2], axis=-1)


@dataclasses.dataclass(frozen=True)
class SparseMixer(Router):
    """:func:`sparsemixer_top2` as a router (k = 2); option ``jitter_eps`` > 0 (Phi-3.5-MoE's
    ``router_jitter_noise``, 0.01)."""

    name = "sparsemixer"

    jitter_eps: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        positive_number("jitter_eps", self.jitter_eps)
        if self.k not in (None, 2):
            raise ValueError(f"router='sparsemixer' chooses 2 experts per token: it needs k=2, got k={self.k}")

    def plan(self, logits, router_in, params, draws, token_mask, capacity) -> RoutingPlan:
        mask = check_logits(logits, token_mask)  # [G, S]
        num_groups, group_size, _ = logits.shape
        experts, weights = sparsemixer_top2(logits, float(self.jitter_eps))  # [G, S, 2] each
        requested = jnp.broadcast_to(mask[..., None], experts.shape)  # [G, S, 2]
        order = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))  # [G, S]
        return plan_from_choices(logits, router_probabilities(logits), experts, weights, requested, order, mask,
                                 capacity=capacity, priority="choice")
