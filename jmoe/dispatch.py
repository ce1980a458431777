"""Dispatch (tokens -> expert slots) and combine (expert slots -> tokens).

Every backend computes the same two functions of a :class:`~jmoe.routing.RoutingPlan`:

* ``dispatch(x [G, S, d], plan) -> [E, G * C, d]``: slot (e, g * C + c) holds
  token ``plan.slot_token[g, e, c]`` of group g, or zeros for a padding slot;
* ``combine(expert_out [E, G * C, d], plan) -> [G, S, d]``:
  ``y[g, s] = sum_k token_weight[g, s, k] * expert_out[token_expert[g, s, k], g * C + token_slot[g, s, k]]``
  over the assignments that hold a slot; a token with none gets exactly 0.

The sum is accumulated in float32 and cast to ``expert_out``'s dtype.

Backends:
  ``einsum``  the GShard/Switch one-hot einsums over ``[G, S, E, C]``: the
              readable reference, cost O(G S E C d);
  ``gather``  index gathers from the plan's compact form, cost O(G (S K + E C) d)
              whatever E and C are.
  ``pallas``  Pallas GPU (Triton) kernels over the same compact form
              (:mod:`jmoe.pallas`; off GPU an error unless tests opt in to
              interpret mode: :func:`jmoe.platform.interpret`).
  ``mosaic``  the same kernels in Mosaic GPU (:mod:`jmoe.pallas.mosaic_dispatch`), opt-in
              until a GPU run measures it (Triton is deprecated in jax 0.11).
A new backend is one :class:`Backend` and one ``BACKENDS.register`` line.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jmoe.platform import Registry
from jmoe.routing.plan import RoutingPlan

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Backend:
    dispatch: Callable[[Array, RoutingPlan], Array]
    combine: Callable[[Array, RoutingPlan], Array]


def _to_expert_major(slots: Array) -> Array:
    """[G, E, C, d] -> [E, G * C, d]."""
    num_groups, num_experts, capacity, d = slots.shape
    return jnp.swapaxes(slots, 0, 1).reshape(num_experts, num_groups * capacity, d)


def _to_group_major(expert_out: Array, plan: RoutingPlan) -> Array:
    """[E, G * C, d] -> [G, E, C, d]."""
    num_experts, _, d = expert_out.shape
    slots = expert_out.reshape(num_experts, plan.num_groups, plan.capacity, d)
    return jnp.swapaxes(slots, 0, 1)


def _check(x: Array, plan: RoutingPlan) -> None:
    if x.ndim != 3 or x.shape[:2] != (plan.num_groups, plan.group_size):
        raise ValueError(
            f"tokens must be [G, S, d] = [{plan.num_groups}, {plan.group_size}, d], got {x.shape}"
        )


def _check_expert_out(expert_out: Array, plan: RoutingPlan) -> None:
    expected = (plan.num_experts, plan.num_groups * plan.capacity)
    if expert_out.ndim != 3 or expert_out.shape[:2] != expected:
        raise ValueError(f"expert outputs must be [E, G * C, d] = [{expected[0]}, {expected[1]}, d], got {expert_out.shape}")


# ----------------------------------------------------------------------------
# einsum
# ----------------------------------------------------------------------------


def einsum_dispatch(x: Array, plan: RoutingPlan) -> Array:
    """One-hot dispatch: ``slots[g, e, c] = sum_s mask[g, s, e, c] * x[g, s]``.

    A non-finite entry would reach every slot of its group through ``0 * NaN``; when x
    has one (``lax.cond``: the common case pays one check), the contraction runs on the
    finite part and each slot takes its own token's non-finite entries back, so a NaN
    stays with its token as in the index backends.
    """
    _check(x, plan)
    mask = plan.dispatch_mask().astype(x.dtype)  # [G, S, E, C]

    def plain(x):
        return jnp.einsum("gsec,gsd->gecd", mask, x)  # [G, E, C, d]

    def isolated(x):
        finite, codes = _split_non_finite(x)  # [G, S, d] each
        slot_codes = jnp.einsum("gsec,gsd->gecd", mask.astype(jnp.float32), codes)  # one token per slot
        return _keep_non_finite(plain(finite), slot_codes)

    return _to_expert_major(jax.lax.cond(jnp.all(jnp.isfinite(x)), plain, isolated, x))


def einsum_combine(expert_out: Array, plan: RoutingPlan) -> Array:
    """One-hot combine: ``y[g, s] = sum_{e, c} combine[g, s, e, c] * out[g, e, c]``; a slot's
    non-finite entries reach only the tokens that combine it (as in :func:`einsum_dispatch`)."""
    _check_expert_out(expert_out, plan)
    slots = _to_group_major(expert_out, plan).astype(jnp.float32)  # [G, E, C, d]
    combine = plan.combine_array()  # [G, S, E, C]

    def plain(slots):
        return jnp.einsum("gsec,gecd->gsd", combine, slots)  # [G, S, d]

    def isolated(slots):
        finite, codes = _split_non_finite(slots)
        used = (combine != 0).astype(jnp.float32)  # [G, S, E, C]: the slots a token combines
        kinds = jnp.stack([codes == code for code in _CODES], axis=-1).astype(jnp.float32)  # [G, E, C, d, 3]
        counts = jnp.einsum("gsec,gecdn->gsdn", used, kinds)  # [G, S, d, 3]: NaN, +inf, -inf terms
        nan = (counts[..., 0] > 0) | ((counts[..., 1] > 0) & (counts[..., 2] > 0))
        y = jnp.where(counts[..., 1] > 0, jnp.inf, jnp.where(counts[..., 2] > 0, -jnp.inf, plain(finite)))
        return jnp.where(nan, jnp.nan, y)

    y = jax.lax.cond(jnp.all(jnp.isfinite(slots)), plain, isolated, slots)
    return y.astype(expert_out.dtype)


_CODES = (1.0, 2.0, 3.0)  # NaN, +inf, -inf


def _split_non_finite(x: Array) -> tuple[Array, Array]:
    """``x`` with its non-finite entries zeroed, and their codes (0 finite, 1 NaN, 2 +inf, 3 -inf)."""
    codes = jnp.where(jnp.isnan(x), 1.0, jnp.where(x == jnp.inf, 2.0, jnp.where(x == -jnp.inf, 3.0, 0.0)))
    return jnp.where(codes == 0, x, jnp.zeros((), x.dtype)), codes.astype(jnp.float32)


def _keep_non_finite(values: Array, codes: Array) -> Array:
    """``values`` with each entry whose code says NaN / +inf / -inf set to it."""
    special = jnp.where(codes == 1, jnp.nan, jnp.where(codes == 2, jnp.inf, -jnp.inf)).astype(values.dtype)
    return jnp.where(codes == 0, values, special)


# ----------------------------------------------------------------------------
# gather
# ----------------------------------------------------------------------------


def gather_dispatch(x: Array, plan: RoutingPlan) -> Array:
    """Index dispatch: ``slots[g, e, c] = x[g, slot_token[g, e, c]]`` (zeros if -1)."""
    _check(x, plan)
    token = plan.slot_token  # [G, E, C]
    filled = token >= 0
    rows = jnp.take_along_axis(
        x[:, None, :, :],  # [G, 1, S, d]
        jnp.where(filled, token, 0)[..., None],  # [G, E, C, 1]
        axis=2,
    )  # [G, E, C, d]
    slots = jnp.where(filled[..., None], rows, jnp.zeros((), x.dtype))
    return _to_expert_major(slots)


def gather_combine(expert_out: Array, plan: RoutingPlan) -> Array:
    """Index combine: ``y[g, s] = sum_k w[g, s, k] * out[g, e_k, c_k]`` over kept k."""
    _check_expert_out(expert_out, plan)
    num_experts, _, d = expert_out.shape
    kept = plan.token_slot >= 0  # [G, S, K]
    group = jnp.arange(plan.num_groups)[:, None, None]  # [G, 1, 1]
    row = group * plan.capacity + jnp.where(kept, plan.token_slot, 0)  # [G, S, K]
    picked = expert_out[plan.token_expert, row]  # [G, S, K, d]
    picked = jnp.where(kept[..., None], picked.astype(jnp.float32), 0.0)
    y = jnp.einsum("gsk,gskd->gsd", plan.token_weight, picked)
    return y.astype(expert_out.dtype)


# ``pallas``: the kernels of jmoe/pallas (Triton on GPU; elsewhere interpret mode where tests opt in),
# imported on first use so that importing jmoe does not import Pallas.
def _pallas_dispatch(x: Array, plan: RoutingPlan) -> Array:
    from jmoe.pallas.dispatch import pallas_dispatch

    return pallas_dispatch(x, plan)


def _pallas_combine(expert_out: Array, plan: RoutingPlan) -> Array:
    from jmoe.pallas.dispatch import pallas_combine

    return pallas_combine(expert_out, plan)


# ``mosaic``: the same kernels in Mosaic GPU (jmoe/pallas/mosaic_dispatch.py), opt-in: "auto" on a GPU
# moves to it once a GPU run shows it at least as fast as the Triton kernels (Triton is deprecated).
def _mosaic_dispatch(x: Array, plan: RoutingPlan) -> Array:
    from jmoe.pallas.mosaic_dispatch import mosaic_dispatch

    return mosaic_dispatch(x, plan)


def _mosaic_combine(expert_out: Array, plan: RoutingPlan) -> Array:
    from jmoe.pallas.mosaic_dispatch import mosaic_combine

    return mosaic_combine(expert_out, plan)


# "auto": the Pallas kernels on GPU (measured 5.3x / 2.6x faster than XLA's gather), gather elsewhere.
# On TPU gather, on paper (not yet measured on a TPU: benchmarks/tpu_check.sh times it against the
# copy bandwidth): dispatch and combine are row copies, memory bound, and a Pallas TPU kernel moves
# the same bytes as XLA's gather: it would fetch each row with its own DMA (d * 2 bytes, 8 KiB at
# d = 4096 bf16, large enough to stream near HBM bandwidth), which is what XLA:TPU's gather of whole
# rows does. The GPU kernels won by avoiding XLA:GPU's slow gather / scatter-add codegen, not by
# moving fewer bytes. The one place a kernel could win is the backward, where XLA transposes the
# gather into a scatter-add (the Pallas formulation gathers and sums instead): write a Pallas TPU
# kernel if tpu_check.sh shows gather's fwd+bwd well below the copy bandwidth.
BACKENDS: Registry[Backend] = Registry("dispatch", fallback="gather", auto={"gpu": "pallas", "tpu": "gather"})
BACKENDS.register("einsum", Backend(einsum_dispatch, einsum_combine))
BACKENDS.register("gather", Backend(gather_dispatch, gather_combine))
BACKENDS.register("pallas", Backend(_pallas_dispatch, _pallas_combine))
BACKENDS.register("mosaic", Backend(_mosaic_dispatch, _mosaic_combine))
NAMES = BACKENDS.names


def resolve_backend(name: str) -> str:
    """``"auto"`` -> this platform's backend (pallas on GPU, gather on TPU and CPU); else ``name``."""
    return BACKENDS.resolve(name)


def get_backend(name: str) -> Backend:
    return BACKENDS.get(name)
