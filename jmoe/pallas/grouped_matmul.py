"""Grouped matrix product for dropless experts: a Pallas GPU (Triton) kernel pair.

Rows sorted by expert, ``group_sizes[e]`` consecutive rows per expert e::

    out[r] = x[r] @ w[g(r)]            gmm:   [N, K], [E, K, F] -> [N, F]
    dw[e]  = x[rows of e]^T dy[rows of e]   tgmm:  [N, K], [N, F] -> [E, K, F]

Rows past ``sum(group_sizes)`` belong to no expert: their output is 0 and they add
nothing to ``dw`` (the expert-parallel receive buffer has such rows). This is what
``jax.lax.ragged_dot`` computes; XLA on the H100 we measured (jax 0.11.2) runs
ragged_dot as E dense products over all rows (BENCHMARKS.md), this computes each
row once.

``grouped_matmul`` is ``gmm`` under the one grouped-matmul VJP (:mod:`jmoe.grouped_matmul.vjp`):
``dx = gmm(dy, w^T)`` (the same kernel reading ``w`` transposed) and ``dw = tgmm(x, dy)``. Both kernels write every
output element exactly once (no atomics: deterministic).

gmm's schedule (MegaBlocks / megablox style; :func:`jmoe.grouped_matmul.tile_schedule`):
the output rows are cut into tiles of ``block_m``; a *work item* is a (row tile, group)
pair whose rows overlap, so a tile that straddles a group boundary is visited once per
group, each visit storing only its group's rows. There are at most ``tiles + E + 1``
items, a static bound; unused items store nothing. The rows past the last group form
one more "group" whose items store zeros without computing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jmoe.grouped_matmul.scan import tile_schedule
from jmoe.grouped_matmul.vjp import GmmKernels, grouped_matmul_vjp
from jmoe.pallas.kernels import _call, _interpret_in_shard_map, _next_power_of_2, _zero

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Tiles (powers of two, >= 16 for Triton's dot) and launch options."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int | None = None
    interpret: bool | None = None


def _blocks(cfg: GmmConfig, k: int, f: int) -> tuple[int, int, int]:
    """Tiles capped at the next power of two of the dims (never below 16)."""
    cap = lambda b, n: max(16, min(b, _next_power_of_2(n)))  # noqa: E731
    return cfg.block_m, cap(cfg.block_n, f), cap(cfg.block_k, k)


def _gmm_kernel(tile_ref, start_ref, end_ref, expert_ref, x_ref, w_ref, out_ref, *,
                block_m, block_n, block_k, transpose_w):
    # x [N, K], w [E, K, F] (or [E, F, K] when transpose_w), out [N, F]; program (item, n)
    num_rows, k_dim = x_ref.shape
    num_experts = w_ref.shape[0]
    f_dim = out_ref.shape[1]
    item = pl.program_id(0)
    tile, start, end, expert = (plgpu.load(r.at[item]) for r in (tile_ref, start_ref, end_ref, expert_ref))
    rows = tile * block_m + jnp.arange(block_m)  # [BM]
    row_in = (rows >= start) & (rows < end)
    cols = pl.program_id(1) * block_n + jnp.arange(block_n)  # [BN]
    col_in = cols < f_dim
    e = jnp.minimum(expert, num_experts - 1)

    def body(j, acc):  # acc [BM, BN] f32
        ks = j * block_k + jnp.arange(block_k)  # [BK]
        k_in = ks < k_dim
        x = plgpu.load(x_ref.at[rows[:, None], ks[None, :]], mask=row_in[:, None] & k_in[None, :],
                       other=_zero(x_ref))  # [BM, BK]
        if transpose_w:
            w = plgpu.load(w_ref.at[e, cols[:, None], ks[None, :]], mask=col_in[:, None] & k_in[None, :],
                           other=_zero(w_ref))  # [BN, BK]
            dims = (((1,), (1,)), ((), ()))
        else:
            w = plgpu.load(w_ref.at[e, ks[:, None], cols[None, :]], mask=k_in[:, None] & col_in[None, :],
                           other=_zero(w_ref))  # [BK, BN]
            dims = (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    # The padding "group" (expert == E) and unused items run no k steps: their acc stays 0.
    steps = jnp.where(expert < num_experts, pl.cdiv(k_dim, block_k), 0)
    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(out_ref.at[rows[:, None], cols[None, :]], acc.astype(out_ref.dtype),
                mask=row_in[:, None] & col_in[None, :])


def gmm(x: Array, w: Array, group_sizes: Array, *, transpose_w: bool = False,
        config: GmmConfig = GmmConfig()) -> Array:
    """``out[r] = x[r] @ w[g(r)]`` (``w[g(r)].T`` with ``transpose_w``), 0 past the groups.

    Args:
      x: [N, K] rows sorted by expert.
      w: [E, K, F] ([E, F, K] with ``transpose_w``).
      group_sizes: [E] int32, rows per expert (sum <= N).
    Returns:
      [N, F] in x's dtype (float32 accumulation).
    """
    _check(x, w, group_sizes, transpose_w)
    num_rows, k_dim = x.shape
    f_dim = w.shape[1] if transpose_w else w.shape[2]
    if _interpret_in_shard_map((x, w, group_sizes), config):
        return gmm_reference(x, w, group_sizes, transpose_w=transpose_w)
    block_m, block_n, block_k = _blocks(config, k_dim, f_dim)
    schedule = tile_schedule(group_sizes, num_rows, block_m)
    kernel = functools.partial(_gmm_kernel, block_m=block_m, block_n=block_n, block_k=block_k,
                               transpose_w=transpose_w)
    return _call(kernel, jax.ShapeDtypeStruct((num_rows, f_dim), x.dtype),
                 (schedule[0].shape[0], pl.cdiv(f_dim, block_n)), (*schedule, x, w), config, "jmoe_gmm",
                 poison=False)


def _tgmm_kernel(start_ref, end_ref, x_ref, dy_ref, out_ref, *, block_m, block_n, block_k):
    # x [N, K], dy [N, F], out [E, K, F]; program (e, k tile, n tile)
    k_dim, f_dim = x_ref.shape[1], dy_ref.shape[1]
    e = pl.program_id(0)
    start, end = plgpu.load(start_ref.at[e]), plgpu.load(end_ref.at[e])
    ks = pl.program_id(1) * block_k + jnp.arange(block_k)  # [BK]
    cols = pl.program_id(2) * block_n + jnp.arange(block_n)  # [BN]
    k_in, col_in = ks < k_dim, cols < f_dim

    def body(i, acc):  # acc [BK, BN] f32; i = row block of the group, in order
        rows = start + i * block_m + jnp.arange(block_m)  # [BM]
        row_in = rows < end
        x = plgpu.load(x_ref.at[rows[:, None], ks[None, :]], mask=row_in[:, None] & k_in[None, :],
                       other=_zero(x_ref))  # [BM, BK]
        dy = plgpu.load(dy_ref.at[rows[:, None], cols[None, :]], mask=row_in[:, None] & col_in[None, :],
                        other=_zero(dy_ref))  # [BM, BN]
        return acc + lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, pl.cdiv(end - start, block_m), body, jnp.zeros((block_k, block_n), jnp.float32))
    plgpu.store(out_ref.at[e, ks[:, None], cols[None, :]], acc.astype(out_ref.dtype),
                mask=k_in[:, None] & col_in[None, :])


def tgmm(x: Array, dy: Array, group_sizes: Array, *, out_dtype=None, config: GmmConfig = GmmConfig()) -> Array:
    """``dw[e] = x[rows of e]^T @ dy[rows of e]``: [N, K], [N, F], [E] -> [E, K, F]; an
    expert with no rows gets exactly 0; rows past the groups count for nothing."""
    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"tgmm needs x [N, K] and dy [N, F], got {list(x.shape)} and {list(dy.shape)}")
    num_experts = group_sizes.shape[0]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if _interpret_in_shard_map((x, dy, group_sizes), config):
        return tgmm_reference(x, dy, group_sizes).astype(out_dtype)
    k_dim, f_dim = x.shape[1], dy.shape[1]
    block_m, block_n, block_k = _blocks(config, k_dim, f_dim)
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), x.shape[0])
    starts = ends - jnp.minimum(group_sizes.astype(jnp.int32), ends)
    kernel = functools.partial(_tgmm_kernel, block_m=block_m, block_n=block_n, block_k=block_k)
    return _call(kernel, jax.ShapeDtypeStruct((num_experts, k_dim, f_dim), out_dtype),
                 (num_experts, pl.cdiv(k_dim, block_k), pl.cdiv(f_dim, block_n)),
                 (starts, ends, x, dy), config, "jmoe_tgmm", poison=False)


KERNELS = GmmKernels(
    gmm=lambda x, w, group_sizes, *, transpose_w, config: gmm(x, w, group_sizes, transpose_w=transpose_w,
                                                             config=config),
    tgmm=lambda x, dy, group_sizes, *, config: tgmm(x, dy, group_sizes, out_dtype=jnp.float32, config=config),
)


def grouped_matmul(x: Array, w: Array, group_sizes: Array, config: GmmConfig = GmmConfig()) -> Array:
    """Differentiable :func:`gmm`: ``[N, K], [E, K, F], [E] -> [N, F]`` (like
    ``jax.lax.ragged_dot``); gradients to x and w (:mod:`jmoe.grouped_matmul.vjp`)."""
    return grouped_matmul_vjp(x, w, group_sizes, KERNELS, config)


def gmm_reference(x: Array, w: Array, group_sizes: Array, *, transpose_w: bool = False) -> Array:
    """Pure-jnp :func:`gmm`: each row's expert by ``searchsorted``, one gathered-weight
    product per row (slow, obvious), 0 past the groups."""
    if transpose_w:
        w = jnp.swapaxes(w, 1, 2)
    num_rows = x.shape[0]
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    row_expert = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")  # [N]; E past the groups
    inside = row_expert < w.shape[0]
    out = jnp.einsum("nk,nkf->nf", x.astype(jnp.float32),
                     w[jnp.minimum(row_expert, w.shape[0] - 1)].astype(jnp.float32))
    return jnp.where(inside[:, None], out, 0.0).astype(x.dtype)


def tgmm_reference(x: Array, dy: Array, group_sizes: Array) -> Array:
    """Pure-jnp :func:`tgmm` (float32): a one-hot of each row's expert."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    row_expert = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")  # [N]
    onehot = jax.nn.one_hot(row_expert, group_sizes.shape[0], dtype=jnp.float32)  # [N, E]; zero row past groups
    return jnp.einsum("ne,nk,nf->ekf", onehot, x.astype(jnp.float32), dy.astype(jnp.float32))


def _check(x: Array, w: Array, group_sizes: Array, transpose_w: bool) -> None:
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"gmm needs x [N, K] and w [E, K, F], got {list(x.shape)} and {list(w.shape)}")
    k_w = w.shape[2] if transpose_w else w.shape[1]
    if k_w != x.shape[1]:
        raise ValueError(f"contracting dims differ: x {list(x.shape)}, w {list(w.shape)} (transpose_w={transpose_w})")
    if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an int [E={w.shape[0]}] array, got {group_sizes.dtype}{list(group_sizes.shape)}")
