"""The dropless path on two expert axes, one send per node: nodes (``expert_outer``, N_o)
x devices in a node (``expert``, n_i).

A token whose K experts live on m distinct nodes sends m rows across the outer axis, not
K (DeepSeek-V3's node-limited dispatch, DeepEP's two hops)::

    node rows: token t, node m -> one row (x_t, the token's expert ids, its weights on node m's
               experts, 0 elsewhere), sorted by (node, cost); cost = its experts on node m
    outer rounds (expert_outer): node rows -> gateway (m, my inner index), at most
               ceil(c * A) assignments per gateway and round (fit_to_buffer with costs)
        gateway: its rows' (row, expert) pairs, compacted into S = ceil(c * A) slots
                 -> dropless_exchange_experts over ``expert`` (inner rounds, same code as flat)
                 -> y_row = sum of the row's weighted expert outputs on this node (float32)
        one row back across the outer axis per node row
    y_t = sum over its node rows

A = T_l * K as on the flat path, so every buffer is about c * A rows per device whatever
N_o and n_i: the gateway's slots, its inner exchange (sized for S assignments, c = 1 there:
S already holds the factor, unless S is capped at the worst case) and the outer receive buffer (rows <= assignments). Rows that
do not fit go in further rounds (outer, or inner within an outer round); nothing is dropped
with ``overflow="rounds"``. ``extra["rounds"]``: the expert passes of the step (the inner
rounds summed over the outer rounds; 1 when everything fits at once), the same on every
device. The backward re-runs both levels (:func:`jmoe.parallel.dropless_exchange.rounds_ffn`
with the gateway as its experts, whose own rounds have the same custom VJP).

The combine happens twice: weighted on the gateway (its node's experts, float32, sent home
in the tokens' dtype), then summed at home. In float32 the result equals the flat path's to
rounding; in bfloat16 a node's partial sum is rounded once more before it travels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe import dropless
from jmoe.parallel.dropless_exchange import (
    DEFAULT_BUFFER_FACTOR,
    OVERFLOWS,
    count_rounds,
    dropless_exchange_experts,
    rounds_ffn,
)
from jmoe.parallel.row_exchanges import ROW_EXCHANGES, exchange_sizes, fit_to_buffer, receive_buffer_rows

Array = jax.Array


def node_rows(token_expert: Array, token_weight: Array, experts_per_node: int) -> tuple[Array, Array, Array]:
    """One row per (token, node it uses): ``(node [T, K], cost [T, K], first [T, K])``.

    ``node[t, k]``: the node of expert ``token_expert[t, k]``; ``cost[t, k]``: how many of
    token t's counting assignments (weight != 0) are on that node; ``first[t, k]``: k is the
    first counting assignment of t on its node, the one that stands for the node's row. So
    ``sum_k first[t, k]`` is the number of rows token t sends across the outer axis."""
    node = token_expert // experts_per_node  # [T, K]
    live = token_weight != 0  # [T, K]
    k = token_expert.shape[1]
    same = (node[:, :, None] == node[:, None, :]) & live[:, :, None] & live[:, None, :]  # [T, K, K']
    cost = jnp.sum(same, axis=2).astype(jnp.int32)  # [T, K]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [K, K']: k' < k
    first = live & ~jnp.any(same & earlier, axis=2)  # [T, K]
    return node, cost, first


def node_exchange_experts(
    tokens: Array,
    token_expert: Array,
    token_weight: Array,
    params: dict[str, Array],
    activation: str,
    *,
    num_experts: int,
    outer_axis: str,
    inner_axis: str,
    outer_size: int,
    inner_size: int,
    model_axis: str | None = None,
    exchange: str = "auto",
    grouped_matmul: str = "auto",
    buffer_factor: float | None = None,
    overflow: str = "rounds",
    token_axes: tuple[str, ...] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Dropless experts on ``outer_axis`` x ``inner_axis`` (inside ``shard_map``), one
    device's view; one row per (token, destination node) crosses the outer axis.

    ``y[t] = sum_k token_weight[t, k] * FFN_{token_expert[t, k]}(tokens[t])`` as
    :func:`jmoe.parallel.dropless_exchange.dropless_exchange_experts` (same arguments; the
    expert axes are ``(outer_axis, inner_axis)``, expert e on device
    ``(e // (n_i E_l), (e // E_l) % n_i)``); module docstring for the steps.

    Returns ``y [T_l, d]`` and ``{"dropped": my assignments not delivered, "rounds": the
    step's expert passes (int32, the same everywhere)}``; the rows that cross the outer axis
    are :func:`node_rows`' ``first`` on other nodes.
    """
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
    c = DEFAULT_BUFFER_FACTOR if buffer_factor is None else buffer_factor
    num_tokens, k = token_expert.shape
    a = num_tokens * k
    per_node = num_experts // outer_size
    kn = min(k, per_node)  # the most assignments one node row can carry
    costs = tuple(range(1, kn + 1))  # [kn]: row class w costs w + 1 (static: closed over by the VJP)
    # a node row is at most one per token and node: A rows, at most T_l to one node
    sizes = exchange_sizes(a, outer_size, c, k=k, local_experts=1)
    # assignments a gateway takes per round: ceil(c A), at most every source's rows at full cost
    budget = max(receive_buffer_rows(a, outer_size, c, k=k, local_experts=kn), kn)
    inner_factor = max(1.0, c * a / budget)  # the gateway's S = budget slots already hold c (up to the cap)
    outer = Budgeted(ROW_EXCHANGES.get(exchange).sized(sizes, (outer_axis,)), costs, budget)

    node, cost, first = node_rows(token_expert, token_weight, per_node)  # [T, K] x 3
    row_class = node * kn + jnp.clip(cost - 1, 0, kn - 1)  # [T, K]: (node, cost) order
    order, counts, _ = dropless.sort_routed(row_class, first.astype(jnp.float32), outer_size * kn)  # [A], [N_o kn]
    counts_all = jax.lax.all_gather(counts.reshape(outer_size, kn), outer_axis)  # [N_o src, N_o dst, kn]
    limit = 1 if overflow == "drop" else outer_size * a
    local_rounds, remaining = count_rounds(outer, counts_all, limit)
    axes = tuple(token_axes) if token_axes is not None else (outer_axis, inner_axis)
    rounds = jax.lax.pmax(local_rounds, axes)
    me = jax.lax.axis_index(outer_axis)
    outer_dropped = jnp.sum(remaining[me] * jnp.asarray(costs)[None, :]).astype(jnp.int32)

    # what each node row carries: the token's expert ids and its weights on that node's experts
    row_token = order // k  # [A]
    row_node = node.reshape(-1)[order]  # [A]
    carried_ids = token_expert[row_token]  # [A, K]
    carried_weights = jnp.where(node[row_token] == row_node[:, None], token_weight[row_token], 0.0)  # [A, K]

    def gateway(x, weights, labels, layout, p):  # [R1, d] node rows -> [R1, d] node-combined outputs
        del layout
        return _gateway(x, weights, labels, p, activation, num_experts=per_node, slots=budget, buffer_factor=inner_factor,
                        inner_axis=inner_axis, inner_size=inner_size, model_axis=model_axis, exchange=exchange,
                        grouped_matmul=grouped_matmul, overflow=overflow, token_axes=axes, outer_axis=outer_axis)

    run = rounds_ffn(outer, gateway, k, (outer_axis,))
    out_sorted, extra = run(tokens, params, carried_weights.astype(jnp.float32), order, counts_all, rounds,
                            carried_ids)  # [A, d] node rows, [2]
    y = dropless.unsort_and_combine(out_sorted, order, first.astype(jnp.float32), tokens.dtype)  # [T_l, d]
    passes = jax.lax.pmax(extra[1], axes)  # the same on every device already; pmax: typed so
    return y, {"dropped": outer_dropped + extra[0], "rounds": passes}


