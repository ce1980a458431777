"""Grouped matrix product on TPU: the megablox Pallas TPU kernels JAX ships.

Rows sorted by expert, ``group_sizes[e]`` consecutive rows per expert e::

    out[r] = x[r] @ w[g(r)]                       megablox gmm                        [N, K], [E, K, F] -> [N, F]
    dx[r]  = dy[r] @ w[g(r)]^T                    the same kernel, transpose_rhs=True [N, F], [E, K, F] -> [N, K]
    dw[e]  = x[rows of e]^T @ dy[rows of e]       megablox tgmm                       [N, K], [N, F] -> [E, K, F]

The kernels live in ``jax.experimental.pallas.ops.tpu.megablox`` (maintained with JAX;
MaxText's dropless MoE on TPU uses them): one program per (row tile, group) item, as in
MegaBlocks, a float32 VMEM accumulator, the schedule in scalar-prefetched SMEM. This module
adds what a layer needs: the one grouped-matmul VJP (:mod:`jmoe.grouped_matmul.vjp`), any
sizes (the kernels want the rows a multiple of the row tile and, on TPU, tiles that are
multiples of (8, 128): the operands are zero-padded to the tiles here, which is free for the
usual model dims, multiples of 128), any float dtype (the kernels take bfloat16 and float32;
others run in float32), and zeros for the rows past ``sum(group_sizes)`` (the kernels leave
those rows unwritten; the expert-parallel receive buffer has such rows).

Compiled on TPU; elsewhere an error unless tests opt in (:func:`jmoe.platform.interpret`),
then they run in Pallas's TPU interpret mode (``pltpu.InterpretParams``: VMEM, SMEM and DMAs
simulated on the CPU, uninitialised memory NaN, out-of-bounds reads raise). Not yet run
on a TPU: the tiles (megablox's default 128 x 128 x 128) are not tuned
(``benchmarks/tpu_check.sh`` times others).
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp

from jmoe import platform
from jmoe.compat import any_varying, vary_like
from jmoe.grouped_matmul.vjp import GmmKernels, check_operands, grouped_matmul_vjp, zero_past_groups

Array = jax.Array

KERNEL_DTYPES = (jnp.bfloat16, jnp.float32)  # what the megablox kernels accept


@dataclasses.dataclass(frozen=True)
class MegabloxConfig:
    """Tiles of the megablox kernels (static, hashable).

    ``block_m`` rows (a multiple of 16: bfloat16 packs 16 rows in a TPU vreg), ``block_k``
    of the contraction and ``block_n`` output columns (multiples of 128, the TPU lane
    width) per program. A tile larger than its (rounded up) dimension shrinks to it.
    ``interpret``: True / False, or None for "compiled on TPU, elsewhere interpreted where
    tests opted in, else an error".
    """

    block_m: int = 128
    block_k: int = 128
    block_n: int = 128
    interpret: bool | None = None

    def __post_init__(self):
        for name, multiple in (("block_m", 16), ("block_k", 128), ("block_n", 128)):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"MegabloxConfig.{name} must be a positive multiple of {multiple}, got {value!r}")


def interpret(flag: bool | None, args=()):
    """megablox's ``interpret`` argument: False compiled (on TPU); else Pallas's TPU
    interpret mode, or, inside ``shard_map`` (values of ``args`` vary over mesh axes), its
    plain interpreter (the TPU interpret mode's callbacks hang there on CPU devices)."""
    if not platform.interpret(flag, "grouped_matmul='megablox' (Pallas TPU kernels)", ("tpu",)):
        return False
    if any_varying(args):
        return True
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def _untyped_outputs(args):
    """Inside ``shard_map``: a context tracing the megablox ``pallas_call`` without the
    mesh-axis type check. Its output shapes carry no mesh axes (megablox does not say how
    they vary), which ``check_vma`` rejects; the caller marks them varying like their
    inputs (:func:`jmoe.compat.vary_like`). A no-op outside ``shard_map``."""
    if not any_varying(args):
        return contextlib.nullcontext()
    from jax._src import config  # private: the flag shard_map sets while tracing its body (jax 0.10 - 0.12)

    return config._check_vma(False)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tile(dim: int, block: int, align: int) -> tuple[int, int]:
    """(tile, padded dim): ``block``, or ``dim`` rounded up to ``align`` when that is smaller."""
    tile = min(block, _round_up(dim, align))
    return tile, _round_up(dim, tile)


def _pad(a: Array, shape: tuple[int, ...]) -> Array:
    """Zero-pad ``a`` at the end of each axis to ``shape`` (a no-op when it already fits)."""
    if a.shape == tuple(shape):
        return a
    return jnp.pad(a, [(0, s - n) for n, s in zip(a.shape, shape)])


def _compute_dtype(*arrays: Array):
    dtype = jnp.result_type(*arrays)
    return dtype if any(dtype == d for d in KERNEL_DTYPES) else jnp.float32


def megablox_gmm(x: Array, w: Array, group_sizes: Array, *, transpose_w: bool = False,
                 config: MegabloxConfig = MegabloxConfig()) -> Array:
    """``out[r] = x[r] @ w[g(r)]`` (``w[g(r)].T`` with ``transpose_w``), 0 past the groups.

    Args:
      x: [N, K] rows sorted by expert, any float dtype.
      w: [E, K, F] ([E, F, K] with ``transpose_w``).
      group_sizes: [E] int, rows per expert (sum <= N).
    Returns:
      [N, F] in x's dtype (float32 accumulation).
    """
    from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm

    check_operands("megablox grouped matmul", x, w, group_sizes, transpose_w)
    (num_rows, k_dim), num_experts = x.shape, w.shape[0]
    f_dim = w.shape[1] if transpose_w else w.shape[2]
    dtype = _compute_dtype(x, w)
    tm, m_pad = _tile(num_rows, config.block_m, 16)
    tk, k_pad = _tile(k_dim, config.block_k, 128)
    tn, f_pad = _tile(f_dim, config.block_n, 128)
    x_p = _pad(x.astype(dtype), (m_pad, k_pad))
    w_p = _pad(w.astype(dtype), (num_experts, f_pad, k_pad) if transpose_w else (num_experts, k_pad, f_pad))
    sizes = group_sizes.astype(jnp.int32)
    with _untyped_outputs((x, w, group_sizes)):
        out = gmm(x_p, w_p, sizes, preferred_element_type=dtype, tiling=(tm, tk, tn),
                  transpose_rhs=transpose_w, interpret=interpret(config.interpret, (x, w)))  # [m_pad, f_pad]
    out = vary_like(out[:num_rows, :f_dim], x, w, group_sizes)  # the kernel's output type carries no mesh axes
    return zero_past_groups(out, sizes).astype(x.dtype)


def megablox_tgmm(x: Array, dy: Array, group_sizes: Array, *, config: MegabloxConfig = MegabloxConfig()) -> Array:
    """``dw[e] = x[rows of e]^T @ dy[rows of e]``: [N, K], [N, F], [E] -> [E, K, F] float32;
    an expert with no rows gets exactly 0; rows past the groups count for nothing."""
    from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm

    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"megablox_tgmm needs x [N, K] and dy [N, F], got {list(x.shape)} and {list(dy.shape)}")
    (num_rows, k_dim), f_dim = x.shape, dy.shape[1]
    dtype = _compute_dtype(x, dy)
    tm, m_pad = _tile(num_rows, config.block_m, 16)
    tk, k_pad = _tile(k_dim, config.block_k, 128)
    tn, f_pad = _tile(f_dim, config.block_n, 128)
    x_p = _pad(x.astype(dtype), (m_pad, k_pad))
    dy_p = _pad(dy.astype(dtype), (m_pad, f_pad))
    with _untyped_outputs((x, dy, group_sizes)):
        dw = tgmm(x_p.T, dy_p, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32,
                  tiling=(tm, tk, tn), interpret=interpret(config.interpret, (x, dy)))  # [E, k_pad, f_pad]
    return vary_like(dw[:, :k_dim, :f_dim], x, dy, group_sizes)


KERNELS = GmmKernels(gmm=megablox_gmm, tgmm=megablox_tgmm)  # their signatures are the pair's


def megablox_grouped_matmul(x: Array, w: Array, group_sizes: Array,
                            config: MegabloxConfig = MegabloxConfig()) -> Array:
    """Differentiable :func:`megablox_gmm`: ``[N, K], [E, K, F], [E] -> [N, F]`` (like
    ``jax.lax.ragged_dot``); gradients to x and w (:mod:`jmoe.grouped_matmul.vjp`)."""
    return grouped_matmul_vjp(x, w, group_sizes, KERNELS, config)
