"""Grouped matrix product on Hopper GPUs: the Mosaic GPU ragged-dot kernels JAX ships.

Rows sorted by expert, ``group_sizes[e]`` consecutive rows per expert e::

    out[r] = x[r] @ w[g(r)]                       ragged_dot_mgpu.ragged_dot            [N, K], [E, K, F] -> [N, F]
    dx[r]  = dy[r] @ w[g(r)]^T                    the same kernel, transpose_rhs=True   [N, F], [E, K, F] -> [N, K]
    dw[e]  = x[rows of e]^T @ dy[rows of e]       transposed_ragged_dot_mgpu            [N, K], [N, F] -> [E, K, F]

The kernels live in ``jax.experimental.pallas.ops.gpu`` (maintained with JAX, so
they follow its Mosaic GPU API; jmoe only calls them): a persistent grid over the
SMs, TMA loads into a software pipeline of shared-memory stages, ``wgmma`` with a
float32 accumulator, one program per (row tile, group) item, as in MegaBlocks. They
are written for Hopper (sm_90: H100, H200). This module adds what a layer needs:
the one grouped-matmul VJP (:mod:`jmoe.grouped_matmul.vjp`), argument checks with clear errors, and zeros for the rows past
``sum(group_sizes)`` (the kernels leave those rows unwritten; the expert-parallel
receive buffer has such rows).

Off GPU, where tests opt in (:func:`jmoe.platform.interpret`; an error otherwise), and
with ``interpret=True``, the kernels run under Mosaic GPU's interpret mode, which simulates shared memory, TMA and barriers on the CPU: slow, for tests.
The weight-gradient kernel needs jax >= 0.11 to be interpreted (jax 0.10's
interpreter lacks ``layout_cast``).

Limits of the kernels, checked here: x and w in the same 16-bit dtype; K and F
multiples of the tiles (64 or 128). Not checked, a cost: the forward / dx kernel's
persistent grid covers all N rows, and a row tile past the groups is still multiplied
(its result is not stored). Fine on one device (no such rows but padding tokens); on an
expert mesh a round's receive buffer has about c * A rows (``dropless_buffer_factor`` c),
of which about A are filled when routing is balanced (jmoe's Pallas kernels skip such
tiles).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.compat import mosaic_gpu_interpret_mode, vary_like
from jmoe.grouped_matmul.vjp import GmmKernels, check_operands, grouped_matmul_vjp, zero_past_groups
from jmoe import platform

Array = jax.Array

HALF_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class MosaicGmmConfig:
    """Tiles and pipeline depth of the Mosaic GPU kernels.

    ``block_m`` rows x ``block_n`` output columns per program, ``block_k`` of the
    contraction per pipeline step (64 bf16 = one 128-byte swizzled row),
    ``max_concurrent_steps`` shared-memory stages in flight, ``grid_block_n``
    column tiles visited together (L2 reuse). 128 x 128 x 64 with 4 stages uses
    160 KiB of the H100's 228 KiB shared memory. A tile larger than the dimension
    it cuts is reduced to 64 when 64 divides the dimension.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 1
    interpret: bool | None = None


def interpret(flag: bool | None) -> bool:
    """Compiled on a GPU; elsewhere interpreted only where tests allow it (:func:`jmoe.platform.interpret`)."""
    return platform.interpret(flag, "grouped_matmul='mosaic' (Mosaic GPU kernels for Hopper)", ("gpu",))


def _fit(block: int, dim: int, what: str) -> int:
    """The tile used along a dimension: ``block``, or 64 when only 64 divides it."""
    candidates = sorted({block, min(block, 64)}, reverse=True)
    for b in candidates:
        if dim % b == 0:
            return b
    raise ValueError(f"mosaic grouped matmul: {what} = {dim} must be a multiple of "
                     f"{' or '.join(map(str, candidates))}")


def _grid_block_n(config: MosaicGmmConfig, block_n: int, f_dim: int) -> int:
    """``config.grid_block_n`` when that many column tiles divide F, else 1."""
    return config.grid_block_n if f_dim % (block_n * config.grid_block_n) == 0 else 1


