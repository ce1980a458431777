"""Three row-indexed Pallas GPU (Triton) kernels, each with a pure-jnp reference.

They know nothing about MoE; :mod:`jmoe.pallas.dispatch` builds dispatch and
combine (and their VJPs) from them. An index ``-1`` (or any index outside the
source) means "no row": it reads nothing and contributes 0.

* ``gather_rows``      ``out[r] = scale[r] * x[src[r]]`` (``scale`` optional:
                       an exact copy), ``0`` where ``src[r] == -1``.
                       ``[N, d], [R] -> [R, d]``.
* ``gather_sum_rows``  ``out[t] = sum_k w[t, k] * x[idx[t, k]]`` over the k with
                       ``idx[t, k] != -1``; float32 accumulation, a row with no
                       valid k is exactly 0. ``[N, d], [T, K], [T, K] -> [T, d]``.
* ``gather_dot_rows``  ``out[t, k] = sum_d y[t, d] * x[idx[t, k], d]`` (float32),
                       0 where ``idx[t, k] == -1``. ``[T, d], [N, d], [T, K] -> [T, K]``.

Layout: every ref is the whole array (no BlockSpec): the Triton lowering sees
pointers, and each program computes its own row / column indices and masks.
A program owns a ``[block_rows, block_d]`` tile of the output: rows past the
end and columns past ``d`` are masked, so ``d`` need not be a power of two and
``R`` / ``T`` need not be multiples of ``block_rows``. The tiles cover the
output exactly once, so every element is written (no atomics, deterministic).
Row / column positions are used unclamped under their masks (a masked lane
is never accessed; clamping with ``where`` would hide from Triton that the
columns are contiguous and cost vectorised loads); only data-dependent source
rows are clamped (``-1`` -> 0) before they are masked.

On a non-GPU backend the same kernels run with ``interpret=True`` where the caller
opted in (tests; :func:`resolve_interpret`), else they are an error. In interpret mode Pallas fills an
un-aliased float output with NaN before the kernel runs, so an element the
kernel forgot to write shows up as NaN; ``poison=True`` does the same on GPU by
passing a NaN-filled buffer aliased to the output (``input_output_aliases``);
the tests use it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jmoe import platform
from jmoe.compat import any_varying, varying_shape

Array = jax.Array


def _is_power_of_2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options (static, hashable).

    Attributes:
      block_rows: output rows per program, a power of two.
      block_d: columns per program (per loop step in ``gather_dot_rows``), a
        power of two; capped at ``next_power_of_2(d)``.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages (None: Triton's default).
      interpret: True / False, or None for "compiled on a GPU; off GPU
        interpreted where tests opted in, else an error" (:func:`resolve_interpret`).
    """

    # 32 x 256: measured on an H100 (jax 0.11.2, bf16, T=16384, d=4096): combine fwd+bwd
    # 0.82 ms vs 2.00 ms for 16 x 512 at E=8, dispatch fwd+bwd the same (BENCHMARKS.md).
    block_rows: int = 32
    block_d: int = 256
    num_warps: int = 4
    num_stages: int | None = None
    interpret: bool | None = None

    def __post_init__(self):
        for name in ("block_rows", "block_d"):
            value = getattr(self, name)
            if not isinstance(value, int) or not _is_power_of_2(value):
                raise ValueError(f"{name} must be a power of two (Triton), got {value!r}")
        if not _is_power_of_2(self.num_warps):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps!r}")

    def tiles(self, rows: int, d: int) -> tuple[int, int]:
        """(block_rows, block_d) capped to the problem so tiny shapes waste no work."""
        return min(self.block_rows, _next_power_of_2(rows)), min(self.block_d, _next_power_of_2(d))


def resolve_interpret(interpret: bool | None) -> bool:
    """None -> compiled on a GPU; elsewhere interpreted where tests allow it, else an error
    (:func:`jmoe.platform.interpret`)."""
    return platform.interpret(interpret, "the Pallas Triton kernels (dispatch='pallas', grouped_matmul='pallas')",
                              ("gpu",))


def _interpret_in_shard_map(args, cfg: KernelConfig) -> bool:
    """True when the kernel would be interpreted on values that vary over manual
    mesh axes (inside ``jax.shard_map`` with ``check_vma``). Pallas's interpreter
    fails there in jax 0.10 ("gather requires varying manual axes to match"), so
    the callers then compute their pure-jnp reference instead: the same function,
    and off GPU only (compiled kernels run inside shard_map as they are)."""
    return resolve_interpret(cfg.interpret) and any_varying(args)


