"""Aux-loss-free load balancing (DeepSeek-V3, Wang et al. 2024; DeepSeek-V3 report, section 2.1.2).

A router with a selection bias (``router="group_limited", selection_bias=True``) chooses
its experts on ``s + b`` while the combine weights stay the unbiased scores ``s``. The bias
``b [E]`` is *state*, not a parameter: no gradient reaches it and the optimizer never sees
it. After each optimizer step it moves against the load of that step's whole batch::

    b_e <- b_e + rate * sign(mean_j load_j - load_e)

(an overloaded expert is chosen less, an idle one more), ``load_e`` the assignments expert e
kept over the step's global batch (every device: the layer's ``aux["tokens_per_expert"]``,
summed over the step's train-mode calls).

In a Flax NNX training step::

    loss, grads = nnx.value_and_grad(loss_fn)(model)   # train-mode calls count each layer's load
    optimizer.update(model, grads)                     # wrt=nnx.Param: the biases are not in it
    jmoe.update_selection_biases(model, rate=1e-3)     # b += rate * sign(mean - load); load = 0

Both variables are ordinary NNX state (:class:`SelectionBias`, :class:`ExpertLoad`), so
``nnx.state(model)`` saves and restores them with a checkpoint. A train-mode call *writes*
``expert_load``: under a plain ``jax.jit``, pass the state in as an argument and merge it
inside (``jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))``), not closed over from
outside the trace, as NNX requires for any state a call mutates (BatchNorm's statistics
too); ``nnx.jit`` and the NNX transforms handle it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


class SelectionBias(nnx.Variable):
    """A router's selection bias ``b [E]`` (float32): read by the choice only; not a parameter."""


class ExpertLoad(nnx.Variable):
    """Assignments each expert kept ``[E]`` (float32) since the last bias update, summed over
    the train-mode calls (global over a mesh's devices)."""


def bias_update(bias: Array, load: Array, rate: float) -> Array:
    """``bias + rate * sign(mean(load) - load)`` over the last (expert) axis; leading axes
    (layers stacked with ``nnx.vmap``) are independent."""
    load = load.astype(jnp.float32)
    return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def update_selection_biases(model: nnx.Module, rate: float) -> int:
    """Apply :func:`bias_update` to every ``jmoe.MoE`` layer in ``model`` that has a selection
    bias, with the load it counted since the last update, then zero that count. ``rate`` is
    gamma (>= 0; 0 leaves the biases and only resets the counts). Returns the number of
    layers updated (stacked layers count once). Works inside ``nnx.jit``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
        raise ValueError(f"rate must be a number >= 0, got {rate!r}")
    updated = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and isinstance(getattr(module, "expert_load", None), ExpertLoad):
            load = module.expert_load[...]
            module.selection_bias[...] = bias_update(module.selection_bias[...], load, rate)
            module.expert_load[...] = jnp.zeros_like(load)
            updated += 1
    return updated
