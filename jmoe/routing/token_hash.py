"""Hash routing: a token's experts are a fixed function of its token id (Hash Layers, Roller et
al. 2021; DeepSeek-V4's first MoE layers).

Per token with id t, from float32 logits ``l = x W_r`` ``[G, S, E]``::

    e_j    = T[t, j], j < k                  T = token_experts [vocab_size, k] int32, a router
                                             buffer (no gradient, not a parameter), initialised
                                             to T[t, j] = (t k + j) mod E, replaced by a
                                             checkpoint's table when one is loaded
    s      = score_function(l)               sigmoid / softmax / sqrt_softplus
                                             (:data:`jmoe.routing.group_limited.SCORE_FUNCTIONS`)
    w_j    = s_{e_j}                         (/ (sum_j s_{e_j} + normalize_epsilon) with normalize)
    w_j   *= routed_scaling_factor

The layer is called with ``token_ids=`` (x's shape without d); the ids reach the router beside
its random draws, sharded like the tokens on a mesh. Ids outside ``[0, vocab_size)`` are an
error when the layer sees concrete ids (outside ``jit``) and clamped inside a trace. Slots and
losses are the token-choice ones (:func:`jmoe.routing.token_choice.plan_from_choices`), the
losses reading ``p = s / sum_e s_e`` (the softmax itself for softmax scores).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.checks import int_at_least, non_negative_number, positive_number
from jmoe.routing.group_limited import SCORE_FUNCTIONS, router_scores
from jmoe.routing.plan import RoutingPlan, check_logits
from jmoe.routing.router import Router
from jmoe.routing.token_choice import PRIORITIES, plan_from_choices

Array = jax.Array


def initial_table(vocab_size: int, k: int, num_experts: int) -> Array:
    """``T[t, j] = (t k + j) mod E``: ``[vocab_size, k]`` int32 (a token's k experts are distinct for k <= E)."""
    return ((jnp.arange(vocab_size)[:, None] * k + jnp.arange(k)) % num_experts).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TokenHash(Router):
    """The module docstring's router. Options: ``vocab_size`` (the table's rows), ``score_function``,
    ``normalize`` / ``normalize_epsilon``, ``routed_scaling_factor``, ``priority``."""

    name = "token_hash"
    params = ("router_weight", "router_bias", "token_experts")
    buffers = ("token_experts",)
    needs_token_ids = True

    vocab_size: int = 1
    score_function: str = "sigmoid"
    normalize: bool = False
    normalize_epsilon: float = 1e-20
    routed_scaling_factor: float = 1.0
    priority: str = "choice"

    def __post_init__(self):
        super().__post_init__()
        int_at_least("vocab_size", self.vocab_size, 1)
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function must be one of {tuple(SCORE_FUNCTIONS)}, got {self.score_function!r}")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")
        positive_number("routed_scaling_factor", self.routed_scaling_factor)
        non_negative_number("normalize_epsilon", self.normalize_epsilon)

    def init_params(self, key, d_model: int, num_experts: int) -> dict[str, Array]:
        return {**super().init_params(key, d_model, num_experts),
                "token_experts": initial_table(self.vocab_size, self.k, num_experts)}  # [V, k]

    def check_token_ids(self, token_ids: Array) -> None:
        """Integer ids; concrete ones in ``[0, vocab_size)``."""
        if not jnp.issubdtype(token_ids.dtype, jnp.integer):
            raise ValueError(f"token_ids must be integers, got {token_ids.dtype}")
        if not isinstance(token_ids, jax.core.Tracer) and token_ids.size and not (
                0 <= int(jnp.min(token_ids)) and int(jnp.max(token_ids)) < self.vocab_size):
            raise ValueError(f"token_ids must be in [0, vocab_size={self.vocab_size}), got values in "
                             f"[{int(jnp.min(token_ids))}, {int(jnp.max(token_ids))}]")

    def plan(self, logits, router_in, params, draws, token_mask, capacity) -> RoutingPlan:
        mask = check_logits(logits, token_mask)  # [G, S]
        num_groups, group_size, _ = logits.shape
        table = params["token_experts"]  # [V, k]
        experts = jnp.take(table, draws["token_ids"], axis=0, mode="clip").astype(jnp.int32)  # [G, S, K]
        scores = router_scores(logits, self.score_function)  # [G, S, E]
        weights = jnp.take_along_axis(scores, experts, axis=-1)  # [G, S, K]
        if self.normalize:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + self.normalize_epsilon)
        weights = weights * self.routed_scaling_factor
        requested = jnp.broadcast_to(mask[..., None], experts.shape)  # [G, S, K]
        order = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))  # [G, S]
        probs = scores if self.score_function == "softmax" else scores / jnp.sum(scores, axis=-1, keepdims=True)
        return plan_from_choices(logits, probs, experts, weights, requested, order, mask, capacity=capacity,
                                 priority=self.priority)
