"""The capacity path's exchange: every expert's slots to the device that holds it and back.

Per device (``G_l`` local groups, capacity C, n = |expert_outer| x |expert| devices
holding ``E_l = E / n`` experts each)::

    dispatch     -> [E, G_l * C, d]
    all_to_all   -> [E_l, n * G_l * C, d]   rows from every device, for my experts
    experts         w_in [E_l, d, f/m], w_out [E_l, f/m, d]; psum over "model"
    all_to_all   -> [E, G_l * C, d]         my tokens' results come home

C is static and the same on every device, so there is no count exchange (and no hang).
Flat (one all-to-all over both expert axes), hierarchical (Tutel 2DH), or chunked
(:func:`exchange_experts`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jmoe.parallel.mesh import MeshAxes

Array = jax.Array


def tiled_all_to_all(x: Array, axis) -> Array:
    """Tiled all-to-all on the leading axis: block j goes to device j; block i of the
    result came from device i (``all_to_all(split_axis=0, concat_axis=0, tiled=True)``)."""
    return jax.lax.all_to_all(x, axis, 0, 0, tiled=True)


def _outer_inner(axes: MeshAxes) -> tuple[str, str, int, int]:
    """The two expert axes of the hierarchical exchange (outer, inner) and their sizes."""
    outer, inner = axes.expert_axes
    return outer, inner, axes.size(outer), axes.size(inner)


def exchange_to_experts(x: Array, axes: MeshAxes, hierarchical: bool) -> Array:
    """[E, N, d] rows for every expert -> [E_l, n * N, d] rows from every device for mine.

    n = the product of the expert axes' sizes; with two expert axes (outer o, inner i,
    sizes n_o, n_i) expert block b = o * n_i + i lives on device (o, i).

    Flat: one all-to-all over the expert axes. Hierarchical (Tutel 2DH): first within
    the inner axis (each message is the n_o blocks for one inner destination), then
    across the outer one (each message is n_i blocks), with a swap of the two block
    axes before and after the first exchange; the result is the same.
    """
    n = axes.expert_size
    num_experts, rows, d = x.shape
    e_l = num_experts // n
    if n == 1:  # experts not split (only "model" > 1): nothing to exchange
        return x
    if hierarchical:
        outer, inner, n_o, n_i = _outer_inner(axes)
        x = x.reshape(n_o, n_i, e_l, rows, d)  # [dest o, dest i, E_l, N, d]
        x = jnp.swapaxes(x, 0, 1)  # [dest i, dest o, E_l, N, d]: group by inner destination
        x = tiled_all_to_all(x, inner)  # [src i, dest o, E_l, N, d]
        x = jnp.swapaxes(x, 0, 1)  # [dest o, src i, E_l, N, d]
        x = tiled_all_to_all(x, outer)  # [src o, src i, E_l, N, d]
        x = x.reshape(n, e_l, rows, d)  # [src, E_l, N, d]
    else:
        x = x.reshape(n, e_l, rows, d)  # [dest, E_l, N, d]
        x = tiled_all_to_all(x, axes.expert_axes)  # [src, E_l, N, d]
    return jnp.swapaxes(x, 0, 1).reshape(e_l, n * rows, d)  # [E_l, n * N, d]


def exchange_to_tokens(y: Array, axes: MeshAxes, hierarchical: bool) -> Array:
    """Inverse of :func:`exchange_to_experts`: [E_l, n * N, d] -> [E, N, d]."""
    n = axes.expert_size
    e_l, total, d = y.shape
    rows = total // n
    if n == 1:
        return y
    y = jnp.swapaxes(y.reshape(e_l, n, rows, d), 0, 1)  # [src, E_l, N, d]
    if hierarchical:
        outer, inner, n_o, n_i = _outer_inner(axes)
        y = y.reshape(n_o, n_i, e_l, rows, d)  # [src o, src i, E_l, N, d]
        y = tiled_all_to_all(y, outer)  # [expert o, src i, E_l, N, d]
        y = jnp.swapaxes(y, 0, 1)  # [src i, expert o, E_l, N, d]
        y = tiled_all_to_all(y, inner)  # [expert i, expert o, E_l, N, d]
        y = jnp.swapaxes(y, 0, 1)  # [expert o, expert i, E_l, N, d]
    else:
        y = tiled_all_to_all(y, axes.expert_axes)  # [expert block, E_l, N, d]
    return y.reshape(n * e_l, rows, d)  # [E, N, d]


def exchange_experts(expert_in: Array, experts: Callable[[Array], Array], *, capacity: int, chunks: int,
                     axes: MeshAxes, hierarchical: bool) -> Array:
    """``[E, G_l * C, d]`` slots -> their experts' outputs, same layout, through the exchange.

    ``experts``: the local experts ``[E_l, N, d] -> [E_l, N, d]``. With ``chunks`` = m > 1 the
    capacity C is split into m chunks, each exchanged and computed separately so chunk i's
    experts can overlap chunk i+1's exchange; m must divide C.
    """
    if capacity % chunks:
        raise ValueError(f"a2a_chunks={chunks} must divide the capacity C={capacity}")
    num_experts, rows, d = expert_in.shape
    g_l = rows // capacity
    cc = capacity // chunks
    chunks_in = expert_in.reshape(num_experts, g_l, chunks, cc, d)  # [E, G_l, m, C/m, d]
    outs = []
    for j in range(chunks):
        xj = chunks_in[:, :, j].reshape(num_experts, g_l * cc, d)  # [E, G_l * C/m, d]
        xj = exchange_to_experts(xj, axes, hierarchical)  # [E_l, n * G_l * C/m, d]
        yj = exchange_to_tokens(experts(xj), axes, hierarchical)  # [E, G_l * C/m, d]
        outs.append(yj.reshape(num_experts, g_l, 1, cc, d))
    return jnp.concatenate(outs, axis=2).reshape(num_experts, g_l * capacity, d)  # [E, G_l * C, d]
