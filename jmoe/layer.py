"""The MoE Flax NNX layer: a thin module over the one forward (:mod:`jmoe.forward`).

``y, aux = MoE(...)(x)`` with x ``[B, S, d]`` (or ``[T, d]``). Tokens are split
row-major into groups of ``group_size`` (default: one sequence per group, or
all T tokens for a 2-D input); capacity is per group and expert:
``expert_capacity(group_size, num_experts, k=k, capacity_factor=...)``, with
``capacity_factor`` in train mode and ``eval_capacity_factor`` after
``moe.eval()``. The router is a float32 ``[d, E]`` weight; its probabilities are
computed in float32 whatever the activation dtype.

A token dropped by every expert it chose gets output 0: the model's residual
connection carries it on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe import parallel, routing
from jmoe.experts import ExpertBank
from jmoe.forward import Pipeline, moe_forward
from jmoe.options import CapacityOptions, DroplessOptions, MeshOptions, check_combination, check_layer

Array = jax.Array


def group_tokens(x: Array, group_size: int | None) -> tuple[Array, tuple[int, ...]]:
    """[B, S, d] or [T, d] -> [G, group_size, d] (row-major), and the input's shape."""
    if x.ndim not in (2, 3):
        raise ValueError(f"MoE input must be [B, S, d] or [T, d], got shape {x.shape}")
    tokens = x.reshape(-1, x.shape[-1])  # [T, d]
    if group_size is None:
        group_size = x.shape[-2]
    if group_size < 1 or tokens.shape[0] % group_size:
        raise ValueError(
            f"the token count {tokens.shape[0]} (input shape {x.shape}) is not divisible "
            f"by group_size={group_size}"
        )
    return tokens.reshape(-1, group_size, x.shape[-1]), x.shape


def check_input(x: Array, d_model: int) -> Array:
    """``x`` if it is a floating-point ``[..., d_model]`` array with tokens, else a clear error."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"MoE input must be floating point, got {x.dtype} (cast it first: the output "
                         f"has the input's dtype)")
    if x.shape[-1] != d_model:
        raise ValueError(f"MoE input's last dim must be d_model={d_model}, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"MoE input has no tokens: shape {x.shape}")
    return x


def check_token_mask(token_mask: Array, x: Array) -> Array:
    """A boolean mask of ``x``'s shape without d, else a clear error."""
    if token_mask.dtype != jnp.bool_:
        raise ValueError(f"token_mask must be boolean (True = a real token), got {token_mask.dtype}")
    if token_mask.shape != x.shape[:-1]:
        raise ValueError(f"token_mask must have shape {x.shape[:-1]}, got {token_mask.shape}")
    return token_mask


