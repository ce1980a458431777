"""Pallas dispatch / combine of a :class:`~jmoe.routing.RoutingPlan`, with kernel VJPs.

The same two functions as every backend of :mod:`jmoe.dispatch`:

* ``pallas_dispatch(x [G, S, d], plan) -> [E, G * C, d]``: slot (e, g * C + c)
  holds ``x[g, slot_token[g, e, c]]``, zeros for a padding slot (-1);
* ``pallas_combine(expert_out [E, G * C, d], plan) -> [G, S, d]``:
  ``y[g, s] = sum_k token_weight[g, s, k] * expert_out[token_expert[g, s, k], g * C + token_slot[g, s, k]]``
  over the k with ``token_slot != -1`` (float32 sum, cast to expert_out's
  dtype); a token whose choices were all dropped is exactly 0.

Both flatten the plan into row indices and call the row kernels of
:mod:`jmoe.pallas.kernels`. Flat layouts: tokens ``[T = G * S, d]`` (row
``g * S + s``), slots ``[R = E * G * C, d]`` (row ``e * G * C + g * C + c``).

* ``slot_src [R]``   token row of each slot, -1 for padding (from ``slot_token``);
* ``token_rows [T, K]`` slot row of each of a token's choices, -1 if dropped
  (from ``token_expert`` and ``token_slot``);
* ``token_weight [T, K]`` float32.

Gradients (``jax.custom_vjp``, every backward pass a kernel too):

* dispatch: ``dx[t] = sum_k dslots[token_rows[t, k]]`` -> ``gather_sum_rows``
  with weight 1 on the kept choices;
* combine: ``dexpert_out[r] = slot_weight[r] * dy[slot_src[r]]`` -> ``gather_rows``
  with a scale, where ``slot_weight[r]`` is the combine weight of the choice
  that holds slot r (0 for padding); ``dtoken_weight[t, k] = <dy[t], expert_out[token_rows[t, k]]>``
  (0 for a dropped choice) -> ``gather_dot_rows``. That gradient is how the
  router learns.

The integer index arrays get no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jmoe.pallas.kernels import KernelConfig, gather_dot_rows, gather_rows, gather_sum_rows
from jmoe.routing import RoutingPlan

Array = jax.Array

DEFAULT_CONFIG = KernelConfig()


# ----------------------------------------------------------------------------
# The plan as flat row indices
# ----------------------------------------------------------------------------


def slot_sources(plan: RoutingPlan) -> Array:
    """[R = E * G * C] int32: token row ``g * S + slot_token[g, e, c]`` of each slot, -1 for padding."""
    num_groups, _, capacity = plan.slot_token.shape
    group = jnp.arange(num_groups, dtype=jnp.int32)[:, None, None]  # [G, 1, 1]
    src = jnp.where(plan.slot_token >= 0, group * plan.group_size + plan.slot_token, -1)  # [G, E, C]
    return jnp.swapaxes(src, 0, 1).reshape(-1).astype(jnp.int32)  # [E, G, C] -> [R]


def token_rows(plan: RoutingPlan) -> Array:
    """[T = G * S, K] int32: slot row ``e * G * C + g * C + c`` of each choice, -1 if it holds no slot."""
    num_groups, _, capacity = plan.slot_token.shape
    group = jnp.arange(num_groups, dtype=jnp.int32)[:, None, None]  # [G, 1, 1]
    rows = plan.token_expert * (num_groups * capacity) + group * capacity + plan.token_slot  # [G, S, K]
    rows = jnp.where(plan.token_slot >= 0, rows, -1)
    return rows.reshape(-1, rows.shape[-1]).astype(jnp.int32)


def slot_weights(rows: Array, weight: Array, num_slots: int) -> Array:
    """[R] float32: the weight of the choice that holds each slot, 0 for padding.

    ``rows`` / ``weight`` [T, K] as from :func:`token_rows`; a slot is held by at
    most one choice, so this scatter has no collisions.
    """
    target = jnp.where(rows >= 0, rows, num_slots).reshape(-1)  # -1 -> out of range, dropped
    return jnp.zeros((num_slots,), jnp.float32).at[target].set(weight.reshape(-1), mode="drop")


# ----------------------------------------------------------------------------
# custom_vjp cores on flat arrays
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch_rows(x: Array, src: Array, rows: Array, config: KernelConfig) -> Array:
    """x [T, d], src [R], rows [T, K] -> [R, d] (``out[r] = x[src[r]]``)."""
    return gather_rows(x, src, config=config)


def _dispatch_rows_fwd(x, src, rows, config):
    return gather_rows(x, src, config=config), (src, rows)


def _dispatch_rows_bwd(config, residuals, dslots):
    src, rows = residuals
    kept = (rows >= 0).astype(jnp.float32)  # [T, K]
    dx = gather_sum_rows(dslots, rows, kept, out_dtype=dslots.dtype, config=config)  # [T, d]
    return dx, None, None


_dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _combine_rows(expert_out: Array, weight: Array, rows: Array, src: Array, config: KernelConfig) -> Array:
    """expert_out [R, d], weight [T, K], rows [T, K], src [R] -> [T, d]."""
    return gather_sum_rows(expert_out, rows, weight, config=config)


def _combine_rows_fwd(expert_out, weight, rows, src, config):
    y = gather_sum_rows(expert_out, rows, weight, config=config)
    return y, (expert_out, weight, rows, src)


def _combine_rows_bwd(config, residuals, dy):
    expert_out, weight, rows, src = residuals
    scale = slot_weights(rows, weight, expert_out.shape[0])  # [R]
    dexpert_out = gather_rows(dy, src, scale, out_dtype=expert_out.dtype, config=config)  # [R, d]
    dweight = gather_dot_rows(dy, expert_out, rows, config=config)  # [T, K] f32
    return dexpert_out, dweight, None, None


_combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


# ----------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------


def _check_plan(plan: RoutingPlan) -> None:
    if plan.slot_token.ndim != 3 or plan.token_slot.ndim != 3:
        raise ValueError(
            f"plan.slot_token must be [G, E, C] and the token side [G, S, K], got "
            f"{plan.slot_token.shape} and {plan.token_slot.shape}"
        )


def pallas_dispatch(x: Array, plan: RoutingPlan, *, config: KernelConfig = DEFAULT_CONFIG) -> Array:
    """Kernel dispatch: ``slots[e, g * C + c] = x[g, slot_token[g, e, c]]`` (zeros if -1).

    x [G, S, d] (float32 / bfloat16 / any float) -> [E, G * C, d] of x's dtype.
    """
    _check_plan(plan)
    if x.ndim != 3 or x.shape[:2] != (plan.num_groups, plan.group_size):
        raise ValueError(f"tokens must be [G, S, d] = [{plan.num_groups}, {plan.group_size}, d], got {x.shape}")
    num_groups, group_size, d = x.shape
    slots = _dispatch_rows(x.reshape(num_groups * group_size, d), slot_sources(plan), token_rows(plan), config)
    return slots.reshape(plan.num_experts, num_groups * plan.capacity, d)  # [R, d] -> [E, G * C, d]


def pallas_combine(expert_out: Array, plan: RoutingPlan, *, config: KernelConfig = DEFAULT_CONFIG) -> Array:
    """Kernel combine: ``y[g, s] = sum_k w[g, s, k] * expert_out[e_k, g * C + c_k]`` over kept k.

    expert_out [E, G * C, d] -> [G, S, d] of expert_out's dtype (float32 sum).
    Differentiable in expert_out and ``plan.token_weight``.
    """
    _check_plan(plan)
    expected = (plan.num_experts, plan.num_groups * plan.capacity)
    if expert_out.ndim != 3 or expert_out.shape[:2] != expected:
        raise ValueError(
            f"expert outputs must be [E, G * C, d] = [{expected[0]}, {expected[1]}, d], got {expert_out.shape}"
        )
    d = expert_out.shape[-1]
    num_k = plan.token_weight.shape[-1]
    y = _combine_rows(
        expert_out.reshape(-1, d),  # [R, d]
        plan.token_weight.reshape(-1, num_k).astype(jnp.float32),  # [T, K]
        token_rows(plan),
        slot_sources(plan),
        config,
    )  # [T, d]
    return y.reshape(plan.num_groups, plan.group_size, d)


# ----------------------------------------------------------------------------
# References (pure jnp, same flat formulation)
# ----------------------------------------------------------------------------


def dispatch_reference(x: Array, plan: RoutingPlan) -> Array:
    """Pure-jnp ``pallas_dispatch``."""
    num_groups, group_size, d = x.shape
    valid = slot_sources(plan)  # [R]
    rows = x.reshape(-1, d)[jnp.maximum(valid, 0)]  # [R, d]
    rows = jnp.where((valid >= 0)[:, None], rows, jnp.zeros((), x.dtype))
    return rows.reshape(plan.num_experts, num_groups * plan.capacity, d)


def combine_reference(expert_out: Array, plan: RoutingPlan) -> Array:
    """Pure-jnp ``pallas_combine``."""
    d = expert_out.shape[-1]
    rows = token_rows(plan)  # [T, K]
    picked = expert_out.reshape(-1, d)[jnp.maximum(rows, 0)].astype(jnp.float32)  # [T, K, d]
    picked = jnp.where((rows >= 0)[..., None], picked, 0.0)
    weight = plan.token_weight.reshape(rows.shape)
    y = jnp.einsum("tk,tkd->td", weight, picked).astype(expert_out.dtype)
    return y.reshape(plan.num_groups, plan.group_size, d)
