"""Dropless experts (MegaBlocks): every (token, choice) assignment is computed.

Instead of fixed-capacity slots, the T * K assignments of a batch are sorted by
expert (a stable sort, so results are deterministic), the experts run as one
grouped matrix product over the sorted rows with per-expert group sizes
(:data:`GROUPED_MATMULS`: ``jax.lax.ragged_dot``, the item loop of
:mod:`jmoe.grouped_matmul`, its Pallas kernels, or JAX's Mosaic GPU kernels for
Hopper), and the outputs are unsorted and combined:

    y[t] = sum_k w[t, k] * FFN_{e[t, k]}(x[t])

over the assignments with a non-zero weight. Shapes stay static: the sorted
buffer is always ``[T * K, d]``; only the group sizes are data. There is no
padding and nothing is dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.experts import ACTIVATIONS, GATED
from jmoe.grouped_matmul import scan_grouped_matmul

Array = jax.Array

# How the grouped matmul runs (each computes ``rows[r] @ w[g(r)]``, 0 past the groups):
#   "ragged_dot": XLA's jax.lax.ragged_dot. XLA:CPU and XLA:GPU (the H100 we measured,
#                 jax 0.11.2) run it as E dense products over all rows (BENCHMARKS.md).
#   "scan":       jmoe.grouped_matmul, a lax.scan over (row tile, expert) items: each row
#                 once, plus at most E partial tiles. 7.6x faster than ragged_dot for a
#                 dropless layer fwd+bwd on CPU (BENCHMARKS.md); not yet timed on a GPU.
#   "pallas":     jmoe.pallas.grouped_matmul, the same schedule as Triton kernels; tested
#                 in interpret mode, not yet run on a GPU (interpreted off GPU: slow).
#   "mosaic":     jmoe.pallas.mosaic_grouped_matmul: the Hopper (sm_90) kernels JAX ships
#                 (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu: TMA + wgmma) under
#                 jmoe's VJP; bf16/f16 only. Tested in Mosaic GPU's interpret mode (the
#                 backward needs jax >= 0.11 there), not yet run on a GPU. It multiplies
#                 row tiles past the groups too (not stored): on an expert mesh, bound
#                 the receive buffer (dropless_buffer_factor).
#   "auto":       scan on CPU (measured), ragged_dot elsewhere (TPU has a native grouped
#                 matmul; on GPU nothing else has been measured yet).
GROUPED_MATMULS = ("auto", "ragged_dot", "scan", "pallas", "mosaic")


def resolve_grouped_matmul(name: str) -> str:
    if name not in GROUPED_MATMULS:
        raise ValueError(f"grouped_matmul must be one of {GROUPED_MATMULS}, got {name!r}")
    if name == "auto":
        return "scan" if jax.default_backend() == "cpu" else "ragged_dot"
    return name


def _grouped_dot(rows: Array, w: Array, group_sizes: Array, matmul: str) -> Array:
    """``rows[r] @ w[g(r)]``: [N, K], [E, K, F] -> [N, F], 0 past the groups."""
    matmul = resolve_grouped_matmul(matmul)
    if matmul == "pallas":
        from jmoe.pallas.grouped_matmul import grouped_matmul  # Triton import only when asked

        return grouped_matmul(rows, w.astype(rows.dtype), group_sizes)
    if matmul == "mosaic":
        from jmoe.pallas.mosaic_grouped_matmul import mosaic_grouped_matmul  # Mosaic GPU import only when asked

        return mosaic_grouped_matmul(rows, w.astype(rows.dtype), group_sizes)
    if matmul == "scan":
        return scan_grouped_matmul(rows, w, group_sizes)
    return jax.lax.ragged_dot(rows, w, group_sizes)


def sort_by_expert(token_expert: Array, num_experts: int) -> tuple[Array, Array]:
    """Stable sort of the flattened assignments by expert.

    Args:
      token_expert: [T, K] int32.
    Returns:
      order [T * K] int32 (assignment index a = t * K + k, in expert order) and
      group_sizes [E] int32 (assignments per expert).
    """
    flat = token_expert.reshape(-1)  # [T * K]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # [T * K]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
    return order, group_sizes


def grouped_ffn(rows: Array, row_expert: Array, group_sizes: Array, params: dict[str, Array], activation: str,
                matmul: str = "auto") -> Array:
    """The expert FFNs on rows sorted by expert: ``[N, d] -> [N, d]``.

    Row n belongs to expert ``row_expert[n]``; rows of one expert are contiguous and
    ``group_sizes[e]`` of them belong to expert e. Same math as
    :func:`jmoe.experts.expert_ffn`, one grouped matmul per projection (``matmul``:
    one of :data:`GROUPED_MATMULS`).
    """
    act = ACTIVATIONS[activation]
    h = _grouped_dot(rows, params["w_in"], group_sizes, matmul)  # [N, f]
    if "b_in" in params:
        h = h + params["b_in"][row_expert]
    if activation in GATED:
        h = act(_grouped_dot(rows, params["w_gate"], group_sizes, matmul)) * h
    else:
        h = act(h)
    y = _grouped_dot(h, params["w_out"], group_sizes, matmul)  # [N, d]
    if "b_out" in params:
        y = y + params["b_out"][row_expert]
    return y


def dropless_experts(
    tokens: Array,
    token_expert: Array,
    token_weight: Array,
    params: dict[str, Array],
    activation: str,
    matmul: str = "auto",
) -> Array:
    """``y[t] = sum_k token_weight[t, k] * FFN_{token_expert[t, k]}(tokens[t])``.

    Args:
      tokens: [T, d].
      token_expert: [T, K] int32.
      token_weight: [T, K] float32 (0 for an assignment that must not count,
        e.g. a padding token: it is not computed).
      params: stacked expert weights (see :func:`jmoe.experts.expert_ffn`).
      matmul: grouped matmul implementation (:data:`GROUPED_MATMULS`).
    Returns:
      [T, d] in the tokens' dtype, accumulated in float32.
    """
    num_tokens, k = token_expert.shape
    num_experts = params["w_in"].shape[0]
    # Weight-0 assignments (padding tokens, skipped 2nd choices) get expert id E: sorted
    # last, past every group, so a grouped matmul that skips such rows never computes them.
    routed = jnp.where(token_weight != 0, token_expert, num_experts)  # [T, K]
    order, group_sizes = sort_by_expert(routed, num_experts)  # [T*K], [E]
    rows = tokens[order // k]  # [T*K, d] sorted by expert
    row_expert = jnp.minimum(routed.reshape(-1)[order], num_experts - 1)  # [T*K] (biases of rows past the groups: unused)
    out_sorted = grouped_ffn(rows, row_expert, group_sizes, params, activation, matmul)  # [T*K, d]
    return unsort_and_combine(out_sorted, order, token_weight, tokens.dtype)


def unsort_and_combine(out_sorted: Array, order: Array, token_weight: Array, dtype) -> Array:
    """Expert-ordered outputs ``[T*K, d]`` (row i is assignment ``order[i]``) ->
    ``y[t] = sum_k token_weight[t, k] * out[t, k]`` ``[T, d]``, summed in float32; an
    assignment with weight 0 contributes exactly 0."""
    num_tokens, k = token_weight.shape
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted, unique_indices=True)  # [T*K, d] assignment order
    out = out.reshape(num_tokens, k, -1).astype(jnp.float32)  # [T, K, d]
    kept = (token_weight != 0)[..., None]
    y = jnp.sum(jnp.where(kept, token_weight[..., None] * out, 0.0), axis=1)  # [T, d]
    return y.astype(dtype)
