"""How one round of the dropless exchange moves rows: ``padded`` and ``ragged``.

A round delivers, for every (source i, destination j, local expert e), the next
``kept[i, j, e]`` of source i's rows for expert ``j E_l + e`` (its rows are sorted by
global expert; ``sent[i, j, e]`` of them went in earlier rounds). The receiver gets its
rows ordered by (local expert, source) in a buffer of R rows, runs its experts, and the
outputs go back to the positions the rows left from. Each exchange is three steps,
the same for the forward's rows and the backward's (x, dy) and dx::

    layout = exchange.layout(counts_all, sent_all, kept_all, me)   indices / offsets (ints)
    recv   = exchange.to_experts(x [A, ...], layout)               [R, ...], by (expert, source)
    out    = exchange.to_home(y [R, ...], out [A, ...], layout)    y written at the rows' places

and :meth:`plan_round` says how much of what is left fits one round (``kept_all``), the
same on every device (it reads only the all-gathered counts).

``padded`` (XLA:CPU, which has no ragged all-to-all; static shapes throughout): a uniform
``all_to_all`` of cells ``[n, P, d]``: a source sends at most P rows to one destination
per round, R = n * P. ``ragged`` (GPU / TPU, ``jax.lax.ragged_all_to_all``): only the
kept rows move; a receiver takes at most R rows per round from all sources together
(:func:`fit_to_buffer` shares them out). ``"auto"``: ragged on GPU / TPU, padded elsewhere.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jmoe import platform
from jmoe.parallel.capacity_exchange import tiled_all_to_all
from jmoe.platform import Registry

Array = jax.Array


def fit_to_buffer(counts: Array, buffer_rows: int, costs: Array | None = None) -> Array:
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

    ``costs [E_l]`` (None: all 1): a row of column e takes ``costs[e]`` units of the buffer
    (the node exchange's rows carry ``costs[e]`` assignments): a chunk keeps up to L units,
    ``min(counts, L // costs)`` rows, and ``sum kept * costs <= buffer_rows``. Every round
    keeps at least one row while any is left, as long as ``buffer_rows >= max(costs)``.
    """
    n_src, e_l = counts.shape
    flat = counts.T.reshape(-1).astype(jnp.int32)  # [E_l * n_src], (expert, source) order
    cost = jnp.ones_like(flat) if costs is None else jnp.repeat(jnp.asarray(costs, jnp.int32), n_src)  # [E_l * n_src]
    capped_at = lambda level: jnp.minimum(flat, level // cost)  # noqa: E731
    fits = lambda level: jnp.sum(capped_at(level) * cost) <= buffer_rows  # noqa: E731

    def bisect(_, bounds):  # invariant: fits(lo); the level is in [lo, hi]
        lo, hi = bounds
        mid = (lo + hi + 1) // 2
        return jnp.where(fits(mid), mid, lo), jnp.where(fits(mid), hi, mid - 1)

    top = jnp.max(flat * cost)
    level, _ = jax.lax.fori_loop(0, 32, bisect, (jnp.zeros_like(top), top))  # zeros_like: same mesh type
    capped = capped_at(level)  # [E_l * n_src]
    cut = flat > capped
    spare = buffer_rows - jnp.sum(capped * cost)
    extra = cut & (jnp.cumsum(cut * cost) <= spare)  # one more row for the first cut chunks that fit
    kept = capped + extra.astype(jnp.int32)
    return kept.reshape(e_l, n_src).T.astype(counts.dtype)


def receive_buffer_rows(num_assignments: int, expert_size: int, buffer_factor: float | None, *, k: int = 1,
                        local_experts: int | None = None) -> int:
    """R, the rows a device's experts compute in one round of the ragged exchange.

    Worst case (``buffer_factor=None``): ``n * T_l * min(K, E_l)`` with ``T_l = A / K``
    tokens per device: a token's K experts are distinct, so it sends at most
    ``min(K, E_l)`` rows to one device (E_l local experts; ``local_experts=None``: K), and
    every one of the n sources may send all its tokens to the same device: one round
    always suffices. With a factor c >= 1: ``ceil(c * A)`` rounded up to a multiple of 8,
    at most the worst case.
    """
    tokens = num_assignments // k
    worst = expert_size * tokens * (k if local_experts is None else min(k, local_experts))
    if buffer_factor is None:
        return worst
    check_buffer_factor(buffer_factor)
    return min(worst, _round8(math.ceil(buffer_factor * num_assignments)))


def check_buffer_factor(buffer_factor: float) -> None:
    if not (isinstance(buffer_factor, (int, float)) and math.isfinite(buffer_factor) and buffer_factor >= 1.0):
        raise ValueError(f"buffer_factor must be finite and >= 1 (1 holds perfectly balanced routing), "
                         f"got {buffer_factor}")


def _round8(rows: int) -> int:
    return -(-rows // 8) * 8


@dataclasses.dataclass(frozen=True)
class ExchangeSizes:
    """The static sizes of one round: ``receive_rows`` R (ragged: a receiver's rows from
    all sources) and ``cell_rows`` P (padded: rows per (source, destination) cell, R = n P)."""

    receive_rows: int
    cell_rows: int


def exchange_sizes(num_assignments: int, expert_size: int, buffer_factor: float, *, k: int,
                   local_experts: int) -> ExchangeSizes:
    """R = ``ceil(c * A)`` and P = ``ceil(c * A / n)``, each rounded up to 8 and at most its
    worst case (R: ``n * T_l * min(K, E_l)``; P: ``T_l * min(K, E_l)``, one source's rows
    for one device). Neither grows with n at a fixed A."""
    check_buffer_factor(buffer_factor)
    recv = receive_buffer_rows(num_assignments, expert_size, buffer_factor, k=k, local_experts=local_experts)
    worst_cell = (num_assignments // k) * min(k, local_experts)
    cell = min(worst_cell, _round8(math.ceil(buffer_factor * num_assignments / expert_size)))
    return ExchangeSizes(recv, max(cell, 1))


def _exclusive_cumsum(x: Array, axis: int) -> Array:
    return jnp.cumsum(x, axis=axis) - x


@dataclasses.dataclass(frozen=True)
class PaddedExchange:
    """Cells of P rows per (source, destination): ``all_to_all`` of ``[n, P, d]`` each way.

    ``plan_round``: each cell keeps up to P rows, shared over its E_l experts by
    :func:`fit_to_buffer` (a hot expert does not starve a cold one in the same cell).
    """

    cell_rows: int  # P
    axes: tuple[str, ...]

    @classmethod
    def sized(cls, sizes: "ExchangeSizes", axes: tuple[str, ...]) -> "PaddedExchange":
        return cls(sizes.cell_rows, axes)

    def plan_round(self, remaining: Array) -> Array:
        """``remaining [n_src, n_dst, E_l]`` -> kept this round, same shape."""
        per_cell = lambda c: fit_to_buffer(c[None], self.cell_rows)[0]  # noqa: E731
        return jax.vmap(jax.vmap(per_cell))(remaining)

    def layout(self, counts_all: Array, sent_all: Array, kept_all: Array, me: Array) -> dict[str, Array]:
        n, _, e_l = counts_all.shape
        p = jnp.arange(self.cell_rows, dtype=jnp.int32)  # [P]
        # sender: cell j holds my next kept[me, j, e] rows of each expert e, expert by expert
        kept_me = kept_all[me].astype(jnp.int32)  # [n_dst, E_l]
        start_me = (_exclusive_cumsum(counts_all[me].reshape(-1), 0).reshape(n, e_l) + sent_all[me]).astype(jnp.int32)
        ends = jnp.cumsum(kept_me, axis=1)  # [n_dst, E_l]
        slot_expert = jnp.sum(p[None, None, :] >= ends[:, :, None], axis=1)  # [n_dst, P]; E_l: empty slot
        e_c = jnp.minimum(slot_expert, e_l - 1)
        rank = p[None, :] - jnp.take_along_axis(ends - kept_me, e_c, axis=1)  # [n_dst, P]
        source_row = jnp.take_along_axis(start_me, e_c, axis=1) + rank  # [n_dst, P]
        # receiver: the cells from every source, ordered by (local expert, source, position)
        kept_in = kept_all[:, me].astype(jnp.int32)  # [n_src, E_l]
        ends_in = jnp.cumsum(kept_in, axis=1)
        recv_expert = jnp.sum(p[None, None, :] >= ends_in[:, :, None], axis=1).reshape(-1)  # [n_src * P]
        order = jnp.argsort(recv_expert, stable=True).astype(jnp.int32)  # [R]
        return {"source_row": jnp.where(slot_expert < e_l, source_row, -1),  # [n_dst, P]; -1: empty
                "order": order, "row_expert": jnp.minimum(recv_expert[order], e_l - 1).astype(jnp.int32),
                "group_sizes": jnp.sum(kept_in, axis=0).astype(jnp.int32)}

    def _a2a(self, x: Array) -> Array:
        return tiled_all_to_all(x, self.axes) if self.axes else x

    def to_experts(self, x: Array, layout: dict[str, Array]) -> Array:
        """[A, ...] my rows -> [R, ...] my experts' rows (zeros past the groups)."""
        src = layout["source_row"]  # [n, P]
        send = jnp.take(x, jnp.maximum(src, 0), axis=0)  # [n, P, ...]
        send = jnp.where((src >= 0).reshape(*src.shape, *[1] * (x.ndim - 1)), send, jnp.zeros((), x.dtype))
        recv = self._a2a(send)  # [n_src, P, ...]
        return recv.reshape(-1, *x.shape[1:])[layout["order"]]  # [R, ...]

    def to_home(self, y: Array, out: Array, layout: dict[str, Array]) -> Array:
        """[R, ...] outputs -> written into ``out [A, ...]`` at the rows' places."""
        src = layout["source_row"]  # [n, P]
        cells = jnp.zeros_like(y).at[layout["order"]].set(y, unique_indices=True)  # [n_src * P, ...]
        back = self._a2a(cells.reshape(*src.shape, *y.shape[1:]))  # [n_dst, P, ...]
        where = jnp.where(src >= 0, src, out.shape[0]).reshape(-1)  # out of bounds: dropped
        return out.at[where].set(back.reshape(-1, *y.shape[1:]).astype(out.dtype), mode="drop")


def ragged_exchange_offsets(counts_all: Array, me: Array, kept_all: Array | None = None,
                            sent_all: Array | None = None) -> dict[str, Array]:
    """Offsets and sizes of the two ragged all-to-alls, from everyone's counts.

    ``counts_all[i, j, e]``: rows device i sends to local expert e of device j
    ([n_src, n_dst, E_l]). Slices are indexed ``s = peer * E_l + e``. Each device keeps its
    rows sorted by global expert ``j * E_l + e``, so on the sender::

        send_offset[i, j, e] = sum of counts_all[i] (flattened) before (j, e) + sent_all[i, j, e]

    and on the receiver the rows land ordered by (local expert, source)::

        recv_offset[i, j, e] = sum_{e' < e} sum_{i'} kept_all[i', j, e']
                               + sum_{i' < i} kept_all[i', j, e]

    Forward (me sends to j): input ``send_offset[me]``, sizes ``kept_all[me]``, output
    offsets (on j) ``recv_offset[me]``; I receive ``kept_all[:, me]``. The way home swaps
    the roles (input ``recv_offset[:, me]``, output ``send_offset[:, me]``).

    ``kept_all`` (None: everything) are this round's rows; ``sent_all`` (None: none)
    those of earlier rounds, so a chunk sends its next rows.
    """
    kept = counts_all if kept_all is None else kept_all
    n, _, e_l = counts_all.shape
    flat = counts_all.reshape(n, -1)  # [n_src, n_dst * E_l]
    send_offset = _exclusive_cumsum(flat, 1).reshape(counts_all.shape)  # [n_src, n_dst, E_l]
    if sent_all is not None:
        send_offset = send_offset + sent_all
    per_expert = jnp.sum(kept, axis=0)  # [n_dst, E_l]: group sizes on each receiver
    base = _exclusive_cumsum(per_expert, 1)  # [n_dst, E_l]
    recv_offset = base[None] + _exclusive_cumsum(kept, 0)  # [n_src, n_dst, E_l]
    mine = lambda x: x.reshape(-1).astype(jnp.int32)  # noqa: E731
    return {
        "fwd": (mine(send_offset[me]), mine(kept[me]), mine(recv_offset[me]), mine(kept[:, me])),
        "back": (mine(recv_offset[:, me]), mine(kept[:, me]), mine(send_offset[:, me]), mine(kept[me])),
        "group_sizes": per_expert[me].astype(jnp.int32),  # [E_l]
    }


@dataclasses.dataclass(frozen=True)
class RaggedExchange:
    """``jax.lax.ragged_all_to_all`` each way; a receiver takes at most R rows a round,
    shared over its (source, expert) chunks by :func:`fit_to_buffer`."""

    receive_rows: int  # R
    axes: tuple[str, ...]

    @classmethod
    def sized(cls, sizes: "ExchangeSizes", axes: tuple[str, ...]) -> "RaggedExchange":
        return cls(sizes.receive_rows, axes)

    def plan_round(self, remaining: Array) -> Array:
        """``remaining [n_src, n_dst, E_l]`` -> kept this round, same shape."""
        return jax.vmap(fit_to_buffer, in_axes=(1, None), out_axes=1)(remaining, self.receive_rows)

    def layout(self, counts_all: Array, sent_all: Array, kept_all: Array, me: Array) -> dict[str, Array]:
        offsets = ragged_exchange_offsets(counts_all, me, kept_all, sent_all)
        ends = jnp.cumsum(offsets["group_sizes"])  # [E_l]
        row_expert = jnp.searchsorted(ends, jnp.arange(self.receive_rows), side="right")  # [R]
        return {**offsets, "row_expert": jnp.minimum(row_expert, ends.shape[0] - 1).astype(jnp.int32)}

    def _ragged(self, x, output, offsets):
        ragged = jax.lax.ragged_all_to_all if platform.has_ragged_all_to_all() else ragged_all_to_all_emulated
        return ragged(x, output, *offsets, axis_name=self.axes)

    def to_experts(self, x: Array, layout: dict[str, Array]) -> Array:
        return self._ragged(x, jnp.zeros((self.receive_rows, *x.shape[1:]), x.dtype), layout["fwd"])  # [R, ...]

    def to_home(self, y: Array, out: Array, layout: dict[str, Array]) -> Array:
        # into a zero buffer, then added: each row comes home in exactly one round
        back = self._ragged(y.astype(out.dtype), jnp.zeros_like(out), layout["back"])  # [A, ...]
        return out + back


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


ROW_EXCHANGES: Registry[type] = Registry("dropless_exchange", fallback="padded",
                                         auto={"gpu": "ragged", "tpu": "ragged"})
ROW_EXCHANGES.register("padded", PaddedExchange)
ROW_EXCHANGES.register("ragged", RaggedExchange)
