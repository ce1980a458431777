"""Grouped matrix product in plain XLA: a loop over (row tile, expert) work items.

Rows sorted by expert, ``group_sizes[e]`` consecutive rows per expert e::

    out[r] = x[r] @ w[g(r)]        [N, K], [E, K, F] -> [N, F]; 0 past the groups

(what ``jax.lax.ragged_dot`` computes). XLA:CPU, and XLA:GPU on the H100 we measured,
run ``ragged_dot`` as E dense products over all N rows (BENCHMARKS.md). This version
cuts the rows into tiles of ``block_m`` and loops (``lax.scan``) over the work items of
:func:`tile_schedule`: each (tile, expert) pair whose rows overlap, at most
``N / block_m + E + 1`` of them. An item is one ``[block_m, K] @ [K, F]`` product, so the
work is ``(N + E * block_m) * K * F`` multiply-adds instead of ``E * N * K * F``.

Under the one grouped-matmul VJP (:mod:`jmoe.grouped_matmul`): ``dx`` is the same loop
with ``w[e]^T`` (:func:`scan_gmm` with ``transpose_w``), ``dw[e]`` accumulates
``x_tile^T dy_tile`` over the items of expert e in the loop's carry, updated in place
(:func:`scan_tgmm`). Rows past the groups add nothing and get zero gradient. The Pallas
GPU kernels (:mod:`jmoe.pallas.grouped_matmul`) use the same schedule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.compat import vary_like
from jmoe.grouped_matmul.vjp import GmmKernels, grouped_matmul_vjp

Array = jax.Array


def tile_schedule(group_sizes: Array, num_rows: int, block_m: int) -> tuple[Array, Array, Array, Array]:
    """Work items ``(item_tile, item_start, item_end, item_expert)``, each ``[W]`` int32,
    ``W = ceil(num_rows / block_m) + E + 1`` (a static bound).

    Item i covers rows ``[item_start, item_end)`` of row tile ``item_tile`` (rows
    ``[tile * block_m, (tile + 1) * block_m)``), all of expert ``item_expert``. A tile that
    straddles group boundaries appears once per group. ``item_expert == E`` marks the
    rows past the groups (output 0) and the unused items (empty row range). Every row in
    ``[0, num_rows)`` lies in exactly one item's range.
    """
    num_experts = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)  # [E]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])  # [E + 1]
    ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])  # [E + 1]: last = rows past the groups
    first = starts // block_m
    last = jnp.maximum(ends - 1, 0) // block_m
    count = jnp.where(ends > starts, last - first + 1, 0)  # [E + 1] items per group
    count_end = jnp.cumsum(count)  # [E + 1]
    num_items = -(-num_rows // block_m) + num_experts + 1
    item = jnp.arange(num_items, dtype=jnp.int32)
    group = jnp.searchsorted(count_end, item, side="right").astype(jnp.int32)  # [W]; E + 1: unused
    used = group <= num_experts
    g = jnp.minimum(group, num_experts)
    tile = first[g] + item - (count_end[g] - count[g])
    return (jnp.where(used, tile, 0), jnp.where(used, starts[g], 0), jnp.where(used, ends[g], 0),
            g.astype(jnp.int32))


def _tiles(x: Array, block_m: int) -> Array:
    """[N, K] -> [ceil(N / block_m), block_m, K], zero padded."""
    num_rows = x.shape[0]
    pad = -num_rows % block_m
    return jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block_m, x.shape[1])


def _row_mask(tile, start, end, block_m: int) -> Array:
    rows = tile * block_m + jnp.arange(block_m)  # [BM]
    return (rows >= start) & (rows < end)


def _loop_gmm(x: Array, w: Array, group_sizes: Array, block_m: int, transpose_w: bool) -> Array:
    """``x[r] @ w[g(r)]`` (``w[g(r)]^T`` with ``transpose_w``) by the item loop; [N, F]."""
    num_rows = x.shape[0]
    num_experts = w.shape[0]
    f_dim = w.shape[1] if transpose_w else w.shape[2]
    x_tiles = _tiles(x, block_m)  # [T, BM, K]
    schedule = tile_schedule(group_sizes, num_rows, block_m)

    def step(out, item):  # out [T, BM, F] float32
        tile, start, end, expert = item

        def compute(out):
            w_e = w[expert]  # [K, F] (or [F, K])
            x_t = x_tiles[tile]  # [BM, K]
            dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
            y_t = lax.dot_general(x_t, w_e, dims, preferred_element_type=jnp.float32)  # [BM, F]
            keep = _row_mask(tile, start, end, block_m)[:, None]
            return out.at[tile].set(jnp.where(keep, y_t, out[tile]))

        return lax.cond(expert < num_experts, compute, lambda out: out, out), None

    out = vary_like(jnp.zeros((x_tiles.shape[0], block_m, f_dim), jnp.float32), x, w, group_sizes)
    out, _ = lax.scan(step, out, schedule)
    return out.reshape(-1, f_dim)[:num_rows].astype(x.dtype)


def _loop_tgmm(x: Array, dy: Array, group_sizes: Array, block_m: int) -> Array:
    """``dw[e] = x[rows of e]^T dy[rows of e]`` by the item loop: [E, K, F] float32."""
    num_rows, k_dim = x.shape
    num_experts = group_sizes.shape[0]
    x_tiles, dy_tiles = _tiles(x, block_m), _tiles(dy, block_m)  # [T, BM, K], [T, BM, F]
    schedule = tile_schedule(group_sizes, num_rows, block_m)

    def step(dw, item):  # dw [E, K, F] float32
        tile, start, end, expert = item

        def accumulate(dw):
            keep = _row_mask(tile, start, end, block_m)[:, None]
            x_t = jnp.where(keep, x_tiles[tile], jnp.zeros((), x.dtype))  # [BM, K]
            part = lax.dot_general(x_t, dy_tiles[tile], (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)  # [K, F]
            return dw.at[expert].add(part)

        return lax.cond(expert < num_experts, accumulate, lambda dw: dw, dw), None

    dw = vary_like(jnp.zeros((num_experts, k_dim, dy.shape[1]), jnp.float32), x, dy, group_sizes)
    dw, _ = lax.scan(step, dw, schedule)
    return dw


BLOCK_M = 128


def scan_gmm(x: Array, w: Array, group_sizes: Array, *, transpose_w: bool = False, block_m: int = BLOCK_M) -> Array:
    """``out[r] = x[r] @ w[g(r)]`` (``w[g(r)]^T`` with ``transpose_w``): [N, K], [E, K, F]
    -> [N, F] in x's dtype (float32 accumulation), 0 past ``sum(group_sizes)``."""
    return _loop_gmm(x, w.astype(x.dtype), group_sizes, block_m, transpose_w)


