"""Routing: expert capacity, and routers as pure functions of router logits.

A router turns logits ``[G, S, E]`` (G groups of S tokens, E experts) into a
:class:`RoutingPlan`: which token sits in which expert slot, with what combine
weight, plus the auxiliary losses and metrics. Nothing here knows about Flax.

Conventions (the contracts of ``shared/GUIDE.md`` section 3):

* Router probabilities are ``softmax(float32(logits))`` over experts, whatever
  the dtype of the logits.
* Capacity ``C`` is per group and per expert; every shape is static.
* An expert over capacity keeps its slots for the assignments that come first in
  the priority order (choice-major by default); the rest are *dropped*: their
  combine weight is exactly 0 and they occupy no slot.
* The combine weight of a kept (token, expert) pair is the full-softmax
  probability of that expert (``normalize=False``), or that probability divided
  by the sum over the token's k selected experts (``normalize=True``, computed
  before any drop).

The plan is kept in a compact index form whose size never involves ``S * E * C``:

* slot side   ``slot_token [G, E, C]`` int32: the token (index within its group)
  in slot c of expert e, or -1 for a padding slot;
* token side  ``token_expert [G, S, K]`` int32, ``token_slot [G, S, K]`` int32
  (-1 when that assignment holds no slot) and ``token_weight [G, S, K]`` float32
  (exactly 0 when ``token_slot == -1``).

The dense one-hot views used by the einsum backend, ``dispatch_mask()`` and
``combine_array()`` ``[G, S, E, C]``, are built only when asked for.
"""

from __future__ import annotations

import functools
import math
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

PRIORITIES = ("choice", "token")
SECOND_EXPERT_POLICIES = ("all", "random")


# ----------------------------------------------------------------------------
# Capacity
# ----------------------------------------------------------------------------