def _call(kernel, out_shape, grid, args, cfg, name: str, poison: bool):
    """pallas_call with whole-array refs; ``cfg`` is a :class:`KernelConfig` or any config
    with ``num_warps``, ``num_stages``, ``interpret`` (the grouped matmul's); ``poison``
    aliases a NaN buffer to the output (for tests; outside ``shard_map``)."""
    out_shape = varying_shape(out_shape, args)
    if poison:
        args = (*args, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        kernel = _ignore_poison(kernel)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        input_output_aliases={len(args) - 1: 0} if poison else {},
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=resolve_interpret(cfg.interpret),
        name=name,
    )(*args)


def _ignore_poison(kernel):
    def wrapped(*refs):
        *ins, _poison_ref, out_ref = refs
        kernel(*ins, out_ref)

    return wrapped


def _zero(ref) -> np.ndarray:
    """A 0 of the ref's dtype: Triton's masked load wants ``other`` of the loaded type
    (a Python 0.0 would be a float32 constant next to a bfloat16 load)."""
    return np.zeros((), ref.dtype)


def _check_rows(name: str, x: Array) -> None:
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a 2-D float array [rows, d], got {x.dtype}{list(x.shape)}")


def _check_index(name: str, idx: Array, ndim: int) -> None:
    if idx.ndim != ndim or idx.dtype != jnp.int32:
        raise ValueError(f"{name} must be a {ndim}-D int32 index array, got {idx.dtype}{list(idx.shape)}")


def _tile(block_rows: int, block_d: int, num_rows: int, d: int):
    """This program's rows [BR] and columns [BD] (grid axes 0 and 1), and which are in range."""
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)  # [BR]
    cols = pl.program_id(1) * block_d + jnp.arange(block_d)  # [BD]
    return rows, cols, rows < num_rows, cols < d


def _load_rows(x_ref, idx, row_in, cols, col_in):
    """The tile ``x[idx[r], cols]`` [BR, BD], 0 where the row or column is past the end or
    ``idx`` names no source row (-1 or out of range); and that validity [BR]."""
    valid = row_in & (idx >= 0) & (idx < x_ref.shape[0])
    vals = plgpu.load(
        x_ref.at[jnp.where(valid, idx, 0)[:, None], cols[None, :]],
        mask=valid[:, None] & col_in[None, :],
        other=_zero(x_ref),
    )
    return vals, valid


def _store_tile(out_ref, rows, cols, row_in, col_in, vals) -> None:
    # Rows past the end are masked, not clamped: clamping would write a row twice.
    plgpu.store(
        out_ref.at[rows[:, None], cols[None, :]],
        vals.astype(out_ref.dtype),
        mask=row_in[:, None] & col_in[None, :],
    )


# ----------------------------------------------------------------------------
# gather_rows: out[r] = scale[r] * x[src[r]]
# ----------------------------------------------------------------------------


def _gather_rows_kernel(*refs, block_rows: int, block_d: int, has_scale: bool):
    if has_scale:
        src_ref, x_ref, scale_ref, out_ref = refs  # [R], [N, d], [R], [R, d]
    else:
        src_ref, x_ref, out_ref = refs
    rows, cols, row_in, col_in = _tile(block_rows, block_d, *out_ref.shape)
    src = plgpu.load(src_ref.at[rows], mask=row_in, other=-1)  # [BR]
    vals, _ = _load_rows(x_ref, src, row_in, cols, col_in)  # [BR, BD]; 0 for "no row"
    if has_scale:
        scale = plgpu.load(scale_ref.at[rows], mask=row_in, other=0.0)  # [BR] f32
        vals = vals.astype(jnp.float32) * scale[:, None]
    _store_tile(out_ref, rows, cols, row_in, col_in, vals)


