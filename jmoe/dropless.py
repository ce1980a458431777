"""Dropless experts (MegaBlocks): every (token, choice) assignment is computed.

Instead of fixed-capacity slots, the T * K assignments of a batch are sorted by
expert (a stable sort, so results are deterministic), the experts run as one
grouped matrix product over the sorted rows with per-expert group sizes
(``jax.lax.ragged_dot``, or the Pallas kernel :mod:`jmoe.pallas.grouped_matmul`),
and the outputs are unsorted and combined:

    y[t] = sum_k w[t, k] * FFN_{e[t, k]}(x[t])

over the assignments with a non-zero weight. Shapes stay static: the sorted
buffer is always ``[T * K, d]``; only the group sizes are data. There is no
padding and nothing is dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.experts import ACTIVATIONS, GATED

Array = jax.Array

# How the grouped matmul runs: XLA's ragged_dot, or the Pallas (Triton) kernel pair that
# computes each row once (XLA's GPU ragged_dot did E dense products on the H100 we
# measured; BENCHMARKS.md). "auto" is ragged_dot everywhere until a GPU run has shown the
# Pallas kernels compiled, correct and faster (benchmarks/gpu_check.sh measures both);
# "pallas" is opt-in (interpreted off GPU: slow, for tests).
GROUPED_MATMULS = ("auto", "ragged_dot", "pallas")


def resolve_grouped_matmul(name: str) -> str:
    if name not in GROUPED_MATMULS:
        raise ValueError(f"grouped_matmul must be one of {GROUPED_MATMULS}, got {name!r}")
    return "ragged_dot" if name == "auto" else name


def _grouped_dot(rows: Array, w: Array, group_sizes: Array, matmul: str) -> Array:
    """``rows[r] @ w[g(r)]``: [N, K], [E, K, F] -> [N, F], 0 past the groups."""
    if resolve_grouped_matmul(matmul) == "pallas":
        from jmoe.pallas.grouped_matmul import grouped_matmul  # Triton import only when asked

        return grouped_matmul(rows, w.astype(rows.dtype), group_sizes)
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
        e.g. a padding token).
      params: stacked expert weights (see :func:`jmoe.experts.expert_ffn`).
      matmul: grouped matmul implementation (:data:`GROUPED_MATMULS`).
    Returns:
      [T, d] in the tokens' dtype, accumulated in float32.
    """
    num_tokens, k = token_expert.shape
    num_experts = params["w_in"].shape[0]
    order, group_sizes = sort_by_expert(token_expert, num_experts)  # [T*K], [E]
    rows = tokens[order // k]  # [T*K, d] sorted by expert
    row_expert = token_expert.reshape(-1)[order]  # [T*K]
    out_sorted = grouped_ffn(rows, row_expert, group_sizes, params, activation, matmul)  # [T*K, d]
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted, unique_indices=True)  # [T*K, d] assignment order
    out = out.reshape(num_tokens, k, -1).astype(jnp.float32)  # [T, K, d]
    kept = (token_weight != 0)[..., None]
    y = jnp.sum(jnp.where(kept, token_weight[..., None] * out, 0.0), axis=1)  # [T, d]
    return y.astype(tokens.dtype)
