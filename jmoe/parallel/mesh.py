"""Meshes: jmoe's axis names and roles, the mesh constructor, and shape checks.

Mesh axes by their default names (a size-1 axis may be left out):

* ``"data"``          tokens only (experts replicated): plain data parallelism;
* ``"expert_outer"``  optional 2nd expert axis (hosts), for the hierarchical exchange;
* ``"expert"``        experts *and* tokens: device i holds experts
                      ``[i * E / n, (i + 1) * E / n)`` and a 1/n share of the groups;
* ``"model"``         each expert's hidden dim f is split over it (tokens replicated);
* any other axis      tokens, like ``"data"`` (a tutorial's ``"batch"``); ``MeshAxes.of(mesh,
                      expert_axes=..., model_axis=...)`` gives other names the expert / model roles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA, EXPERT_OUTER, EXPERT, MODEL = "data", "expert_outer", "expert", "model"
AXES = (DATA, EXPERT_OUTER, EXPERT, MODEL)


def make_mesh(
    *,
    expert: int | None = None,
    data: int | None = None,
    model: int = 1,
    expert_outer: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    axis_types: AxisType = AxisType.Auto,
) -> Mesh:
    """A mesh with axes ``("data", ["expert_outer",] "expert", "model")``.

    ``data * expert_outer * expert * model`` must equal the number of devices
    (default ``jax.devices()``, all processes). One of ``expert`` / ``data`` may
    be left out and is filled in; with both left out, every device not used by
    ``model`` / ``expert_outer`` goes to ``expert``. ``expert_outer`` (for the
    hierarchical all-to-all: hosts x devices per host) appears only when given.

    Axis types default to ``Auto``, so the mesh works with ``jax.set_mesh`` and
    with Flax NNX ``out_sharding`` metadata on a user's own parameters (e.g.
    ``nnx.Linear(..., kernel_metadata={"out_sharding": (None, "model")})``).

    Example: ``make_mesh(expert=4)`` on 8 devices -> ``{data: 2, expert: 4, model: 1}``.
    """
    devices = list(jax.devices() if devices is None else devices)
    num = len(devices)
    outer = 1 if expert_outer is None else expert_outer
    for name, size in (("expert", expert), ("data", data), ("model", model), ("expert_outer", outer)):
        if size is not None and size < 1:
            raise ValueError(f"mesh axis {name!r} must have size >= 1, got {size}")
    rest = model * outer
    if expert is None and data is None:
        data = 1
    if expert is None or data is None:
        known = rest * (expert or data)
        if num % known:
            raise ValueError(
                f"{num} devices cannot be split into model={model} x expert_outer={outer} x "
                f"{'expert' if expert else 'data'}={expert or data} x something"
            )
        if expert is None:
            expert = num // known
        else:
            data = num // known
    if data * outer * expert * model != num:
        raise ValueError(
            f"mesh data={data} x expert_outer={outer} x expert={expert} x model={model} = "
            f"{data * outer * expert * model} does not match the {num} devices"
        )
    shape = [data, expert, model]
    names = [DATA, EXPERT, MODEL]
    if expert_outer is not None:
        shape.insert(1, expert_outer)
        names.insert(1, EXPERT_OUTER)
    device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, tuple(names), axis_types=(axis_types,) * len(names))


def resolve_mesh(mesh: Mesh | None = None, x=None):
    """``mesh`` if given, else the ambient mesh of ``jax.set_mesh``, else the mesh of ``x``'s
    type when x is sharded over explicit axes (an array placed with ``jax.device_put`` and no
    mesh set); None if none."""
    if mesh is not None:
        return mesh
    ambient = jax.sharding.get_abstract_mesh()
    if ambient is not None and not ambient.empty:
        return ambient
    if x is not None:
        sharding = getattr(jax.typeof(x), "sharding", None)
        typed = getattr(sharding, "mesh", None)
        if typed is not None and not typed.empty and is_explicit(typed) and typed.size > 1:
            return typed
    return None


def axis_size(mesh, name: str) -> int:
    """The size of axis ``name`` in ``mesh`` (1 when absent or without a mesh)."""
    return dict(mesh.shape).get(name, 1) if mesh is not None else 1


def is_explicit(mesh) -> bool:
    """True when any axis of ``mesh`` has explicit sharding (``jax.make_mesh``'s default):
    arrays then carry their sharding in their type."""
    return mesh is not None and any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """Which mesh axes play which role, and their sizes.

    Defaults: experts over ``("expert_outer", "expert")`` (those in the mesh), the expert
    hidden dim over ``"model"``; every other axis holds tokens (data parallelism, whatever
    its name: ``"data"``, a tutorial's ``"batch"``). ``expert_axes`` / ``model_axis`` name
    other axes for those roles.
    """

    token_axes: tuple[str, ...]  # groups are sharded over these: the data axes, then the expert axes
    expert_axes: tuple[str, ...]  # experts are sharded over these (outer first)
    model_axis: str | None  # the expert hidden dim f is sharded over this (None when size 1)
    sizes: tuple[tuple[str, int], ...] = ()  # every mesh axis and its size

    @classmethod
    def of(cls, mesh, expert_axes: Sequence[str] | None = None, model_axis: str | None = None) -> "MeshAxes":
        names = tuple(mesh.axis_names)
        for name in (*(expert_axes or ()), *([model_axis] if model_axis else [])):
            if name not in names:
                raise ValueError(f"mesh axis {name!r} is not in the mesh, whose axes are {names}")
        experts = tuple(expert_axes) if expert_axes is not None else tuple(a for a in (EXPERT_OUTER, EXPERT)
                                                                              if a in names)
        model = MODEL if model_axis is None else model_axis
        if model in experts:
            raise ValueError(f"mesh axis {model!r} cannot hold both experts and the expert hidden dim")
        return cls(
            token_axes=tuple(a for a in names if a not in experts and a != model) + experts,
            expert_axes=experts,
            model_axis=model if axis_size(mesh, model) > 1 else None,  # size 1: nothing to split
            sizes=tuple((a, int(n)) for a, n in dict(mesh.shape).items()),
        )

    def size(self, *names: str) -> int:
        """The product of the sizes of axes ``names`` (1 for none)."""
        sizes = dict(self.sizes)
        return math.prod(sizes.get(a, 1) for a in names)

    @property
    def expert_size(self) -> int:
        """n, the number of devices the experts are split over."""
        return self.size(*self.expert_axes)


def expert_parallel_size(mesh) -> int:
    """n = |expert_outer| x |expert| (1 without a mesh): how many ways experts are split."""
    return 1 if mesh is None else MeshAxes.of(mesh).expert_size


def uses_mesh(mesh, axes: MeshAxes | None = None) -> bool:
    """True when the layer runs under ``shard_map`` on ``mesh``: experts or their hidden dim
    are split (expert or model axis > 1), or the mesh has explicit axes and > 1 device (its
    arrays' types carry their sharding; the layer then shards tokens itself)."""
    if mesh is None:
        return False
    axes = MeshAxes.of(mesh) if axes is None else axes
    split = axes.expert_size * (axes.size(axes.model_axis) if axes.model_axis else 1) > 1
    return split or (is_explicit(mesh) and axes.size(*dict(axes.sizes)) > 1)


def check_mesh(axes: MeshAxes, *, num_experts: int, num_groups: int, d_ff: int, hierarchical: bool = False,
               shared_d_ff: int | None = None) -> None:
    """Raise a clear ``ValueError`` for a mesh / shape the EP path does not support (``shared_d_ff``:
    the shared expert's width, split over the model axis too)."""
    mesh_shape = dict(axes.sizes)
    n = axes.expert_size
    if num_experts % n:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the expert-parallel size "
            f"{' x '.join(f'|{a}|' for a in axes.expert_axes)} = {n} of mesh {mesh_shape}; use an expert axis "
            f"that divides num_experts and give the other devices to 'model' or 'data'"
        )
    shards = axes.size(*axes.token_axes)
    if num_groups % shards:
        raise ValueError(
            f"the number of groups G={num_groups} (batch x seq / group_size) is not divisible by "
            f"{' x '.join(f'|{a}|' for a in axes.token_axes)} = {shards} of mesh {mesh_shape}: every device "
            f"must route whole groups of its own"
        )
    m = axes.size(axes.model_axis) if axes.model_axis else 1
    for name, width in (("d_ff", d_ff), ("shared_d_ff", shared_d_ff)):
        if width is not None and width % m:
            raise ValueError(f"{name}={width} is not divisible by the {axes.model_axis!r} axis size {m}")
    if hierarchical and len(axes.expert_axes) != 2:
        raise ValueError(
            f"hierarchical all-to-all needs two expert axes (outer, inner; make_mesh(expert_outer=...)), "
            f"got expert axes {axes.expert_axes} of mesh axes {tuple(mesh_shape)}"
        )
