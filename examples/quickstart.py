"""A jmoe.MoE layer inside your own Flax NNX model: one train step on random data."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jmoe


class Block(nnx.Module):
    """Pre-norm residual block whose FFN is a Switch (top-1) MoE."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.moe = jmoe.MoE(d_model, 4 * d_model, num_experts=8, k=1, capacity_factor=1.25, rngs=rngs)

    def __call__(self, x):  # x [B, S, d]
        y, aux = self.moe(self.norm(x))
        return x + y, aux  # dropped tokens pass through the residual


model = Block(64, rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, target):
    def loss_fn(model):
        y, aux = model(x)
        return jnp.mean((y - target) ** 2) + 0.01 * aux["load_balancing_loss"] + 0.001 * aux["z_loss"], aux

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, aux


x = jax.random.normal(jax.random.key(1), (4, 32, 64))  # [B, S, d]
for step in range(5):
    loss, aux = train_step(model, optimizer, x, jnp.roll(x, 1, axis=-1))
    print(f"step {step}: loss {float(loss):.4f}  dropped {float(aux['dropped_fraction']):.3f}  "
          f"tokens/expert {aux['tokens_per_expert'].astype(int).tolist()}")
