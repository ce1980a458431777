"""Elementwise functions that routers and experts share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.checks import positive_number


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """``cap * tanh(x / cap)``: ~x for |x| << cap, bounded to (-cap, cap) (Gemma 2's logit softcap)."""
    return cap * jnp.tanh(x / cap)


def check_softcap(name: str, cap: float | None) -> None:
    """None (no cap) or a finite number > 0, else a ValueError naming ``name``."""
    if cap is not None:
        positive_number(name, cap)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in float32 (an RMSNorm without its weight)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """An RMSNorm: ``x / sqrt(mean(x^2) + eps) * (offset + weight)`` over the last axis, in float32,
    cast to x's dtype (``weight`` broadcast to x)."""
    return (rms_normalize(x, eps) * (offset + weight.astype(jnp.float32))).astype(x.dtype)