def _check(x: Array, w: Array, group_sizes: Array, transpose_w: bool) -> None:
    check_operands("mosaic grouped matmul", x, w, group_sizes, transpose_w)
    if x.dtype != w.dtype or not any(x.dtype == d for d in HALF_DTYPES):
        raise ValueError(f"mosaic grouped matmul needs x and w both bfloat16 or both float16 (wgmma), got "
                         f"{x.dtype} and {w.dtype}")


def mosaic_gmm(x: Array, w: Array, group_sizes: Array, *, transpose_w: bool = False,
               config: MosaicGmmConfig = MosaicGmmConfig()) -> Array:
    """``out[r] = x[r] @ w[g(r)]`` (``w[g(r)].T`` with ``transpose_w``), 0 past the groups.

    Args:
      x: [N, K] rows sorted by expert, 16-bit.
      w: [E, K, F] ([E, F, K] with ``transpose_w``), x's dtype.
      group_sizes: [E] int, rows per expert (sum <= N).
    Returns:
      [N, F] in x's dtype (float32 accumulation).
    """
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    _check(x, w, group_sizes, transpose_w)
    k_dim = x.shape[1]
    f_dim = w.shape[1] if transpose_w else w.shape[2]
    block_k = _fit(config.block_k, k_dim, "the contraction dim")
    block_n = _fit(config.block_n, f_dim, "the output dim")
    with mosaic_gpu_interpret_mode(interpret(config.interpret)):
        out = ragged_dot_mgpu.ragged_dot(
            x, w, group_sizes=group_sizes.astype(jnp.int32), block_m=config.block_m, block_n=block_n,
            block_k=block_k, max_concurrent_steps=config.max_concurrent_steps,
            grid_block_n=_grid_block_n(config, block_n, f_dim), transpose_rhs=transpose_w)  # [N, F]
    out = vary_like(out, x, w, group_sizes)  # the kernel's output type carries no mesh axes
    return zero_past_groups(out, group_sizes)  # the kernel leaves rows past the groups unwritten


def mosaic_tgmm(x: Array, dy: Array, group_sizes: Array, *, config: MosaicGmmConfig = MosaicGmmConfig()) -> Array:
    """``dw[e] = x[rows of e]^T @ dy[rows of e]``: [N, K], [N, F], [E] -> [E, K, F] in x's
    dtype; an expert with no rows gets exactly 0; rows past the groups count for nothing."""
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0] or x.dtype != dy.dtype:
        raise ValueError(f"mosaic_tgmm needs x [N, K] and dy [N, F] of one dtype, got {x.dtype}{list(x.shape)} "
                         f"and {dy.dtype}{list(dy.shape)}")
    k_dim, f_dim = x.shape[1], dy.shape[1]
    block_m = _fit(config.block_m, k_dim, "the weight's input dim")
    block_n = _fit(config.block_n, f_dim, "the weight's output dim")
    with mosaic_gpu_interpret_mode(interpret(config.interpret)):
        dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(
            x, dy, group_sizes=group_sizes.astype(jnp.int32), block_m=block_m, block_n=block_n,
            block_k=config.block_k, max_concurrent_steps=config.max_concurrent_steps,
            grid_block_n=_grid_block_n(config, block_n, f_dim))  # [E, K, F]
    return vary_like(dw, x, dy, group_sizes)


KERNELS = GmmKernels(gmm=mosaic_gmm, tgmm=mosaic_tgmm)  # their signatures are the pair's


def mosaic_grouped_matmul(x: Array, w: Array, group_sizes: Array,
                          config: MosaicGmmConfig = MosaicGmmConfig()) -> Array:
    """Differentiable :func:`mosaic_gmm`: ``[N, K], [E, K, F], [E] -> [N, F]`` (like
    ``jax.lax.ragged_dot``); gradients to x and w (:mod:`jmoe.grouped_matmul.vjp`)."""
    return grouped_matmul_vjp(x, w, group_sizes, KERNELS, config)
