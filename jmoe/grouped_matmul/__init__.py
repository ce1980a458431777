"""Grouped matmuls for dropless experts, behind one registry.

Each implementation computes ``out[r] = rows[r] @ w[g(r)]`` ([N, K], [E, K, F] -> [N, F],
0 past the groups) with gradients to rows and w; all but XLA's ``ragged_dot`` are a
(gmm, tgmm) kernel pair under the one VJP of :mod:`jmoe.grouped_matmul.vjp`.

Registered (:data:`GROUPED_MATMULS`; the module of each says what was measured):
  ragged_dot  XLA's ``jax.lax.ragged_dot`` (:mod:`jmoe.grouped_matmul.ragged_dot`);
  scan        a ``lax.scan`` over (row tile, expert) items, each row computed once
              (:mod:`jmoe.grouped_matmul.scan`);
  pallas      the same schedule as Pallas GPU (Triton) kernels (:mod:`jmoe.pallas.grouped_matmul`);
  mosaic      JAX's Hopper (Mosaic GPU) kernels, 16-bit dtypes only
              (:mod:`jmoe.pallas.mosaic_grouped_matmul`);
  megablox    JAX's TPU (Pallas Mosaic TPU) kernels, MaxText's dropless path
              (:mod:`jmoe.pallas.megablox_grouped_matmul`).
``"auto"``: scan on CPU (measured faster there), megablox on TPU (what MaxText runs there;
not yet measured by jmoe), ragged_dot elsewhere.

The kernels (pallas, mosaic, megablox) are an error off their platforms unless tests opt in to
Pallas's interpreter (:func:`jmoe.platform.interpret`).

A new grouped matmul is one module with its function plus one :func:`register` line.
Implementations that import Pallas are loaded on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax
import jax.numpy as jnp

from jmoe.compat import on_auto_axes
from jmoe.grouped_matmul.scan import scan_grouped_matmul, tile_schedule
from jmoe.grouped_matmul.vjp import GmmKernels, grouped_matmul_vjp, vjp_outputs
from jmoe.platform import Registry

Array = jax.Array

__all__ = ["GROUPED_MATMULS", "GmmKernels", "GroupedMatmul", "NAMES", "check_dtype", "grouped_matmul",
           "grouped_matmul_vjp", "scan_grouped_matmul", "tile_schedule", "vjp_outputs"]


@dataclasses.dataclass(frozen=True)
class GroupedMatmul:
    """Where the differentiable function ``(rows [N, K], w [E, K, F], group_sizes [E]) ->
    [N, F]`` lives (``module:function``, imported on first use), the activation dtypes it
    supports (None: any), and whether it needs w cast to the rows' dtype first."""

    function: str
    dtypes: tuple | None = None
    cast_weights: bool = False

    def load(self) -> Callable[[Array, Array, Array], Array]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


GROUPED_MATMULS: Registry[GroupedMatmul] = Registry("grouped_matmul", fallback="ragged_dot",
                                                    auto={"cpu": "scan", "tpu": "megablox"})
GROUPED_MATMULS.register("ragged_dot", GroupedMatmul("jmoe.grouped_matmul.ragged_dot:ragged_dot_grouped_matmul"))
GROUPED_MATMULS.register("scan", GroupedMatmul("jmoe.grouped_matmul.scan:scan_grouped_matmul"))
GROUPED_MATMULS.register("pallas", GroupedMatmul("jmoe.pallas.grouped_matmul:grouped_matmul", cast_weights=True))
GROUPED_MATMULS.register("mosaic", GroupedMatmul("jmoe.pallas.mosaic_grouped_matmul:mosaic_grouped_matmul",
                                                 dtypes=(jnp.bfloat16, jnp.float16), cast_weights=True))
GROUPED_MATMULS.register("megablox", GroupedMatmul("jmoe.pallas.megablox_grouped_matmul:megablox_grouped_matmul",
                                                   cast_weights=True))
NAMES = GROUPED_MATMULS.names


def check_dtype(name: str, dtype) -> None:
    """A clear error when grouped matmul ``name`` cannot run in activation ``dtype``."""
    entry = GROUPED_MATMULS.get(name)
    if entry.dtypes is not None and not any(jnp.dtype(dtype) == jnp.dtype(d) for d in entry.dtypes):
        allowed = " or ".join(str(jnp.dtype(d)) for d in entry.dtypes)
        raise ValueError(f"grouped_matmul={name!r} needs dtype {allowed}, got {jnp.dtype(dtype)}")


def grouped_matmul(rows: Array, w: Array, group_sizes: Array, name: str = "auto") -> Array:
    """``rows[r] @ w[g(r)]``: [N, K], [E, K, F] -> [N, F], 0 past the groups, by the
    implementation ``name`` of :data:`GROUPED_MATMULS`.

    Operands explicitly sharded on a mesh (outside ``shard_map``: rows split over ``"model"``
    along K, say) are fine: the implementation then runs with the mesh axes Auto
    (:func:`jmoe.compat.on_auto_axes`) and the gradients keep the operands' shardings.
    """
    entry = GROUPED_MATMULS.get(name)
    if entry.cast_weights:
        w = w.astype(rows.dtype)
    return on_auto_axes(entry.load(), rows, w, group_sizes)
