"""The MoE layer's one forward: the same function on one device and, per device, on a mesh.

::

    (params, groups [G, S, d], token_mask [G, S], draws, exchange)
      route      plan = router.route(params["router"], groups, draws, token_mask, C)
      expert in  router.expert_inputs: x (x * jitter: jitter_experts) and the plan, or w x and weight 1
                 (scale_expert_input)
      zero       zero-computation experts (ZeroExperts): w x or w c added; the rest is the FFN experts' plan
      capacity   dispatch -> [E, G * C, d]; exchange.capacity_experts; combine -> [G, S, d]
      dropless   exchange.dropless_experts: sort by expert, grouped FFN, unsort + combine
      shared     + the shared expert on every token (hidden dim split over the model axis), its n
                 experts each scaled by the plan's shared_weight when the router weights them
      aux        exchange.reduce_aux(plan, ...): the plan's losses and metrics

The exchange is the only step that differs: :class:`LocalExchange` (one device: the
identity around the experts) here, :class:`jmoe.parallel.MeshExchange` (all-to-all for
capacity; counts + rows for dropless; aux reduced over devices) inside ``shard_map``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jmoe import dispatch as dispatch_lib
from jmoe import dropless
from jmoe.experts import Activation, ZeroExperts, expert_ffn, shared_ffn
from jmoe.routing import Router, RoutingPlan

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """What the forward computes (static, hashable).

    ``capacity``: slots per expert and group, or None for a dropless layer (MegaBlocks:
    every assignment computed by a grouped matmul; the plan is routed with C = S, so it
    drops nothing). ``dispatch``: the capacity path's backend; ``grouped_matmul``: the
    dropless path's. ``shared_activation``: the shared expert's (None: ``activation``).
    ``zero_experts``: the zero-computation experts after the ``num_experts`` FFN experts (None: none).
    """

    router: Router
    capacity: int | None
    activation: str | Activation
    compute_dtype: Any = jnp.float32
    dispatch: str = "auto"
    grouped_matmul: str = "auto"
    shared_activation: Activation | None = None
    zero_experts: ZeroExperts | None = None
    num_experts: int | None = None  # the FFN experts, with zero_experts


@dataclasses.dataclass(frozen=True)
class LocalExchange:
    """One device: nothing moves; the experts run on the dispatched rows."""

    model_axis = None  # the mesh axis that splits FFN hidden dims (the shared expert's too)

    def capacity_experts(self, expert_in: Array, params: dict[str, Array], activation: str, capacity: int) -> Array:
        return expert_ffn(expert_in, params, activation)  # [E, G * C, d]

    def dropless_experts(self, tokens: Array, token_expert: Array, token_weight: Array, params: dict[str, Array],
                         activation: str, grouped_matmul: str, num_experts: int) -> tuple[Array, dict[str, Array]]:
        y = dropless.dropless_experts(tokens, token_expert, token_weight, params, activation, grouped_matmul)
        one = jnp.ones((), jnp.int32)
        return y, {"dropped": jnp.zeros((), jnp.int32), "rounds": one}  # [T, d], nothing dropped, one pass

    def reduce_aux(self, plan: RoutingPlan, mask: Array | None, exchange_stats: dict[str, Array] | None = None):
        return {**plan.aux(), "exchange_rounds": jnp.ones((), jnp.int32)}


def moe_forward(pipeline: Pipeline, params: dict, groups: Array, token_mask: Array | None, draws: dict[str, Array],
                exchange=LocalExchange()) -> tuple[Array, dict[str, Array]]:
    """The layer on groups: ``groups [G, S, d] -> (y [G, S, d], aux)``.

    ``params = {"router": {...}, "experts": {"w_in": [E, d, f], ...}}`` and, with a shared
    expert, ``"shared": {"w_in": [d, F], ...}`` (on a mesh: the device's local experts and
    its slice of F); ``draws``: the router's random draws ``[G, S, ...]`` (empty in eval
    mode). ``y = sum_k w_k FFN_{e_k}(x) + shared(x)`` (the shared experts weighted by the
    plan's ``shared_weight`` when the router gives one); with ``router.scale_expert_input``
    ``y = FFN_e(w x) + shared(x)`` (Llama 4). A token dropped by every expert it chose gets
    only the shared expert's output (0 without one); a masked token (``token_mask`` False)
    gets y = 0, and its input is never read.
    """
    num_groups, group_size, d = groups.shape
    if token_mask is not None:  # masked tokens are never read: a NaN there reaches no output, loss or gradient
        groups = jnp.where(token_mask[..., None], groups, jnp.zeros((), groups.dtype))
    capacity = group_size if pipeline.capacity is None else pipeline.capacity
    plan = pipeline.router.route(params["router"], groups, draws, token_mask, capacity)
    routed_in, plan_for_experts = pipeline.router.expert_inputs(groups, plan, draws)  # x (jittered), or w x
    if pipeline.zero_experts is not None:
        plan_for_experts, y_zero = _split_zero_experts(pipeline, plan_for_experts, groups, params["router"])
    y, exchange_stats = _routed(pipeline, params["experts"], routed_in, plan_for_experts, exchange)  # [G, S, d]
    if pipeline.zero_experts is not None:
        y = (y.astype(jnp.float32) + y_zero).astype(y.dtype)
    aux = exchange.reduce_aux(plan, token_mask, exchange_stats)
    if "shared" in params:
        tokens = groups.reshape(-1, d).astype(pipeline.compute_dtype)  # [T, d]
        activation = pipeline.shared_activation or pipeline.activation
        weight = None if plan.shared_weight is None else plan.shared_weight.reshape(tokens.shape[0], -1)  # [T, n]
        shared = shared_ffn(tokens, params["shared"], activation, exchange.model_axis, weight)  # [T, d]
        y = y + shared.reshape(groups.shape).astype(y.dtype)
        if token_mask is not None:
            y = jnp.where(token_mask[..., None], y, jnp.zeros((), y.dtype))
    if pipeline.capacity is None:
        aux = {**aux, "padding_fraction": jnp.zeros((), jnp.float32)}
    return y, aux


def _split_zero_experts(pipeline: Pipeline, plan: RoutingPlan, groups: Array,
                        router_params: dict) -> tuple[RoutingPlan, Array]:
    """The plan of the FFN experts alone (the zero-computation choices hold no slot of theirs and
    weigh 0) and what the zero-computation choices add ``[G, S, d]`` (:class:`ZeroExperts`)."""
    e = pipeline.num_experts
    y_zero = pipeline.zero_experts.outputs(groups, plan.token_expert, plan.token_weight, e,
                                           router_params.get("zero_constants"))  # [G, S, d]
    zero = plan.token_expert >= e  # [G, S, K]
    ffn_plan = plan.replace(slot_token=plan.slot_token[:, :e], token_expert=jnp.where(zero, 0, plan.token_expert),
                            token_slot=jnp.where(zero, -1, plan.token_slot),
                            token_weight=jnp.where(zero, 0.0, plan.token_weight))
    return ffn_plan, y_zero


def _routed(pipeline: Pipeline, experts: dict, groups: Array, plan: RoutingPlan,
            exchange) -> tuple[Array, dict[str, Array] | None]:
    """The routed experts' output ``[G, S, d]`` (dropless or capacity path) and the dropless
    exchange's stats (``dropped``: assignments not delivered, ``rounds``; None for the
    capacity path)."""
    if pipeline.capacity is None:
        tokens = groups.reshape(-1, groups.shape[-1]).astype(pipeline.compute_dtype)  # [T, d]
        y, exchange_stats = exchange.dropless_experts(
            tokens, plan.token_expert.reshape(tokens.shape[0], -1), plan.token_weight.reshape(tokens.shape[0], -1),
            experts, pipeline.activation, pipeline.grouped_matmul, plan.num_experts,
        )  # [T, d]
        return y.reshape(groups.shape), exchange_stats
    backend = dispatch_lib.get_backend(pipeline.dispatch)
    expert_in = backend.dispatch(groups.astype(pipeline.compute_dtype), plan)  # [E, G * C, d]
    expert_out = exchange.capacity_experts(expert_in, experts, pipeline.activation, plan.capacity)  # [E, G * C, d]
    return backend.combine(expert_out, plan), None  # [G, S, d]