def expert_capacity(
    tokens_per_group: int,
    num_experts: int,
    *,
    k: int = 1,
    capacity_factor: float = 1.0,
    min_capacity: int = 1,
    multiple_of: int = 1,
) -> int:
    """Slots per expert and per group.

    ``C = ceil(k * capacity_factor * tokens_per_group / num_experts)``, then
    ``C = max(C, min_capacity)``, then C is rounded up to a multiple of
    ``multiple_of``.

    Switch Transformer's example: 6 tokens, 3 experts, k=1: factor 1.0 gives 2,
    factor 1.5 gives 3.

    Raises:
      ValueError: naming the bad argument, for non-positive sizes or factor,
        ``k < 1`` or ``k > num_experts``, negative ``min_capacity``,
        ``multiple_of < 1``, or a capacity that comes out 0.
    """
    if tokens_per_group < 1:
        raise ValueError(f"tokens_per_group must be >= 1, got {tokens_per_group}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > num_experts:
        raise ValueError(f"k={k} must be <= num_experts={num_experts}")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    if min_capacity < 0:
        raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    # Rounded to 9 digits first so that 1.1 * 10 / 11 stays exactly 1 (no float noise).
    capacity = math.ceil(round(k * capacity_factor * tokens_per_group / num_experts, 9))
    capacity = max(capacity, min_capacity)
    capacity = -(-capacity // multiple_of) * multiple_of
    if capacity == 0:
        raise ValueError(
            "capacity came out 0 (capacity_factor * k * tokens_per_group / num_experts "
            "rounds to 0 and min_capacity is 0): every token would be dropped; raise "
            "capacity_factor or min_capacity"
        )
    return capacity


# ----------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class RoutingPlan:
    """Which token fills which expert slot with what weight; losses; metrics.

    Attributes:
      slot_token: [G, E, C] int32, token index in the group, -1 for padding.
      token_expert: [G, S, K] int32, the expert of each of the token's K choices.
      token_slot: [G, S, K] int32, slot in that expert, -1 if the assignment
        holds no slot (dropped over capacity, skipped, or a masked token).
      token_weight: [G, S, K] float32, combine weight; exactly 0 where
        ``token_slot == -1``.
      load_balancing_loss: scalar, Switch ``E * sum_e f_e * P_e`` averaged over
        groups (0 for expert choice).
      z_loss: scalar, mean over tokens of ``logsumexp(logits)^2``.
      dropped_fraction: scalar, dropped assignments / requested assignments.
      requested_assignments: scalar float32, the denominator of
        ``dropped_fraction`` (valid tokens x k, less the 2nd choices GShard's
        random policy skipped; valid tokens for expert choice): the weight of
        this plan's ``dropped_fraction`` when plans over disjoint tokens (the
        devices of a mesh) are averaged.
      tokens_per_expert: [E] float32, kept assignments per expert, summed over groups.
      padding_fraction: scalar, empty slots / (G * E * C).
      router_entropy: scalar, mean over tokens of ``-sum_e p_e log p_e``.
      expert_importance, expert_load: [E] float32, the noisy top-k router's
        ``Importance`` and ``Load`` vectors (sums over the plan's valid tokens,
        see :mod:`jmoe.noisy`); None for every other router. Sums, so the
        vectors of plans over disjoint tokens add up (``psum`` on a mesh) to
        the vectors of the whole batch.
      importance_weight, load_weight: static floats, the loss coefficients.

    The losses ``importance_loss`` / ``load_loss`` are not stored: they are
    computed from the vectors (:func:`jmoe.noisy.balance_loss`), 0 when the
    vectors are None, so ``aux()`` has the same keys whatever the router.
    """

    slot_token: Array
    token_expert: Array
    token_slot: Array
    token_weight: Array
    load_balancing_loss: Array
    z_loss: Array
    dropped_fraction: Array
    requested_assignments: Array
    tokens_per_expert: Array
    padding_fraction: Array
    router_entropy: Array
    expert_importance: Array | None = None
    expert_load: Array | None = None
    importance_weight: float = flax.struct.field(pytree_node=False, default=0.0)
    load_weight: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def importance_loss(self) -> Array:
        """``importance_weight * CV(expert_importance)^2``; 0 without the vector."""
        from jmoe import noisy  # noisy imports this module

        return noisy.balance_loss(self.expert_importance, self.importance_weight)

    @property
    def load_loss(self) -> Array:
        """``load_weight * CV(expert_load)^2``; 0 without the vector."""
        from jmoe import noisy

        return noisy.balance_loss(self.expert_load, self.load_weight)

    @property
    def num_groups(self) -> int:
        return self.slot_token.shape[0]

    @property
    def num_experts(self) -> int:
        return self.slot_token.shape[1]

    @property
    def capacity(self) -> int:
        return self.slot_token.shape[2]

    @property
    def group_size(self) -> int:
        return self.token_expert.shape[1]

    def dispatch_mask(self) -> Array:
        """[G, S, E, C] bool: True where token s sits in slot c of expert e."""
        expert_1h, slot_1h = self._one_hot_parts()
        return jnp.einsum("gske,gskc->gsec", expert_1h, slot_1h) > 0

    def combine_array(self) -> Array:
        """[G, S, E, C] float32: the combine weight of token s in slot c of expert e."""
        return jnp.einsum("gske,gskc,gsk->gsec", *self._one_hot_parts(), self.token_weight)

    def _one_hot_parts(self) -> tuple[Array, Array]:
        expert_1h = jax.nn.one_hot(self.token_expert, self.num_experts, dtype=jnp.float32)  # [G, S, K, E]
        slot_1h = jax.nn.one_hot(self.token_slot, self.capacity, dtype=jnp.float32)  # [G, S, K, C]; -1 -> zeros
        return expert_1h, slot_1h

    def aux(self) -> dict[str, Array]:
        """The losses and metrics as a flat dict (what ``jmoe.MoE`` returns)."""
        return {
            "load_balancing_loss": self.load_balancing_loss,
            "z_loss": self.z_loss,
            "dropped_fraction": self.dropped_fraction,
            "tokens_per_expert": self.tokens_per_expert,
            "padding_fraction": self.padding_fraction,
            "router_entropy": self.router_entropy,
            "importance_loss": self.importance_loss,
            "load_loss": self.load_loss,
        }


# ----------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------


def router_probabilities(logits: Array) -> Array:
    """``softmax(float32(logits))`` over the last (expert) axis."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _check_logits(logits: Array, token_mask: Array | None) -> Array:
    if logits.ndim != 3:
        raise ValueError(f"router logits must be [G, S, E], got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"router logits must be floating point, got {logits.dtype}")
    if token_mask is None:
        return jnp.ones(logits.shape[:2], dtype=bool)
    if token_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"token_mask must be [G, S] = {logits.shape[:2]}, got {token_mask.shape}"
        )
    return token_mask.astype(bool)


def _masked_mean(values: Array, mask: Array) -> Array:
    """Mean of ``values`` over entries where ``mask`` (0 when there are none)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def z_loss(logits: Array, token_mask: Array) -> Array:
    """Router z-loss (ST-MoE): mean over valid tokens of ``logsumexp(logits)^2``."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [G, S]
    return _masked_mean(lse**2, token_mask)


def router_entropy(probs: Array, token_mask: Array) -> Array:
    """Mean over valid tokens of ``-sum_e p_e log p_e``."""
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)  # [G, S]
    return _masked_mean(entropy, token_mask)


def load_balancing_loss(probs: Array, top_experts: Array, token_mask: Array) -> Array:
    """Switch load-balancing loss ``E * sum_e f_e * P_e``, averaged over groups.

    ``f_e``: fraction of the group's valid tokens that have e among their top-k
    (before capacity drops); ``P_e``: mean router probability of e over the
    group's valid tokens. It equals k when routing is perfectly balanced.

    Args:
      probs: [G, S, E] float32.
      top_experts: [G, S, K] int32.
      token_mask: [G, S] bool.
    """
    num_experts = probs.shape[-1]
    mask = token_mask.astype(jnp.float32)[..., None]  # [G, S, 1]
    count = jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # [G, 1]
    selected = jnp.sum(jax.nn.one_hot(top_experts, num_experts, dtype=jnp.float32), axis=2)  # [G, S, E]
    f = jnp.sum(selected * mask, axis=1) / count  # [G, E]
    p = jnp.sum(probs * mask, axis=1) / count  # [G, E]
    return jnp.mean(num_experts * jnp.sum(f * p, axis=-1))


def _slot_metrics(slot_token: Array) -> tuple[Array, Array]:
    """tokens_per_expert [E] (filled slots, summed over groups) and padding_fraction
    (empty slots / (G * E * C)) from ``slot_token [G, E, C]``."""
    filled = slot_token >= 0  # [G, E, C]
    tokens_per_expert = jnp.sum(filled, axis=(0, 2)).astype(jnp.float32)  # [E]
    return tokens_per_expert, 1.0 - jnp.mean(filled.astype(jnp.float32))


# ----------------------------------------------------------------------------
# Tokens choose experts: Switch (k=1), GShard (k=2), top-k
# ----------------------------------------------------------------------------


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
    mask = _check_logits(logits, token_mask)  # [G, S]
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

    token_weight = jnp.where(token_slot >= 0, weights, 0.0)  # [G, S, K]
    slot_token = _slots_from_tokens(top_experts, token_slot, num_experts, capacity)  # [G, E, C]

    num_requested = jnp.sum(requested).astype(jnp.float32)
    dropped = (jnp.sum(requested & (token_slot < 0)) / jnp.maximum(num_requested, 1.0)).astype(jnp.float32)
    tokens_per_expert, padding = _slot_metrics(slot_token)
    return RoutingPlan(
        slot_token=slot_token,
        token_expert=top_experts.astype(jnp.int32),
        token_slot=token_slot.astype(jnp.int32),
        token_weight=token_weight.astype(jnp.float32),
        load_balancing_loss=load_balancing_loss(probs, top_experts, mask),
        z_loss=z_loss(logits, mask),
        dropped_fraction=dropped,
        requested_assignments=num_requested,
        tokens_per_expert=tokens_per_expert,
        padding_fraction=padding,
        router_entropy=router_entropy(probs, mask),
    )


def _slots_from_tokens(token_expert: Array, token_slot: Array, num_experts: int, capacity: int) -> Array:
    """Invert the token side: [G, E, C] token index per slot, -1 where empty."""
    num_groups, group_size, k = token_expert.shape
    g = jnp.broadcast_to(jnp.arange(num_groups)[:, None, None], token_expert.shape)
    s = jnp.broadcast_to(jnp.arange(group_size)[None, :, None], token_expert.shape)
    slot = jnp.where(token_slot >= 0, token_slot, capacity)  # out of range -> dropped by the scatter
    slot_token = jnp.full((num_groups, num_experts, capacity), -1, dtype=jnp.int32)
    return slot_token.at[g, token_expert, slot].set(s.astype(jnp.int32), mode="drop")


# ----------------------------------------------------------------------------
# Experts choose tokens (Zhou et al. 2022)
# ----------------------------------------------------------------------------


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
    mask = _check_logits(logits, token_mask)  # [G, S]
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
    tokens_per_expert, padding = _slot_metrics(slot_token)
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
