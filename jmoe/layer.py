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
from jmoe.balancing import ExpertLoad, SelectionBias
from jmoe.compat import in_capture
from jmoe.experts import Activation, ExpertBank, Shared, SharedExpert, ZeroExperts, as_activation
from jmoe.forward import Pipeline, moe_forward
from jmoe.checks import int_at_least
from jmoe.options import CapacityOptions, DroplessOptions, MeshOptions, check_combination, check_layer

Array = jax.Array


def sown_aux(sown, *, pop: bool = True) -> dict[str, Array]:
    """The aux values that ``sow_aux=True`` layers sowed, each summed over the layers and
    calls. ``sown``: the model (its ``nnx.Intermediate`` variables; ``pop``: removed, ready
    for the next step) or the intermediates ``nnx.capture(model, nnx.Intermediate)`` returned.
    The losses are then what a model adds to its objective: ``lb_weight * out["load_balancing_loss"]``."""
    if isinstance(sown, nnx.Module):
        sown = nnx.pop(sown, nnx.Intermediate) if pop else nnx.state(sown, nnx.Intermediate)
    totals: dict[str, Array] = {}
    for path, variable in nnx.to_flat_state(sown):
        name = str(path[-1])  # the aux key the layer sowed under; the value is a tuple, one per call
        values = variable.get_value() if hasattr(variable, "get_value") else variable
        for value in values:
            totals[name] = totals[name] + value if name in totals else value
    return totals


class RouterBuffer(nnx.Variable):
    """A router's fixed table (e.g. :class:`jmoe.routing.TokenHash`'s ``token_experts``): state that
    is neither a parameter nor trained; it is saved with ``nnx.state`` and loaded with a checkpoint."""


def sow_aux(module: nnx.Module, aux: dict[str, Array]) -> None:
    """Record ``aux`` as ``nnx.Intermediate`` values of ``module``, one tuple entry per call.

    Inside ``nnx.capture(model, nnx.Intermediate)`` (Flax's way of extracting intermediates)
    this is ``module.sow``, and capture returns them. Outside a capture, where Flax deprecates
    ``sow``, the module keeps them as its own ``nnx.Intermediate`` variables (what ``sow`` did
    there), for :func:`sown_aux` to collect from the model or ``nnx.bridge.ToLinen``'s
    ``intermediates`` collection."""
    for name, value in aux.items():
        if in_capture(module):
            module.sow(nnx.Intermediate, name, value)
        elif hasattr(module, name):
            variable = getattr(module, name)
            variable.set_value(variable.get_value() + (value,))
        else:
            setattr(module, name, nnx.Intermediate((value,)))


def router_stream(rngs: nnx.Rngs, router: routing.Router) -> nnx.RngStream:
    """The random stream of a router that draws: ``rngs``'s ``router`` stream, else its
    ``default`` one, else a clear error."""
    for name in ("router", "default"):
        if name in rngs:
            return rngs[name].fork()
    raise ValueError(f"router={router.name!r} draws random numbers in train mode ({router.draws_random}): give "
                     f"rngs a 'router' (or 'default') stream, e.g. nnx.Rngs(params=0, router=1); it has "
                     f"{sorted(rngs)}")


def group_size_for(x: Array, group_size: int | None, train: bool) -> int:
    """Tokens per routing group for ``x`` ([B, S, d] or [T, d]): ``group_size`` (default:
    the sequence length S, or all T tokens of a 2-D input). In eval mode, a 3-D input whose
    token count ``group_size`` does not divide, with ``S < group_size`` (a decode step
    ``[B, 1, d]``), is routed one sequence per group."""
    if x.ndim not in (2, 3):
        raise ValueError(f"MoE input must be [B, S, d] or [T, d], got shape {x.shape}")
    num_tokens = x.size // x.shape[-1]
    if group_size is None:
        return x.shape[-2]
    if group_size >= 1 and num_tokens % group_size == 0:
        return group_size
    if not train and x.ndim == 3 and x.shape[1] < group_size:
        return x.shape[1]
    raise ValueError(f"the token count {num_tokens} (input shape {x.shape}) is not divisible "
                     f"by group_size={group_size}")


