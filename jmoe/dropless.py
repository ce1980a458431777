"""Dropless experts (MegaBlocks): every (token, choice) assignment is computed.

Instead of fixed-capacity slots, the T * K assignments of a batch are sorted by
expert (a stable sort, so results are deterministic), the experts run as one
grouped matrix product over the sorted rows with per-expert group sizes
(any of :data:`jmoe.grouped_matmul.GROUPED_MATMULS`), and the outputs are unsorted and combined:

    y[t] = sum_k w[t, k] * FFN_{e[t, k]}(x[t])

over the assignments with a non-zero weight. Shapes stay static: the sorted
buffer is always ``[T * K, d]``; only the group sizes are data. There is no
padding and nothing is dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.experts import Activation, as_activation, sum_over_model
from jmoe.grouped_matmul import grouped_matmul

Array = jax.Array

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


def grouped_ffn(rows: Array, row_expert: Array, group_sizes: Array, params: dict[str, Array],
                activation: str | Activation,
                matmul: str = "auto", model_axis: str | None = None) -> Array:
    """The expert FFNs on rows sorted by expert: ``[N, d] -> [N, d]``.

    Row n belongs to expert ``row_expert[n]``; rows of one expert are contiguous and
    ``group_sizes[e]`` of them belong to expert e. Same math as
    :func:`jmoe.experts.expert_ffn` (``model_axis`` too), one grouped matmul per
    projection (``matmul``: a name of :data:`jmoe.grouped_matmul.GROUPED_MATMULS`).
    """
    act = as_activation(activation)
    up = grouped_matmul(rows, params["w_in"], group_sizes, matmul)  # [N, f]
    if "b_in" in params:
        up = up + params["b_in"][row_expert]
    gate = None
    if act.gated:
        gate = grouped_matmul(rows, params["w_gate"], group_sizes, matmul)  # [N, f]
        if "b_gate" in params:
            gate = gate + params["b_gate"][row_expert]
    h = act(up, gate)  # [N, f]
    y = sum_over_model(grouped_matmul(h, params["w_out"], group_sizes, matmul), model_axis)  # [N, d]
    if "b_out" in params:
        y = y + params["b_out"][row_expert]
    if act.output_norm is not None:  # after the sum over the model axis: the norm reads all of d
        weight = params["norm_weight"][row_expert] if "norm_weight" in params else params["tied_norm_weight"]
        y = act.output_norm(y, weight)  # [N, d]
    return y


def sort_routed(token_expert: Array, token_weight: Array, num_experts: int) -> tuple[Array, Array, Array]:
    """The assignments that count, in expert order: ``(order [A], group_sizes [E],
    routed [T, K])``, A = T * K. Weight-0 assignments (padding tokens, skipped 2nd choices)
    get expert id E in ``routed``: sorted last, past every group and in no count."""
    routed = jnp.where(token_weight != 0, token_expert, num_experts)  # [T, K]
    order, group_sizes = sort_by_expert(routed, num_experts)  # [A], [E]
    return order, group_sizes, routed


def sort_assignments(tokens: Array, token_expert: Array, token_weight: Array,
                     num_experts: int) -> tuple[Array, Array, Array, Array]:
    """The assignments in expert order: ``(order [A], group_sizes [E], rows [A, d],
    routed [A])``, A = T * K.

    Weight-0 assignments (padding tokens, skipped 2nd choices) get expert id E: sorted
    last, past every group and in no count, so a grouped matmul that skips such rows never
    computes them and an exchange never sends them. ``routed`` is each sorted row's expert
    id (E for those).
    """
    k = token_expert.shape[1]
    order, group_sizes, routed = sort_routed(token_expert, token_weight, num_experts)  # [A], [E], [T, K]
    rows = tokens[order // k]  # [A, d] sorted by expert
    return order, group_sizes, rows, routed.reshape(-1)[order]


def dropless_experts(
    tokens: Array,
    token_expert: Array,
    token_weight: Array,
    params: dict[str, Array],
    activation: str | Activation,
    matmul: str = "auto",
) -> Array:
    """``y[t] = sum_k token_weight[t, k] * FFN_{token_expert[t, k]}(tokens[t])``.

    Args:
      tokens: [T, d].
      token_expert: [T, K] int32.
      token_weight: [T, K] float32 (0 for an assignment that must not count,
        e.g. a padding token: it is not computed).
      params: stacked expert weights (see :func:`jmoe.experts.expert_ffn`).
      matmul: a name of :data:`jmoe.grouped_matmul.GROUPED_MATMULS`.
    Returns:
      [T, d] in the tokens' dtype, accumulated in float32.
    """
    num_experts = params["w_in"].shape[0]
    order, group_sizes, rows, routed = sort_assignments(tokens, token_expert, token_weight, num_experts)
    row_expert = jnp.minimum(routed, num_experts - 1)  # [T*K] (biases of rows past the groups: unused)
    out_sorted = grouped_ffn(rows, row_expert, group_sizes, params, activation, matmul)  # [T*K, d]
    return unsort_and_combine(out_sorted, order, token_weight, tokens.dtype)


def unsort_and_combine(out_sorted: Array, order: Array, token_weight: Array, dtype) -> Array:
    """Expert-ordered outputs ``[T*K, d]`` (row i is assignment ``order[i]``) ->
    ``y[t] = sum_k token_weight[t, k] * out[t, k]`` ``[T, d]``, summed in float32; an
    assignment with weight 0 contributes exactly 0 (its output is never NaN or inf: it is
    never computed) and gets no gradient."""
    num_tokens, k = token_weight.shape
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted, unique_indices=True)  # [T*K, d] assignment order
    weight = jnp.where(token_weight != 0, token_weight, 0.0).astype(jnp.float32)  # [T, K]: no gradient where 0
    return weighted_sum(out.reshape(num_tokens, k, -1), weight).astype(dtype)  # [T, d]


@jax.custom_vjp
def weighted_sum(out: Array, weight: Array) -> Array:
    """``y[t] = sum_k weight[t, k] * out[t, k]`` in float32: ``out [T, K, d]`` (any float
    dtype), ``weight [T, K]`` float32 -> ``[T, d]`` float32. The backward keeps ``out`` in
    its own dtype (a bf16 layer keeps bf16 rows, not a float32 copy) and the weights."""
    return jnp.einsum("tk,tkd->td", weight, out.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def _weighted_sum_fwd(out, weight):
    return weighted_sum(out, weight), (out, weight)


def _weighted_sum_bwd(res, dy):
    out, weight = res
    d_out = (weight[..., None] * dy[:, None, :]).astype(out.dtype)  # [T, K, d]
    d_weight = jnp.einsum("tkd,td->tk", out.astype(jnp.float32), dy, precision=jax.lax.Precision.HIGHEST)
    return d_out, d_weight


weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)
