"""The MoE Flax NNX layer: router -> plan -> dispatch -> experts -> combine.

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

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe import dispatch as dispatch_lib
from jmoe import dropless
from jmoe import noisy
from jmoe import parallel
from jmoe import routing
from jmoe.experts import ExpertBank

Array = jax.Array

ROUTERS = ("tokens_choose", "experts_choose", "noisy_top_k")


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
      router: ``"tokens_choose"`` (Switch/GShard/top-k), ``"experts_choose"``
        or ``"noisy_top_k"`` (Shazeer et al. 2017, :mod:`jmoe.noisy`: a second
        float32 weight ``noise_weight`` [d, E], zero-initialised as in the
        paper; Gaussian noise ``eps * softplus(x W_noise)`` on the logits in
        train mode only; combine weights = softmax over the noisy top k, so
        ``normalize`` has no effect; ``second_expert_policy`` must be "all").
      activation: ``relu``, ``gelu``, ``swiglu``, ``geglu``.
      use_bias: biases in the expert FFNs.
      dispatch: ``"auto"`` (pallas on GPU, else gather), ``"einsum"``,
        ``"gather"`` or ``"pallas"`` (:mod:`jmoe.pallas`; interpreted off GPU).
        All compute the same function (:mod:`jmoe.dispatch`).
      priority, batch_prioritized, normalize, second_expert_policy: router
        options of :func:`jmoe.routing.tokens_choose`.
      jitter: multiplicative router-input noise ``x * U(1 - jitter, 1 + jitter)``
        in train mode (Switch); 0 disables it.
      importance_loss_weight, load_loss_weight: coefficients (>= 0) of the
        noisy top-k importance and load losses (``aux["importance_loss"]``,
        ``aux["load_loss"]``, already weighted). Default None: the paper's 0.1
        for ``router="noisy_top_k"``; other routers report both losses as 0
        and reject a non-zero coefficient.
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
        (:func:`jmoe.parallel.dropless_exchange_experts`); it supports neither
        ``hierarchical_a2a`` nor ``a2a_chunks > 1``.
      dropless_exchange: how a dropless layer on a mesh moves rows:
        ``"ragged"`` (``jax.lax.ragged_all_to_all``, only the valid rows; on CPU
        an all_gather emulation for tests), ``"padded"`` (worst-case
        ``all_to_all``), ``"auto"`` = ragged on GPU / TPU, padded elsewhere.
      dropless_buffer_factor: a dropless layer on a mesh: None (the default) sizes
        each device's receive buffer for the worst case (n x its T_l * k assignments:
        nothing is ever dropped; the ragged exchange's buffer is [n * T_l * k, d]);
        c >= 1 bounds it to ceil(c * T_l * k) rows (c = 1 holds perfectly balanced
        routing): assignments that don't fit are dropped like capacity drops (each
        (source, local expert) chunk keeps up to a common cap, a source its first
        rows) and counted in ``dropped_fraction``. No effect on one device.
      grouped_matmul: a dropless layer's grouped matmul: ``"ragged_dot"``
        (``jax.lax.ragged_dot``), ``"scan"`` (:mod:`jmoe.grouped_matmul`: a loop
        over row tiles, each row computed once), ``"pallas"``
        (:mod:`jmoe.pallas.grouped_matmul`, interpreted off GPU; not yet measured on
        a GPU), ``"mosaic"`` (JAX's Hopper kernels, :mod:`jmoe.pallas.mosaic_grouped_matmul`;
        bf16 / f16 ``dtype``; not yet measured on a GPU); ``"auto"`` = scan on CPU, ragged_dot elsewhere
        (:data:`jmoe.dropless.GROUPED_MATMULS` says why).
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
        router: str = "tokens_choose",
        activation: str = "gelu",
        use_bias: bool = False,
        dispatch: str = "auto",
        priority: str = "choice",
        batch_prioritized: bool = False,
        normalize: bool = False,
        second_expert_policy: str = "all",
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
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
        self.dropless = capacity_factor is None
        if self.dropless and router == "experts_choose":
            raise ValueError("capacity_factor=None (dropless) needs a tokens-choose router, not 'experts_choose'")
        for name, factor in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if factor is None and self.dropless:
                continue
            if not factor > 0:
                raise ValueError(f"{name} must be > 0, got {factor}")
        if priority not in routing.PRIORITIES:
            raise ValueError(f"priority must be one of {routing.PRIORITIES}, got {priority!r}")
        if second_expert_policy not in routing.SECOND_EXPERT_POLICIES:
            raise ValueError(
                f"second_expert_policy must be one of {routing.SECOND_EXPERT_POLICIES}, got {second_expert_policy!r}"
            )
        if second_expert_policy == "random" and k != 2:
            raise ValueError(f"second_expert_policy='random' needs k=2, got k={k}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if router == "noisy_top_k" and second_expert_policy != "all":
            raise ValueError(f"router='noisy_top_k' needs second_expert_policy='all', got {second_expert_policy!r}")
        noisy_weights = {}
        for name, weight in (("importance_loss_weight", importance_loss_weight), ("load_loss_weight", load_loss_weight)):
            if weight is not None and not weight >= 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
            if weight and router != "noisy_top_k":
                raise ValueError(f"{name}={weight} needs router='noisy_top_k', got router={router!r}")
            default = 0.1 if router == "noisy_top_k" else 0.0
            noisy_weights[name] = float(default if weight is None else weight)
        dispatch_lib.resolve_backend(dispatch)  # fails early on an unknown name
        dropless.resolve_grouped_matmul(grouped_matmul)  # fails early on an unknown name
        if grouped_matmul == "mosaic":
            from jmoe.pallas.mosaic_grouped_matmul import HALF_DTYPES  # Mosaic GPU import only when asked

            if not any(jnp.dtype(dtype) == half for half in HALF_DTYPES):
                raise ValueError(f"grouped_matmul='mosaic' (wgmma) needs dtype bfloat16 or float16, got "
                                 f"{jnp.dtype(dtype)}")
        if dropless_buffer_factor is not None:
            if not self.dropless:
                raise ValueError(f"dropless_buffer_factor={dropless_buffer_factor} is for a dropless layer "
                                 f"(capacity_factor=None), got capacity_factor={capacity_factor}")
            parallel.receive_buffer_rows(1, 1, dropless_buffer_factor)  # fails early on c < 1
        if dropless_exchange not in parallel.DROPLESS_EXCHANGES:
            raise ValueError(f"dropless_exchange must be one of {parallel.DROPLESS_EXCHANGES}, got {dropless_exchange!r}")

        self.d_model, self.d_ff, self.num_experts, self.k = d_model, d_ff, num_experts, k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.capacity_multiple_of = min_capacity, capacity_multiple_of
        self.group_size = group_size
        self.router = router
        self.dispatch = dispatch
        self.priority, self.batch_prioritized = priority, batch_prioritized
        self.normalize, self.second_expert_policy = normalize, second_expert_policy
        self.jitter = jitter
        self.importance_loss_weight = noisy_weights["importance_loss_weight"]
        self.load_loss_weight = noisy_weights["load_loss_weight"]
        self.dtype = dtype
        self.deterministic = deterministic
        self.mesh, self.hierarchical_a2a, self.a2a_chunks = mesh, hierarchical_a2a, a2a_chunks
        self.dropless_exchange = dropless_exchange
        self.grouped_matmul = grouped_matmul
        self.dropless_buffer_factor = dropless_buffer_factor

        self.router_weight = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), (d_model, num_experts), jnp.float32)
        )
        if router == "noisy_top_k":
            self.noise_weight = nnx.Param(jnp.zeros((d_model, num_experts), jnp.float32))  # W_noise
        self.experts = ExpertBank(
            num_experts, d_model, d_ff, activation=activation, use_bias=use_bias,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.rngs = rngs["router"].fork()

    def capacity(self, group_size: int) -> int:
        """Slots per expert and group for the current mode (train / eval).

        Dropless: ``group_size``, the most one expert can receive (a token's k
        experts are distinct), so the routing plan never drops.
        """
        if self.dropless:
            return group_size
        factor = self.eval_capacity_factor if self.deterministic else self.capacity_factor
        return routing.expert_capacity(
            group_size, self.num_experts, k=self.k, capacity_factor=factor,
            min_capacity=self.min_capacity, multiple_of=self.capacity_multiple_of,
        )

    def draw_router_noise(self, groups_shape: tuple[int, ...]) -> tuple[Array | None, Array | None, Array | None]:
        """The router's random draws for groups ``[G, S, d]``, always in this order.

        Returns ``(jitter [G, S, d] | None, eps [G, S, E] | None, second_uniform [G, S]
        | None)``: the multiplicative jitter ``U(1 - jitter, 1 + jitter)``; noisy
        top-k's standard normal ``eps``; the ``U[0, 1)`` draws of GShard's random
        2nd-expert policy. All None in eval mode. The expert-parallel path draws the
        same over the global shapes and shards them, so it matches one device.
        """
        if self.deterministic:
            return None, None, None
        jitter = eps = second_uniform = None
        if self.jitter > 0:
            jitter = jax.random.uniform(
                self.rngs(), groups_shape, minval=1.0 - self.jitter, maxval=1.0 + self.jitter
            )  # [G, S, d]
        if self.router == "noisy_top_k":
            eps = jax.random.normal(self.rngs(), (*groups_shape[:2], self.num_experts), jnp.float32)
        elif self.second_expert_policy == "random":
            second_uniform = jax.random.uniform(self.rngs(), groups_shape[:2])  # [G, S]
        return jitter, eps, second_uniform

    def plan_from_logits(
        self,
        logits: Array,
        token_mask: Array | None = None,
        *,
        noise_logits: Array | None = None,
        eps: Array | None = None,
        second_uniform: Array | None = None,
    ) -> routing.RoutingPlan:
        """The layer's router on float32 logits ``[G, S, E]`` -> the routing plan.

        A pure function of its inputs: ``noise_logits`` (``x W_noise``) and ``eps``
        feed noisy top-k; ``second_uniform`` [G, S] (None: keep every 2nd choice)
        feeds GShard's random policy. Both the one-device path and, per device, the expert-parallel path
        call it, so a router is wired in here only.
        """
        capacity = self.capacity(logits.shape[1])
        if self.router == "experts_choose":
            capacity = min(capacity, logits.shape[1])  # an expert takes each token at most once
            return routing.experts_choose(logits, capacity=capacity, token_mask=token_mask)
        if self.router == "noisy_top_k":
            return noisy.noisy_top_k(
                logits, noise_logits, k=self.k, capacity=capacity, eps=eps,
                importance_weight=self.importance_loss_weight, load_weight=self.load_loss_weight,
                priority=self.priority, batch_prioritized=self.batch_prioritized, token_mask=token_mask,
            )
        return routing.tokens_choose(
            logits, k=self.k, capacity=capacity, priority=self.priority,
            batch_prioritized=self.batch_prioritized, normalize=self.normalize,
            token_mask=token_mask, second_expert_policy="all" if second_uniform is None else "random",
            second_uniform=second_uniform,
        )

    def route(self, groups: Array, token_mask: Array | None = None) -> routing.RoutingPlan:
        """groups [G, S, d] -> the routing plan (router logits in float32)."""
        jitter, eps, second_uniform = self.draw_router_noise(groups.shape)
        router_in = groups.astype(jnp.float32)  # [G, S, d]
        if jitter is not None:
            router_in = router_in * jitter
        logits = router_in @ self.router_weight[...]  # [G, S, E] float32
        noise_logits = router_in @ self.noise_weight[...] if self.router == "noisy_top_k" else None
        return self.plan_from_logits(logits, token_mask, noise_logits=noise_logits, eps=eps,
                                     second_uniform=second_uniform)

    def __call__(self, x: Array, *, token_mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """x [B, S, d] or [T, d] -> (y of x's shape and dtype, aux losses and metrics).

        ``token_mask`` (x's shape without d) marks padding tokens with False:
        they take no expert slot, get output 0, and are left out of the losses.
        """
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE input's last dim must be d_model={self.d_model}, got shape {x.shape}")
        groups, shape = group_tokens(x, self.group_size)  # [G, S, d]
        mask = None
        if token_mask is not None:
            if token_mask.shape != x.shape[:-1]:
                raise ValueError(f"token_mask must have shape {x.shape[:-1]}, got {token_mask.shape}")
            mask = token_mask.reshape(groups.shape[:2])
        mesh = parallel.resolve_mesh(self.mesh)
        if parallel.uses_mesh(mesh):  # expert parallelism under shard_map
            y, aux = parallel.moe_layer_on_mesh(self, groups, mask, mesh)
            return y.reshape(shape).astype(x.dtype), aux
        plan = self.route(groups, mask)
        if self.dropless:
            tokens = groups.reshape(-1, self.d_model).astype(self.dtype)  # [T, d]
            y = dropless.dropless_experts(
                tokens, plan.token_expert.reshape(tokens.shape[0], -1),
                plan.token_weight.reshape(tokens.shape[0], -1), self.experts.params(), self.experts.activation,
                self.grouped_matmul,
            )  # [T, d]
            return y.reshape(shape).astype(x.dtype), {**plan.aux(), "padding_fraction": jnp.zeros((), jnp.float32)}
        backend = dispatch_lib.get_backend(self.dispatch)
        expert_in = backend.dispatch(groups.astype(self.dtype), plan)  # [E, G * C, d]
        expert_out = self.experts(expert_in)  # [E, G * C, d]
        y = backend.combine(expert_out, plan)  # [G, S, d]
        return y.reshape(shape).astype(x.dtype), plan.aux()
