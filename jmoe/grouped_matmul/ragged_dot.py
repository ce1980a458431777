"""XLA's grouped matmul, ``jax.lax.ragged_dot`` (autodiff gives its gradients).

XLA:CPU and XLA:GPU (the H100 we measured, jax 0.11.2) run it as E dense products over
all rows (BENCHMARKS.md); TPU has a native grouped matmul.
"""

from __future__ import annotations

import jax

Array = jax.Array


def ragged_dot_grouped_matmul(x: Array, w: Array, group_sizes: Array) -> Array:
    """``out[r] = x[r] @ w[g(r)]``: [N, K], [E, K, F], [E] -> [N, F], 0 past the groups."""
    return jax.lax.ragged_dot(x, w, group_sizes)
