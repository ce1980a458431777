"""Experts choose tokens (Zhou et al. 2022): each expert takes its best ``capacity`` tokens."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jmoe.routing.plan import RoutingPlan, check_logits, router_entropy, router_probabilities, slot_metrics, z_loss
from jmoe.routing.router import Router

Array = jax.Array




@functools.partial(jax.jit, static_argnames=("capacity",))
def experts_choose(logits: Array, *, capacity: int, token_mask: Array | None = None) -> RoutingPlan:
    """Expert choice routing: each expert takes its ``capacity`` best tokens.

    Slot c of expert e holds the token with the c-th highest probability
    ``p[s, e]`` among the group's valid tokens (ties: lower token index first);
    its combine weight is that probability. A token may be taken by 0..E
    experts; a token no expert takes gets output 0 (the residual carries it).

    It looks at the whole group to decide, so a token's routing depends on
    later tokens: use it for encoders / non-causal models, not for
    autoregressive decoding.

    The token side has K = E: ``token_expert[g, s, e] = e`` and
    ``token_slot[g, s, e]`` the slot token s holds in expert e, or -1.
    ``dropped_fraction`` is the fraction of valid tokens that no expert took;
    the load-balancing loss is 0 (expert choice is balanced by construction).

    Args:
      logits: [G, S, E] router logits, any float dtype.
      capacity: tokens per expert and group; at most S.
      token_mask: [G, S] bool; False tokens are never taken.
    """
    mask = check_logits(logits, token_mask)  # [G, S]
    num_groups, group_size, num_experts = logits.shape
    if not 1 <= capacity <= group_size:
        raise ValueError(
            f"capacity must be in [1, group_size={group_size}] for experts_choose, got {capacity}"
        )
    probs = router_probabilities(logits)  # [G, S, E]
    scores = jnp.where(mask[..., None], probs, -1.0)  # masked tokens rank last
    top_scores, top_tokens = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [G, E, C]
    slot_token = jnp.where(top_scores >= 0, top_tokens, -1).astype(jnp.int32)  # [G, E, C]

    # Token side: token_slot[g, s, e] = c where slot_token[g, e, c] == s.
    g = jnp.arange(num_groups)[:, None, None]
    e = jnp.arange(num_experts)[None, :, None]
    c = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), slot_token.shape)
    token_row = jnp.where(slot_token >= 0, slot_token, group_size)  # padding -> out of range
    token_slot = jnp.full((num_groups, group_size, num_experts), -1, dtype=jnp.int32)
    token_slot = token_slot.at[g, token_row, e].set(c, mode="drop")  # [G, S, E]
    token_expert = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), token_slot.shape)
    token_weight = jnp.where(token_slot >= 0, probs, 0.0)  # [G, S, E]

    taken = jnp.any(token_slot >= 0, axis=-1)  # [G, S]
    dropped = jnp.sum(mask & ~taken) / jnp.maximum(jnp.sum(mask), 1)
    tokens_per_expert, padding = slot_metrics(slot_token)
    return RoutingPlan(
        slot_token=slot_token,
        token_expert=token_expert,
        token_slot=token_slot,
        token_weight=token_weight.astype(jnp.float32),
        load_balancing_loss=jnp.zeros((), jnp.float32),
        z_loss=z_loss(logits, mask),
        dropped_fraction=dropped.astype(jnp.float32),
        requested_assignments=jnp.sum(mask).astype(jnp.float32),
        tokens_per_expert=tokens_per_expert,
        padding_fraction=padding,
        router_entropy=router_entropy(probs, mask),
    )


@dataclasses.dataclass(frozen=True)
class ExpertsChoose(Router):
    """:func:`experts_choose` as a router: ``k`` sets the capacity (the average number of
    experts per token); an expert takes each token at most once, so C is capped at S.
    It needs a capacity: no dropless mode."""

    name = "experts_choose"
    supports_dropless = False
    supports_input_scaling = False

    def plan(self, logits, router_in, params, draws, token_mask, capacity) -> RoutingPlan:
        return experts_choose(logits, capacity=min(capacity, logits.shape[1]), token_mask=token_mask)
