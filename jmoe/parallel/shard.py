"""The layer's one forward on a mesh: ``jax.shard_map`` around it, the exchange it uses
there (:class:`MeshExchange`), and the reduction of its aux values over devices.

Expert parallelism (EP) on a mesh whose expert axes hold n = |expert_outer| x |expert|
> 1 devices, per device (``G_l`` local groups, ``E_l = E / n`` local experts)::

    x      [G_l, S, d]        tokens: P(("data", "expert_outer", "expert"))
    plan = router(x @ W_r)    routed locally on the device's own groups
    exchange                  capacity: :mod:`jmoe.parallel.capacity_exchange`;
                              dropless: :mod:`jmoe.parallel.dropless_exchange`
    combine      -> [G_l, S, d]

Each expert's FFN acts row by row, so where a row sits in the exchanged buffers does not
matter: the result equals the one-device layer on the same groups (float rounding). The
random draws are made over the global shapes and sharded like the tokens.

Supported: E divisible by n (``E < #devices`` is fine when the rest of the devices go to
``"model"`` or ``"data"``); the number of groups divisible by
``|data| x |expert_outer| x |expert|``. Anything else raises ``ValueError`` before
compilation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jmoe.compat import shard_map
from jmoe.experts import expert_ffn
from jmoe.parallel.capacity_exchange import exchange_experts
from jmoe.parallel.dropless_exchange import dropless_exchange_experts
from jmoe.parallel.mesh import EXPERT, EXPERT_OUTER, MeshAxes, axis_size, check_mesh
from jmoe.parallel.placement import expert_param_specs
from jmoe.routing.plan import RoutingPlan

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MeshExchange:
    """The exchange step of the one forward (:mod:`jmoe.forward`) inside ``shard_map``.

    ``mesh_sizes = (|expert_outer|, |expert|)``; ``hierarchical`` / ``chunks``: the capacity
    path's 2DH and chunked all-to-all; ``dropless_exchange`` / ``buffer_factor``: the
    dropless path's row exchange and receive-buffer bound.
    """

    axes: MeshAxes
    mesh_sizes: tuple[int, int]
    hierarchical: bool = False
    chunks: int = 1
    dropless_exchange: str = "auto"
    buffer_factor: float | None = None

    def capacity_experts(self, expert_in: Array, params: dict[str, Array], activation: str, capacity: int) -> Array:
        """[E, G_l * C, d] slots -> expert outputs, same layout (exchanged both ways)."""
        def local_experts(x):  # [E_l, N, d]: my experts, hidden dim split over "model"
            return expert_ffn(x, params, activation, self.axes.model_axis)

        return exchange_experts(expert_in, local_experts, capacity=capacity, chunks=self.chunks,
                                mesh_sizes=self.mesh_sizes, axes=self.axes, hierarchical=self.hierarchical)

    def dropless_experts(self, tokens: Array, token_expert: Array, token_weight: Array, params: dict[str, Array],
                         activation: str, grouped_matmul: str, num_experts: int) -> tuple[Array, Array]:
        """[T_l, d] -> (y [T_l, d], assignments the receive buffers dropped)."""
        return dropless_exchange_experts(
            tokens, token_expert, token_weight, params, activation, num_experts=num_experts,
            expert_axes=self.axes.expert_axes, expert_size=math.prod(self.mesh_sizes),
            model_axis=self.axes.model_axis, exchange=self.dropless_exchange, grouped_matmul=grouped_matmul,
            buffer_factor=self.buffer_factor,
        )

    def reduce_aux(self, plan: RoutingPlan, mask: Array | None, buffer_dropped: Array | None = None):
        return reduce_aux(plan, mask, self.axes.token_axes, buffer_dropped)


def reduce_aux(plan: RoutingPlan, mask: Array | None, token_axes: tuple[str, ...],
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
    A router's extra losses: computed from the ``psum`` of their statistics (sums over
    tokens, :class:`~jmoe.routing.plan.ExtraLoss`), so they are the whole batch's.
    """
    if not token_axes:
        return plan.aux()
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
               tokens_per_expert=jax.lax.psum(aux["tokens_per_expert"], token_axes))
    for name, loss in plan.extra_losses.items():
        out[name] = loss.replace(statistic=jax.lax.psum(loss.statistic, token_axes)).value
    return out


def forward_on_mesh(forward: Callable, mesh, params: dict, groups: Array, token_mask: Array | None,
                    draws: dict[str, Array], *, hierarchical: bool = False, a2a_chunks: int = 1,
                    dropless_exchange: str = "auto", buffer_factor: float | None = None):
    """``forward(params, groups, token_mask, draws, exchange) -> (y, aux)`` run per device
    under ``jax.shard_map`` with a :class:`MeshExchange`.

    ``params = {"router": {...}, "experts": {...}}``: the router's weights replicated, the
    expert weights per :func:`expert_param_specs`; ``groups [G, S, d]``, ``token_mask
    [G, S]`` and every draw ``[G, S, ...]`` sharded over the token axes. Returns y
    ``[G, S, d]`` sharded like the groups and the aux values (equal on every device).
    """
    w_in = params["experts"]["w_in"]  # [E, d, f]
    check_mesh(mesh, num_experts=w_in.shape[0], num_groups=groups.shape[0], d_ff=w_in.shape[2],
               hierarchical=hierarchical)
    axes = MeshAxes.of(mesh)
    exchange = MeshExchange(axes, (axis_size(mesh, EXPERT_OUTER), axis_size(mesh, EXPERT)), hierarchical,
                            a2a_chunks, dropless_exchange, buffer_factor)
    token_spec = P(axes.token_axes or None)
    inputs = {"groups": groups, "draws": draws}
    if token_mask is not None:
        inputs["mask"] = token_mask
    param_specs = {"router": jax.tree.map(lambda _: P(), params["router"]),
                   "experts": expert_param_specs(params["experts"], mesh)}

    def local(inputs, params):
        return forward(params, inputs["groups"], inputs.get("mask"), inputs["draws"], exchange)

    fn = shard_map(local, mesh=mesh, in_specs=(jax.tree.map(lambda _: token_spec, inputs), param_specs),
                   out_specs=(token_spec, P()))  # aux: replicated
    return fn(inputs, params)