def scan_tgmm(x: Array, dy: Array, group_sizes: Array, *, block_m: int = BLOCK_M) -> Array:
    """``dw[e] = x[rows of e]^T dy[rows of e]``: [E, K, F] float32."""
    return _loop_tgmm(x, dy, group_sizes, block_m)


KERNELS = GmmKernels(
    gmm=lambda x, w, group_sizes, *, transpose_w, config: scan_gmm(x, w, group_sizes, transpose_w=transpose_w,
                                                                  block_m=config),
    tgmm=lambda x, dy, group_sizes, *, config: scan_tgmm(x, dy, group_sizes, block_m=config),
)


def scan_grouped_matmul(x: Array, w: Array, group_sizes: Array, block_m: int = BLOCK_M) -> Array:
    """``out[r] = x[r] @ w[g(r)]``: [N, K], [E, K, F], [E] int -> [N, F] in x's dtype
    (float32 accumulation), 0 for rows past ``sum(group_sizes)``; gradients to x and w."""
    if x.ndim != 2 or w.ndim != 3 or w.shape[1] != x.shape[1] or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"scan_grouped_matmul needs x [N, K], w [E, K, F], group_sizes [E]; got "
                         f"{list(x.shape)}, {list(w.shape)}, {list(group_sizes.shape)}")
    return grouped_matmul_vjp(x, w, group_sizes, KERNELS, block_m)
