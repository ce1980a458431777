"""The dropless path's exchange: counts, then rows (padded or ragged), with a receive-buffer bound.

A dropless layer (``capacity_factor=None``) has no static capacity; per device
(A = T_l * K assignments, :func:`dropless_exchange_experts`)::

    plan = router(x @ W_r)    token side only: token_expert, token_weight [G_l, S, K]
    sort by expert -> [A, d]; counts [E]
    exchange="padded" (XLA:CPU, which has no ragged all-to-all):
      all_to_all counts [n, E_l] int32           how many rows each source sends me, per expert
      all_to_all rows   [n, A, d] -> [n, A, d]   padded: chunk j = my rows for device j
      sort by (local expert, source, position); grouped matmul over E_l groups; unsort
      all_to_all rows   [n, A, d] -> [n, A, d]   results home; unsort; combine
    exchange="ragged" (GPU / TPU: ``jax.lax.ragged_all_to_all``, only valid rows move):
      all_gather counts [n, n, E_l] int32        every device computes every offset
      ragged_all_to_all [A, d] -> [R, d]         lands already ordered by (local expert, source)
      grouped matmul over E_l groups
      ragged_all_to_all [R, d] -> [A, d]         results home, in my sorted order; unsort; combine
    R = n * T_l * min(K, E_l) (the worst case), or ceil(c * A) with ``dropless_buffer_factor`` c: rows past
    R are dropped and counted in ``dropped_fraction``.

The exchanges are a registry (:data:`DROPLESS_EXCHANGES`): ``"auto"`` is ragged on GPU /
TPU and padded elsewhere.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from jmoe import dropless, platform
from jmoe.parallel.capacity_exchange import tiled_all_to_all
from jmoe.platform import Registry

Array = jax.Array


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
    ``exchange="ragged"`` replaces steps 2-5 by :func:`ragged_exchange`: the counts are
    all-gathered and two ``jax.lax.ragged_all_to_all`` calls move only the valid rows (XLA
    on GPU / TPU; elsewhere :func:`ragged_all_to_all_emulated`, for tests). ``"auto"``:
    ragged on GPU / TPU, padded elsewhere.

    Assignments that do not count (weight 0: padding tokens, GShard's skipped 2nd
    choices) are sorted last and never sent: they take no buffer space or compute.

    The receive buffer: a device computes at most R rows, R = ``n * T_l * min(K, E_l)``
    (the worst case, :func:`receive_buffer_rows`: every source sends it every token, each
    with as many rows as it has local experts to take them; nothing can be dropped) or, with
    ``buffer_factor`` c >= 1, R = ceil(c * A) rounded up to a multiple of 8 (c = 1 holds
    perfectly balanced routing). The ragged exchange's receive buffer is then ``[R, d]``
    instead of ``[n * A, d]``. Rows that do not fit are dropped: each (source, expert)
    chunk keeps up to a common cap, a source its first rows (:func:`fit_to_buffer`); a
    dropped row's output is 0 (as a capacity drop) and it is counted.

    Args:
      tokens: [T_l, d] (compute dtype); token_expert [T_l, K] int32 (global expert ids);
      token_weight [T_l, K] float32 (0: the assignment does not count).
      params: local expert weights ``w_in [E_l, d, f_l]``, ...
      buffer_factor: None (R = n * T_l * min(K, E_l)) or c >= 1 (R = ceil(c * A), rounded up to 8).
    Returns:
      [T_l, d] in the tokens' dtype, accumulated in float32; and the number of
      assignments the receive buffers dropped (int32 scalar; summed over the devices of
      the expert axes it is the group's total).
    """
    exchange_fn = DROPLESS_EXCHANGES.get(exchange)
    n = expert_size
    e_l = num_experts // n
    buffer_rows = receive_buffer_rows(token_expert.size, n, buffer_factor, k=token_expert.shape[1], local_experts=e_l)

    # 1. route locally: sort my assignments by expert; destination device = e // E_l.
    order, counts, rows, _ = dropless.sort_assignments(tokens, token_expert, token_weight, num_experts)

    def experts(x_local, row_expert, group_sizes):  # rows grouped by local expert -> FFN outputs
        return dropless.grouped_ffn(x_local, row_expert, group_sizes, params, activation, grouped_matmul, model_axis)

    out_sorted, dropped = exchange_fn(rows, counts.reshape(n, e_l), experts, expert_axes, buffer_rows)  # [A, d]
    return dropless.unsort_and_combine(out_sorted, order, token_weight, tokens.dtype), dropped


