"""Dispatch / combine as Mosaic GPU kernels (``jax.experimental.pallas.mosaic_gpu``): the
``dispatch="mosaic"`` backend, opt-in, beside the Triton one (:mod:`jmoe.pallas.dispatch`).

The same functions of a :class:`~jmoe.routing.RoutingPlan` on the same flat row indices
(:func:`jmoe.pallas.dispatch.slot_sources`, :func:`~jmoe.pallas.dispatch.token_rows`) and
the same custom VJPs, every backward a kernel, no atomics (deterministic):

* dispatch ``slots[r] = x[src[r]]``                 -> :func:`mosaic_gather_rows`;
  its backward ``dx[t] = sum_k dslots[rows[t, k]]``  -> :func:`mosaic_gather_sum_rows` (weight 1);
* combine ``y[t] = sum_k w[t, k] expert_out[rows[t, k]]`` -> :func:`mosaic_gather_sum_rows`;
  its backward ``dexpert_out[r] = slot_weight[r] dy[src[r]]`` -> :func:`mosaic_gather_rows`
  with a scale, and ``dw[t, k] = <dy[t], expert_out[rows[t, k]]>`` -> :func:`mosaic_gather_dot_rows`.

Schedule: one program per (block of ``block_rows`` output rows, ``block_d`` columns), one
warpgroup. The block's indices are copied to shared memory (TMA), then each source row
with its own TMA copy (``block_d`` columns; a row naming no source copies row 0 and is
replaced by zeros), one barrier for the block; the per-row fix-up (zero, scale, weighted
sum in float32, dot product) runs in registers, and the output block leaves by one TMA
store. Rows and columns are padded to the blocks here (indices with -1, columns with 0).

Status: tested in Mosaic GPU's interpret mode on CPU (jax 0.10 and 0.12) and lowered for
CUDA without a GPU; **not yet run on a GPU** (``benchmarks/gpu_check.sh`` is to time it
beside the Triton kernels, whose bar is 83-89% of copy bandwidth on an H100). Until a GPU
run shows it at least as fast, ``dispatch="auto"`` stays on the Triton kernels. Shared
memory buffers are reused across loop steps relying on the warpgroup's program order
(the GPU tests check it). Off GPU: an error unless tests opt in (:func:`jmoe.platform.interpret`);
inside ``shard_map`` the interpreter is not used (the pure-jnp references run instead, as
for the Triton kernels).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jmoe import platform
from jmoe.compat import any_varying, mosaic_gpu_interpret_mode, varying_shape
from jmoe.pallas.dispatch import _check_plan, slot_sources, slot_weights, token_rows
from jmoe.pallas.kernels import gather_dot_rows_reference, gather_rows_reference, gather_sum_rows_reference
from jmoe.routing import RoutingPlan

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MosaicDispatchConfig:
    """``block_rows`` output rows (a multiple of 32: TMA copies of the int32 indices are
    multiples of 128 bytes) x ``block_d`` columns (``block_d * itemsize`` a multiple of 128
    bytes) per program; ``interpret`` True / False / None (compiled on GPU, else tests' opt-in)."""

    block_rows: int = 32
    block_d: int = 128
    interpret: bool | None = None

    def __post_init__(self):
        if not isinstance(self.block_rows, int) or self.block_rows <= 0 or self.block_rows % 32:
            raise ValueError(f"block_rows must be a positive multiple of 32, got {self.block_rows!r}")
        if not isinstance(self.block_d, int) or self.block_d <= 0 or self.block_d % 64:
            raise ValueError(f"block_d must be a positive multiple of 64, got {self.block_d!r}")


DEFAULT_CONFIG = MosaicDispatchConfig()


def interpret(flag: bool | None) -> bool:
    return platform.interpret(flag, "dispatch='mosaic' (Mosaic GPU kernels)", ("gpu",))


def _reference_instead(args, config: MosaicDispatchConfig) -> bool:
    """Interpreted inside ``shard_map``: the pure-jnp reference instead (Mosaic GPU's
    interpreter is not safe on several devices at once; compiled kernels run as they are)."""
    return interpret(config.interpret) and any_varying(args)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_rows(a: Array, rows: int, value) -> Array:
    return a if a.shape[0] == rows else jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1),
                                                 constant_values=value)


def _pad_cols(a: Array, cols: int) -> Array:
    return a if a.shape[1] == cols else jnp.pad(a, ((0, 0), (0, cols - a.shape[1])))


def _run(body, out_type, grid, args, config):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kernel = plgpu.kernel(body, out_type=varying_shape(out_type, args), grid=grid,
                          grid_names=("r", "c")[:len(grid)])
    with mosaic_gpu_interpret_mode(interpret(config.interpret)):
        return kernel(*args)


