"""The routing plan: which token fills which expert slot, with what weight; the
losses and metrics every router shares.

A router turns logits ``[G, S, E]`` (G groups of S tokens, E experts) into a
:class:`RoutingPlan`. Nothing here knows about Flax.

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

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class ExtraLoss:
    """A router's own loss ``finalize(statistic)``, computed from a statistic that adds up.

    ``statistic`` (float32, e.g. [E]) is a *sum over the plan's valid tokens*: that is the
    declared cross-device reduction. The statistics of plans over disjoint tokens (the
    devices of a mesh) are summed (``psum``) and the loss is computed from the total, so
    it is the whole batch's loss. ``finalize`` is static (hashable, compared by value).
    """

    statistic: Array
    finalize: Callable[[Array], Array] = flax.struct.field(pytree_node=False)

    @property
    def value(self) -> Array:
        return jnp.asarray(self.finalize(self.statistic), jnp.float32)


GLOBAL_LOAD_BALANCING = "global_load_balancing_loss"
# Unweighted balance losses every layer's aux has (0 where a router has none); the user weights them.
BALANCE_LOSSES = ("sequence_balance_loss", GLOBAL_LOAD_BALANCING)


@dataclasses.dataclass(frozen=True)
class GlobalLoadBalance:
    """The global-batch load-balancing loss from its statistic (an :class:`ExtraLoss` finalizer):
    ``statistic [2E + 1]`` = (selections per expert, probability sums per expert, valid tokens),
    each summed over the tokens of every group (and, on a mesh, every device), then
    ``E * sum_e f_e P_e`` with ``f_e = selections_e / T`` and ``P_e = probability sum_e / T``.
    It equals k when the whole batch is balanced (Megatron-Core's global aux loss)."""

    def __call__(self, statistic: Array) -> Array:
        num_experts = (statistic.shape[0] - 1) // 2
        tokens = jnp.maximum(statistic[-1], 1.0)
        f = statistic[:num_experts] / tokens  # [E]
        p = statistic[num_experts:2 * num_experts] / tokens  # [E]
        return num_experts * jnp.sum(f * p)


def global_load_balance(probs: Array, top_experts: Array, token_mask: Array) -> dict[str, ExtraLoss]:
    """``{"global_load_balancing_loss": ExtraLoss}`` for a plan's ``extra_losses``: the
    Switch loss with f and P over the whole (global) batch instead of per group
    (:class:`GlobalLoadBalance`). probs [G, S, E] float32, top_experts [G, S, K], token_mask [G, S]."""
    num_experts = probs.shape[-1]
    mask = token_mask.astype(bool)[..., None]  # [G, S, 1]
    selected = jnp.sum(jax.nn.one_hot(top_experts, num_experts, dtype=jnp.float32), axis=2)  # [G, S, E]
    statistic = jnp.concatenate([
        jnp.sum(jnp.where(mask, selected, 0.0), axis=(0, 1)),  # [E]
        jnp.sum(jnp.where(mask, probs, 0.0), axis=(0, 1)),  # [E]: masked tokens never read
        jnp.sum(mask.astype(jnp.float32))[None],
    ])  # [2E + 1]
    return {GLOBAL_LOAD_BALANCING: ExtraLoss(statistic, GlobalLoadBalance())}




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
        groups (0 for expert choice). ``aux()`` adds ``sequence_balance_loss`` = this / K:
        DeepSeek-V3's sequence-wise balance loss ``sum_i f'_i P_i``, ``f'_i = E / (K T) *
        count_i``, per group (a sequence by default), with the router's probabilities (the
        normalised scores for a sigmoid router).
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
      extra_losses: losses computed from statistics summed over tokens, by name
        (:class:`ExtraLoss`): noisy top-k's importance and load losses, the token-choice
        routers' ``global_load_balancing_loss``.
      shared_weight: [G, S, n] float32, the weights of the layer's n shared experts per token
        when the router weights them (:class:`jmoe.routing.SharedSink`); None: the shared
        expert is added unweighted.
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
    extra_losses: dict[str, ExtraLoss] = flax.struct.field(default_factory=dict)
    shared_weight: Array | None = None

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
        """The losses and metrics as a flat dict (what ``jmoe.MoE`` returns), extra losses included."""
        return {
            "load_balancing_loss": self.load_balancing_loss,
            "sequence_balance_loss": self.load_balancing_loss / self.token_expert.shape[-1],
            "z_loss": self.z_loss,
            "dropped_fraction": self.dropped_fraction,
            "tokens_per_expert": self.tokens_per_expert,
            "padding_fraction": self.padding_fraction,
            "router_entropy": self.router_entropy,
            **{name: loss.value for name, loss in self.extra_losses.items()},
        }




def router_probabilities(logits: Array) -> Array:
    """``softmax(float32(logits))`` over the last (expert) axis."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def check_logits(logits: Array, token_mask: Array | None) -> Array:
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


def masked_mean(values: Array, mask: Array) -> Array:
    """Mean of ``values`` over entries where ``mask`` (0 when there are none); values off the
    mask are never read (a NaN in a masked-out token does not reach the mean)."""
    mask = mask.astype(bool)
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def z_loss(logits: Array, token_mask: Array) -> Array:
    """Router z-loss (ST-MoE): mean over valid tokens of ``logsumexp(logits)^2``."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [G, S]
    return masked_mean(lse**2, token_mask)


def router_entropy(probs: Array, token_mask: Array) -> Array:
    """Mean over valid tokens of ``-sum_e p_e log p_e``."""
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)  # [G, S]
    return masked_mean(entropy, token_mask)


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
    mask = token_mask.astype(bool)[..., None]  # [G, S, 1]
    count = jnp.maximum(jnp.sum(mask.astype(jnp.float32), axis=1), 1.0)  # [G, 1]
    selected = jnp.sum(jax.nn.one_hot(top_experts, num_experts, dtype=jnp.float32), axis=2)  # [G, S, E]
    f = jnp.sum(jnp.where(mask, selected, 0.0), axis=1) / count  # [G, E]
    p = jnp.sum(jnp.where(mask, probs, 0.0), axis=1) / count  # [G, E]: masked tokens never read
    return jnp.mean(num_experts * jnp.sum(f * p, axis=-1))


def slot_metrics(slot_token: Array) -> tuple[Array, Array]:
    """tokens_per_expert [E] (filled slots, summed over groups) and padding_fraction
    (empty slots / (G * E * C)) from ``slot_token [G, E, C]``."""
    filled = slot_token >= 0  # [G, E, C]
    tokens_per_expert = jnp.sum(filled, axis=(0, 2)).astype(jnp.float32)  # [E]
    return tokens_per_expert, 1.0 - jnp.mean(filled.astype(jnp.float32))


def slots_from_tokens(token_expert: Array, token_slot: Array, num_experts: int, capacity: int) -> Array:
    """Invert the token side: [G, E, C] token index per slot, -1 where empty."""
    num_groups, group_size, k = token_expert.shape
    g = jnp.broadcast_to(jnp.arange(num_groups)[:, None, None], token_expert.shape)
    s = jnp.broadcast_to(jnp.arange(group_size)[None, :, None], token_expert.shape)
    slot = jnp.where(token_slot >= 0, token_slot, capacity)  # out of range -> dropped by the scatter
    slot_token = jnp.full((num_groups, num_experts, capacity), -1, dtype=jnp.int32)
    return slot_token.at[g, token_expert, slot].set(s.astype(jnp.int32), mode="drop")
