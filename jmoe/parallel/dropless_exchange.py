"""The dropless path on an expert mesh: counts, then rows in bounded rounds, nothing dropped.

Per device (A = T_l * K assignments, n devices on the expert axes, E_l = E / n experts
each; :func:`dropless_exchange_experts`)::

    sort my assignments by expert -> counts [n_dst, E_l]
    all_gather counts -> counts_all [n_src, n_dst, E_l]   every device knows every count
    rounds = rounds needed to deliver everything (computed from counts_all alone,
             max over the mesh: every device runs the same collectives the same number of times)
    repeat rounds times:                                  lax.while_loop, custom VJP
        kept_all = exchange.plan_round(remaining)         what fits this round
        rows -> experts (exchange.to_experts)             [R, d], R ~ c * A rows
        grouped FFN over my E_l experts
        outputs -> home (exchange.to_home)                [A, d]
        remaining -= kept_all
    unsort + combine

Every buffer is sized by ``buffer_factor`` c, not by n: the rows a device's experts
compute per round are ``ceil(c * A)`` (ragged) or ``n * ceil(c * A / n)`` (padded cells),
each rounded up to 8 and never past the worst case (:func:`exchange_sizes`). Balanced
routing takes one round; skewed routing takes more rounds, never more memory, and
nothing is dropped (``overflow="rounds"``). ``overflow="drop"`` keeps one round and
drops what did not fit (a fixed step time), counted in ``dropped_fraction``.

The backward (:func:`rounds_ffn`'s custom VJP) keeps only the tokens, the parameters,
the sort order and the counts: it runs the rounds again, sending each round's x and dy
rows to the experts, recomputing their forward there, sending dx home and accumulating
the expert weights' gradient; no round's receive buffer or FFN activation is a residual.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jmoe import dropless
from jmoe.compat import vary_like
from jmoe.parallel.row_exchanges import (
    ROW_EXCHANGES,
    ExchangeSizes,
    PaddedExchange,
    RaggedExchange,
    check_buffer_factor,
    exchange_sizes,
    fit_to_buffer,
    ragged_all_to_all_emulated,
    ragged_exchange_offsets,
    receive_buffer_rows,
)

Array = jax.Array

DEFAULT_BUFFER_FACTOR = 1.5
"""The default c (``dropless_buffer_factor=None``): measured, BENCHMARKS.md ("CPU, 2026-12-03")."""
OVERFLOWS = ("rounds", "drop")
DROPLESS_EXCHANGES = ROW_EXCHANGES
NAMES = ROW_EXCHANGES.names

__all__ = ["DEFAULT_BUFFER_FACTOR", "DROPLESS_EXCHANGES", "NAMES", "OVERFLOWS", "ExchangeSizes",
           "PaddedExchange", "RaggedExchange", "check_buffer_factor", "count_rounds", "dropless_exchange_experts",
           "exchange_sizes", "fit_to_buffer", "ragged_all_to_all_emulated", "ragged_exchange_offsets",
           "receive_buffer_rows"]


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
    exchange: str = "auto",
    grouped_matmul: str = "auto",
    buffer_factor: float | None = None,
    overflow: str = "rounds",
    token_axes: tuple[str, ...] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Dropless experts under expert parallelism (inside ``shard_map``), one device's view.

    ``y[t] = sum_k token_weight[t, k] * FFN_{token_expert[t, k]}(tokens[t])`` for this
    device's T_l tokens, the experts living on the n = ``expert_size`` devices of
    ``expert_axes`` (expert e on device ``e // E_l``; ``params`` holds the E_l local ones).

    The assignments are sorted by expert (:func:`jmoe.dropless.sort_routed`; weight-0
    ones, e.g. padding tokens, sort last and are never sent: they take no buffer space or
    compute); the counts are all-gathered; the rows travel in rounds of bounded buffers
    (module docstring), each round through ``exchange`` (a name of
    :data:`DROPLESS_EXCHANGES`: ``padded`` cells or ``ragged``), the experts' hidden dim
    split over ``model_axis`` (``psum``-ed); the outputs are unsorted and combined
    exactly as :func:`jmoe.dropless.dropless_experts`.

    Args:
      tokens: [T_l, d] (compute dtype); token_expert [T_l, K] int32 (global expert ids);
      token_weight [T_l, K] float32 (0: the assignment does not count).
      params: local expert weights ``w_in [E_l, d, f_l]``, ...
      buffer_factor: c >= 1 (None: :data:`DEFAULT_BUFFER_FACTOR`): buffers of about c * A rows.
      overflow: ``"rounds"`` (deliver everything, more rounds when skewed) or ``"drop"``
        (one round; what does not fit gets output 0 and is counted).
      token_axes: the mesh axes the tokens are split over (default: ``expert_axes``): the
        rounds are the max over all of them.
    Returns:
      y [T_l, d] in the tokens' dtype, accumulated in float32; and ``{"dropped": int32
      (my assignments not delivered; summed over devices it is the batch's), "rounds":
      int32 (the same on every device)}``.
    """
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
    n = expert_size
    e_l = num_experts // n
    a, k = token_expert.size, token_expert.shape[1]
    sizes = exchange_sizes(a, n, DEFAULT_BUFFER_FACTOR if buffer_factor is None else buffer_factor, k=k,
                           local_experts=e_l)
    row_exchange = ROW_EXCHANGES.get(exchange).sized(sizes, tuple(expert_axes))

    order, counts, _ = dropless.sort_routed(token_expert, token_weight, num_experts)  # [A], [E]; rows not gathered
    counts = counts.reshape(n, e_l)  # [n_dst, E_l]
    counts_all = jax.lax.all_gather(counts, expert_axes) if expert_axes else counts[None]  # [n_src, n_dst, E_l]
    limit = 1 if overflow == "drop" else n * a  # every round delivers >= 1 row while any is left
    local_rounds, remaining = count_rounds(row_exchange, counts_all, limit)
    axes = tuple(token_axes if token_axes is not None else expert_axes)
    rounds = jax.lax.pmax(local_rounds, axes) if axes else local_rounds  # the same on every device
    me = _me(expert_axes)
    dropped = jnp.sum(remaining[me]).astype(jnp.int32)

    def experts(x_local, weights, labels, layout, p):  # rows grouped by local expert -> FFN outputs
        y = dropless.grouped_ffn(x_local, layout["row_expert"], layout["group_sizes"], p, activation,
                                 grouped_matmul, model_axis)
        return y, jnp.zeros((2,), jnp.int32)

    run = rounds_ffn(row_exchange, experts, k, tuple(expert_axes))
    out_sorted, _ = run(tokens, params, (), order, counts_all, rounds, ())  # [A, d], expert order
    y = dropless.unsort_and_combine(out_sorted, order, token_weight, tokens.dtype)
    return y, {"dropped": dropped, "rounds": rounds}


