"""Meshes: jmoe's axis names and roles, the mesh constructor, and shape checks.

Mesh axes (names are fixed; a size-1 axis may be left out):

* ``"data"``          tokens only (experts replicated): plain data parallelism;
* ``"expert_outer"``  optional 2nd expert axis (hosts), for the hierarchical exchange;
* ``"expert"``        experts *and* tokens: device i holds experts
                      ``[i * E / n, (i + 1) * E / n)`` and a 1/n share of the groups;
* ``"model"``         each expert's hidden dim f is split over it (tokens replicated);
* any other axis      the layer is replicated over it (its inputs are gathered).
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


def resolve_mesh(mesh: Mesh | None = None):
    """``mesh`` if given, else the ambient mesh of ``jax.set_mesh`` (None if none)."""
    if mesh is not None:
        return mesh
    ambient = jax.sharding.get_abstract_mesh()
    if ambient is None or ambient.empty:
        return None
    return ambient


def axis_size(mesh, name: str) -> int:
    """The size of axis ``name`` in ``mesh`` (1 when absent or without a mesh)."""
    return dict(mesh.shape).get(name, 1) if mesh is not None else 1


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """Which mesh axes play which role (only those in the mesh)."""

    token_axes: tuple[str, ...]  # groups are sharded over these: data, expert_outer, expert
    expert_axes: tuple[str, ...]  # experts are sharded over these: expert_outer, expert
    model_axis: str | None  # the expert hidden dim f is sharded over this (None when size 1)

    @classmethod
    def of(cls, mesh) -> "MeshAxes":
        names = tuple(mesh.axis_names)
        return cls(
            token_axes=tuple(a for a in (DATA, EXPERT_OUTER, EXPERT) if a in names),
            expert_axes=tuple(a for a in (EXPERT_OUTER, EXPERT) if a in names),
            model_axis=MODEL if axis_size(mesh, MODEL) > 1 else None,  # size 1: nothing to split
        )


def expert_parallel_size(mesh) -> int:
    """n = |expert_outer| x |expert| (1 without a mesh): how many ways experts are split."""
    return axis_size(mesh, EXPERT_OUTER) * axis_size(mesh, EXPERT)


def uses_mesh(mesh) -> bool:
    """True when ``mesh`` asks for the sharded layer path (expert or model axis > 1)."""
    return expert_parallel_size(mesh) * axis_size(mesh, MODEL) > 1


def check_mesh(mesh, *, num_experts: int, num_groups: int, d_ff: int, hierarchical: bool = False) -> None:
    """Raise a clear ``ValueError`` for a mesh / shape the EP path does not support."""
    n = expert_parallel_size(mesh)
    if num_experts % n:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the expert-parallel size "
            f"|expert_outer| x |expert| = {n} of mesh {dict(mesh.shape)}; use an expert axis "
            f"that divides num_experts and give the other devices to 'model' or 'data'"
        )
    shards = math.prod(axis_size(mesh, a) for a in (DATA, EXPERT_OUTER, EXPERT))
    if num_groups % shards:
        raise ValueError(
            f"the number of groups G={num_groups} (batch x seq / group_size) is not divisible by "
            f"|data| x |expert_outer| x |expert| = {shards} of mesh {dict(mesh.shape)}: every device "
            f"must route whole groups of its own"
        )
    m = axis_size(mesh, MODEL)
    if d_ff % m:
        raise ValueError(f"d_ff={d_ff} is not divisible by the 'model' axis size {m}")
    if hierarchical and EXPERT_OUTER not in mesh.axis_names:
        raise ValueError(
            f"hierarchical all-to-all needs a mesh with an 'expert_outer' axis (make_mesh(expert_outer=...)), "
            f"got axes {tuple(mesh.axis_names)}"
        )