class MoE(nnx.Module):
    """Sparse Mixture-of-Experts FFN with static-shape capacity routing.

    Args:
      d_model: token width d.
      d_ff: hidden width of each expert.
      num_experts: E.
      k: experts per token (tokens_choose); for experts_choose, the average
        number of experts per token that sets the capacity.
      capacity_factor / eval_capacity_factor: train / eval capacity factors.
        ``capacity_factor=None`` makes the layer *dropless* (MegaBlocks,
        :mod:`jmoe.dropless`): every (token, choice) is computed by a grouped
        matmul over expert-sorted rows; no capacity, no padding, no drops (in
        train and eval mode; ``eval_capacity_factor`` is then ignored).
      min_capacity, capacity_multiple_of: see :func:`jmoe.routing.expert_capacity`.
      group_size: tokens per routing group (default: the sequence length).
      router: a name of :data:`jmoe.routing.ROUTERS` (token choice: Switch / GShard /
        top-k, the default; expert choice; noisy top-k, Shazeer et al. 2017, with a
        second float32 weight ``noise_weight`` [d, E] and Gaussian noise on the logits in
        train mode only).
      activation: ``relu``, ``gelu``, ``swiglu``, ``geglu``.
      use_bias: biases in the expert FFNs.
      dispatch: a name of :data:`jmoe.dispatch.BACKENDS` (``"auto"``: the platform's
        choice). All compute the same function (:mod:`jmoe.dispatch`).
      priority, batch_prioritized, normalize, second_expert_policy: router
        options (:class:`jmoe.routing.token_choice.TokensChoose`; noisy top-k has the
        first two); None = the router's default. An option the router does not have is
        an error unless it is at its default.
      jitter: multiplicative router-input noise ``x * U(1 - jitter, 1 + jitter)``
        in train mode (Switch); 0 disables it.
      importance_loss_weight, load_loss_weight: coefficients (>= 0) of the
        noisy top-k importance and load losses (``aux["importance_loss"]``,
        ``aux["load_loss"]``, already weighted). Default None: the paper's 0.1.
        Every router's extra losses are in ``aux`` (0 for the routers without them).
      dtype: activation / expert compute dtype; param_dtype: expert weights.
      mesh, hierarchical_a2a, a2a_chunks: expert parallelism
        (:mod:`jmoe.parallel`). The mesh is ``mesh`` if given, else the ambient
        one of ``jax.set_mesh``; when its ``expert_outer x expert`` (or
        ``model``) size is > 1 the layer runs under ``jax.shard_map``: tokens
        sharded over (data, expert_outer, expert), experts over the expert
        axes, each expert's hidden dim over ``model``; same results as one
        device. ``hierarchical_a2a``: two-step all-to-all (needs
        ``expert_outer``); ``a2a_chunks``: split capacity into chunks to
        overlap exchange and expert compute (must divide C). A dropless layer
        on a mesh exchanges counts, then its assignment rows each way
        (:mod:`jmoe.parallel.dropless_exchange`); it supports neither
        ``hierarchical_a2a`` nor ``a2a_chunks > 1``.
      dropless_exchange: how a dropless layer on a mesh moves rows, a name of
        :data:`jmoe.parallel.DROPLESS_EXCHANGES` (``"auto"``: the platform's choice).
      dropless_buffer_factor: a dropless layer on a mesh: None (the default) sizes
        each device's receive buffer for the worst case (n x its T_l * k assignments:
        nothing is ever dropped; the ragged exchange's buffer is [n * T_l * k, d]);
        c >= 1 bounds it to ceil(c * T_l * k) rows (c = 1 holds perfectly balanced
        routing): assignments that don't fit are dropped like capacity drops (each
        (source, local expert) chunk keeps up to a common cap, a source its first
        rows) and counted in ``dropped_fraction``. No effect on one device.
      grouped_matmul: a dropless layer's grouped matmul, a name of
        :data:`jmoe.grouped_matmul.GROUPED_MATMULS` (``"auto"``: the platform's choice;
        each implementation's module says what it needs and what was measured).
      rngs: ``params`` stream for init; the ``router`` stream (falls back to
        ``default``) draws jitter and the GShard random policy in train mode.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        k: int = 1,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 1,
        capacity_multiple_of: int = 1,
        group_size: int | None = None,
        router: str = routing.DEFAULT_ROUTER,
        activation: str = "gelu",
        use_bias: bool = False,
        dispatch: str = "auto",
        priority: str | None = None,
        batch_prioritized: bool | None = None,
        normalize: bool | None = None,
        second_expert_policy: str | None = None,
        jitter: float = 0.0,
        importance_loss_weight: float | None = None,
        load_loss_weight: float | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        deterministic: bool = False,
        mesh: jax.sharding.Mesh | None = None,
        hierarchical_a2a: bool = False,
        a2a_chunks: int = 1,
        dropless_exchange: str = "auto",
        grouped_matmul: str = "auto",
        dropless_buffer_factor: float | None = None,
        rngs: nnx.Rngs,
    ):
        check_layer(d_model, d_ff, num_experts, dtype, param_dtype)
        router_options = dict(priority=priority, batch_prioritized=batch_prioritized, normalize=normalize,
                              second_expert_policy=second_expert_policy,
                              importance_loss_weight=importance_loss_weight, load_loss_weight=load_loss_weight)
        self.router = routing.make_router(router, k=k, jitter=jitter,
                                          **{n: v for n, v in router_options.items() if v is not None})
        self.capacity_options = CapacityOptions(capacity_factor, eval_capacity_factor, min_capacity,
                                                capacity_multiple_of)
        self.dropless_options = DroplessOptions(grouped_matmul, dropless_exchange, dropless_buffer_factor)
        self.mesh_options = MeshOptions(mesh, hierarchical_a2a, a2a_chunks)
        check_combination(self.router, num_experts, self.capacity_options, self.dropless_options,
                          self.mesh_options, dispatch, dtype)
        self.d_model, self.num_experts, self.group_size = d_model, num_experts, group_size
        self.dispatch, self.dtype, self.deterministic = dispatch, dtype, deterministic

        for name, value in self.router.init_params(rngs.params(), d_model, num_experts).items():
            setattr(self, name, nnx.Param(value))  # router_weight [d, E] float32, ...
        self.experts = ExpertBank(
            num_experts, d_model, d_ff, activation=activation, use_bias=use_bias,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.rngs = rngs["router"].fork()

    @property
    def k(self) -> int:
        return self.router.k

    @property
    def dropless(self) -> bool:
        return self.capacity_options.dropless

    def capacity(self, group_size: int) -> int:
        """Slots per expert and group for the current mode (train / eval).

        Dropless: ``group_size``, the most one expert can receive (a token's k
        experts are distinct), so the routing plan never drops.
        """
        slots = self.capacity_options.slots(group_size, self.num_experts, self.router.k, not self.deterministic)
        return group_size if slots is None else slots

    def pipeline(self, group_size: int) -> Pipeline:
        """What the forward computes for groups of ``group_size`` tokens in the current mode."""
        slots = self.capacity_options.slots(group_size, self.num_experts, self.router.k, not self.deterministic)
        return Pipeline(self.router, slots, self.experts.activation, self.dtype, self.dispatch,
                        self.dropless_options.grouped_matmul)

    def params(self) -> dict:
        """``{"router": {name: [d, E] float32}, "experts": {w_in: [E, d, f], ...}}``."""
        return {"router": {name: getattr(self, name)[...] for name in self.router.params},
                "experts": self.experts.params()}

    def draws(self, groups_shape: tuple[int, ...]) -> dict[str, Array]:
        """The router's random draws for groups ``[G, S, d]`` (none in eval mode), over the
        global shapes: the mesh path shards them, so it matches one device."""
        if self.deterministic:
            return {}
        return self.router.draw(self.rngs, groups_shape, self.num_experts)

    def route(self, groups: Array, token_mask: Array | None = None) -> routing.RoutingPlan:
        """groups [G, S, d] -> the routing plan (router logits in float32)."""
        return self.router.route(self.params()["router"], groups, self.draws(groups.shape), token_mask,
                                 self.capacity(groups.shape[1]))

    def __call__(self, x: Array, *, token_mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """x [B, S, d] or [T, d] -> (y of x's shape and dtype, aux losses and metrics).

        ``token_mask`` (x's shape without d) marks padding tokens with False:
        they take no expert slot, get output 0, and are left out of the losses.
        """
        groups, shape = group_tokens(check_input(x, self.d_model), self.group_size)  # [G, S, d]
        mask = None
        if token_mask is not None:
            mask = check_token_mask(token_mask, x).reshape(groups.shape[:2])
        forward = functools.partial(moe_forward, self.pipeline(groups.shape[1]))
        mesh = parallel.resolve_mesh(self.mesh_options.mesh)
        if parallel.uses_mesh(mesh):  # expert parallelism under shard_map
            y, aux = parallel.forward_on_mesh(
                forward, mesh, self.params(), groups, mask, self.draws(groups.shape),
                hierarchical=self.mesh_options.hierarchical_a2a, a2a_chunks=self.mesh_options.a2a_chunks,
                dropless_exchange=self.dropless_options.exchange, buffer_factor=self.dropless_options.buffer_factor,
            )
        else:
            y, aux = forward(self.params(), groups, mask, self.draws(groups.shape))
        return y.reshape(shape).astype(x.dtype), routing.complete_aux(aux)
