"""Tokens choose experts: Switch (k=1), GShard (k=2, random 2nd expert), top-k."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jmoe.routing.plan import (RoutingPlan, check_logits, global_load_balance, load_balancing_loss, router_entropy,
                               router_probabilities, slot_metrics, slots_from_tokens, z_loss)
from jmoe.routing.router import Router

Array = jax.Array

PRIORITIES = ("choice", "token")
SECOND_EXPERT_POLICIES = ("all", "random")




@functools.partial(
    jax.jit,
    static_argnames=("k", "capacity", "priority", "batch_prioritized", "normalize", "second_expert_policy"),
)
def tokens_choose(
    logits: Array,
    *,
    k: int,
    capacity: int,
    priority: str = "choice",
    batch_prioritized: bool = False,
    normalize: bool = False,
    token_mask: Array | None = None,
    second_expert_policy: str = "all",
    rng: Array | None = None,
    second_uniform: Array | None = None,
) -> RoutingPlan:
    """Each token picks its top-k experts; experts keep at most ``capacity`` of them.

    Args:
      logits: [G, S, E] router logits, any float dtype.
      k: experts per token (1 = Switch, 2 = GShard).
      capacity: slots per expert and group (see :func:`expert_capacity`).
      priority: who wins a slot of an expert over capacity.
        ``"choice"`` (GShard, Switch, flaxformer): every token's 1st choice, in
        token order, before any 2nd choice, and so on.
        ``"token"`` (MaxText): token 0's choices, then token 1's, and so on.
      batch_prioritized: V-MoE BPR: the token order of every pass above is the
        descending order of the tokens' top-1 probability (stable: ties keep the
        lower token index).
      normalize: combine weights renormalised over the k selected experts
        (``p_e / sum_{j in top-k} p_j``, before drops). Default: ``p_e``.
      token_mask: [G, S] bool; False tokens (padding) take no slot, get weight
        0, and are left out of the losses and metrics.
      second_expert_policy: ``"all"`` keeps every choice; ``"random"`` (GShard,
        k=2 only) keeps the 2nd choice with probability
        ``min(1, 2 * p2 / (p1 + p2))``: kept where ``u < keep_prob``, u uniform in
        [0, 1). A 2nd choice left out this way holds no slot and does not count
        as dropped.
      rng: PRNG key for the u draws ``[G, S]`` of ``second_expert_policy="random"``.
      second_uniform: [G, S] the u draws themselves (instead of ``rng``), e.g.
        drawn over a whole batch and sharded, so each device routes as one would.

    Top-k ties go to the lower expert index.

    Returns:
      A :class:`RoutingPlan` with K = k.
    """
    mask = check_logits(logits, token_mask)  # [G, S]
    num_groups, group_size, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    if second_expert_policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(
            f"second_expert_policy must be one of {SECOND_EXPERT_POLICIES}, got {second_expert_policy!r}"
        )
    if second_expert_policy == "random":
        if k != 2:
            raise ValueError(f"second_expert_policy='random' is GShard's top-2 policy; needs k=2, got k={k}")
        if rng is None and second_uniform is None:
            raise ValueError("second_expert_policy='random' needs an rng key or second_uniform draws")
        if second_uniform is not None and second_uniform.shape != (num_groups, group_size):
            raise ValueError(f"second_uniform must be [G, S] = {[num_groups, group_size]}, got {list(second_uniform.shape)}")

    probs = router_probabilities(logits)  # [G, S, E]
    top_probs, top_experts = jax.lax.top_k(probs, k)  # [G, S, K] each

    if normalize:
        weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)  # [G, S, K]
    else:
        weights = top_probs

    requested = jnp.broadcast_to(mask[..., None], top_experts.shape)  # [G, S, K]
    if second_expert_policy == "random":
        p1, p2 = top_probs[..., 0], top_probs[..., 1]  # [G, S]
        keep_prob = jnp.minimum(1.0, 2.0 * p2 / (p1 + p2))
        u = jax.random.uniform(rng, p2.shape) if second_uniform is None else second_uniform  # [G, S]
        keep_second = u < keep_prob  # [G, S]
        requested = requested.at[..., 1].set(requested[..., 1] & keep_second)

    # Token order for the passes over choices (BPR sorts by top-1 probability).
    if batch_prioritized:
        order = jnp.argsort(-top_probs[..., 0], axis=-1, stable=True)  # [G, S]
    else:
        order = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))

    return plan_from_choices(logits, probs, top_experts, weights, requested, order, mask, capacity=capacity,
                             priority=priority)


def plan_from_choices(logits: Array, probs: Array, top_experts: Array, weights: Array, requested: Array,
                      order: Array, token_mask: Array, *, capacity: int, priority: str) -> RoutingPlan:
    """The plan of a router whose tokens chose their experts: slots by priority
    (:func:`assign_slots`), weights 0 where dropped, the shared losses and metrics.

    ``logits`` / ``probs`` [G, S, E] (probs: what the losses and entropy read); ``top_experts``
    / ``weights`` / ``requested`` [G, S, K]; ``order`` [G, S] the token order of each pass;
    ``token_mask`` [G, S] bool.
    """
    num_experts = logits.shape[-1]
    token_slot = assign_slots(top_experts, requested, order, capacity=capacity, priority=priority,
                              num_experts=num_experts)  # [G, S, K]
    token_weight = jnp.where(token_slot >= 0, weights, 0.0)  # [G, S, K]
    slot_token = slots_from_tokens(top_experts, token_slot, num_experts, capacity)  # [G, E, C]

    num_requested = jnp.sum(requested).astype(jnp.float32)
    dropped = (jnp.sum(requested & (token_slot < 0)) / jnp.maximum(num_requested, 1.0)).astype(jnp.float32)
    tokens_per_expert, padding = slot_metrics(slot_token)
    return RoutingPlan(
        slot_token=slot_token,
        token_expert=top_experts.astype(jnp.int32),
        token_slot=token_slot.astype(jnp.int32),
        token_weight=token_weight.astype(jnp.float32),
        load_balancing_loss=load_balancing_loss(probs, top_experts, token_mask),
        z_loss=z_loss(logits, token_mask),
        dropped_fraction=dropped,
        requested_assignments=num_requested,
        tokens_per_expert=tokens_per_expert,
        padding_fraction=padding,
        router_entropy=router_entropy(probs, token_mask),
        extra_losses=global_load_balance(probs, top_experts, token_mask),
    )


def assign_slots(top_experts: Array, requested: Array, order: Array, *, capacity: int, priority: str,
                 num_experts: int) -> Array:
    """Each requested assignment's slot in its expert, in priority order: ``token_slot [G, S, K]``
    int32, -1 where not requested or over ``capacity``.

    ``top_experts`` / ``requested`` [G, S, K]; ``order`` [G, S] the token order of each pass
    (identity, or BPR's); ``priority`` choice-major (all 1st choices, then 2nd, ...) or
    token-major.
    """
    num_groups, group_size, k = top_experts.shape
    # Assignments in priority order: [G, S, K] -> [G, A] with A = S * K.
    expert_in_order = jnp.take_along_axis(top_experts, order[..., None], axis=1)  # [G, S, K]
    requested_in_order = jnp.take_along_axis(requested, order[..., None], axis=1)  # [G, S, K]
    if priority == "choice":
        expert_in_order = jnp.swapaxes(expert_in_order, 1, 2)  # [G, K, S]
        requested_in_order = jnp.swapaxes(requested_in_order, 1, 2)
    expert_flat = expert_in_order.reshape(num_groups, -1)  # [G, A]
    requested_flat = requested_in_order.reshape(num_groups, -1)  # [G, A]

    # Position of each assignment in its expert's queue: running count of
    # earlier requested assignments to the same expert.
    onehot = jax.nn.one_hot(expert_flat, num_experts, dtype=jnp.int32) * requested_flat[..., None]  # [G, A, E]
    position = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # [G, A]
    slot_flat = jnp.where(requested_flat & (position < capacity), position, -1)  # [G, A]

    # Back to token order [G, S, K].
    if priority == "choice":
        slot_in_order = jnp.swapaxes(slot_flat.reshape(num_groups, k, group_size), 1, 2)
    else:
        slot_in_order = slot_flat.reshape(num_groups, group_size, k)
    inverse_order = jnp.argsort(order, axis=-1)  # [G, S]
    token_slot = jnp.take_along_axis(slot_in_order, inverse_order[..., None], axis=1)  # [G, S, K]
    return token_slot


@dataclasses.dataclass(frozen=True)
class TokensChoose(Router):
    """Each token picks its top-k experts (:func:`tokens_choose`); the options are its own."""

    name = "tokens_choose"

    priority: str = "choice"
    batch_prioritized: bool = False
    normalize: bool = False
    second_expert_policy: str = "all"

    def __post_init__(self):
        super().__post_init__()
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")
        if self.second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(f"second_expert_policy must be one of {SECOND_EXPERT_POLICIES}, "
                             f"got {self.second_expert_policy!r}")
        if self.second_expert_policy == "random" and self.k not in (None, 2):
            raise ValueError(f"second_expert_policy='random' needs k=2, got k={self.k}")

    @property
    def draws_random(self) -> str:
        drawn = [super().draws_random, "the random 2nd-expert policy" if self.second_expert_policy == "random" else ""]
        return ", ".join(d for d in drawn if d)

    def draw(self, key_fn: Callable[[], Array], groups_shape: tuple[int, ...], num_experts: int) -> dict[str, Array]:
        """Jitter, then GShard's ``second_uniform [G, S]`` U[0, 1) draws (random policy)."""
        draws = super().draw(key_fn, groups_shape, num_experts)
        if self.second_expert_policy == "random":
            draws["second_uniform"] = jax.random.uniform(key_fn(), groups_shape[:2])  # [G, S]
        return draws

    def plan(self, logits, router_in, params, draws, token_mask, capacity) -> RoutingPlan:
        uniform = draws.get("second_uniform")  # None in eval mode: every 2nd choice is kept
        return tokens_choose(
            logits, k=self.k, capacity=capacity, priority=self.priority, batch_prioritized=self.batch_prioritized,
            normalize=self.normalize, token_mask=token_mask,
            second_expert_policy="all" if uniform is None else "random", second_uniform=uniform,
        )
