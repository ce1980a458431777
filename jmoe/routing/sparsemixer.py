"""SparseMixer's top-2 (Phi-3.5-MoE; GRIN, Liu et al. 2024, arXiv 2409.12136; SparseMixer, Liu et
al. 2023), in eval and train mode.

Per token, from float32 logits ``l [E]`` and ``eps`` = ``jitter_eps``, two rounds; round r reads
the candidates ``c`` (round 1: ``l``; round 2: ``l`` with ``c_{e1} = -inf``)::

    m      = max_e c_e,  b = argmax_e c_e
    keep_e = (m - l_e) / max(|l_e|, m) <= 2 eps          (the others -> -inf: c')
    pi     = softmax(c')                                   the round's distribution
    eval   e = b,                  w = pi_e
    train  e = argmax_e (c'_e + g_e), g ~ Gumbel(0, 1)     (a sample of pi)
           forward   w = s pi_e,   s = 1 if e = b or u > 3/4 (u ~ U[0, 1)), else 0.3333
           backward  dw / dl = d pi_e / dl = pi_e (onehot(e) - pi)   (s held out of the gradient)

The train-mode weight is Heun's third-order estimator of the routing gradient (GRIN, section 2:
the sampled expert's weight is scaled by 1 or about 1/3 at random when it is not the round's
best), as transformers' ``sparsemixer`` and microsoft/SparseMixer compute it (their constant
0.3333, their 3/4; ``PhimoeMultiplier``'s backward is the gradient of ``pi_e``). Round 2 excludes
the round-1 expert, sampled in train mode. The weights are not renormalised. ``router_jitter_noise``
is eps; Phi-3.5-MoE's ``input_jitter_noise`` is the router's ``jitter`` with ``jitter_experts=True``
(the block's input jittered, the experts' too). Slots and losses are the token-choice ones
(losses on ``softmax(l)``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jmoe.checks import positive_number
from jmoe.routing.plan import RoutingPlan, check_logits, router_probabilities
from jmoe.routing.router import Router
from jmoe.routing.token_choice import plan_from_choices

Array = jax.Array

HEUN_KEEP = 0.75  # u > 3/4: the sampled expert keeps its full weight (Heun's third-order method)
HEUN_SCALE = 0.3333  # else its weight times this (transformers' and microsoft/SparseMixer's constant)


def sparsemixer_round(candidates: Array, logits: Array, jitter_eps: float, gumbel: Array | None = None,
                      uniform: Array | None = None) -> tuple[Array, Array]:
    """One round on ``candidates [..., E]`` (the logits, -inf where already chosen): the expert and
    its weight (the module docstring). Eval mode without draws; train mode with ``gumbel [..., E]``
    and ``uniform [...]``. Returns ``expert [...]`` int32 and ``weight [...]`` float32."""
    top = jnp.max(candidates, axis=-1, keepdims=True)  # [..., 1]
    best = jnp.argmax(candidates, axis=-1).astype(jnp.int32)  # [...]
    factor = jnp.maximum(jnp.abs(logits), top)  # [..., E]
    masked = jnp.where((top - logits) / factor > 2.0 * jitter_eps, -jnp.inf, candidates)  # [..., E]
    probs = jax.nn.softmax(masked, axis=-1)  # [..., E]
    expert = best if gumbel is None else jnp.argmax(masked + gumbel, axis=-1).astype(jnp.int32)  # [...]
    weight = jnp.take_along_axis(probs, expert[..., None], axis=-1)[..., 0]  # [...]: pi_e
    if uniform is not None:  # forward s pi_e, gradient d pi_e / dl
        scale = jnp.where((expert == best) | (uniform > HEUN_KEEP), 1.0, jnp.float32(HEUN_SCALE))  # [...]
        weight = weight + jax.lax.stop_gradient(weight * (scale - 1.0))
    return expert, weight


def sparsemixer_top2(logits: Array, jitter_eps: float, gumbel: Array | None = None,
                     uniform: Array | None = None) -> tuple[Array, Array]:
    """The module docstring's two rounds on ``logits [..., E]``; train mode with ``gumbel [..., 2, E]``
    and ``uniform [..., 2]`` (round r's draws at index r). Returns ``experts [..., 2]`` int32 and
    ``weights [..., 2]`` float32."""
    logits = logits.astype(jnp.float32)
    draws = (lambda r: (None, None)) if gumbel is None else (lambda r: (gumbel[..., r, :], uniform[..., r]))
    e1, w1 = sparsemixer_round(logits, logits, jitter_eps, *draws(0))
    rest = jnp.where(jax.nn.one_hot(e1, logits.shape[-1], dtype=jnp.bool_), -jnp.inf, logits)  # [..., E]
    e2, w2 = sparsemixer_round(rest, logits, jitter_eps, *draws(1))
    return jnp.stack([e1, e2], axis=-1), jnp.stack([w1, w2], axis=-1)


@dataclasses.dataclass(frozen=True)
class SparseMixer(Router):
    """:func:`sparsemixer_top2` as a router (k = 2); option ``jitter_eps`` > 0 (Phi-3.5-MoE's
    ``router_jitter_noise``, 0.01). Train mode draws ``gumbel [G, S, 2, E]`` and
    ``heun_uniform [G, S, 2]`` (so the layer needs a ``router`` or ``default`` random stream)."""

    name = "sparsemixer"

    jitter_eps: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        positive_number("jitter_eps", self.jitter_eps)
        if self.k not in (None, 2):
            raise ValueError(f"router='sparsemixer' chooses 2 experts per token: it needs k=2, got k={self.k}")

    @property
    def draws_random(self) -> str:
        return ", ".join(d for d in (super().draws_random, "the sampled experts") if d)

    def draw(self, key_fn: Callable[[], Array], groups_shape: tuple[int, ...], num_experts: int) -> dict[str, Array]:
        """Jitter, then each round's Gumbel noise ``gumbel [G, S, 2, E]`` and ``heun_uniform [G, S, 2]``."""
        draws = super().draw(key_fn, groups_shape, num_experts)
        tokens = tuple(groups_shape[:2])
        draws["gumbel"] = jax.random.gumbel(key_fn(), (*tokens, 2, num_experts))  # [G, S, 2, E]
        draws["heun_uniform"] = jax.random.uniform(key_fn(), (*tokens, 2))  # [G, S, 2]
        return draws

    def plan(self, logits, router_in, params, draws, token_mask, capacity) -> RoutingPlan:
        mask = check_logits(logits, token_mask)  # [G, S]
        num_groups, group_size, _ = logits.shape
        experts, weights = sparsemixer_top2(logits, float(self.jitter_eps), draws.get("gumbel"),
                                            draws.get("heun_uniform"))  # [G, S, 2] each
        requested = jnp.broadcast_to(mask[..., None], experts.shape)  # [G, S, 2]
        order = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))  # [G, S]
        return plan_from_choices(logits, router_probabilities(logits), experts, weights, requested, order, mask,
                                 capacity=capacity, priority="choice")
