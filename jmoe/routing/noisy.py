"""Noisy top-k gating (Shazeer et al. 2017) and its importance and load losses.

Pure functions of router logits; nothing here knows about Flax. With the gate
weight ``W_g`` and the noise weight ``W_noise`` (both ``[d, E]``, float32), a
token x has

* clean logits        ``c(x) = x W_g``                                  [E]
* noise scale         ``sigma(x) = softplus(x W_noise)``                [E]
* noisy logits        ``H(x)_i = c(x)_i + eps_i * sigma(x)_i``, ``eps ~ N(0, 1)``
  drawn in train mode only (without noise ``H = c``);
* gates               ``G(x) = softmax(KeepTopK(H(x), k))``, ``KeepTopK`` leaving
  the k largest entries and setting the rest to -inf (ties: lower expert index),
  so G is the softmax over the k kept experts and exactly 0 elsewhere.

Losses, over every valid token of the batch (all groups together):

* ``Importance_i = sum_x G(x)_i``;
  ``importance_loss = w_importance * CV(Importance)^2``;
* ``P(x, i) = Phi((c(x)_i - kth_excluding(H(x), k, i)) / sigma(x)_i)``: the
  probability that expert i is among the noisy top k when only ``eps_i`` is
  redrawn (the other components of H kept), ``kth_excluding(v, k, i)`` the k-th
  largest entry of v with component i left out, Phi the standard normal CDF;
  ``Load_i = sum_x P(x, i)`` (a smooth estimate of how many tokens pick i);
  ``load_loss = w_load * CV(Load)^2``. Gradients reach ``W_noise`` through it.
* ``CV(v)^2 = Var(v) / (Mean(v)^2 + 1e-10)`` over the E experts, with the
  population variance (divide by E); the epsilon keeps an all-zero v at 0.

The plan carries both losses as :class:`~jmoe.routing.plan.ExtraLoss` of the vectors
``Importance`` / ``Load`` [E] (sums over tokens), computed by :func:`balance_loss` (the
one definition): on an expert-parallel mesh each device's vectors are summed over the
devices first, so the losses are the whole batch's.

:func:`noisy_top_k` builds a :class:`~jmoe.routing.RoutingPlan` by handing
``KeepTopK(H, k)`` to :func:`jmoe.routing.tokens_choose`: its float32 softmax is
exactly G(x), so the combine weights are the paper's gates and the slots go
through the same capacity / priority machinery as every other router.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jmoe.compat import normal_cdf
from jmoe.routing.plan import ExtraLoss, RoutingPlan, z_loss
from jmoe.routing.router import Router
from jmoe.routing.token_choice import tokens_choose

Array = jax.Array

CV_EPSILON = 1e-10
"""Added to ``Mean^2`` in :func:`cv_squared` (the paper's code uses the same)."""

MIN_NOISE_STD = 1e-6
"""Lower bound on ``sigma`` where :func:`prob_in_top_k` divides by it (softplus can underflow to 0)."""


def noise_std(noise_logits: Array) -> Array:
    """``sigma = softplus(x W_noise)`` in float32, same shape as the input."""
    return jax.nn.softplus(noise_logits.astype(jnp.float32))


def noisy_logits(clean_logits: Array, noise_logits: Array, eps: Array | None) -> Array:
    """``H = clean + eps * softplus(noise_logits)`` in float32; ``H = clean`` when eps is None.

    Args:
      clean_logits: [..., E], ``x W_g``.
      noise_logits: [..., E], ``x W_noise``.
      eps: [..., E] standard normal draws, or None (eval mode: no noise).
    """
    clean = clean_logits.astype(jnp.float32)
    if eps is None:
        return clean
    return clean + eps.astype(jnp.float32) * noise_std(noise_logits)  # [..., E]


def top_k_mask(values: Array, k: int) -> Array:
    """[..., E] bool: True on the k largest entries of the last axis (ties: lower index)."""
    num_experts = values.shape[-1]
    _, top = jax.lax.top_k(values, k)  # [..., K]
    return jnp.any(top[..., None] == jnp.arange(num_experts), axis=-2)  # [..., E]


def keep_top_k(values: Array, k: int) -> Array:
    """The paper's ``KeepTopK``: the k largest entries kept, the others set to -inf."""
    return jnp.where(top_k_mask(values, k), values, -jnp.inf)  # [..., E]


def gates(h: Array, k: int) -> Array:
    """``G = softmax(KeepTopK(H, k))`` in float32: [..., E], sums to 1, exactly 0 off the top k."""
    return jax.nn.softmax(keep_top_k(h.astype(jnp.float32), k), axis=-1)


def cv_squared(values: Array, epsilon: float = CV_EPSILON) -> Array:
    """``Var(v) / (Mean(v)^2 + epsilon)`` over the last axis, population variance.

    0 when all entries are equal (perfect balance), and 0 (not NaN) for an
    all-zero v; ``E - 1`` when a single entry holds everything (E entries).
    """
    values = values.astype(jnp.float32)
    mean = jnp.mean(values, axis=-1)
    var = jnp.mean((values - mean[..., None]) ** 2, axis=-1)
    return var / (mean**2 + epsilon)


@dataclasses.dataclass(frozen=True)
class BalanceLoss:
    """``weight * CV(v)^2`` as a static, hashable finalizer of an :class:`ExtraLoss`."""

    weight: float

    def __call__(self, values: Array) -> Array:
        return balance_loss(values, self.weight)


def balance_loss(values: Array | None, weight: float) -> Array:
    """``weight * CV(values)^2`` as a float32 scalar: the importance loss from
    ``Importance``, the load loss from ``Load`` (0 when ``values`` is None).

    The one definition of both losses: the one-device layer applies it to its
    plan's vectors, the expert-parallel layer to their sum over the devices.
    """
    if values is None:
        return jnp.zeros((), jnp.float32)
    return jnp.asarray(weight * cv_squared(values), jnp.float32)


def kth_excluding(values: Array, k: int) -> Array:
    """``out[..., i]`` = the k-th largest entry of ``values[..., :]`` with entry i left out.

    With ``t_1 >= ... >= t_{k+1}`` the k+1 largest entries: it is ``t_{k+1}``
    when ``v_i >= t_k`` (i is one of the top k, removing it moves the k-th one
    down; when ``v_i`` ties ``t_k`` outside the top k, ``t_k = t_{k+1}``) and
    ``t_k`` otherwise.

    Args:
      values: [..., E], E > k.
      k: 1 <= k < E.
    """
    num_experts = values.shape[-1]
    if not 1 <= k < num_experts:
        raise ValueError(f"kth_excluding needs 1 <= k < E={num_experts}, got k={k}")
    top, _ = jax.lax.top_k(values, k + 1)  # [..., K + 1]
    kth, next_one = top[..., k - 1 : k], top[..., k : k + 1]  # [..., 1] each
    return jnp.where(values >= kth, next_one, kth)  # [..., E]


def prob_in_top_k(clean_logits: Array, h: Array, noise_logits: Array, k: int) -> Array:
    """``P(x, i) = Phi((c_i - kth_excluding(H, k, i)) / sigma_i)``: [..., E] float32.

    The probability that expert i is in the top k of H when ``eps_i`` alone is
    redrawn. With k = E every expert is always in: P = 1. ``sigma`` is clamped
    below at :data:`MIN_NOISE_STD`.
    """
    clean = clean_logits.astype(jnp.float32)
    if k == clean.shape[-1]:
        return jnp.ones_like(clean)
    threshold = kth_excluding(h.astype(jnp.float32), k)  # [..., E]
    sigma = jnp.maximum(noise_std(noise_logits), MIN_NOISE_STD)  # [..., E]
    return normal_cdf((clean - threshold) / sigma)


def _masked_sum(per_token: Array, token_mask: Array | None) -> Array:
    """[G, S, E] -> [E]: sum over the valid tokens of every group."""
    if token_mask is not None:
        per_token = jnp.where(token_mask.astype(bool)[..., None], per_token, 0.0)
    return jnp.sum(per_token.reshape(-1, per_token.shape[-1]), axis=0)


def importance(gate_values: Array, token_mask: Array | None = None) -> Array:
    """``Importance_i = sum_x G(x)_i`` over valid tokens: [G, S, E] -> [E]."""
    return _masked_sum(gate_values, token_mask)


def smooth_load(
    clean_logits: Array, h: Array, noise_logits: Array, k: int, token_mask: Array | None = None
) -> Array:
    """``Load_i = sum_x P(x, i)`` over valid tokens: [G, S, E] inputs -> [E]."""
    return _masked_sum(prob_in_top_k(clean_logits, h, noise_logits, k), token_mask)


def _check_weight(name: str, weight: float) -> None:
    if not (weight >= 0 and math.isfinite(weight)):
        raise ValueError(f"{name} must be finite and >= 0, got {weight}")


@functools.partial(
    jax.jit,
    static_argnames=("k", "capacity", "importance_weight", "load_weight", "priority", "batch_prioritized"),
)
def noisy_top_k(
    clean_logits: Array,
    noise_logits: Array,
    *,
    k: int,
    capacity: int,
    rng: Array | None = None,
    eps: Array | None = None,
    importance_weight: float = 0.1,
    load_weight: float = 0.1,
    priority: str = "choice",
    batch_prioritized: bool = False,
    token_mask: Array | None = None,
) -> RoutingPlan:
    """Noisy top-k gating as a routing plan (tokens choose experts).

    Each token's top k of ``H`` (see the module docstring) request a slot in
    their experts, in the order of :func:`jmoe.routing.tokens_choose`
    (``priority``, ``batch_prioritized``), within ``capacity`` per expert and
    group. The combine weight of a kept assignment is its gate ``G(x)_e``
    (softmax over the k kept experts, taken before capacity drops).

    Aux values of the plan:
      importance_loss: ``importance_weight * CV(Importance)^2``, an extra loss of the
        statistic Importance [E];
      load_loss: ``load_weight * CV(Load)^2`` (smooth estimator), of Load [E];
      z_loss: from the clean logits ``c`` (H outside the top k is -inf);
      load_balancing_loss: Switch ``E * sum_e f_e * P_e`` with ``P_e`` the mean
        gate ``G(x)_e`` and ``f_e`` the fraction of tokens with e in their noisy top k;
      router_entropy: of ``G(x)`` (at most ``log k``).

    Args:
      clean_logits: [G, S, E] ``x W_g``, any float dtype (used in float32).
      noise_logits: [G, S, E] ``x W_noise``.
      k: experts per token, 1 <= k <= E.
      capacity: slots per expert and group.
      rng: PRNG key for ``eps`` (train mode): ``eps = normal(rng, [G, S, E])``;
        None = no noise (eval mode, deterministic). The load estimate still uses ``sigma``.
      eps: [G, S, E] the standard normal draws themselves, instead of ``rng``
        (the expert-parallel layer draws them over the global batch and hands
        each device its share, so its noise is the one-device layer's).
      importance_weight, load_weight: the loss coefficients, >= 0 (the paper
        uses 0.1 each); static (a new value compiles anew).
      token_mask: [G, S] bool; False tokens take no slot and are left out of
        every loss.

    Edge case: if a kept gate underflows to exactly 0 (logits more than ~100
    apart among the top k), that assignment may be booked to another expert
    with weight 0; the output is unaffected.
    """
    if clean_logits.ndim != 3:
        raise ValueError(f"router logits must be [G, S, E], got shape {clean_logits.shape}")
    if noise_logits.shape != clean_logits.shape:
        raise ValueError(
            f"noise_logits must have the clean logits' shape {clean_logits.shape}, got {noise_logits.shape}"
        )
    num_experts = clean_logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
    _check_weight("importance_weight", importance_weight)
    _check_weight("load_weight", load_weight)
    if rng is not None and eps is not None:
        raise ValueError("give noisy_top_k either rng or eps, not both")
    if eps is not None and eps.shape != clean_logits.shape:
        raise ValueError(f"eps must have the logits' shape {clean_logits.shape}, got {eps.shape}")

    clean = clean_logits.astype(jnp.float32)  # [G, S, E]
    if rng is not None:
        eps = jax.random.normal(rng, clean.shape, jnp.float32)  # [G, S, E]
    h = noisy_logits(clean, noise_logits, eps)  # [G, S, E]
    sparse = keep_top_k(h, k)  # [G, S, E], -inf off the top k
    plan = tokens_choose(
        sparse, k=k, capacity=capacity, priority=priority, batch_prioritized=batch_prioritized,
        normalize=False, token_mask=token_mask,
    )
    gate_values = jax.nn.softmax(sparse, axis=-1)  # [G, S, E], G(x)
    mask = None if token_mask is None else token_mask.astype(bool)
    valid = jnp.ones(clean.shape[:2], bool) if mask is None else mask  # [G, S]
    return plan.replace(
        z_loss=z_loss(clean, valid),
        extra_losses={
            **plan.extra_losses,  # the global load-balancing loss of the gates
            "importance_loss": ExtraLoss(importance(gate_values, mask), BalanceLoss(importance_weight)),  # [E]
            "load_loss": ExtraLoss(smooth_load(clean, h, noise_logits, k, mask), BalanceLoss(load_weight)),  # [E]
        },
    )


@dataclasses.dataclass(frozen=True)
class NoisyTopK(Router):
    """:func:`noisy_top_k` as a router: a second float32 weight ``noise_weight [d, E]``,
    zero-initialised as in the paper; ``eps [G, S, E]`` drawn in train mode only; the
    importance and load losses (coefficients >= 0, the paper's 0.1 by default)."""

    name = "noisy_top_k"
    params = (*Router.params, "noise_weight")
    extra_losses = ("importance_loss", "load_loss")

    priority: str = "choice"
    batch_prioritized: bool = False
    importance_loss_weight: float = dataclasses.field(default=0.1, metadata={"off": 0.0})
    load_loss_weight: float = dataclasses.field(default=0.1, metadata={"off": 0.0})

    def __post_init__(self):
        super().__post_init__()
        _check_weight("importance_loss_weight", self.importance_loss_weight)
        _check_weight("load_loss_weight", self.load_loss_weight)

    @property
    def draws_random(self) -> str:
        return ", ".join(d for d in (super().draws_random, "the logit noise eps") if d)

    def init_params(self, key: Array, d_model: int, num_experts: int) -> dict[str, Array]:
        return {**super().init_params(key, d_model, num_experts),
                "noise_weight": jnp.zeros((d_model, num_experts), jnp.float32)}  # W_noise

    def draw(self, key_fn: Callable[[], Array], groups_shape: tuple[int, ...], num_experts: int) -> dict[str, Array]:
        """Jitter, then the standard normal ``eps [G, S, E]``."""
        draws = super().draw(key_fn, groups_shape, num_experts)
        draws["eps"] = jax.random.normal(key_fn(), (*groups_shape[:2], num_experts), jnp.float32)
        return draws

    def plan(self, logits, router_in, params, draws, token_mask, capacity) -> RoutingPlan:
        noise_logits = router_in @ params["noise_weight"]  # [G, S, E] float32
        return noisy_top_k(
            logits, noise_logits, k=self.k, capacity=capacity, eps=draws.get("eps"),
            importance_weight=float(self.importance_loss_weight), load_weight=float(self.load_loss_weight),
            priority=self.priority, batch_prioritized=self.batch_prioritized, token_mask=token_mask,
        )