def group_tokens(x: Array, group_size: int | None) -> tuple[Array, tuple[int, ...]]:
    """[B, S, d] or [T, d] -> [G, group_size, d] (row-major, as in train mode), and x's shape."""
    size = group_size_for(x, group_size, train=True)
    return x.reshape(-1, size, x.shape[-1]), x.shape


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


def check_router_input(router_input: Array, x: Array, width: int) -> Array:
    """A floating-point array of x's shape with ``width`` for d, else a clear error."""
    if not jnp.issubdtype(router_input.dtype, jnp.floating):
        raise ValueError(f"router_input must be floating point, got {router_input.dtype}")
    if router_input.shape != (*x.shape[:-1], width):
        raise ValueError(f"router_input must have shape {(*x.shape[:-1], width)} (x's tokens, router_d_model="
                         f"{width}), got {router_input.shape}")
    return router_input


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
      router: a name of :data:`jmoe.routing.ROUTERS` (that router with its defaults) or a
        configured router object, a :class:`jmoe.routing.Router` (``TokensChoose``: Switch /
        GShard / top-k, the default; ``ExpertsChoose``; ``NoisyTopK``, Shazeer et al. 2017;
        ``GroupLimited``: sigmoid / softmax / sqrt-softplus scores, the group limit, the selection
        bias, DeepSeek-V2/V3/V4, Llama 4; ``TokenHash``: experts by token id, with ``token_ids=``
        at the call; ``SparseMixer``: Phi-3.5-MoE; ``SharedSink``: group-limited routing that also weights
        the shared experts, Inkling; or a user's own subclass). Every router option lives on the
        router object (priority, normalize, jitter, router_bias, scale_expert_input, ...);
        ``k`` is the layer's and binds the router (:func:`jmoe.routing.as_router`). A router
        with ``selection_bias=True`` adds the state ``selection_bias [E]`` and the load it
        balances, ``expert_load [E]`` (:func:`jmoe.update_selection_biases`).
      activation: the experts' activation, a name of :data:`jmoe.experts.ACTIVATIONS` or a
        configured :class:`jmoe.experts.Activation` (e.g. GPT-OSS's
        ``Activation("clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=7.0)``).
      use_bias: biases in the expert FFNs (gated: on the gate, the up and the down projection).
      shared: the shared expert (DeepSeek-MoE, Qwen2-MoE, Llama 4), a :class:`jmoe.experts.Shared`
        (its width, Qwen2-MoE's gate, its activation: default the experts'): one dense FFN every
        token goes through, added to the routed output; None: no shared expert. On a mesh its
        hidden dim is split over ``model``, never over the expert axes.
      zero_experts: zero-computation experts (LongCat-Flash), a :class:`jmoe.experts.ZeroExperts`:
        the router chooses among the E FFN experts and these (identity: ``w x``; constant: ``w c``,
        ``zero_constants [constant, d]``), routed like the others; None: none.
      dispatch: a name of :data:`jmoe.dispatch.BACKENDS` (``"auto"``: the platform's
        choice). All compute the same function (:mod:`jmoe.dispatch`).
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
        (:mod:`jmoe.parallel.dropless_exchange`); with ``hierarchical_a2a`` one
        row per (token, node) across ``expert_outer``
        (:mod:`jmoe.parallel.node_exchange`); no ``a2a_chunks > 1``.
      dropless_exchange: how a dropless layer on a mesh moves rows, a name of
        :data:`jmoe.parallel.DROPLESS_EXCHANGES` (``"auto"``: the platform's choice).
      dropless_buffer_factor: a dropless layer on a mesh: c >= 1 sizes every exchange
        buffer to about c x its T_l * k rows per device and round, whatever the mesh size
        (None: ``jmoe.parallel.DEFAULT_BUFFER_FACTOR``; c = 1 holds perfectly balanced
        routing). Rows that do not fit go in further rounds of the same step
        (``aux["exchange_rounds"]``). No effect on one device.
      dropless_overflow: ``"rounds"`` (default: deliver every assignment, more rounds under
        skew, nothing dropped) or ``"drop"`` (one round, a fixed step time: assignments that
        do not fit are dropped like capacity drops, each (source, expert) chunk keeping up to
        a common cap, and counted in ``dropped_fraction``).
      grouped_matmul: a dropless layer's grouped matmul, a name of
        :data:`jmoe.grouped_matmul.GROUPED_MATMULS` (``"auto"``: the platform's choice;
        each implementation's module says what it needs and what was measured).
      router_d_model: the width of the router's own input, for a layer whose router reads
        another array than its experts (``router_input=`` at the call; a ``router_weight
        [router_d_model, E]``): Nemotron-H's and Muse Spark's experts read a projection of the
        hidden state the router reads. None: ``d_model`` (the router reads x, or a
        ``router_input`` of x's width).
      sow_aux: return y alone and record the aux values as ``nnx.Intermediate`` (a drop-in MLP
        for ``nnx.Sequential``; :func:`sow_aux`): collect them with
        ``nnx.capture(model, nnx.Intermediate)`` (Flax's way) or from the model, and sum them
        with :func:`sown_aux`.
      rngs: ``params`` stream for init; only a router that draws random numbers (jitter,
        GShard's random policy, noisy top-k) needs the ``router`` stream (else ``default``).
      expert_axes, model_axis: the mesh axes that hold the experts / split each expert's
        hidden dim, when they are not named ``("expert_outer", "expert")`` / ``"model"``.
        Every other mesh axis holds tokens. A mesh known at construction (``mesh=`` or
        ``jax.set_mesh``) also gives the parameters their ``out_sharding`` metadata, so
        they are created in place and ``nnx.get_partition_spec`` reports it.
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
        router: str | routing.Router = routing.DEFAULT_ROUTER,
        activation: str | Activation = "gelu",
        use_bias: bool = False,
        shared: Shared | None = None,
        zero_experts: ZeroExperts | None = None,
        dispatch: str = "auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        deterministic: bool = False,
        mesh: jax.sharding.Mesh | None = None,
        expert_axes: tuple[str, ...] | None = None,
        model_axis: str | None = None,
        hierarchical_a2a: bool = False,
        a2a_chunks: int = 1,
        dropless_exchange: str = "auto",
        grouped_matmul: str = "auto",
        dropless_buffer_factor: float | None = None,
        dropless_overflow: str = "rounds",
        router_d_model: int | None = None,
        sow_aux: bool = False,
        rngs: nnx.Rngs,
    ):
        check_layer(d_model, d_ff, num_experts, dtype, param_dtype)
        self.router_d_model = d_model if router_d_model is None else router_d_model
        int_at_least("router_d_model", self.router_d_model, 1)
        self.router = routing.as_router(router, k)
        if self.router.jitter_experts and self.router_d_model != d_model:
            raise ValueError(f"jitter_experts=True multiplies the experts' input by the router's jitter draw, "
                             f"which has the router input's width: it needs router_d_model == d_model, got "
                             f"router_d_model={self.router_d_model}, d_model={d_model}")
        activation = as_activation(activation)
        if shared is not None and not isinstance(shared, Shared):
            raise TypeError(f"shared must be a jmoe.experts.Shared (or None), got {shared!r}")
        self.capacity_options = CapacityOptions(capacity_factor, eval_capacity_factor, min_capacity,
                                                capacity_multiple_of)
        self.dropless_options = DroplessOptions(grouped_matmul, dropless_exchange, dropless_buffer_factor,
                                                dropless_overflow)
        self.mesh_options = MeshOptions(mesh, hierarchical_a2a, a2a_chunks, expert_axes, model_axis)
        self.zero_experts = zero_experts
        self.num_choices = num_experts + (0 if zero_experts is None else zero_experts.count)  # what the router picks
        check_combination(self.router, self.num_choices, self.capacity_options, self.dropless_options,
                          self.mesh_options, dispatch, dtype, shared)
        self.d_model, self.num_experts, self.group_size = d_model, num_experts, group_size
        self.dispatch, self.dtype, self.deterministic = dispatch, dtype, deterministic
        self.sow_aux = sow_aux

        mesh, axes = self._mesh_axes()
        shared_d_ff = None if shared is None else shared.d_ff
        if mesh is not None:  # the mesh is known: check what needs only the sizes, then place the weights
            parallel.check_mesh(axes, num_experts=num_experts, num_groups=0, d_ff=d_ff,
                                hierarchical=hierarchical_a2a and parallel.uses_mesh(mesh, axes), shared_d_ff=shared_d_ff)
        placed_on = mesh if self.mesh_options.mesh else None
        sharding = {} if mesh is None else parallel.param_sharding(axes, placed_on)
        self._init_router_state(rngs, d_model, param_dtype, sharding)  # router_weight [router_d_model, E]
        self.experts = ExpertBank(
            num_experts, d_model, d_ff, activation=activation, use_bias=use_bias,
            dtype=dtype, param_dtype=param_dtype, sharding=sharding, rngs=rngs,
        )
        if shared is not None:
            self.shared_expert = SharedExpert(
                d_model, shared.d_ff, activation=shared.activation_for(activation), gate=shared.gate, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs,
                sharding={} if mesh is None else parallel.param_sharding(axes, placed_on, shared=True),
            )
        self.rngs = router_stream(rngs, self.router) if self.router.draws_random else None

    def _init_router_state(self, rngs: nnx.Rngs, d_model: int, param_dtype, sharding: dict) -> None:
        """The router's weights (``router_weight [d, E]`` float32, ...: parameters, selection-bias
        state or buffers as the router says), the load a selection bias balances, and the constant
        zero-computation experts' vectors ``zero_constants [constant, d]``."""
        for name, value in self.router.init_params(rngs.params(), self.router_d_model, self.num_choices).items():
            kind = (SelectionBias if name in self.router.state_params else
                    RouterBuffer if name in self.router.buffers else nnx.Param)
            setattr(self, name, kind(value, **sharding.get(name, {})))
        if hasattr(self, "selection_bias"):  # the load its bias update balances
            self.expert_load = ExpertLoad(jnp.zeros((self.num_choices,), jnp.float32),
                                          **sharding.get("selection_bias", {}))
        if self.zero_experts is not None and self.zero_experts.constant:
            self.zero_constants = nnx.Param(jnp.zeros((self.zero_experts.constant, d_model), param_dtype))

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
        slots = self._slots(group_size)
        return group_size if slots is None else slots

    def _slots(self, group_size: int) -> int | None:
        """C in the current mode (train / eval); None for a dropless layer."""
        return self.capacity_options.slots(group_size, self.num_choices, self.router.k, not self.deterministic)

    def _pipeline(self, group_size: int) -> Pipeline:
        """What the forward computes for groups of ``group_size`` tokens in the current mode."""
        shared = self.shared_expert.activation if hasattr(self, "shared_expert") else None
        return Pipeline(self.router, self._slots(group_size), self.experts.activation, self.dtype, self.dispatch,
                        self.dropless_options.grouped_matmul, shared, self.zero_experts, self.num_experts)

    def params(self) -> dict:
        """``{"router": {name: [d, E] float32, ...}, "experts": {w_in: [E, d, f], ...}}``, and
        ``"shared": {w_in: [d, F], ...}`` with a shared expert."""
        names = (*self.router.params, "zero_constants")  # the constant experts' vectors travel with the router's
        params = {"router": {name: getattr(self, name)[...] for name in names if hasattr(self, name)},
                  "experts": self.experts.params()}
        if hasattr(self, "shared_expert"):
            params["shared"] = self.shared_expert.params()
        return params

    def draws(self, groups_shape: tuple[int, ...]) -> dict[str, Array]:
        """The router's random draws for groups ``[G, S, d]`` (none in eval mode), over the
        global shapes (the router input's width): the mesh path shards them, so it matches one device."""
        if self.deterministic or self.rngs is None:
            return {}
        return self.router.draw(self.rngs, (*groups_shape[:2], self.router_d_model), self.num_choices)

    def router_inputs(self, groups_shape: tuple[int, ...], token_ids: Array | None,
                      router_input: Array | None = None) -> dict[str, Array]:
        """What the router reads besides the tokens, per token ``[G, S, ...]``: its random draws,
        for a router that routes by token id ``token_ids [G, S]``, and the router's own input
        ``router_input [G, S, router_d_model]`` when given (it then routes on it, not on x)."""
        inputs = self.draws(groups_shape)
        if router_input is not None:
            inputs["router_input"] = router_input.reshape(*groups_shape[:2], self.router_d_model)
        elif self.router_d_model != self.d_model:
            raise ValueError(f"this layer's router reads an input of its own (router_d_model={self.router_d_model}, "
                             f"d_model={self.d_model}): call it with router_input= [..., {self.router_d_model}]")
        if not self.router.needs_token_ids:
            return inputs
        if token_ids is None:
            raise ValueError(f"router={self.router.name!r} routes by token id: call the layer with token_ids= "
                             f"(the input's shape without d, integers)")
        self.router.check_token_ids(token_ids)
        return {**inputs, "token_ids": token_ids.reshape(groups_shape[:2])}

    def route(self, groups: Array, token_mask: Array | None = None, token_ids: Array | None = None,
              router_input: Array | None = None) -> routing.RoutingPlan:
        """groups [G, S, d] -> the routing plan (router logits in float32)."""
        return self.router.route(self.params()["router"], groups,
                                 self.router_inputs(groups.shape, token_ids, router_input), token_mask,
                                 self.capacity(groups.shape[1]))

    def __call__(self, x: Array, *, token_mask: Array | None = None, token_ids: Array | None = None,
                 router_input: Array | None = None):
        """x [B, S, d] or [T, d] -> (y of x's shape and dtype, aux losses and metrics); with
        ``sow_aux=True`` only y, the aux values sown as ``nnx.Intermediate`` (:func:`sown_aux`).

        ``token_mask`` (x's shape without d) marks padding tokens with False:
        they take no expert slot, get output 0, and are left out of the losses.
        ``token_ids`` (x's shape without d, integers): the tokens' vocabulary ids, for a router
        that routes by them (``TokenHash``); the other routers ignore them.
        ``router_input`` (x's shape with ``router_d_model`` for d, floating point): what the
        router reads instead of x (the experts still read x): Gemma 4 routes on the residual
        stream while its experts read a normed copy; needed when ``router_d_model != d_model``.
        """
        check_input(x, self.d_model)
        if token_mask is not None:
            check_token_mask(token_mask, x)
        if token_ids is not None and token_ids.shape != x.shape[:-1]:
            raise ValueError(f"token_ids must have shape {x.shape[:-1]}, got {token_ids.shape}")
        if router_input is not None:
            check_router_input(router_input, x, self.router_d_model)
        group_size = group_size_for(x, self.group_size, not self.deterministic)
        groups_shape = (x.size // (group_size * self.d_model), group_size, self.d_model)  # [G, S, d]
        router_inputs = self.router_inputs(groups_shape, token_ids, router_input)
        forward = functools.partial(moe_forward, self._pipeline(group_size))
        mesh, axes = self._mesh_axes(x)
        if parallel.uses_mesh(mesh, axes):  # under shard_map: expert / model parallel, or an explicit mesh
            y, aux = parallel.forward_on_mesh(
                forward, mesh, axes, self.params(), x, token_mask, router_inputs, group_size=group_size,
                hierarchical=self.mesh_options.hierarchical_a2a, a2a_chunks=self.mesh_options.a2a_chunks,
                dropless_exchange=self.dropless_options.exchange, buffer_factor=self.dropless_options.buffer_factor,
                overflow=self.dropless_options.overflow,
            )
        else:
            mask = None if token_mask is None else token_mask.reshape(groups_shape[:2])
            y, aux = forward(self.params(), x.reshape(groups_shape), mask, router_inputs)
        y, aux = y.reshape(x.shape).astype(x.dtype), routing.complete_aux(aux)
        if hasattr(self, "expert_load") and not self.deterministic:  # the load the next bias update balances
            self.expert_load[...] = self.expert_load[...] + aux["tokens_per_expert"]
        if not self.sow_aux:
            return y, aux
        sow_aux(self, aux)
        return y

    def _mesh_axes(self, x: Array | None = None) -> tuple:
        """The mesh the layer runs on (``mesh=``, the ambient one, or that of x's explicit
        sharding; None) and its axes' roles."""
        mesh = parallel.resolve_mesh(self.mesh_options.mesh, x)
        if mesh is None:
            return None, None
        return mesh, parallel.MeshAxes.of(mesh, self.mesh_options.expert_axes, self.mesh_options.model_axis)