def _load_rows(x_gmem, idx_smem, tile, barrier, c0, block_rows, block_d):
    """Row i of ``tile`` <- ``x[idx[i], c0 : c0 + block_d]`` (row 0 when idx names none), one
    TMA copy per row, all on ``barrier`` (block_rows arrivals); waits for them."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num_src = x_gmem.shape[0]

    def copy(i, carry):
        s = idx_smem[i]
        s = jnp.where((s >= 0) & (s < num_src), s, 0)
        plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(s, 1), pl.ds(c0, block_d)], tile.at[pl.ds(i, 1)], barrier)
        return carry

    lax.fori_loop(0, block_rows, copy, None)
    plgpu.barrier_wait(barrier)


def _valid(idx_smem, i, num_src):
    s = idx_smem[i]
    return (s >= 0) & (s < num_src)


# ----------------------------------------------------------------------------
# gather_rows: out[r] = scale[r] * x[src[r]]
# ----------------------------------------------------------------------------


def mosaic_gather_rows(x: Array, src: Array, scale: Array | None = None, *, out_dtype=None,
                       config: MosaicDispatchConfig = DEFAULT_CONFIG) -> Array:
    """``out[r] = scale[r] * x[src[r]]`` ([N, d], [R] int32, [R] float32 or None -> [R, d]),
    0 where ``src[r]`` names no row; without ``scale`` the rows are copied exactly."""
    out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
    if _reference_instead((x, src) if scale is None else (x, src, scale), config):
        return gather_rows_reference(x, src, scale, out_dtype=out_dtype)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (num_rows,), (num_src, d) = src.shape, x.shape
    br, bd = config.block_rows, config.block_d
    rows_p, d_p = _round_up(num_rows, br), _round_up(d, bd)
    src_p = _pad_rows(src.astype(jnp.int32), rows_p, -1)
    x_p = _pad_cols(x, d_p)
    has_scale = scale is not None

    def body(*refs):
        if has_scale:
            src_gmem, scale_gmem, x_gmem, out_gmem = refs
        else:
            (src_gmem, x_gmem, out_gmem), scale_gmem = refs, None
        r0, c0 = lax.axis_index("r") * br, lax.axis_index("c") * bd

        def scoped(idx_smem, scale_smem, tile, out_tile, bar, rows_bar):
            plgpu.copy_gmem_to_smem(src_gmem.at[pl.ds(r0, br)], idx_smem, bar)
            plgpu.barrier_wait(bar)
            if has_scale:
                plgpu.copy_gmem_to_smem(scale_gmem.at[pl.ds(r0, br)], scale_smem, bar)
                plgpu.barrier_wait(bar)
            _load_rows(x_gmem, idx_smem, tile, rows_bar, c0, br, bd)

            def fix(i, carry):
                ok = _valid(idx_smem, i, num_src)

                @pl.when(ok)
                def _():
                    v = tile[pl.ds(i, 1), :]
                    if has_scale:
                        v = v.astype(jnp.float32) * scale_smem[i]
                    out_tile[pl.ds(i, 1), :] = v.astype(out_dtype)

                @pl.when(jnp.logical_not(ok))
                def _():
                    out_tile[pl.ds(i, 1), :] = jnp.zeros((1, bd), out_dtype)

                return carry

            lax.fori_loop(0, br, fix, None)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_tile, out_gmem.at[pl.ds(r0, br), pl.ds(c0, bd)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((br,), jnp.int32), plgpu.SMEM((br,), jnp.float32),
                      plgpu.SMEM((br, bd), x.dtype), plgpu.SMEM((br, bd), out_dtype),
                      plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=br))

    args = (src_p, _pad_rows(scale.astype(jnp.float32), rows_p, 0.0), x_p) if has_scale else (src_p, x_p)
    out = _run(body, jax.ShapeDtypeStruct((rows_p, d_p), out_dtype), (rows_p // br, d_p // bd), args, config)
    return out[:num_rows, :d]


# ----------------------------------------------------------------------------
# gather_sum_rows: out[t] = sum_k w[t, k] * x[idx[t, k]]
# ----------------------------------------------------------------------------


def mosaic_gather_sum_rows(x: Array, idx: Array, weight: Array, *, out_dtype=None,
                           config: MosaicDispatchConfig = DEFAULT_CONFIG) -> Array:
    """``out[t] = sum_k weight[t, k] * x[idx[t, k]]`` over the idx naming a row (float32 sum):
    [N, d], [T, K] int32, [T, K] float32 -> [T, d]; a row with none is exactly 0."""
    out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
    if _reference_instead((x, idx, weight), config):
        return gather_sum_rows_reference(x, idx, weight, out_dtype=out_dtype)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (num_rows, num_k), (num_src, d) = idx.shape, x.shape
    br, bd = config.block_rows, config.block_d
    rows_p, d_p = _round_up(num_rows, br), _round_up(d, bd)
    idx_t = _pad_rows(idx.astype(jnp.int32), rows_p, -1).T  # [K, T]: a choice's indices contiguous
    w_t = _pad_rows(weight.astype(jnp.float32), rows_p, 0.0).T
    x_p = _pad_cols(x, d_p)

    def body(idx_gmem, w_gmem, x_gmem, out_gmem):
        r0, c0 = lax.axis_index("r") * br, lax.axis_index("c") * bd

        def scoped(idx_smem, w_smem, tiles, acc, out_tile, bar, rows_bar):
            for k in range(num_k):  # static; separate buffers per choice
                plgpu.copy_gmem_to_smem(idx_gmem.at[k, pl.ds(r0, br)], idx_smem.at[k], bar)
                plgpu.barrier_wait(bar)
                plgpu.copy_gmem_to_smem(w_gmem.at[k, pl.ds(r0, br)], w_smem.at[k], bar)
                plgpu.barrier_wait(bar)
                _load_rows(x_gmem, idx_smem.at[k], tiles.at[k], rows_bar, c0, br, bd)

                def add(i, carry, k=k):
                    ok = _valid(idx_smem.at[k], i, num_src)
                    base = jnp.zeros((1, bd), jnp.float32) if k == 0 else acc[pl.ds(i, 1), :]

                    @pl.when(ok)
                    def _():
                        acc[pl.ds(i, 1), :] = base + w_smem[k, i] * tiles[k, pl.ds(i, 1), :].astype(jnp.float32)

                    if k == 0:
                        @pl.when(jnp.logical_not(ok))
                        def _():
                            acc[pl.ds(i, 1), :] = base

                    return carry

                lax.fori_loop(0, br, add, None)

            def cast(i, carry):
                out_tile[pl.ds(i, 1), :] = acc[pl.ds(i, 1), :].astype(out_dtype)
                return carry

            lax.fori_loop(0, br, cast, None)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_tile, out_gmem.at[pl.ds(r0, br), pl.ds(c0, bd)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((num_k, br), jnp.int32), plgpu.SMEM((num_k, br), jnp.float32),
                      plgpu.SMEM((num_k, br, bd), x.dtype), plgpu.SMEM((br, bd), jnp.float32),
                      plgpu.SMEM((br, bd), out_dtype), plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=br))

    out = _run(body, jax.ShapeDtypeStruct((rows_p, d_p), out_dtype), (rows_p // br, d_p // bd),
               (idx_t, w_t, x_p), config)
    return out[:num_rows, :d]


# ----------------------------------------------------------------------------
# gather_dot_rows: out[t, k] = <y[t], x[idx[t, k]]>
# ----------------------------------------------------------------------------


def mosaic_gather_dot_rows(y: Array, x: Array, idx: Array, *, config: MosaicDispatchConfig = DEFAULT_CONFIG) -> Array:
    """``out[t, k] = sum_d y[t, d] * x[idx[t, k], d]`` in float32, 0 where idx names no row:
    [T, d], [N, d], [T, K] int32 -> [T, K] float32."""
    if _reference_instead((y, x, idx), config):
        return gather_dot_rows_reference(y, x, idx)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (num_rows, num_k), (num_src, d) = idx.shape, x.shape
    br, bd = config.block_rows, config.block_d
    rows_p, d_p = _round_up(num_rows, br), _round_up(d, bd)
    idx_t = _pad_rows(idx.astype(jnp.int32), rows_p, -1).T  # [K, T]
    y_p = _pad_rows(_pad_cols(y, d_p), rows_p, 0)
    x_p = _pad_cols(x, d_p)

    def body(idx_gmem, y_gmem, x_gmem, out_gmem):
        r0 = lax.axis_index("r") * br

        def scoped(idx_smem, y_tile, x_tile, dots, bar, rows_bar):
            for k in range(num_k):  # static
                plgpu.copy_gmem_to_smem(idx_gmem.at[k, pl.ds(r0, br)], idx_smem.at[k], bar)
                plgpu.barrier_wait(bar)

                def zero(i, carry, k=k):
                    dots[k, i] = jnp.float32(0)
                    return carry

                lax.fori_loop(0, br, zero, None)

                def column_block(j, carry, k=k):
                    c0 = j * bd
                    plgpu.copy_gmem_to_smem(y_gmem.at[pl.ds(r0, br), pl.ds(c0, bd)], y_tile, bar)
                    plgpu.barrier_wait(bar)
                    _load_rows(x_gmem, idx_smem.at[k], x_tile, rows_bar, c0, br, bd)

                    def row(i, carry):
                        @pl.when(_valid(idx_smem.at[k], i, num_src))
                        def _():
                            dots[k, i] = dots[k, i] + jnp.sum(y_tile[pl.ds(i, 1), :].astype(jnp.float32)
                                                              * x_tile[pl.ds(i, 1), :].astype(jnp.float32))

                        return carry

                    lax.fori_loop(0, br, row, None)
                    return carry

                lax.fori_loop(0, d_p // bd, column_block, None)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dots, out_gmem.at[:, pl.ds(r0, br)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((num_k, br), jnp.int32), plgpu.SMEM((br, bd), y.dtype),
                      plgpu.SMEM((br, bd), x.dtype), plgpu.SMEM((num_k, br), jnp.float32),
                      plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=br))

    out_t = _run(body, jax.ShapeDtypeStruct((num_k, rows_p), jnp.float32), (rows_p // br,), (idx_t, y_p, x_p), config)
    return out_t.T[:num_rows]


# ----------------------------------------------------------------------------
# custom VJPs (as jmoe.pallas.dispatch) and the backend
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch_rows(x, src, rows, config):
    return mosaic_gather_rows(x, src, config=config)


def _dispatch_rows_fwd(x, src, rows, config):
    return mosaic_gather_rows(x, src, config=config), (src, rows)


def _dispatch_rows_bwd(config, residuals, dslots):
    src, rows = residuals
    kept = (rows >= 0).astype(jnp.float32)
    return mosaic_gather_sum_rows(dslots, rows, kept, out_dtype=dslots.dtype, config=config), None, None


_dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _combine_rows(expert_out, weight, rows, src, config):
    return mosaic_gather_sum_rows(expert_out, rows, weight, config=config)


def _combine_rows_fwd(expert_out, weight, rows, src, config):
    return mosaic_gather_sum_rows(expert_out, rows, weight, config=config), (expert_out, weight, rows, src)


def _combine_rows_bwd(config, residuals, dy):
    expert_out, weight, rows, src = residuals
    scale = slot_weights(rows, weight, expert_out.shape[0])  # [R]
    dexpert_out = mosaic_gather_rows(dy, src, scale, out_dtype=expert_out.dtype, config=config)
    dweight = mosaic_gather_dot_rows(dy, expert_out, rows, config=config)
    return dexpert_out, dweight, None, None


_combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


def mosaic_dispatch(x: Array, plan: RoutingPlan, *, config: MosaicDispatchConfig = DEFAULT_CONFIG) -> Array:
    """``slots[e, g * C + c] = x[g, slot_token[g, e, c]]`` (zeros if -1): [G, S, d] -> [E, G * C, d]."""
    _check_plan(plan)
    if x.ndim != 3 or x.shape[:2] != (plan.num_groups, plan.group_size):
        raise ValueError(f"tokens must be [G, S, d] = [{plan.num_groups}, {plan.group_size}, d], got {x.shape}")
    num_groups, group_size, d = x.shape
    slots = _dispatch_rows(x.reshape(num_groups * group_size, d), slot_sources(plan), token_rows(plan), config)
    return slots.reshape(plan.num_experts, num_groups * plan.capacity, d)


def mosaic_combine(expert_out: Array, plan: RoutingPlan, *, config: MosaicDispatchConfig = DEFAULT_CONFIG) -> Array:
    """``y[g, s] = sum_k w[g, s, k] * expert_out[e_k, g * C + c_k]`` over kept k (float32 sum):
    [E, G * C, d] -> [G, S, d]; differentiable in expert_out and ``plan.token_weight``."""
    _check_plan(plan)
    expected = (plan.num_experts, plan.num_groups * plan.capacity)
    if expert_out.ndim != 3 or expert_out.shape[:2] != expected:
        raise ValueError(f"expert outputs must be [E, G * C, d] = [{expected[0]}, {expected[1]}, d], "
                         f"got {expert_out.shape}")
    d = expert_out.shape[-1]
    num_k = plan.token_weight.shape[-1]
    y = _combine_rows(expert_out.reshape(-1, d), plan.token_weight.reshape(-1, num_k).astype(jnp.float32),
                      token_rows(plan), slot_sources(plan), config)
    return y.reshape(plan.num_groups, plan.group_size, d)
