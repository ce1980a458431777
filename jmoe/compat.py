"""Differences between the jax versions jmoe runs on, in one place.

* ``shard_map``: public as ``jax.shard_map`` (the experimental import as a fallback).
* The manual mesh axes a value varies over inside ``shard_map``: jax 0.10 spells them
  ``aval.manual_axis_type.varying``, later versions ``aval.vma``.
* Mosaic GPU's interpret mode: public in jax >= 0.11, private in 0.10.
* The derivative of ``erf`` inside ``shard_map`` (jax 0.12): :func:`normal_cdf`.
* Ops without a sharding rule for explicitly sharded operands: :func:`on_auto_axes`.
* Whether a Flax module runs inside ``nnx.capture`` (where ``Module.sow`` is not
  deprecated): :func:`in_capture`.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm
from jax.sharding import PartitionSpec as P

def in_capture(module) -> bool:
    """True inside ``nnx.capture(...)``: flax 0.12.x marks each captured module with a
    ``__captures__`` attribute for the call (Module.sow's own test)."""
    return hasattr(module, "__captures__")


try:
    shard_map = jax.shard_map
except AttributeError:  # pragma: no cover
    from jax.experimental.shard_map import shard_map  # noqa: F401


def varying_axes(x) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) ``x`` varies over; empty outside."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", None) or ())


def vary_like(x, *like):
    """Inside ``shard_map``: ``x`` marked as varying over every manual mesh axis the
    arrays ``like`` vary over (``pcast`` of the axes it lacks); a no-op outside."""
    missing = frozenset().union(*(varying_axes(a) for a in like)) - varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def sum_over_extra_axes(grad, like):
    """Inside ``shard_map``, the cotangent of an input that is the same on several devices
    is the sum of their contributions (a custom VJP must say so itself): a weight
    replicated over ``data`` gets rows from every replica, rows replicated over ``model``
    meet a weight split over it. So: ``psum`` over the axes the gradient varies over and
    the input does not (what autodiff of ``ragged_dot`` does by itself)."""
    extra = tuple(sorted(varying_axes(grad) - varying_axes(like)))
    return jax.lax.psum(grad, extra) if extra else grad


def varying_shape(out_shape: jax.ShapeDtypeStruct, args) -> jax.ShapeDtypeStruct:
    """``out_shape`` marked as varying over the manual mesh axes ``args`` vary over (a
    ``pallas_call`` output inside ``shard_map`` must say so); unchanged outside."""
    avals = [jax.typeof(a) for a in args]
    mats = [m for m in (getattr(a, "manual_axis_type", None) for a in avals) if m is not None]
    if mats:
        varying = frozenset().union(*(m.varying for m in mats))
        mat = type(mats[0])(varying=varying)
        return jax.ShapeDtypeStruct(out_shape.shape, out_shape.dtype, manual_axis_type=mat)
    vmas = [v for v in (getattr(a, "vma", None) for a in avals) if v is not None]
    if vmas:
        return jax.ShapeDtypeStruct(out_shape.shape, out_shape.dtype, vma=frozenset().union(*vmas))
    return out_shape


def any_varying(args) -> bool:
    """True when any of ``args`` varies over a manual mesh axis (inside ``shard_map``)."""
    return any(varying_axes(a) for a in args)


def mosaic_gpu_interpret_mode(interpret: bool):
    """A context running Mosaic GPU kernels in interpret mode (a no-op when False)."""
    if not interpret:
        return contextlib.nullcontext()
    try:
        from jax.experimental.pallas.mosaic_gpu import force_gpu_interpret_mode
    except ImportError:
        from jax._src.pallas.mosaic_gpu.interpret.params import force_gpu_interpret_mode
    return force_gpu_interpret_mode()


def explicit_axes(x) -> tuple[str, ...]:
    """The mesh axes of ``x``'s type that are ``Explicit`` (outside ``shard_map``, on a mesh of
    ``jax.make_mesh``'s default axis types); empty for an unsharded or a manual value."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    return tuple(getattr(mesh, "explicit_axes", ()) or ())


def _axes_of(entry) -> frozenset:
    if entry is None:
        return frozenset()
    return frozenset(entry if isinstance(entry, tuple) else (entry,))


def on_auto_axes(f, rows, w, *rest):
    """``f(rows [N, K], w [E, K, F], *rest) -> [N, F]``, differentiable, on operands whose
    types carry an explicit sharding (outside ``shard_map``, e.g. activations split over
    ``"model"`` by a user's dense layers): ``f`` runs with the mesh axes ``Auto``
    (``jax.sharding.auto_axes``: XLA places its internals), the result keeps the rows' split
    of N and w's split of F (where they do not collide), and the gradients come back in
    their inputs' shardings. A plain call when no operand is explicitly sharded.

    ``f``'s loops, scatters and kernels have no rule for explicitly sharded operands: a
    scan accumulating ``x_tile^T dy_tile`` into ``dw`` would add a K-split product into an
    unsplit accumulator ("Incompatible types for broadcasting").
    """
    axes = explicit_axes(rows) or explicit_axes(w)
    if not axes:
        return f(rows, w, *rest)
    mesh = (jax.typeof(rows) if explicit_axes(rows) else jax.typeof(w)).sharding.mesh
    row_spec = tuple(jax.typeof(rows).sharding.spec) + (None,) * 2 if explicit_axes(rows) else (None, None)
    w_spec = tuple(jax.typeof(w).sharding.spec) + (None,) * 3 if explicit_axes(w) else (None,) * 3
    n_entry, f_entry = row_spec[0], w_spec[2]
    out_spec = P(n_entry, None if _axes_of(f_entry) & _axes_of(n_entry) else f_entry)
    ambient = jax.sharding.get_abstract_mesh()
    context = jax.sharding.use_abstract_mesh(mesh) if ambient is None or ambient.empty else contextlib.nullcontext()
    with context:
        return jax.sharding.auto_axes(f, axes=axes, out_sharding=out_spec)(rows, w, *rest)


@jax.custom_jvp
def normal_cdf(x):
    """The standard normal CDF ``Phi(x)``, differentiable inside ``shard_map`` on every jax.

    jax 0.12 differentiates ``erf`` through ``lax.polynomial`` with constant coefficients
    that do not vary over the manual mesh axes, which ``shard_map``'s type check rejects
    ("Primitive polynomial requires varying manual axes to match"); here the derivative
    is the normal density written out: ``Phi'(x) = exp(-x^2 / 2) / sqrt(2 pi)``.
    """
    return norm.cdf(x)


@normal_cdf.defjvp
def _normal_cdf_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return normal_cdf(x), dx * jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