def gather_rows(
    x: Array,
    src: Array,
    scale: Array | None = None,
    *,
    out_dtype=None,
    config: KernelConfig = KernelConfig(),
    poison: bool = False,
) -> Array:
    """``out[r] = scale[r] * x[src[r]]``, 0 where ``src[r] == -1``.

    Args:
      x: [N, d] float source rows.
      src: [R] int32 source row per output row, -1 for none.
      scale: optional [R] float32 per-row factor (product in float32); without
        it the rows are copied exactly.
      out_dtype: output dtype (default x's).
    Returns:
      [R, d].
    """
    _check_rows("x", x)
    _check_index("src", src, 1)
    if scale is not None and (scale.shape != src.shape or scale.dtype != jnp.float32):
        raise ValueError(f"scale must be float32{list(src.shape)}, got {scale.dtype}{list(scale.shape)}")
    (num_rows,), d = src.shape, x.shape[1]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    block_rows, block_d = config.tiles(num_rows, d)
    kernel = functools.partial(
        _gather_rows_kernel, block_rows=block_rows, block_d=block_d, has_scale=scale is not None
    )
    args = (src, x) if scale is None else (src, x, scale)
    if _interpret_in_shard_map(args, config):
        return gather_rows_reference(x, src, scale, out_dtype=out_dtype)
    return _call(
        kernel,
        jax.ShapeDtypeStruct((num_rows, d), out_dtype),
        (pl.cdiv(num_rows, block_rows), pl.cdiv(d, block_d)),
        args, config, "jmoe_gather_rows", poison,
    )


def gather_rows_reference(x: Array, src: Array, scale: Array | None = None, *, out_dtype=None) -> Array:
    """Pure-jnp ``gather_rows``."""
    valid = (src >= 0) & (src < x.shape[0])  # [R]
    rows = jnp.where(valid[:, None], x[jnp.where(valid, src, 0)], 0)  # [R, d]
    if scale is not None:
        rows = rows.astype(jnp.float32) * scale[:, None]
    return rows.astype(x.dtype if out_dtype is None else out_dtype)


# ----------------------------------------------------------------------------
# gather_sum_rows: out[t] = sum_k w[t, k] * x[idx[t, k]]
# ----------------------------------------------------------------------------


def _gather_sum_rows_kernel(idx_ref, w_ref, x_ref, out_ref, *, block_rows: int, block_d: int):
    # idx [T, K] int32, w [T, K] f32, x [N, d], out [T, d]
    rows, cols, row_in, col_in = _tile(block_rows, block_d, *out_ref.shape)

    def body(k, acc):  # acc [BR, BD] f32; k = the token's k-th choice, in order
        idx = plgpu.load(idx_ref.at[rows, k], mask=row_in, other=-1)  # [BR]
        w = plgpu.load(w_ref.at[rows, k], mask=row_in, other=0.0)  # [BR]
        vals, valid = _load_rows(x_ref, idx, row_in, cols, col_in)  # [BR, BD]
        return acc + jnp.where(valid, w, 0.0)[:, None] * vals.astype(jnp.float32)

    acc = lax.fori_loop(0, idx_ref.shape[1], body, jnp.zeros((block_rows, block_d), jnp.float32))
    _store_tile(out_ref, rows, cols, row_in, col_in, acc)


def gather_sum_rows(
    x: Array,
    idx: Array,
    weight: Array,
    *,
    out_dtype=None,
    config: KernelConfig = KernelConfig(),
    poison: bool = False,
) -> Array:
    """``out[t] = sum_k weight[t, k] * x[idx[t, k]]`` over ``idx != -1`` (float32 sum).

    Args:
      x: [N, d] float source rows.
      idx: [T, K] int32 source row of each term, -1 for none.
      weight: [T, K] float32.
      out_dtype: output dtype (default x's); the sum is float32 until the cast.
    Returns:
      [T, d]; a row whose idx are all -1 is exactly 0.
    """
    _check_rows("x", x)
    _check_index("idx", idx, 2)
    if weight.shape != idx.shape or weight.dtype != jnp.float32:
        raise ValueError(f"weight must be float32{list(idx.shape)}, got {weight.dtype}{list(weight.shape)}")
    (num_rows, _), d = idx.shape, x.shape[1]
    block_rows, block_d = config.tiles(num_rows, d)
    kernel = functools.partial(_gather_sum_rows_kernel, block_rows=block_rows, block_d=block_d)
    if _interpret_in_shard_map((idx, weight, x), config):
        return gather_sum_rows_reference(x, idx, weight, out_dtype=out_dtype)
    return _call(
        kernel,
        jax.ShapeDtypeStruct((num_rows, d), x.dtype if out_dtype is None else out_dtype),
        (pl.cdiv(num_rows, block_rows), pl.cdiv(d, block_d)),
        (idx, weight, x), config, "jmoe_gather_sum_rows", poison,
    )


