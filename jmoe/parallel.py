"""Meshes and expert parallelism: ``jax.shard_map`` + ``jax.lax.all_to_all``.

Mesh axes (names are fixed; a size-1 axis may be left out):

* ``"data"``          tokens only (experts replicated): plain data parallelism;
* ``"expert_outer"``  optional 2nd expert axis (hosts), for the hierarchical exchange;
* ``"expert"``        experts *and* tokens: device i holds experts
                      ``[i * E / n, (i + 1) * E / n)`` and a 1/n share of the groups;
* ``"model"``         each expert's hidden dim f is split over it (tokens replicated);
* any other axis      the layer is replicated over it (its inputs are gathered).

Expert parallelism (EP) on a mesh whose expert axes hold n = |expert_outer| x |expert|
> 1 devices, per device (``G_l`` local groups, ``E_l = E / n`` local experts)::

    x      [G_l, S, d]        tokens: P(("data", "expert_outer", "expert"))
    plan = router(x @ W_r)    routed locally: capacity C per group is static, the same
                              on every device, so no count exchange (and no hang)
    dispatch     -> [E, G_l * C, d]
    all_to_all   -> [E_l, n * G_l * C, d]   rows from every device, for my experts
    experts         w_in [E_l, d, f/m], w_out [E_l, f/m, d]; psum over "model"
    all_to_all   -> [E, G_l * C, d]         my tokens' results come home
    combine      -> [G_l, S, d]

A dropless layer (``capacity_factor=None``) has no static capacity; per device
(A = T_l * K assignments, :func:`dropless_exchange_experts`)::

    plan = router(x @ W_r)    token side only: token_expert, token_weight [G_l, S, K]
    sort by expert -> [A, d]; counts [E]
    exchange="padded" (XLA:CPU, which has no ragged all-to-all):
      all_to_all counts [n, E_l] int32           how many rows each source sends me, per expert
      all_to_all rows   [n, A, d] -> [n, A, d]   padded: chunk j = my rows for device j
      sort by (local expert, source, position); ragged_dot over E_l groups; unsort
      all_to_all rows   [n, A, d] -> [n, A, d]   results home; unsort; combine
    exchange="ragged" (GPU / TPU: ``jax.lax.ragged_all_to_all``, only valid rows move):
      all_gather counts [n, n, E_l] int32        every device computes every offset
      ragged_all_to_all [A, d] -> [R, d]         lands already ordered by (local expert, source)
      grouped matmul over E_l groups
      ragged_all_to_all [R, d] -> [A, d]         results home, in my sorted order; unsort; combine
    R = n * A (the worst case), or ceil(c * A) with ``dropless_buffer_factor`` c: rows past
    R are dropped and counted in ``dropped_fraction``.
    exchange="auto" (the default) is "ragged" on GPU / TPU and "padded" elsewhere.

Each expert's FFN acts row by row, so where a row sits in ``n * G_l * C`` does not
matter: the result equals the one-device layer on the same groups (float rounding).
Aux losses are means over groups / tokens: they are averaged over the token axes
(``pmean``, weighted by each device's valid-token count where the loss is a
masked mean), ``tokens_per_expert`` is summed (``psum``). The noisy top-k losses
are ``w * CV(v)^2`` of per-expert sums over the whole batch: each device's
``Importance`` / ``Load`` vectors [E] are summed (``psum``) and the losses computed
from the totals.

Supported: E divisible by n (``E < #devices`` is fine when the rest of the devices
go to ``"model"`` or ``"data"``); the number of groups divisible by
``|data| x |expert_outer| x |expert|``. Anything else raises ``ValueError`` before
compilation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jmoe import dispatch as dispatch_lib
from jmoe import dropless
from jmoe.experts import expert_ffn
from jmoe.routing import RoutingPlan

Array = jax.Array

DATA, EXPERT_OUTER, EXPERT, MODEL = "data", "expert_outer", "expert", "model"
DROPLESS_EXCHANGES = ("auto", "padded", "ragged")
AXES = (DATA, EXPERT_OUTER, EXPERT, MODEL)

# jax.shard_map is public from jax 0.6; keep the experimental import as a fallback.
try:
    _shard_map = jax.shard_map
except AttributeError:  # pragma: no cover
    from jax.experimental.shard_map import shard_map as _shard_map


# ----------------------------------------------------------------------------
# Meshes
# ----------------------------------------------------------------------------


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


def _axis_size(mesh, name: str) -> int:
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
            model_axis=MODEL if _axis_size(mesh, MODEL) > 1 else None,  # size 1: nothing to split
        )


def expert_parallel_size(mesh) -> int:
    """n = |expert_outer| x |expert| (1 without a mesh): how many ways experts are split."""
    return _axis_size(mesh, EXPERT_OUTER) * _axis_size(mesh, EXPERT)


def uses_mesh(mesh) -> bool:
    """True when ``mesh`` asks for the sharded layer path (expert or model axis > 1)."""
    return expert_parallel_size(mesh) * _axis_size(mesh, MODEL) > 1


def expert_param_specs(params: dict, mesh) -> dict[str, P]:
    """PartitionSpecs of the expert weights on ``mesh``.

    ``w_in / w_gate [E, d, f]: P(expert_axes, None, "model")``,
    ``w_out [E, f, d]: P(expert_axes, "model", None)``,
    ``b_in [E, f]: P(expert_axes, "model")``, ``b_out [E, d]: P(expert_axes, None)``.
    """
    axes = MeshAxes.of(mesh)
    e = axes.expert_axes or None
    m = axes.model_axis
    table = {"w_in": P(e, None, m), "w_gate": P(e, None, m), "w_out": P(e, m, None),
             "b_in": P(e, m), "b_out": P(e, None)}
    return {name: table[name] for name in params}


def check_mesh(mesh, *, num_experts: int, num_groups: int, d_ff: int, hierarchical: bool = False) -> None:
    """Raise a clear ``ValueError`` for a mesh / shape the EP path does not support."""
    n = expert_parallel_size(mesh)
    if num_experts % n:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the expert-parallel size "
            f"|expert_outer| x |expert| = {n} of mesh {dict(mesh.shape)}; use an expert axis "
            f"that divides num_experts and give the other devices to 'model' or 'data'"
        )
    shards = math.prod(_axis_size(mesh, a) for a in (DATA, EXPERT_OUTER, EXPERT))
    if num_groups % shards:
        raise ValueError(
            f"the number of groups G={num_groups} (batch x seq / group_size) is not divisible by "
            f"|data| x |expert_outer| x |expert| = {shards} of mesh {dict(mesh.shape)}: every device "
            f"must route whole groups of its own"
        )
    m = _axis_size(mesh, MODEL)
    if d_ff % m:
        raise ValueError(f"d_ff={d_ff} is not divisible by the 'model' axis size {m}")
    if hierarchical and EXPERT_OUTER not in mesh.axis_names:
        raise ValueError(
            f"hierarchical all-to-all needs a mesh with an 'expert_outer' axis (make_mesh(expert_outer=...)), "
            f"got axes {tuple(mesh.axis_names)}"
        )


def shard_moe_params(tree, mesh: Mesh):
    """Place the ``jmoe.MoE`` layers' parameters in ``tree`` (an NNX module or state) on ``mesh``.

    Expert weights get :func:`expert_param_specs`, everything else in an MoE
    layer (the router weight, noisy top-k's noise weight) is replicated. Other variables are left as they
    are (place them with their own ``out_sharding`` metadata). Returns nothing
    for a module (updated in place), the new state for a state.
    """
    from flax import nnx

    weight_names = ("w_in", "w_gate", "w_out", "b_in", "b_out")

    def spec_for(path, value):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "experts" in keys:
            names = [k for k in keys[keys.index("experts") + 1:] if k in weight_names]
            if names:
                return expert_param_specs({names[0]: None}, mesh)[names[0]]
        if "router_weight" in keys or "noise_weight" in keys:
            return P()
        return None

    is_module = isinstance(tree, nnx.Module)
    state = nnx.state(tree) if is_module else tree

    def place(path, value):
        spec = spec_for(path, value)
        if spec is None or not hasattr(value, "shape"):
            return value
        return to_global(value, mesh, spec)

    new_state = jax.tree_util.tree_map_with_path(place, state)
    if is_module:
        nnx.update(tree, new_state)
        return None
    return new_state


def to_global(tree, mesh: Mesh, spec: P = P()):
    """Every array leaf of ``tree`` as a global ``jax.Array`` with ``NamedSharding(mesh, spec)``.

    Works across processes (``jax.distributed``): each process must hold the
    same host value; it contributes the shards of its own devices
    (``jax.make_array_from_callback``). PRNG key arrays are moved as key data.
    """
    sharding = NamedSharding(mesh, spec)

    def place(value):
        if not hasattr(value, "shape"):
            return value
        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            data = place(jax.random.key_data(value))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
        if sharding.is_fully_addressable:
            return jax.device_put(value, sharding)
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, tree)


# ----------------------------------------------------------------------------
# The exchange
# ----------------------------------------------------------------------------


def _a2a(x: Array, axis) -> Array:
    """Tiled all-to-all on the leading axis: block j goes to device j; block i of the
    result came from device i (``all_to_all(split_axis=0, concat_axis=0, tiled=True)``)."""
    return jax.lax.all_to_all(x, axis, 0, 0, tiled=True)


def exchange_to_experts(x: Array, mesh_sizes: tuple[int, int], axes: MeshAxes, hierarchical: bool) -> Array:
    """[E, N, d] rows for every expert -> [E_l, n * N, d] rows from every device for mine.

    ``mesh_sizes = (n_o, n_i)``: sizes of ``expert_outer`` and ``expert``; n = n_o n_i;
    expert block b = o * n_i + i lives on device (o, i).

    Flat: one all-to-all over both expert axes. Hierarchical (Tutel 2DH): first
    within ``expert`` (each message is the n_o blocks for one inner destination),
    then across ``expert_outer`` (each message is n_i blocks), with a swap of the
    two block axes before and after the first exchange; the result is the same.
    """
    n_o, n_i = mesh_sizes
    n = n_o * n_i
    num_experts, rows, d = x.shape
    e_l = num_experts // n
    if n == 1:  # experts not split (only "model" > 1): nothing to exchange
        return x
    if hierarchical:
        x = x.reshape(n_o, n_i, e_l, rows, d)  # [dest o, dest i, E_l, N, d]
        x = jnp.swapaxes(x, 0, 1)  # [dest i, dest o, E_l, N, d]: group by inner destination
        x = _a2a(x, EXPERT)  # [src i, dest o, E_l, N, d]
        x = jnp.swapaxes(x, 0, 1)  # [dest o, src i, E_l, N, d]
        x = _a2a(x, EXPERT_OUTER)  # [src o, src i, E_l, N, d]
        x = x.reshape(n, e_l, rows, d)  # [src, E_l, N, d]
    else:
        x = x.reshape(n, e_l, rows, d)  # [dest, E_l, N, d]
        x = _a2a(x, axes.expert_axes)  # [src, E_l, N, d]
    return jnp.swapaxes(x, 0, 1).reshape(e_l, n * rows, d)  # [E_l, n * N, d]


def exchange_to_tokens(y: Array, mesh_sizes: tuple[int, int], axes: MeshAxes, hierarchical: bool) -> Array:
    """Inverse of :func:`exchange_to_experts`: [E_l, n * N, d] -> [E, N, d]."""
    n_o, n_i = mesh_sizes
    n = n_o * n_i
    e_l, total, d = y.shape
    rows = total // n
    if n == 1:
        return y
    y = jnp.swapaxes(y.reshape(e_l, n, rows, d), 0, 1)  # [src, E_l, N, d]
    if hierarchical:
        y = y.reshape(n_o, n_i, e_l, rows, d)  # [src o, src i, E_l, N, d]
        y = _a2a(y, EXPERT_OUTER)  # [expert o, src i, E_l, N, d]
        y = jnp.swapaxes(y, 0, 1)  # [src i, expert o, E_l, N, d]
        y = _a2a(y, EXPERT)  # [expert i, expert o, E_l, N, d]
        y = jnp.swapaxes(y, 0, 1)  # [expert o, expert i, E_l, N, d]
    else:
        y = _a2a(y, axes.expert_axes)  # [expert block, E_l, N, d]
    return y.reshape(n * e_l, rows, d)  # [E, N, d]


def local_expert_ffn(x: Array, params: dict[str, Array], activation: str, model_axis: str | None,
                     model_size: int) -> Array:
    """The experts on one device: x [E_l, N, d], hidden dim split over ``model``.

    ``y = sum_over_model(act(x W_in[:, :, f_j]) W_out[:, f_j, :]) + b_out``: the
    activation is elementwise in f, so each shard f_j computes its part and one
    ``psum`` over ``model`` after the second matmul adds them up.
    """
    inner = {k: v for k, v in params.items() if k != "b_out"}
    y = expert_ffn(x, inner, activation)  # [E_l, N, d], partial over model
    if model_axis is not None and model_size > 1:
        y = jax.lax.psum(y, model_axis)
    if "b_out" in params:
        y = y + params["b_out"][:, None, :]
    return y


def dropless_exchange_experts(
    tokens: Array,
    token_expert: Array,
    token_weight: Array,
    params: dict[str, Array],
    activation: str,
    *,
    num_experts: int,
    expert_axes: tuple[str, ...],
    expert_size: int,
    model_axis: str | None = None,
    model_size: int = 1,
    exchange: str = "auto",
    grouped_matmul: str = "auto",
    buffer_factor: float | None = None,
) -> tuple[Array, Array]:
    """Dropless experts under expert parallelism (inside ``shard_map``), one device's view.

    ``y[t] = sum_k token_weight[t, k] * FFN_{token_expert[t, k]}(tokens[t])`` for this
    device's T_l tokens, the experts living on the n = ``expert_size`` devices of
    ``expert_axes`` (expert e on device ``e // E_l``; ``params`` holds the E_l local ones).

    The two-step exchange (counts, then data), per device, A = T_l * K assignments:

    1. stable sort of the A assignments by expert (:func:`jmoe.dropless.sort_by_expert`);
       the rows for device j are then contiguous (experts ``[j E_l, (j + 1) E_l)``);
    2. count exchange: ``all_to_all`` of the per-expert counts ``[n, E_l]`` int32, so each
       device learns how many rows every source sends to each of its local experts;
    3. data exchange, **padded**: send buffer ``[n, A, d]`` (chunk j = my rows for device j,
       left-aligned, zero padded; A rows because in the worst case all go to one device),
       one tiled ``all_to_all`` -> ``[n (source), A, d]``;
    4. the valid received rows are ordered by (local expert, source, position) (a stable
       sort; padding rows get group E_l, past the end, so ``ragged_dot`` leaves them out:
       output 0, no gradient), one grouped FFN (:func:`jmoe.dropless.grouped_ffn`, hidden
       dim split over ``model`` and ``psum``-ed), and the order undone;
    5. the reverse padded ``all_to_all`` brings every row home to the same buffer
       position it left from; unsort and combine exactly as :func:`jmoe.dropless.dropless_experts`.

    Why padded: XLA on CPU has no ragged all-to-all, and the padded exchange has static
    shapes everywhere; its cost is the worst case: n * A rows each way (the capacity
    path with C = group size moves E * G_l * S = (E / (n K)) times as many).
    ``exchange="ragged"`` replaces steps 2-5 by :func:`_ragged_exchange`: the counts are
    all-gathered and two ``jax.lax.ragged_all_to_all`` calls move only the valid rows (XLA
    on GPU / TPU; elsewhere :func:`ragged_all_to_all_emulated`, for tests). ``"auto"``:
    ragged on GPU / TPU, padded elsewhere.

    Assignments that do not count (weight 0: padding tokens, GShard's skipped 2nd
    choices) are sorted last and never sent: they take no buffer space or compute.

    The receive buffer: a device computes at most R rows, R = ``n * A`` (the worst case:
    every source sends it all its rows; nothing can be dropped) or, with
    ``buffer_factor`` c >= 1, R = ceil(c * A) rounded up to a multiple of 8 (c = 1 holds
    perfectly balanced routing). The ragged exchange's receive buffer is then ``[R, d]``
    instead of ``[n * A, d]``. Rows that do not fit are dropped: each (source, expert)
    chunk keeps up to a common cap, a source its first rows (:func:`fit_to_buffer`); a
    dropped row's output is 0 (as a capacity drop) and it is counted.

    Args:
      tokens: [T_l, d] (compute dtype); token_expert [T_l, K] int32 (global expert ids);
      token_weight [T_l, K] float32 (0: the assignment does not count).
      params: local expert weights ``w_in [E_l, d, f_l]``, ...
      buffer_factor: None (R = n * A) or c >= 1 (R = ceil(c * A), rounded up to 8).
    Returns:
      [T_l, d] in the tokens' dtype, accumulated in float32; and the number of
      assignments the receive buffers dropped (int32 scalar; summed over the devices of
      the expert axes it is the group's total).
    """
    if exchange not in DROPLESS_EXCHANGES:
        raise ValueError(f"exchange must be one of {DROPLESS_EXCHANGES}, got {exchange!r}")
    if exchange == "auto":
        exchange = "ragged" if _has_ragged_all_to_all() else "padded"
    num_tokens, k = token_expert.shape
    d = tokens.shape[-1]
    n = expert_size
    e_l = num_experts // n
    a = num_tokens * k
    buffer_rows = receive_buffer_rows(a, n, buffer_factor)

    def a2a(x):
        return x if n == 1 else _a2a(x, expert_axes)

    # 1. route locally: sort my assignments by expert; destination device = e // E_l.
    # Weight-0 assignments get expert id E: sorted last, in no count, never sent.
    routed = jnp.where(token_weight != 0, token_expert, num_experts)  # [T_l, K]
    order, counts = dropless.sort_by_expert(routed, num_experts)  # [A], [E]
    rows = tokens[order // k]  # [A, d], expert order
    inner = {name: value for name, value in params.items() if name != "b_out"}

    def experts(x_local, row_expert, group_sizes):  # rows grouped by local expert -> FFN outputs
        y_local = dropless.grouped_ffn(x_local, row_expert, group_sizes, inner, activation,
                                       grouped_matmul)  # partial over model
        if model_axis is not None and model_size > 1:
            y_local = jax.lax.psum(y_local, model_axis)
        if "b_out" in params:
            y_local = y_local + params["b_out"][row_expert]
        return y_local

    if exchange == "ragged":
        out_sorted, dropped = _ragged_exchange(rows, counts.reshape(n, e_l), experts, expert_axes,
                                               buffer_rows)  # [A, d]
        return dropless.unsort_and_combine(out_sorted, order, token_weight, tokens.dtype), dropped
    dest = jnp.minimum(routed.reshape(-1)[order] // e_l, n - 1)  # [A], non-decreasing (weight-0 rows: any)
    counts = counts.reshape(n, e_l)  # [dest, E_l]
    send_counts = jnp.sum(counts, axis=1)  # [n]
    send_start = jnp.cumsum(send_counts) - send_counts  # [n]: first sorted row for device j
    pos = jnp.arange(a, dtype=jnp.int32)

    # 2. count exchange: recv_counts[i, e] = rows device i sends to my local expert e.
    recv_counts = a2a(counts)  # [src, E_l]

    # 3. data exchange, padded: chunk j = my rows for device j, left-aligned, zeros after.
    take = send_start[:, None] + pos[None, :]  # [n, A]
    send_valid = pos[None, :] < send_counts[:, None]  # [n, A]
    send = jnp.where(send_valid[..., None], rows[jnp.minimum(take, a - 1)], jnp.zeros((), rows.dtype))  # [n, A, d]
    recv = a2a(send)  # [src, A, d]

    # 4. order by (local expert, source, position); padding rows and rows past the receive
    #    buffer -> group E_l (past the end); the first R rows of that order hold every kept row.
    bounds = jnp.cumsum(recv_counts, axis=1)  # [src, E_l]
    local_expert = jnp.sum(pos[None, None, :] >= bounds[:, :, None], axis=1).astype(jnp.int32)  # [src, A]
    kept = fit_to_buffer(recv_counts, buffer_rows)  # [src, E_l]
    expert_of = jnp.minimum(local_expert, e_l - 1)  # [src, A]
    rank = pos[None, :] - jnp.take_along_axis(bounds - recv_counts, expert_of, axis=1)  # [src, A]: place in its (src, e) chunk
    fits = rank < jnp.take_along_axis(kept, expert_of, axis=1)  # [src, A]
    local_expert = jnp.where(fits, local_expert, e_l).reshape(-1)  # [n * A], source-major
    local_order = jnp.argsort(local_expert, stable=True).astype(jnp.int32)[:buffer_rows]  # [R]
    group_sizes = jnp.sum(kept, axis=0).astype(jnp.int32)  # [E_l]
    dropped = (jnp.sum(recv_counts) - jnp.sum(kept)).astype(jnp.int32)
    x_local = recv.reshape(n * a, d)[local_order]  # [R, d]
    row_expert = jnp.minimum(local_expert[local_order], e_l - 1)  # padding rows: clamped, never read back
    y_local = experts(x_local, row_expert, group_sizes)  # [R, d]
    y_recv = jnp.zeros((n * a, d), y_local.dtype).at[local_order].set(y_local, unique_indices=True)  # [n * A, d]

    # 5. home: reverse exchange, each row back at the buffer position it left from.
    back = a2a(y_recv.reshape(n, a, d))  # [dest, A, d]
    out_sorted = back[dest, pos - send_start[dest]]  # [A, d], expert order
    return dropless.unsort_and_combine(out_sorted, order, token_weight, tokens.dtype), dropped


def receive_buffer_rows(num_assignments: int, expert_size: int, buffer_factor: float | None) -> int:
    """R, the rows a device's experts compute per step: ``n * A`` (worst case) without a
    factor, else ``ceil(c * A)`` rounded up to a multiple of 8, at most ``n * A``."""
    worst = expert_size * num_assignments
    if buffer_factor is None:
        return worst
    if not buffer_factor >= 1.0:
        raise ValueError(f"buffer_factor must be >= 1 (1 holds perfectly balanced routing), got {buffer_factor}")
    return min(worst, -(-math.ceil(buffer_factor * num_assignments) // 8) * 8)


def fit_to_buffer(counts: Array, buffer_rows: int) -> Array:
    """Rows kept by a receive buffer of ``buffer_rows`` rows: a common cap per chunk.

    ``counts[i, e]``: rows source i sends to my local expert e ([n_src, E_l]). When they
    do not all fit, every (source, expert) chunk keeps up to the same number of rows L,
    the largest level that fits, and the rows still free go one each to the first chunks
    (in (expert, source) order) that were cut::

        L = max { L : sum_{i,e} min(counts[i, e], L) <= buffer_rows }
        kept[i, e] = min(counts[i, e], L) + [one of the first (buffer_rows - sum min(counts, L))
                                             chunks with counts > L]

    So a cold expert behind a hot one keeps its rows, no source is always the one cut,
    and a source keeps the first ``kept[i, e]`` of its rows for expert e (its sorted order).
    """
    n_src, e_l = counts.shape
    flat = counts.T.reshape(-1).astype(jnp.int32)  # [E_l * n_src], (expert, source) order
    fits = lambda level: jnp.sum(jnp.minimum(flat, level)) <= buffer_rows  # noqa: E731

    def bisect(_, bounds):  # invariant: fits(lo); the level is in [lo, hi]
        lo, hi = bounds
        mid = (lo + hi + 1) // 2
        return jnp.where(fits(mid), mid, lo), jnp.where(fits(mid), hi, mid - 1)

    top = jnp.max(flat)
    level, _ = jax.lax.fori_loop(0, 32, bisect, (jnp.zeros_like(top), top))  # zeros_like: same mesh type
    capped = jnp.minimum(flat, level)  # [E_l * n_src]
    cut = flat > level
    spare = buffer_rows - jnp.sum(capped)
    extra = cut & (jnp.cumsum(cut) <= spare)  # one more row for the first `spare` cut chunks
    kept = capped + extra.astype(jnp.int32)
    return kept.reshape(e_l, n_src).T.astype(counts.dtype)


def ragged_exchange_offsets(counts_all: Array, me: Array, kept_all: Array | None = None) -> dict[str, Array]:
    """Offsets and sizes of the two ragged all-to-alls, from everyone's counts.

    ``counts_all[i, j, e]``: rows device i sends to local expert e of device j
    ([n_src, n_dst, E_l]). Slices are indexed ``s = peer * E_l + e``. Each device keeps its
    rows sorted by global expert ``j * E_l + e``, so on the sender::

        send_offset[i, j, e] = sum of counts_all[i] (flattened) before (j, e)

    and on the receiver the rows land ordered by (local expert, source)::

        recv_offset[i, j, e] = sum_{e' < e} sum_{i'} counts_all[i', j, e']
                               + sum_{i' < i} counts_all[i', j, e]

    Forward (me sends to j): input ``send_offset[me]``, sizes ``counts_all[me]``, output
    offsets (on j) ``recv_offset[me]``; I receive ``counts_all[:, me]``. The way home swaps
    the roles (input ``recv_offset[:, me]``, output ``send_offset[:, me]``).

    With a bounded receive buffer, ``kept_all`` (:func:`fit_to_buffer` per receiver) gives
    the sizes and the receive layout; the send offsets stay those of ``counts_all`` (the
    sender's sorted rows), so a cut chunk sends its first rows.
    """
    kept = counts_all if kept_all is None else kept_all
    n, _, e_l = counts_all.shape
    flat = counts_all.reshape(n, -1)  # [n_src, n_dst * E_l]
    send_offset = (jnp.cumsum(flat, axis=1) - flat).reshape(counts_all.shape)  # [n_src, n_dst, E_l]
    per_expert = jnp.sum(kept, axis=0)  # [n_dst, E_l]: group sizes on each receiver
    base = jnp.cumsum(per_expert, axis=1) - per_expert  # [n_dst, E_l]
    recv_offset = base[None] + jnp.cumsum(kept, axis=0) - kept  # [n_src, n_dst, E_l]
    mine = lambda x: x.reshape(-1).astype(jnp.int32)  # noqa: E731
    return {
        "fwd": (mine(send_offset[me]), mine(kept[me]), mine(recv_offset[me]), mine(kept[:, me])),
        "back": (mine(recv_offset[:, me]), mine(kept[:, me]), mine(send_offset[:, me]), mine(kept[me])),
        "group_sizes": per_expert[me].astype(jnp.int32),  # [E_l]
    }


def _ragged_exchange(rows: Array, counts: Array, experts: Callable, expert_axes: tuple[str, ...],
                     buffer_rows: int) -> tuple[Array, Array]:
    """Expert-sorted rows [A, d] -> their experts' outputs [A, d], same order, moving
    only the valid rows (``exchange="ragged"`` of :func:`dropless_exchange_experts`), and
    the number of my rows the receivers' buffers dropped.

    ``counts`` [n, E_l]: my rows per (destination device, local expert). The receive
    buffer is ``[R, d]``, R = ``buffer_rows`` (``n * A``, the worst case, unless bounded);
    rows past the received total stay zero and fall outside the grouped matmul's groups.
    """
    a, d = rows.shape
    n, e_l = counts.shape
    if not expert_axes:  # one expert device: nothing to exchange
        row_expert = jnp.repeat(jnp.arange(e_l, dtype=jnp.int32), counts[0], total_repeat_length=a)  # [A]
        return experts(rows, row_expert, counts[0].astype(jnp.int32)), jnp.zeros((), jnp.int32)
    ragged = jax.lax.ragged_all_to_all if _has_ragged_all_to_all() else ragged_all_to_all_emulated
    counts_all = jax.lax.all_gather(counts, expert_axes)  # [n_src, n_dst, E_l]
    kept_all = jax.vmap(fit_to_buffer, in_axes=(1, None), out_axes=1)(counts_all, buffer_rows)  # [n_src, n_dst, E_l]
    me = jax.lax.axis_index(expert_axes)
    offsets = ragged_exchange_offsets(counts_all, me, kept_all)
    group_sizes = offsets["group_sizes"]  # [E_l]
    recv = ragged(rows, jnp.zeros((buffer_rows, d), rows.dtype), *offsets["fwd"], axis_name=expert_axes)  # [R, d]
    ends = jnp.cumsum(group_sizes)  # [E_l]
    row_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(buffer_rows), side="right"), e_l - 1)  # [R]
    y_local = experts(recv, row_expert.astype(jnp.int32), group_sizes)  # [R, d]
    out = ragged(y_local, jnp.zeros((a, d), y_local.dtype), *offsets["back"], axis_name=expert_axes)  # [A, d]
    dropped = jnp.sum(counts_all[me] - kept_all[me]).astype(jnp.int32)
    return out, dropped


def _has_ragged_all_to_all() -> bool:
    """XLA implements ``ragged-all-to-all`` on GPU and TPU (not on CPU)."""
    return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """``jax.lax.ragged_all_to_all``'s semantics from ``all_gather`` (for XLA:CPU, which
    lacks the op): tests of the ragged exchange's offsets run on emulated CPU devices.

    Moves every device's whole operand (n times the traffic): for tests, not for speed.
    Source i's slice s goes to device ``s // (N / n)`` at ``output_offsets[s]`` there.
    """
    del recv_sizes  # implied by the senders' send_sizes
    rows_in = operand.shape[0]
    n_slices = input_offsets.shape[0]
    everyone = jax.lax.all_gather((operand, input_offsets, send_sizes, output_offsets), axis_name)
    operands, starts, sizes, targets = everyone  # [n, rows_in, ...], [n, N] x 3
    n = operands.shape[0]
    me = jax.lax.axis_index(axis_name)
    mine = (jnp.arange(n_slices) // (n_slices // n)) == me  # [N]: slices addressed to me
    r = jnp.arange(rows_in)  # [rows_in]
    inside = (r[None, None, :] >= starts[:, :, None]) & (r[None, None, :] < (starts + sizes)[:, :, None])  # [n, N, rows]
    inside = inside & mine[None, :, None]
    where = targets[:, :, None] + r[None, None, :] - starts[:, :, None]  # [n, N, rows]
    dest = jnp.max(jnp.where(inside, where, -1), axis=1)  # [n, rows]: -1 = not sent to me
    dest = jnp.where(dest < 0, output.shape[0], dest)  # out of bounds -> dropped
    flat_rows = operands.reshape(n * rows_in, *operand.shape[1:])
    return output.at[dest.reshape(-1)].set(flat_rows, mode="drop")


# ----------------------------------------------------------------------------
# The expert-parallel MoE function
# ----------------------------------------------------------------------------


def expert_parallel_moe(
    groups: Array,
    router_weight: Array,
    expert_params: dict[str, Array],
    plan_fn: Callable[..., RoutingPlan],
    *,
    backend: str,
    activation: str,
    mesh,
    token_mask: Array | None = None,
    router_noise: Array | None = None,
    noise_weight: Array | None = None,
    router_eps: Array | None = None,
    router_uniform: Array | None = None,
    hierarchical: bool = False,
    a2a_chunks: int = 1,
    compute_dtype=jnp.float32,
    dropless_experts: bool = False,
    dropless_exchange: str = "auto",
    grouped_matmul: str = "auto",
    dropless_buffer_factor: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The MoE layer on a mesh, as a pure function.

    Args:
      groups: [G, S, d] tokens (any sharding; resharded to the token axes).
      router_weight: [d, E] float32, replicated.
      expert_params: stacked expert weights (``w_in [E, d, f]``, ...), sharded by
        :func:`expert_param_specs`.
      plan_fn: ``(logits [G_l, S, E] float32, token_mask [G_l, S] | None,
        uniform [G_l, S] | None) -> RoutingPlan``, run on each device's own groups
        (``uniform``: its share of ``router_uniform``); with ``noise_weight`` it
        also gets the keywords ``noise_logits`` ([G_l, S, E] float32) and ``eps``
        (the device's share of ``router_eps``, or None).
      backend: dispatch backend name (``einsum``, ``gather``, ...).
      activation: expert activation.
      mesh: a ``Mesh`` or ``AbstractMesh`` with the axes of :func:`make_mesh`.
      token_mask: [G, S] bool, or None.
      router_noise: [G, S, d] multiplicative router-input noise (jitter), or None;
        drawn by the caller over the global shape so results match one device.
      noise_weight: [d, E] float32, replicated: the noisy top-k router's ``W_noise``
        (its logits are ``router_in @ noise_weight``, jitter included), or None.
      router_eps: [G, S, E] the noisy top-k router's standard normal draws, drawn
        by the caller over the global shape (like ``router_noise``), or None.
      router_uniform: [G, S] U[0, 1) draws for plan_fn (GShard's random 2nd-expert
        policy), drawn by the caller over the global shape, so results match one device.
      hierarchical: two-step all-to-all (``expert`` then ``expert_outer``).
      a2a_chunks: m; the capacity C is split into m chunks, each exchanged and
        computed separately so chunk i's experts can overlap chunk i+1's exchange.
        m must divide C.
      dropless_experts: dropless layer (MegaBlocks): the plan's token side
        (``token_expert``, ``token_weight``) is used, not its slots; the assignments
        go to their experts with :func:`dropless_exchange_experts` (count exchange,
        then the rows each way; no capacity, nothing dropped) and ``padding_fraction``
        is 0. Not with ``hierarchical`` or ``a2a_chunks > 1``.
      dropless_exchange: ``"auto"`` / ``"padded"`` / ``"ragged"``: how a dropless layer
        moves its rows (see :func:`dropless_exchange_experts`); grouped_matmul: its
        grouped matmul (:data:`jmoe.dropless.GROUPED_MATMULS`); dropless_buffer_factor:
        None (the worst-case receive buffer: nothing dropped) or c >= 1: each device
        computes at most ceil(c * T_l * K) rows, the rest is dropped and counted in
        ``dropped_fraction`` (see :func:`dropless_exchange_experts`).

    Returns:
      y [G, S, d] (sharded over the token axes), and the aux dict of
      :meth:`RoutingPlan.aux` equal to the one-device values:
      ``mean_over_devices`` for per-group means, valid-token-weighted means for
      per-token means (z_loss, router_entropy), requested-weighted for
      ``dropped_fraction``, ``psum`` for ``tokens_per_expert``, and the noisy
      top-k losses from the ``psum`` of the plans' Importance / Load vectors.
    """
    num_groups, group_size, d = groups.shape
    num_experts = router_weight.shape[1]
    d_ff = expert_params["w_in"].shape[2]
    check_mesh(mesh, num_experts=num_experts, num_groups=num_groups, d_ff=d_ff, hierarchical=hierarchical)
    if a2a_chunks < 1:
        raise ValueError(f"a2a_chunks must be >= 1, got {a2a_chunks}")
    if dropless_experts and (hierarchical or a2a_chunks != 1):
        raise ValueError(
            f"a dropless layer (capacity_factor=None) on a mesh supports neither hierarchical_a2a nor "
            f"a2a_chunks > 1 (got hierarchical_a2a={hierarchical}, a2a_chunks={a2a_chunks}): its exchange is "
            f"one all-to-all of rows each way"
        )
    axes = MeshAxes.of(mesh)
    sizes = (_axis_size(mesh, EXPERT_OUTER), _axis_size(mesh, EXPERT))
    model_size = _axis_size(mesh, MODEL)
    token_spec = P(axes.token_axes or None)
    dispatch_fn = dispatch_lib.get_backend(backend)

    def local(inputs, router_ws, params):
        x = inputs["groups"]  # [G_l, S, d]
        mask = inputs.get("mask")  # [G_l, S] or None
        router_in = x.astype(jnp.float32)
        if "noise" in inputs:
            router_in = router_in * inputs["noise"]
        logits = router_in @ router_ws["router"]  # [G_l, S, E] float32
        uniform = inputs.get("uniform")  # [G_l, S] or None
        if "noise" in router_ws:  # noisy top-k
            noise_logits = router_in @ router_ws["noise"]  # [G_l, S, E] float32
            plan = plan_fn(logits, mask, uniform, noise_logits=noise_logits, eps=inputs.get("eps"))
        else:
            plan = plan_fn(logits, mask, uniform)
        if dropless_experts:
            tokens = x.reshape(-1, d).astype(compute_dtype)  # [T_l, d]
            y, dropped = dropless_exchange_experts(
                tokens, plan.token_expert.reshape(tokens.shape[0], -1),
                plan.token_weight.reshape(tokens.shape[0], -1), params, activation,
                num_experts=num_experts, expert_axes=axes.expert_axes, expert_size=math.prod(sizes),
                model_axis=axes.model_axis, model_size=model_size, exchange=dropless_exchange,
                grouped_matmul=grouped_matmul, buffer_factor=dropless_buffer_factor,
            )
            aux = _reduce_aux(plan, mask, axes.token_axes, buffer_dropped=dropped)
            aux["padding_fraction"] = jnp.zeros((), jnp.float32)
            return y.reshape(x.shape), aux  # [G_l, S, d]
        capacity = plan.capacity
        if capacity % a2a_chunks:
            raise ValueError(f"a2a_chunks={a2a_chunks} must divide the capacity C={capacity}")

        expert_in = dispatch_fn.dispatch(x.astype(compute_dtype), plan)  # [E, G_l * C, d]
        g_l = x.shape[0]
        cc = capacity // a2a_chunks
        chunks_in = expert_in.reshape(num_experts, g_l, a2a_chunks, cc, d)  # [E, G_l, m, C/m, d]
        outs = []
        for j in range(a2a_chunks):
            xj = chunks_in[:, :, j].reshape(num_experts, g_l * cc, d)  # [E, G_l * C/m, d]
            xj = exchange_to_experts(xj, sizes, axes, hierarchical)  # [E_l, n * G_l * C/m, d]
            yj = local_expert_ffn(xj, params, activation, axes.model_axis, model_size)
            yj = exchange_to_tokens(yj, sizes, axes, hierarchical)  # [E, G_l * C/m, d]
            outs.append(yj.reshape(num_experts, g_l, 1, cc, d))
        expert_out = jnp.concatenate(outs, axis=2).reshape(num_experts, g_l * capacity, d)  # [E, G_l * C, d]
        y = dispatch_fn.combine(expert_out, plan)  # [G_l, S, d]

        aux = _reduce_aux(plan, mask, axes.token_axes)
        return y, aux

    inputs = {"groups": groups}
    specs = {"groups": token_spec}
    if token_mask is not None:
        inputs["mask"], specs["mask"] = token_mask, token_spec
    if router_noise is not None:
        inputs["noise"], specs["noise"] = router_noise, token_spec
    if router_eps is not None:
        inputs["eps"], specs["eps"] = router_eps, token_spec
    if router_uniform is not None:
        inputs["uniform"], specs["uniform"] = router_uniform, token_spec
    router_ws = {"router": router_weight}
    if noise_weight is not None:
        router_ws["noise"] = noise_weight
    param_specs = expert_param_specs(expert_params, mesh)
    fn = _shard_map(
        local, mesh=mesh,
        in_specs=(specs, P(), param_specs),
        out_specs=(token_spec, P()),  # aux: replicated
    )
    return fn(inputs, router_ws, expert_params)


def _reduce_aux(plan: RoutingPlan, mask: Array | None, token_axes: tuple[str, ...],
                buffer_dropped: Array | None = None) -> dict[str, Array]:
    """Per-device aux -> the one-device values (inside shard_map).

    Per-group means (load balancing, padding, and any other aux value): ``pmean``
    (same G_l everywhere).
    Per-valid-token means (z_loss, entropy): ``psum(v_l * t_l) / psum(t_l)``.
    dropped_fraction: ``psum(f_l * r_l + b_l) / psum(r_l)``, r_l = the plan's requested
    assignments (k per valid token, less the 2nd choices GShard's random policy skipped),
    b_l = ``buffer_dropped``, the assignments a dropless exchange's bounded receive
    buffers dropped (0 without one).
    tokens_per_expert: ``psum``.
    importance_loss, load_loss (noisy top-k): from the ``psum`` of the plan's
    Importance / Load vectors [E] (sums over tokens), so the same on every device.
    """
    if not token_axes:
        return plan.aux()
    summed = {}
    if plan.expert_importance is not None:
        summed_plan = plan.replace(expert_importance=jax.lax.psum(plan.expert_importance, token_axes),
                                   expert_load=jax.lax.psum(plan.expert_load, token_axes))
        summed = {"importance_loss": summed_plan.importance_loss, "load_loss": summed_plan.load_loss}
    aux = plan.aux()
    if mask is None:
        tokens = jnp.asarray(plan.num_groups * plan.group_size, jnp.float32)
    else:
        tokens = jnp.sum(mask.astype(jnp.float32))

    def weighted(value, weight, extra=0.0):  # psum(value * weight + extra) / psum(weight)
        total = jax.lax.psum(weight, token_axes)
        return jax.lax.psum(value * weight + extra, token_axes) / jnp.maximum(total, 1.0)

    if mask is None:
        # Every device has the same weight: a plain mean (exactly one device's mean of means).
        z, ent = (jax.lax.pmean(aux[k], token_axes) for k in ("z_loss", "router_entropy"))
    else:
        z = weighted(aux["z_loss"], tokens)
        ent = weighted(aux["router_entropy"], tokens)
    extra = 0.0 if buffer_dropped is None else buffer_dropped.astype(jnp.float32)
    dropped = weighted(aux["dropped_fraction"], plan.requested_assignments, extra)
    out = {name: jax.lax.pmean(value, token_axes) for name, value in aux.items()}  # per-group means
    out.update(z_loss=z, router_entropy=ent, dropped_fraction=dropped,
               tokens_per_expert=jax.lax.psum(aux["tokens_per_expert"], token_axes), **summed)
    return out


# ----------------------------------------------------------------------------
# The adapter under jmoe.MoE
# ----------------------------------------------------------------------------


def moe_layer_on_mesh(module, groups: Array, token_mask: Array | None, mesh) -> tuple[Array, dict[str, Array]]:
    """``jmoe.MoE``'s forward on a mesh: :func:`expert_parallel_moe` with the layer's
    settings, its random draws (``MoE.draw_router_noise``, over the global shapes, so
    jitter, noisy top-k's ``eps`` and GShard's random-policy draws match one device)
    and its router (``MoE.plan_from_logits``, run per device on the local groups).

    A dropless layer (``capacity_factor=None``)
    routes with capacity = group_size (nothing dropped) and runs
    :func:`dropless_exchange_experts`: a count exchange, then the assignment rows each
    way (padded all-to-all or ragged, ``MoE.dropless_exchange``) and a grouped matmul;
    ``padding_fraction`` is 0 as on one device.
    """
    jitter, eps, uniform = module.draw_router_noise(groups.shape)  # global shapes: as on one device
    noisy = module.router == "noisy_top_k"

    def plan_fn(logits, mask, uniform, *, noise_logits=None, eps=None):
        return module.plan_from_logits(logits, mask, noise_logits=noise_logits, eps=eps, second_uniform=uniform)

    return expert_parallel_moe(
        groups, module.router_weight[...], module.experts.params(), plan_fn,
        backend=module.dispatch, activation=module.experts.activation, mesh=mesh,
        token_mask=token_mask, router_noise=jitter, noise_weight=module.noise_weight[...] if noisy else None,
        router_eps=eps, router_uniform=uniform,
        hierarchical=module.hierarchical_a2a, a2a_chunks=module.a2a_chunks, compute_dtype=module.dtype,
        dropless_experts=module.dropless, dropless_exchange=module.dropless_exchange,
        grouped_matmul=module.grouped_matmul, dropless_buffer_factor=module.dropless_buffer_factor,
    )