def _me(expert_axes: tuple[str, ...]) -> Array:
    return jax.lax.axis_index(tuple(expert_axes)) if expert_axes else jnp.zeros((), jnp.int32)


def count_rounds(row_exchange, counts_all: Array, limit: int) -> tuple[Array, Array]:
    """Rounds until nothing is left (at least 1, at most ``limit``) and what is left then
    ``[n_src, n_dst, E_l]``; from the all-gathered counts only, so the same on every device
    of the expert axes."""
    def body(state):
        r, remaining = state
        return r + 1, remaining - row_exchange.plan_round(remaining)

    def more(state):
        r, remaining = state
        return (r < limit) & ((r == 0) | (jnp.sum(remaining) > 0))

    zero = jnp.zeros((), jnp.int32)
    return jax.lax.while_loop(more, body, (zero, counts_all.astype(jnp.int32)))


def _round(row_exchange, counts_all: Array, remaining: Array, me: Array):
    """This round's kept counts and the exchange's layout for them."""
    kept = row_exchange.plan_round(remaining)
    return kept, row_exchange.layout(counts_all, counts_all - remaining, kept, me)


def rounds_ffn(row_exchange, experts: Callable, k: int, expert_axes: tuple[str, ...]) -> Callable:
    """``run(tokens [T_l, d], params, weights, order [A], counts_all, rounds, labels) ->
    (out [A, d], extra int32 [2])``: row ``i`` of ``out`` is what ``experts`` gave sorted row
    i (``tokens[order[i] // k]``; 0 for rows never delivered), with a custom VJP that
    re-runs the rounds (module docstring).

    ``weights`` / ``labels``: pytrees of per-row values ``[A, ...]`` in sorted order (float /
    int) that travel with the rows (``()``: none); ``experts(x [R, d], weights, labels,
    layout, params) -> (y [R, d], extra int32 [2])`` on the receiver, differentiated in
    ``x``, ``weights`` and ``params``; ``extra`` is summed over the rounds."""

    def rows_of(tokens, order):
        return tokens[order // k]  # [A, d], expert order

    def carry_like(x: Array, *like) -> Array:
        """Zeros like ``x`` with the mesh type the loop body gives the carry: varying over the
        axes of ``x`` and ``like`` and over the expert axes (what comes home was exchanged)."""
        return vary_like(jnp.zeros_like(x), x, *like, _me(expert_axes))

    def send(tree, layout):
        return jax.tree.map(lambda v: row_exchange.to_experts(v, layout), tree)

    def forward(tokens, params, weights, order, counts_all, rounds, labels):
        rows = rows_of(tokens, order)
        me = _me(expert_axes)

        def body(state):
            r, remaining, out, extra = state
            kept, layout = _round(row_exchange, counts_all, remaining, me)
            x = row_exchange.to_experts(rows, layout)
            y, more = experts(x, send(weights, layout), send(labels, layout), layout, params)
            return r + 1, remaining - kept, row_exchange.to_home(y, out, layout), extra + more

        extra = carry_like(jnp.zeros((2,), jnp.int32), rows, counts_all)
        state = (jnp.zeros((), jnp.int32), counts_all, carry_like(rows, counts_all), extra)
        _, _, out, extra = jax.lax.while_loop(lambda s: s[0] < rounds, body, state)
        return out, extra

    @jax.custom_vjp
    def run(tokens, params, weights, order, counts_all, rounds, labels):
        return forward(tokens, params, weights, order, counts_all, rounds, labels)

    def run_fwd(tokens, params, weights, order, counts_all, rounds, labels):
        res = (tokens, params, weights, order, counts_all, rounds, labels)
        return forward(*res), res

    def run_bwd(res, cotangents):
        tokens, params, weights, order, counts_all, rounds, labels = res
        d_out = cotangents[0]  # [A, d]; the int extra has none
        rows = rows_of(tokens, order)
        me = _me(expert_axes)

        def body(state):
            r, remaining, d_rows, d_weights, d_params = state
            kept, layout = _round(row_exchange, counts_all, remaining, me)
            x = row_exchange.to_experts(rows, layout)  # [R, d]
            dy = row_exchange.to_experts(d_out, layout)  # [R, d]: 0 on rows past the groups
            held = send(labels, layout)
            ffn = lambda x, w, p: experts(x, w, held, layout, p)  # noqa: E731
            _, pull, _ = jax.vjp(ffn, x, send(weights, layout), params, has_aux=True)
            dx, dw, dp = pull(dy.astype(x.dtype))
            d_weights = jax.tree.map(lambda acc, g: row_exchange.to_home(g, acc, layout), d_weights, dw)
            d_params = jax.tree.map(jnp.add, d_params, dp)
            return r + 1, remaining - kept, row_exchange.to_home(dx, d_rows, layout), d_weights, d_params

        d_params = jax.tree.map(lambda p: vary_like(jnp.zeros_like(p), p), params)
        d_weights = jax.tree.map(lambda w: carry_like(w, counts_all, d_out), weights)
        state = (jnp.zeros((), jnp.int32), counts_all, carry_like(rows, counts_all, d_out), d_weights, d_params)
        _, _, d_rows, d_weights, d_params = jax.lax.while_loop(lambda s: s[0] < rounds, body, state)
        d_tokens = jnp.zeros_like(tokens).at[order // k].add(d_rows.astype(tokens.dtype))  # [T_l, d]
        return d_tokens, d_params, d_weights, None, None, None, None

    run.defvjp(run_fwd, run_bwd)
    return run