def _gateway(x: Array, weights: Array, ids: Array, params: dict[str, Array], activation: str, *,
             num_experts: int, slots: int, buffer_factor: float, inner_axis: str, inner_size: int, model_axis: str | None,
             exchange: str, grouped_matmul: str, overflow: str, token_axes: tuple[str, ...],
             outer_axis: str) -> tuple[Array, Array]:
    """A gateway's node rows ``x [R1, d]`` with their ``weights`` / expert ``ids [R1, K]``
    (weights 0 off this node and on empty rows) -> each row's weighted sum over its experts
    here ``[R1, d]`` and ``[dropped, rounds]`` of the inner exchange."""
    r1, k = ids.shape
    live = (weights != 0).reshape(-1)  # [R1 K]
    s = min(slots, r1 * k)
    pick = jnp.argsort(~live, stable=True)[:s]  # [S]: the live (row, k) pairs first; at most S by the outer plan
    slot_row = (pick // k).astype(jnp.int32)  # [S]
    slot_weight = jnp.where(live[pick], weights.reshape(-1)[pick], 0.0)  # [S]
    base = jax.lax.axis_index(outer_axis) * num_experts
    slot_expert = jnp.clip(ids.reshape(-1)[pick] - base, 0, num_experts - 1).astype(jnp.int32)  # [S], node-local
    y_slots, stats = dropless_exchange_experts(
        x[slot_row], slot_expert[:, None], slot_weight[:, None], params, activation, num_experts=num_experts,
        expert_axes=(inner_axis,), expert_size=inner_size, model_axis=model_axis, exchange=exchange,
        grouped_matmul=grouped_matmul, buffer_factor=buffer_factor, overflow=overflow, token_axes=token_axes,
    )  # [S, d], weighted; 0 on empty slots
    y = jnp.zeros((r1, x.shape[1]), jnp.float32).at[slot_row].add(y_slots.astype(jnp.float32))  # [R1, d]
    return y.astype(x.dtype), jnp.stack([stats["dropped"], stats["rounds"]])


class Budgeted:
    """A row exchange whose receivers also take at most ``budget`` assignments a round, a row
    of column w carrying ``costs[w]`` (:func:`fit_to_buffer` with costs, then the exchange's
    own plan: padded cells, or the ragged receive rows)."""

    def __init__(self, exchange, costs: tuple[int, ...], budget: int):
        self.exchange, self.costs, self.budget = exchange, costs, budget

    def plan_round(self, remaining: Array) -> Array:
        """``remaining [n_src, n_dst, W]`` -> kept this round, same shape."""
        fit = lambda c: fit_to_buffer(c, self.budget, self.costs)  # noqa: E731
        return self.exchange.plan_round(jax.vmap(fit, in_axes=1, out_axes=1)(remaining))

    def layout(self, *args):
        return self.exchange.layout(*args)

    def to_experts(self, x: Array, layout: dict[str, Array]) -> Array:
        return self.exchange.to_experts(x, layout)

    def to_home(self, y: Array, out: Array, layout: dict[str, Array]) -> Array:
        return self.exchange.to_home(y, out, layout)
