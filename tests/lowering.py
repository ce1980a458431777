"""Lowering a layer for an accelerator without one (the kernel lowering tests share it)."""

import jax
import jax.numpy as jnp
from flax import nnx

import jmoe


def dropless_layer_grad_text(grouped_matmul: str, platform: str) -> str:
    """The StableHLO text of d(sum y^2)/d(params, x) of the bf16 SwiGLU dropless layer (d 256,
    f 512, E 8, top-2) with ``grouped_matmul``, lowered for ``platform`` ("cuda", "tpu")."""
    layer = nnx.eval_shape(lambda: jmoe.MoE(256, 512, num_experts=8, k=2, capacity_factor=None, dtype=jnp.bfloat16,
                                            grouped_matmul=grouped_matmul, activation="swiglu", deterministic=True,
                                            rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    x = jax.ShapeDtypeStruct((4, 128, 256), jnp.bfloat16)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, x).lower(lowering_platforms=(platform,)).as_text()