def padded_exchange(rows: Array, counts: Array, experts: Callable, expert_axes: tuple[str, ...],
                    buffer_rows: int) -> tuple[Array, Array]:
    """Expert-sorted rows [A, d] -> their experts' outputs [A, d], same order, through
    worst-case ``all_to_all`` buffers (steps 2-5 of :func:`dropless_exchange_experts`), and
    the number of rows my receive buffer dropped (int32).

    ``counts`` [n, E_l]: my rows per (destination device, local expert); rows past
    ``sum(counts)`` (weight-0 assignments) are never sent.
    """
    a, d = rows.shape
    n, e_l = counts.shape

    def a2a(x):
        return x if n == 1 else tiled_all_to_all(x, expert_axes)

    send_counts = jnp.sum(counts, axis=1)  # [n]
    send_start = jnp.cumsum(send_counts) - send_counts  # [n]: first sorted row for device j
    pos = jnp.arange(a, dtype=jnp.int32)
    dest = jnp.minimum(jnp.searchsorted(jnp.cumsum(send_counts), pos, side="right"), n - 1)  # [A], non-decreasing

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
    return back[dest, pos - send_start[dest]], dropped  # [A, d], expert order


def receive_buffer_rows(num_assignments: int, expert_size: int, buffer_factor: float | None, *, k: int = 1,
                        local_experts: int | None = None) -> int:
    """R, the rows a device's experts compute per step.

    Worst case (no factor): ``n * T_l * min(K, E_l)`` with ``T_l = A / K`` tokens per
    device: a token's K experts are distinct, so it sends at most ``min(K, E_l)`` rows to
    one device (E_l local experts; ``local_experts=None``: K), and every one of the n
    sources may send all its tokens to the same device. With a factor c >= 1:
    ``ceil(c * A)`` rounded up to a multiple of 8, at most the worst case.

    Group-limited routing (``router="group_limited"`` with the groups on the devices)
    bounds a token's fan-out, the *number of devices* its rows reach, to ``topk_group``,
    not this per-device worst case: every token may still pick the same device's group.
    """
    tokens = num_assignments // k
    worst = expert_size * tokens * (k if local_experts is None else min(k, local_experts))
    if buffer_factor is None:
        return worst
    if not (buffer_factor >= 1.0 and math.isfinite(buffer_factor)):
        raise ValueError(f"buffer_factor must be finite and >= 1 (1 holds perfectly balanced routing; None: the "
                         f"worst case), got {buffer_factor}")
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


def ragged_exchange(rows: Array, counts: Array, experts: Callable, expert_axes: tuple[str, ...],
                     buffer_rows: int) -> tuple[Array, Array]:
    """Expert-sorted rows [A, d] -> their experts' outputs [A, d], same order, moving
    only the valid rows (``exchange="ragged"`` of :func:`dropless_exchange_experts`), and
    the number of my rows the receivers' buffers dropped (int32).

    ``counts`` [n, E_l]: my rows per (destination device, local expert). The receive
    buffer is ``[R, d]``, R = ``buffer_rows`` (``n * T_l * min(K, E_l)``, the worst case, unless bounded);
    rows past the received total stay zero and fall outside the grouped matmul's groups.
    """
    a, d = rows.shape
    n, e_l = counts.shape
    if not expert_axes:  # one expert device: nothing to exchange
        row_expert = jnp.repeat(jnp.arange(e_l, dtype=jnp.int32), counts[0], total_repeat_length=a)  # [A]
        return experts(rows, row_expert, counts[0].astype(jnp.int32)), jnp.zeros((), jnp.int32)
    ragged = jax.lax.ragged_all_to_all if platform.has_ragged_all_to_all() else ragged_all_to_all_emulated
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


DROPLESS_EXCHANGES: Registry[Callable] = Registry("dropless_exchange", fallback="padded",
                                                  auto={"gpu": "ragged", "tpu": "ragged"})
DROPLESS_EXCHANGES.register("padded", padded_exchange)
DROPLESS_EXCHANGES.register("ragged", ragged_exchange)
NAMES = DROPLESS_EXCHANGES.names
