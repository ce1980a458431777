"""Meshes and expert parallelism: ``jax.shard_map`` + ``jax.lax.all_to_all``.

The layer's one forward (:mod:`jmoe.forward`) runs per device under ``jax.shard_map``
(:func:`forward_on_mesh`); this package holds only what knows about meshes:

  mesh.py               axis names and roles, ``make_mesh``, shape checks
  placement.py          where parameters live (:func:`moe_param_spec`), global arrays
  capacity_exchange.py  the capacity path's all-to-all (flat, 2DH, chunked)
  dropless_exchange.py  the dropless path: counts, then rows in bounded rounds (custom VJP)
  row_exchanges.py      how one round moves rows (padded cells, ragged), fit_to_buffer
  node_exchange.py      the dropless path on expert_outer x expert: one row per (token, node)
  shard.py              the ``shard_map`` wrapper, :class:`MeshExchange`, the aux reduction
"""

from jmoe.parallel.capacity_exchange import exchange_experts, exchange_to_experts, exchange_to_tokens
from jmoe.parallel.dropless_exchange import (
    DEFAULT_BUFFER_FACTOR,
    DROPLESS_EXCHANGES,
    OVERFLOWS,
    dropless_exchange_experts,
    exchange_sizes,
    fit_to_buffer,
    ragged_all_to_all_emulated,
    ragged_exchange_offsets,
    receive_buffer_rows,
)
from jmoe.parallel.mesh import (
    AXES,
    DATA,
    EXPERT,
    EXPERT_OUTER,
    MODEL,
    MeshAxes,
    axis_size,
    check_mesh,
    expert_parallel_size,
    is_explicit,
    make_mesh,
    resolve_mesh,
    uses_mesh,
)
from jmoe.parallel.node_exchange import node_exchange_experts, node_rows
from jmoe.parallel.placement import expert_param_specs, moe_param_spec, param_sharding, shard_moe_params, to_global
from jmoe.parallel.shard import MeshExchange, forward_on_mesh, reduce_aux

__all__ = [
    "AXES", "DATA", "DEFAULT_BUFFER_FACTOR", "DROPLESS_EXCHANGES", "OVERFLOWS", "exchange_sizes", "EXPERT", "EXPERT_OUTER", "MODEL", "MeshAxes", "MeshExchange",
    "axis_size", "check_mesh", "dropless_exchange_experts", "exchange_experts", "exchange_to_experts",
    "exchange_to_tokens", "expert_param_specs", "expert_parallel_size", "fit_to_buffer", "forward_on_mesh",
    "is_explicit", "make_mesh", "moe_param_spec", "node_exchange_experts", "node_rows", "param_sharding", "ragged_all_to_all_emulated", "ragged_exchange_offsets",
    "receive_buffer_rows", "reduce_aux", "resolve_mesh", "shard_moe_params", "to_global", "uses_mesh",
]
