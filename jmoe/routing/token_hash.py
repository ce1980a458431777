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
losses are group-limited routing's (:func:`jmoe.routing.group_limited.plan_from_scores`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.checks import int_at_least
from jmoe.routing.group_limited import check_score_options, plan_from_scores, router_scores
from jmoe.routing.plan import RoutingPlan, check_logits
from jmoe.routing.router import Router

Array = jax.Array


def initial_table(vocab_size: int, k: int, num_experts: int) -> Array:
    """``T[t, j] = (t k + j) mod E``: ``[vocab_size, k]`` int32 (a token's k experts are distinct for k <= E)."""
    return ((jnp.arange(vocab_size)[:, None] * k + jnp.arange(k)) % num_experts).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TokenHash(Router):
    """The module docstring's router. Options: ``vocab_size`` (the table's rows), ``score_function``,
    ``normalize`` / ``normalize_epsilon``, ``routed_scaling_factor``, ``priority``."""

    name = "token_hash"
    params = (*Router.params, "token_experts")
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
        check_score_options(self)

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
        table = params["token_experts"]  # [V, k]
        experts = jnp.take(table, draws["token_ids"], axis=0, mode="clip").astype(jnp.int32)  # [G, S, K]
        scores = router_scores(logits, self.score_function)  # [G, S, E]
        return plan_from_scores(logits, scores, self.score_function, experts, mask, normalize=self.normalize,
                                normalize_epsilon=float(self.normalize_epsilon),
                                routed_scaling_factor=float(self.routed_scaling_factor), capacity=capacity,
                                priority=self.priority)
