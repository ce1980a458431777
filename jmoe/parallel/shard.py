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
from jmoe.parallel.node_exchange import node_exchange_experts
from jmoe.parallel.mesh import MeshAxes, check_mesh, is_explicit
from jmoe.parallel.placement import expert_param_specs, shared_param_specs
from jmoe.routing.plan import RoutingPlan

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MeshExchange:
    """The exchange step of the one forward (:mod:`jmoe.forward`) inside ``shard_map``.

    ``hierarchical`` / ``chunks``: the capacity
    path's 2DH and chunked all-to-all; ``dropless_exchange`` / ``buffer_factor`` /
    ``overflow``: the dropless path's row exchange, its buffer size and what happens to
    the rows that do not fit one round (:mod:`jmoe.parallel.dropless_exchange`).
    """

    axes: MeshAxes
    hierarchical: bool = False
    chunks: int = 1
    dropless_exchange: str = "auto"
    buffer_factor: float | None = None
    overflow: str = "rounds"

    @property
    def model_axis(self) -> str | None:
        """The mesh axis that splits FFN hidden dims (the shared expert's too)."""
        return self.axes.model_axis

    def capacity_experts(self, expert_in: Array, params: dict[str, Array], activation: str, capacity: int) -> Array:
        """[E, G_l * C, d] slots -> expert outputs, same layout (exchanged both ways)."""
        def local_experts(x):  # [E_l, N, d]: my experts, hidden dim split over "model"
            return expert_ffn(x, params, activation, self.axes.model_axis)

        return exchange_experts(expert_in, local_experts, capacity=capacity, chunks=self.chunks,
                                axes=self.axes, hierarchical=self.hierarchical)

    def dropless_experts(self, tokens: Array, token_expert: Array, token_weight: Array, params: dict[str, Array],
                         activation: str, grouped_matmul: str, num_experts: int) -> tuple[Array, dict[str, Array]]:
        """[T_l, d] -> (y [T_l, d], {"dropped": assignments not delivered, "rounds": exchange rounds}).
        ``hierarchical``: one row per (token, node) across ``expert_outer``
        (:mod:`jmoe.parallel.node_exchange`); else one row per assignment."""
        options = dict(num_experts=num_experts, model_axis=self.axes.model_axis, exchange=self.dropless_exchange,
                       grouped_matmul=grouped_matmul, buffer_factor=self.buffer_factor, overflow=self.overflow,
                       token_axes=self.axes.token_axes)
        if self.hierarchical:
            outer, inner = self.axes.expert_axes
            return node_exchange_experts(tokens, token_expert, token_weight, params, activation, outer_axis=outer,
                                         inner_axis=inner, outer_size=self.axes.size(outer),
                                         inner_size=self.axes.size(inner), **options)
        return dropless_exchange_experts(tokens, token_expert, token_weight, params, activation,
                                         expert_axes=self.axes.expert_axes, expert_size=self.axes.expert_size,
                                         **options)

    def reduce_aux(self, plan: RoutingPlan, mask: Array | None, exchange_stats: dict[str, Array] | None = None):
        return reduce_aux(plan, mask, self.axes.token_axes, exchange_stats)


def reduce_aux(plan: RoutingPlan, mask: Array | None, token_axes: tuple[str, ...],
               exchange_stats: dict[str, Array] | None = None) -> dict[str, Array]:
    """Per-device aux -> the one-device values (inside shard_map).

    Per-group means (load balancing, padding, and any other aux value): ``pmean``
    (same G_l everywhere).
    Per-valid-token means (z_loss, entropy): ``psum(v_l * t_l) / psum(t_l)``.
    dropped_fraction: ``psum(f_l * r_l + b_l) / psum(r_l)``, r_l = the plan's requested
    assignments (k per valid token, less the 2nd choices GShard's random policy skipped),
    b_l = ``exchange_stats["dropped"]``, the assignments a dropless exchange did not
    deliver (``overflow="drop"``; 0 otherwise).
    exchange_rounds: the dropless exchange's rounds (already the same on every device);
    1 for the capacity path.
    tokens_per_expert: ``psum``.
    A router's extra losses: computed from the ``psum`` of their statistics (sums over
    tokens, :class:`~jmoe.routing.plan.ExtraLoss`), so they are the whole batch's.
    """
    rounds = jnp.ones((), jnp.int32) if exchange_stats is None else exchange_stats["rounds"]
    if not token_axes:
        return {**plan.aux(), "exchange_rounds": rounds}
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
    extra = 0.0 if exchange_stats is None else exchange_stats["dropped"].astype(jnp.float32)
    dropped = weighted(aux["dropped_fraction"], plan.requested_assignments, extra)
    out = {name: jax.lax.pmean(value, token_axes) for name, value in aux.items()}  # per-group means
    out.update(z_loss=z, router_entropy=ent, dropped_fraction=dropped,
               tokens_per_expert=jax.lax.psum(aux["tokens_per_expert"], token_axes), exchange_rounds=rounds)
    for name, loss in plan.extra_losses.items():
        out[name] = loss.replace(statistic=jax.lax.psum(loss.statistic, token_axes)).value
    return out


