"""The training mesh and the shardings of the batch, the parameters and the optimizer state.

This is the one module of :mod:`jmoe.training` that calls :mod:`jmoe.parallel` (mesh axes, expert
weight specs, whether a mesh makes the MoE layers expert-parallel).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe import parallel
from jmoe.training.trees import flatten


def training_mesh(expert_parallel: int = 1, num_devices: int = 0) -> jax.sharding.Mesh:
    """The training mesh over the first ``num_devices`` devices (0 = all, every process):
    :func:`jmoe.parallel.make_mesh` with ``expert=expert_parallel`` and ``data`` the rest
    (``model`` 1). The batch is split over (data, expert); with ``expert > 1`` the MoE layers run
    expert-parallel (shard_map + all_to_all) and their expert weights are split over ``expert``.
    """
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"num_devices={n} but only {len(devices)} devices are available")
    if n % expert_parallel:
        raise ValueError(f"{n} devices cannot form an expert axis of size {expert_parallel}")
    return parallel.make_mesh(expert=expert_parallel, data=n // expert_parallel, devices=devices[:n])


def runs_expert_parallel(mesh) -> bool:
    """Whether the MoE layers run on ``mesh`` (:func:`jmoe.parallel.uses_mesh`: its expert axis is > 1)."""
    return parallel.uses_mesh(mesh)


def batch_sharding(mesh) -> NamedSharding:
    """Batch rows split over the token axes: ``P(("data", "expert"))``."""
    return NamedSharding(mesh, P(parallel.MeshAxes.of(mesh).token_axes))


def param_shardings(mesh, params: dict) -> dict:
    """MoE parameters per :func:`jmoe.parallel.moe_param_spec` (the library's one placement
    rule); everything else replicated."""
    def spec(path, x):
        return NamedSharding(mesh, parallel.moe_param_spec(path, mesh, x.shape) or P())

    return jax.tree_util.tree_map_with_path(spec, params)


def opt_state_shardings(mesh, tx, abstract_params: dict, shardings: dict):
    """Shardings of ``tx.init(params)``: a leaf whose path ends with a parameter's path (Adam's
    moments) gets that parameter's sharding; the rest (counts, ...) are replicated."""
    by_path = flatten(shardings)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)

    def pick(path, _):
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        for p, sh in by_path.items():
            if key == p or key.endswith("/" + p):
                return sh
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)
