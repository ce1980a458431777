"""A bank of E independent expert FFNs held as stacked weights.

Plain FFN (``relu``, ``gelu``):   ``y_e = act(x W_in[e] + b_in[e]) W_out[e] + b_out[e]``
Gated FFN (``swiglu``, ``geglu``): ``y_e = (act(x W_gate[e]) * (x W_in[e])) W_out[e]``
with ``act`` = silu for swiglu and gelu for geglu (Shazeer 2020).

Weights are ``[E, d, f]`` and ``[E, f, d]``: each projection is one batched
matmul over experts, never a Python loop. Each expert is initialised like a
dense FFN: truncated normal with variance ``1 / fan_in`` per projection.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "swiglu": jax.nn.silu,
    "geglu": jax.nn.gelu,
}
GATED = ("swiglu", "geglu")


def expert_ffn(x: Array, params: dict[str, Array], activation: str, model_axis: str | None = None) -> Array:
    """The bank's math as a pure function of stacked weights.

    Args:
      x: [E, N, d] tokens already dispatched to each expert.
      params: ``w_in [E, d, f]``, ``w_out [E, f, d]``, gated: ``w_gate [E, d, f]``,
        optional ``b_in [E, f]``, ``b_out [E, d]``.
      model_axis: inside ``shard_map``, the mesh axis the hidden dim f is split over
        (:func:`sum_over_model`), or None.
    Returns:
      [E, N, d].
    """
    act = ACTIVATIONS[activation]
    h = jnp.einsum("end,edf->enf", x, params["w_in"])  # [E, N, f]
    if "b_in" in params:
        h = h + params["b_in"][:, None, :]
    if activation in GATED:
        h = act(jnp.einsum("end,edf->enf", x, params["w_gate"])) * h
    else:
        h = act(h)
    y = sum_over_model(jnp.einsum("enf,efd->end", h, params["w_out"]), model_axis)  # [E, N, d]
    if "b_out" in params:
        y = y + params["b_out"][:, None, :]
    return y


def sum_over_model(y_partial: Array, model_axis: str | None) -> Array:
    """The FFN output from the shards of its hidden dim: ``y = sum_j act(x W_in[:, f_j])
    W_out[f_j, :]`` (the activation is elementwise in f, so each shard f_j computes its
    part and one ``psum`` over ``model_axis`` adds them, before the output bias)."""
    return y_partial if model_axis is None else jax.lax.psum(y_partial, model_axis)


def _stacked_init(key: Array, shape: tuple[int, ...], dtype) -> Array:
    """Truncated normal with variance 1 / fan_in, fan_in = shape[-2] (per expert)."""
    init = jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )
    return init(key, shape, dtype)


class ExpertBank(nnx.Module):
    """E expert FFNs as stacked weights; ``__call__(x [E, N, d]) -> [E, N, d]``."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "gelu",
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        sharding: dict[str, dict] | None = None,
        rngs: nnx.Rngs,
    ):
        """``sharding``: Flax variable metadata per weight name (``out_sharding``, ...)."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if min(num_experts, d_model, d_ff) < 1:
            raise ValueError(
                f"num_experts, d_model and d_ff must be >= 1, got {num_experts}, {d_model}, {d_ff}"
            )
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.dtype = dtype
        e, d, f = num_experts, d_model, d_ff
        meta = (sharding or {}).get
        self.w_in = nnx.Param(_stacked_init(rngs.params(), (e, d, f), param_dtype), **meta("w_in", {}))
        if activation in GATED:
            self.w_gate = nnx.Param(_stacked_init(rngs.params(), (e, d, f), param_dtype), **meta("w_gate", {}))
        self.w_out = nnx.Param(_stacked_init(rngs.params(), (e, f, d), param_dtype), **meta("w_out", {}))
        if use_bias:
            self.b_in = nnx.Param(jnp.zeros((e, f), param_dtype), **meta("b_in", {}))
            self.b_out = nnx.Param(jnp.zeros((e, d), param_dtype), **meta("b_out", {}))

    def params(self) -> dict[str, Array]:
        """The weights as a plain dict (in the compute dtype), for :func:`expert_ffn`."""
        names = ("w_in", "w_gate", "w_out", "b_in", "b_out")
        return {n: getattr(self, n)[...].astype(self.dtype) for n in names if hasattr(self, n)}

    def __call__(self, x: Array) -> Array:
        if x.ndim != 3 or x.shape[0] != self.num_experts or x.shape[2] != self.d_model:
            raise ValueError(
                f"expert inputs must be [E={self.num_experts}, N, d={self.d_model}], got {x.shape}"
            )
        return expert_ffn(x.astype(self.dtype), self.params(), self.activation)