def gather_sum_rows_reference(x: Array, idx: Array, weight: Array, *, out_dtype=None) -> Array:
    """Pure-jnp ``gather_sum_rows``."""
    valid = (idx >= 0) & (idx < x.shape[0])  # [T, K]
    picked = x[jnp.where(valid, idx, 0)].astype(jnp.float32)  # [T, K, d]
    picked = jnp.where(valid[..., None], picked, 0.0)
    out = jnp.einsum("tk,tkd->td", jnp.where(valid, weight, 0.0), picked)
    return out.astype(x.dtype if out_dtype is None else out_dtype)


# ----------------------------------------------------------------------------
# gather_dot_rows: out[t, k] = <y[t], x[idx[t, k]]>
# ----------------------------------------------------------------------------


def _gather_dot_rows_kernel(y_ref, x_ref, idx_ref, out_ref, *, block_rows: int, block_d: int):
    # y [T, d], x [N, d], idx [T, K] int32, out [T, K] f32; program (i, k)
    num_rows, d = y_ref.shape
    num_src = x_ref.shape[0]
    k = pl.program_id(1)
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)  # [BR]
    row_in = rows < num_rows
    idx = plgpu.load(idx_ref.at[rows, k], mask=row_in, other=-1)  # [BR]
    valid = row_in & (idx >= 0) & (idx < num_src)
    safe_idx = jnp.where(valid, idx, 0)

    def body(j, acc):  # acc [BR] f32; j = column block, in order
        cols = j * block_d + jnp.arange(block_d)  # [BD]
        col_in = cols < d
        y = plgpu.load(
            y_ref.at[rows[:, None], cols[None, :]],
            mask=row_in[:, None] & col_in[None, :], other=_zero(y_ref),
        )  # [BR, BD]
        x = plgpu.load(
            x_ref.at[safe_idx[:, None], cols[None, :]],
            mask=valid[:, None] & col_in[None, :], other=_zero(x_ref),
        )  # [BR, BD]
        return acc + jnp.sum(y.astype(jnp.float32) * x.astype(jnp.float32), axis=1)

    acc = lax.fori_loop(0, pl.cdiv(d, block_d), body, jnp.zeros((block_rows,), jnp.float32))
    plgpu.store(out_ref.at[rows, k], acc, mask=row_in)


def gather_dot_rows(
    y: Array, x: Array, idx: Array, *, config: KernelConfig = KernelConfig(), poison: bool = False
) -> Array:
    """``out[t, k] = sum_d y[t, d] * x[idx[t, k], d]`` in float32, 0 where ``idx == -1``.

    Args:
      y: [T, d] float.
      x: [N, d] float.
      idx: [T, K] int32, -1 for none.
    Returns:
      [T, K] float32.
    """
    _check_rows("y", y)
    _check_rows("x", x)
    _check_index("idx", idx, 2)
    if idx.shape[0] != y.shape[0] or x.shape[1] != y.shape[1]:
        raise ValueError(f"shapes do not agree: y {list(y.shape)}, x {list(x.shape)}, idx {list(idx.shape)}")
    (num_rows, num_k), d = idx.shape, y.shape[1]
    block_rows, block_d = config.tiles(num_rows, d)
    kernel = functools.partial(_gather_dot_rows_kernel, block_rows=block_rows, block_d=block_d)
    if _interpret_in_shard_map((y, x, idx), config):
        return gather_dot_rows_reference(y, x, idx)
    return _call(
        kernel,
        jax.ShapeDtypeStruct((num_rows, num_k), jnp.float32),
        (pl.cdiv(num_rows, block_rows), num_k),
        (y, x, idx), config, "jmoe_gather_dot_rows", poison,
    )


def gather_dot_rows_reference(y: Array, x: Array, idx: Array) -> Array:
    """Pure-jnp ``gather_dot_rows``."""
    valid = (idx >= 0) & (idx < x.shape[0])  # [T, K]
    picked = x[jnp.where(valid, idx, 0)].astype(jnp.float32)  # [T, K, d]
    out = jnp.einsum("td,tkd->tk", y.astype(jnp.float32), picked)
    return jnp.where(valid, out, 0.0)