def forward_on_mesh(forward: Callable, mesh, axes: MeshAxes, params: dict, x: Array, token_mask: Array | None,
                    draws: dict[str, Array], *, group_size: int, hierarchical: bool = False, a2a_chunks: int = 1,
                    dropless_exchange: str = "auto", buffer_factor: float | None = None,
                    overflow: str = "rounds"):
    """``forward(params, groups, token_mask, draws, exchange) -> (y, aux)`` run per device
    under ``jax.shard_map`` with a :class:`MeshExchange`.

    ``x [..., d]`` (``[B, S, d]`` or ``[T, d]``): its T tokens are split over the token axes
    and each device cuts its own into groups of ``group_size`` (row-major, so the groups
    are the one-device layer's); ``token_mask`` has x's shape without d; every draw is
    ``[G, group_size, ...]`` over the global groups. ``params = {"router": {...}, "experts":
    {...}}`` (and ``"shared"``): the router's weights replicated, the expert weights per
    :func:`expert_param_specs`, the shared expert's per :func:`shared_param_specs`. On a mesh with explicit axes every input is resharded to
    those specs first (its type says where it lives), and y comes back with x's sharding.
    Returns y of x's shape and the aux values (equal on every device).
    """
    d = x.shape[-1]
    num_tokens = x.size // d
    w_in = params["experts"]["w_in"]  # [E, d, f]
    check_mesh(axes, num_experts=w_in.shape[0], num_groups=num_tokens // group_size, d_ff=w_in.shape[2],
               hierarchical=hierarchical, shared_d_ff=params["shared"]["w_in"].shape[1] if "shared" in params else None)
    exchange = MeshExchange(axes, hierarchical, a2a_chunks, dropless_exchange, buffer_factor, overflow)
    token_spec = P(axes.token_axes or None)
    explicit = is_explicit(mesh)
    inputs = {"tokens": _flat(x, x.ndim - 1, token_spec, explicit, mesh),  # [T, d]
              "draws": {k: _flat(v, 2, token_spec, explicit, mesh) for k, v in draws.items()}}  # [T, ...]
    if token_mask is not None:
        inputs["mask"] = _flat(token_mask, token_mask.ndim, token_spec, explicit, mesh)  # [T]
    input_specs = jax.tree.map(lambda _: token_spec, inputs)
    param_specs = {"router": jax.tree.map(lambda _: P(), params["router"]),
                   "experts": expert_param_specs(params["experts"], axes)}
    if "shared" in params:
        param_specs["shared"] = shared_param_specs(params["shared"], axes)
    if explicit:  # shard_map wants inputs whose types match its in_specs
        inputs, params = jax.tree.map(lambda v, spec: jax.sharding.reshard(v, _on(mesh, spec)),
                                      (inputs, params), (input_specs, param_specs))

    def local(inputs, params):
        groups = inputs["tokens"].reshape(-1, group_size, d)  # [G_l, S, d]
        mask = inputs.get("mask")
        mask = None if mask is None else mask.reshape(groups.shape[:2])  # [G_l, S]
        local_draws = {k: v.reshape(*groups.shape[:2], *v.shape[1:]) for k, v in inputs["draws"].items()}
        y, aux = forward(params, groups, mask, local_draws, exchange)
        return y.reshape(-1, d), aux  # [T_l, d]

    fn = shard_map(local, mesh=mesh, in_specs=(input_specs, param_specs), out_specs=(token_spec, P()))
    y, aux = fn(inputs, params)  # [T, d], aux replicated
    if explicit:
        y = jnp.reshape(y, x.shape, out_sharding=_on(mesh, P(*token_spec, *[None] * (x.ndim - 1))))
        return jax.sharding.reshard(y, _on(mesh, jax.typeof(x).sharding.spec)), aux
    return y.reshape(x.shape), aux


def _flat(v: Array, lead: int, token_spec: P, explicit: bool, mesh=None) -> Array:
    """``v`` with its ``lead`` token dims merged into one leading dim ``[T, ...]`` (x ``[B, S, d]``,
    a mask ``[B, S]``, draws ``[G, S, ...]``). On an explicit mesh the merge keeps the tokens
    split over the token axes."""
    shape = (math.prod(v.shape[:lead]), *v.shape[lead:])
    if not explicit:
        return v.reshape(shape)
    v = jax.sharding.reshard(v, _on(mesh, P(*token_spec, *[None] * (v.ndim - 1))))
    return jnp.reshape(v, shape, out_sharding=_on(mesh, P(*token_spec, *[None] * (len(shape) - 1))))


def _on(mesh, spec: P) -> jax.sharding.NamedSharding:
    """``spec`` on ``mesh`` itself, so an explicit mesh given as ``mesh=`` works without
    ``jax.set_mesh`` around the call."""
    return jax.sharding.NamedSharding(mesh, spec)
