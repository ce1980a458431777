"""The one custom VJP of every grouped matmul: a (gmm, tgmm) kernel pair.

Rows sorted by expert, ``group_sizes[e]`` consecutive rows per expert e::

    out[r] = x[r] @ w[g(r)]                      gmm                   [N, K], [E, K, F] -> [N, F]
    dx[r]  = dy[r] @ w[g(r)]^T                   gmm, transpose_w      [N, F], [E, K, F] -> [N, K]
    dw[e]  = x[rows of e]^T @ dy[rows of e]      tgmm                  [N, K], [N, F] -> [E, K, F]

Rows past ``sum(group_sizes)`` belong to no expert: output 0, no contribution to dw.
An implementation (:mod:`jmoe.grouped_matmul.scan`, the Pallas and Mosaic GPU kernels)
gives the pair as :class:`GmmKernels`; :func:`grouped_matmul_vjp` differentiates it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.compat import sum_over_extra_axes

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GmmKernels:
    """``gmm(x, w, group_sizes, *, transpose_w, config) -> [N, F]`` in x's dtype and
    ``tgmm(x, dy, group_sizes, *, config) -> [E, K, F]`` (any float dtype)."""

    gmm: Callable[..., Array]
    tgmm: Callable[..., Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul_vjp(x: Array, w: Array, group_sizes: Array, kernels: GmmKernels, config: Any) -> Array:
    """``kernels.gmm(x, w, group_sizes)`` with gradients to x and w (none to group_sizes):
    ``dx = gmm(dy, w^T)``, ``dw = tgmm(x, dy)``; ``config`` is the kernels' static config."""
    return kernels.gmm(x, w, group_sizes, transpose_w=False, config=config)


def _fwd(x, w, group_sizes, kernels, config):
    return grouped_matmul_vjp(x, w, group_sizes, kernels, config), (x, w, group_sizes)


def _bwd(kernels, config, residuals, dy):
    x, w, group_sizes = residuals
    dy = dy.astype(x.dtype)
    dx = kernels.gmm(dy, w, group_sizes, transpose_w=True, config=config)  # [N, K]
    dw = kernels.tgmm(x, dy, group_sizes, config=config)  # [E, K, F]
    return vjp_outputs(dx, dw, x, w, group_sizes)


grouped_matmul_vjp.defvjp(_fwd, _bwd)


def vjp_outputs(dx: Array, dw: Array, x: Array, w: Array, group_sizes: Array) -> tuple[Array, Array, np.ndarray]:
    """Computed gradients -> the custom VJP's outputs: dx and dw summed over the mesh axes
    they vary over beyond their input's (:func:`jmoe.compat.sum_over_extra_axes`), dw in
    w's dtype, and float0 for the integer group sizes."""
    dx = sum_over_extra_axes(dx, x)  # w split over "model": each shard holds part of dx
    dw = sum_over_extra_axes(dw, w).astype(w.dtype)  # w replicated over "data": every replica's rows count
    return dx, dw, np.zeros(group_sizes.shape, jax.dtypes.float0)


def check_operands(what: str, x: Array, w: Array, group_sizes: Array, transpose_w: bool) -> None:
    """A clear error unless x is [N, K], w [E, K, F] ([E, F, K] with ``transpose_w``) and
    group_sizes an int [E] array (the shapes every gmm kernel takes)."""
    if x.ndim != 2 or w.ndim != 3 or w.shape[2 if transpose_w else 1] != x.shape[1]:
        raise ValueError(f"{what} needs x [N, K] and w [E, K, F] ([E, F, K] transposed), got "
                         f"{list(x.shape)} and {list(w.shape)} (transpose_w={transpose_w})")
    if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an int [E={w.shape[0]}] array, got "
                         f"{group_sizes.dtype}{list(group_sizes.shape)}")


def zero_past_groups(out: Array, group_sizes: Array) -> Array:
    """Rows at or past ``sum(group_sizes)`` -> 0 (kernels that skip them leave them unwritten)."""
    inside = jnp.arange(out.shape[0]) < jnp.sum(group_sizes.astype(jnp.int32))  # [N]
    return jnp.where(inside[:, None], out, jnp.zeros((), out.dtype))
