"""Where parameters live on a mesh: the expert weights on the expert axes (and their
hidden dim on ``model``), the shared expert like a dense FFN (hidden dim on ``model``,
never on the expert axes), everything else replicated; global arrays across processes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jmoe.parallel.mesh import MeshAxes
from jmoe.routing import PARAM_NAMES as ROUTER_PARAMS

EXPERT_WEIGHTS = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out", "norm_weight", "tied_norm_weight")
REPLICATED_EXPERT_WEIGHTS = ("tied_norm_weight",)  # no expert dim: every device holds it
SHARED_WEIGHTS = ("w_in", "w_gate", "w_out", "gate_weight", "norm_weight")
SHARED_MODULE = "shared_expert"  # the MoE layer's attribute that holds them
ROUTER_VECTORS = ("router_bias", "selection_bias", "router_scale", "router_input_scale",
                  "expert_scale")  # 1-D router weights


def expert_param_specs(params: dict, mesh) -> dict[str, P]:
    """PartitionSpecs of the expert weights on ``mesh`` (or its :class:`MeshAxes`).

    ``w_in / w_gate [E, d, f]: P(expert_axes, None, model)``,
    ``w_out [E, f, d]: P(expert_axes, model, None)``,
    ``b_in / b_gate [E, f]: P(expert_axes, model)``, ``b_out [E, d]: P(expert_axes, None)``,
    each expert's output-norm weight ``norm_weight [E, d]: P(expert_axes, None)``, the one the
    experts share ``tied_norm_weight [d]: P(None)`` (replicated).
    """
    axes = mesh if isinstance(mesh, MeshAxes) else MeshAxes.of(mesh)
    e = axes.expert_axes or None
    m = axes.model_axis
    table = {"w_in": P(e, None, m), "w_gate": P(e, None, m), "w_out": P(e, m, None),
             "b_in": P(e, m), "b_gate": P(e, m), "b_out": P(e, None), "norm_weight": P(e, None),
             "tied_norm_weight": P(None)}
    return {name: table[name] for name in params}


def shared_param_specs(params: dict, mesh) -> dict[str, P]:
    """PartitionSpecs of the shared expert's weights, a dense FFN: ``w_in / w_gate [d, F]:
    P(None, model)``, ``w_out [F, d]: P(model, None)``, ``gate_weight [d, 1]: P()``, ``norm_weight [d]: P()``."""
    axes = mesh if isinstance(mesh, MeshAxes) else MeshAxes.of(mesh)
    m = axes.model_axis
    table = {"w_in": P(None, m), "w_gate": P(None, m), "w_out": P(m, None), "gate_weight": P(None, None),
             "norm_weight": P(None)}
    return {name: table[name] for name in params}


def param_sharding(axes: MeshAxes, mesh=None, shared: bool = False) -> dict[str, dict]:
    """Flax ``out_sharding`` metadata of an MoE layer's parameters by name: the expert weights
    per :func:`expert_param_specs` (``shared=True``: the shared expert's, per
    :func:`shared_param_specs`), the router weights replicated (``mesh``: a concrete mesh
    to place them on, when it is not the ambient one)."""
    if shared:
        specs = shared_param_specs(dict.fromkeys(SHARED_WEIGHTS), axes)
    else:
        specs = {**expert_param_specs(dict.fromkeys(EXPERT_WEIGHTS), axes),
                 **{name: P(None) if name in ROUTER_VECTORS else P(None, None)
                    for name in ROUTER_PARAMS}}
    extra = {} if mesh is None else {"mesh": mesh}
    return {name: {"out_sharding": tuple(spec), **extra} for name, spec in specs.items()}


def moe_param_spec(path, mesh, shape: tuple[int, ...] | None = None) -> P | None:
    """The PartitionSpec of a ``jmoe.MoE`` parameter by its path in a model's state (the
    one placement rule; NNX state paths or ``jax.tree_util`` key paths): expert weights
    (``.../experts/w_in`` ...) per :func:`expert_param_specs`, the shared expert's
    (``.../shared_expert/w_in`` ...) per :func:`shared_param_specs`, router weights (and the
    selection bias) replicated, None for anything else (not an MoE parameter).

    With the weight's ``shape``: leading dims beyond the weight's own (layers stacked with
    ``nnx.vmap``: ``w_in [L, E, d, f]``) stay unsplit, and an expert count the expert axes
    do not divide is a ValueError naming ``num_experts``.
    """
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if SHARED_MODULE in keys:
        names = [k for k in keys[keys.index(SHARED_MODULE) + 1:] if k in SHARED_WEIGHTS]
        if names:
            spec = shared_param_specs({names[0]: None}, mesh)[names[0]]
            return spec if shape is None else P(*([None] * (len(shape) - len(spec))), *spec)
    if "experts" in keys:
        names = [k for k in keys[keys.index("experts") + 1:] if k in EXPERT_WEIGHTS]
        if names:
            spec = expert_param_specs({names[0]: None}, mesh)[names[0]]
            if shape is None or names[0] in REPLICATED_EXPERT_WEIGHTS:
                return spec if shape is None else P(*([None] * len(shape)))
            return _for_shape(spec, shape, mesh, "/".join(keys))
    if keys and keys[-1] in ROUTER_PARAMS:
        return P()
    return None


def _for_shape(spec: P, shape: tuple[int, ...], mesh, where: str) -> P:
    """``spec`` of an expert weight for an array of ``shape``: None for the leading stacked
    dims; the expert dim checked against the expert-parallel size."""
    lead = len(shape) - len(spec)
    if lead < 0:
        raise ValueError(f"{where}: shape {tuple(shape)} has fewer dims than its spec {spec}")
    axes = mesh if isinstance(mesh, MeshAxes) else MeshAxes.of(mesh)
    if shape[lead] % axes.expert_size:
        raise ValueError(f"{where}: num_experts={shape[lead]} is not divisible by the expert-parallel size "
                         f"{axes.expert_size} (axes {axes.expert_axes}) of mesh {dict(axes.sizes)}")
    return P(*([None] * lead), *spec)


def shard_moe_params(tree, mesh: Mesh):
    """Place the ``jmoe.MoE`` layers' parameters in ``tree`` (an NNX module or state) on ``mesh``.

    Each by :func:`moe_param_spec`: expert weights on the expert axes, the router's
    weights replicated. Other variables are left as they are (place them with their own
    ``out_sharding`` metadata). Returns nothing for a module (updated in place), the new
    state for a state.
    """
    from flax import nnx

    is_module = isinstance(tree, nnx.Module)
    state = nnx.state(tree) if is_module else tree

    def place(path, value):
        spec = moe_param_spec(path, mesh, getattr(value, "shape", None))
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
        if isinstance(value, jax.Array) and not value.is_fully_addressable:  # already global (created in place)
            if value.sharding.is_equivalent_to(sharding, value.ndim):
                return value
            return jax.jit(lambda v: v, out_shardings=sharding)(value)
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, tree)
