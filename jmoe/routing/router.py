"""The router base: what every router shares (flaxformer's one base, V-MoE's
router-returns-a-plan).

A router is a frozen dataclass of its options (validated in ``__post_init__``) with

* ``init_params(key, d_model, num_experts)``: its float32 weights by name
  (``router_weight [d, E]`` for all, ``router_bias [E]`` with ``router_bias=True``; a
  router may add its own); the names in ``state_params`` are state, not parameters:
  no gradient reaches them and the optimizer never sees them (a selection bias);
* ``draw(key_fn, groups_shape, num_experts)``: its random draws in train mode, over
  the *global* ``[G, S, ...]`` shapes (the mesh path shards them over the token axes,
  so a mesh routes exactly as one device);
* ``route(params, groups, draws, token_mask, capacity) -> RoutingPlan``: done once here:
  the float32 router input r (the tokens x, or ``draws["router_input"] [G, S, d_r]`` when the
  layer was called with ``router_input=``: Gemma 4 routes on the residual stream while its
  experts read a normed copy, Nemotron-H / Muse Spark on the hidden state their experts see
  projected), multiplicative jitter ``r * U(1 - jitter, 1 + jitter)`` (Switch), with
  ``input_norm_eps=eps`` the RMS-normalised input ``r / sqrt(mean(r^2) + eps) * g / sqrt(d_r)``
  (Gemma 4; ``g = router_input_scale [d_r]``, a parameter), the router matmul ``logits = r W_r``
  (``+ b_r`` with ``router_bias=True``, GPT-OSS), times ``logit_multiplier`` (Muse Spark), with
  ``logit_softcap=c`` the softcap ``logits = c tanh(logits / c)`` (Laguna); then the
  subclass's :meth:`Router.plan` from the logits (its losses read the capped ones); with
  ``per_expert_scale=True`` each chosen expert's combine weight times its own learned scale,
  ``w *= expert_scale[e]`` (``expert_scale [E]``, a parameter; Gemma 4), after the plan's
  normalisation (the losses read the unscaled probabilities).

``scale_expert_input=True`` (Llama 4; k = 1): the chosen expert's combine weight
multiplies its *input* instead of its output, ``y = FFN_e(w * x)``
(:meth:`Router.expert_inputs`, which the forward calls between routing and the experts).
``jitter_experts=True``: the jitter multiplies the FFN experts' input too, the same draw as the
router's (the block's input jittered: Phi-3.5-MoE's ``input_jitter_noise``).

A router's own losses travel in ``RoutingPlan.extra_losses`` under the names in its
``extra_losses`` class attribute. A router with ``needs_token_ids`` reads the token ids the layer
was called with (``token_ids=``) as ``draws["token_ids"] [G, S]``, beside its random draws (so a
mesh shards them like the tokens), and checks them in :meth:`Router.check_token_ids`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.checks import positive_number
from jmoe.elementwise import check_softcap, rms_normalize, softcap
from jmoe.routing.plan import RoutingPlan

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Router:
    """Options every router has: ``jitter`` (0 disables it), ``jitter_experts``, ``router_bias``,
    ``scale_expert_input``, ``logit_softcap`` (None: no cap), ``input_norm_eps`` (None: the raw
    input), ``logit_multiplier``, ``per_expert_scale`` (the module docstring's ``route``); and
    ``k`` (experts per token, for expert choice the average that
    sets the capacity), which is the *layer's*: ``jmoe.MoE(k=...)`` binds its router to it
    (:func:`jmoe.routing.as_router`), so a router object given to the layer leaves ``k`` unset
    (None) or equal to the layer's."""

    name: ClassVar[str] = ""
    params: ClassVar[tuple[str, ...]] = ("router_weight", "router_bias", "router_input_scale",
                                         "expert_scale")  # what init_params may return
    state_params: ClassVar[tuple[str, ...]] = ()  # of those, state that no gradient or optimizer touches
    buffers: ClassVar[tuple[str, ...]] = ()  # of those, fixed tables (not parameters, no gradient)
    needs_token_ids: ClassVar[bool] = False  # plan reads draws["token_ids"] [G, S] (the layer's token_ids=)
    extra_losses: ClassVar[tuple[str, ...]] = ()
    supports_dropless: ClassVar[bool] = True
    supports_input_scaling: ClassVar[bool] = True

    k: int | None = None
    jitter: float = 0.0
    router_bias: bool = False
    scale_expert_input: bool = False
    logit_softcap: float | None = None
    input_norm_eps: float | None = None
    logit_multiplier: float = 1.0
    per_expert_scale: bool = False
    jitter_experts: bool = False

    def __post_init__(self):
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k={self.k!r} must be an integer >= 1")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        check_softcap("logit_softcap", self.logit_softcap)
        if self.input_norm_eps is not None:
            positive_number("input_norm_eps", self.input_norm_eps)
        positive_number("logit_multiplier", self.logit_multiplier)
        if self.jitter_experts and not self.jitter > 0:
            raise ValueError("jitter_experts=True multiplies the experts' input by the router's jitter draw: it "
                             f"needs jitter > 0, got jitter={self.jitter}")
        if self.scale_expert_input and not self.supports_input_scaling:
            raise ValueError(f"scale_expert_input=True needs a router whose tokens choose one expert, "
                             f"got router={self.name!r}")
        if self.scale_expert_input and self.k not in (None, 1):
            raise ValueError(f"scale_expert_input=True (Llama 4) scales the one chosen expert's input: it needs "
                             f"k=1, got k={self.k}")

    @property
    def draws_random(self) -> str:
        """What the router draws in train mode ("" when nothing): it then needs a random stream."""
        return "jitter" if self.jitter > 0 else ""

    def check_experts(self, num_experts: int) -> None:
        if self.k > num_experts:
            raise ValueError(f"k={self.k} must be in [1, num_experts={num_experts}]")

    @property
    def weighted_shared_experts(self) -> int:
        """How many shared experts the router weights per token (``plan.shared_weight [G, S, n]``,
        :class:`jmoe.routing.SharedSink`); 0: none, the shared expert is added unweighted."""
        return 0

    def check_token_ids(self, token_ids: Array) -> None:
        """Token ids as the router needs them, else a clear error (only for ``needs_token_ids``)."""

    def init_params(self, key: Array, d_model: int, num_experts: int) -> dict[str, Array]:
        """``d_model``: the router input's width (the layer's ``router_d_model``)."""
        params = {"router_weight": nnx.initializers.lecun_normal()(key, (d_model, num_experts), jnp.float32)}
        if self.router_bias:
            params["router_bias"] = jnp.zeros((num_experts,), jnp.float32)  # [E]
        if self.input_norm_eps is not None:
            params["router_input_scale"] = jnp.ones((d_model,), jnp.float32)  # [d_r]
        if self.per_expert_scale:
            params["expert_scale"] = jnp.ones((num_experts,), jnp.float32)  # [E]
        return params

    def draw(self, key_fn: Callable[[], Array], groups_shape: tuple[int, ...], num_experts: int) -> dict[str, Array]:
        """Train-mode draws for groups ``[G, S, d]``: ``jitter [G, S, d]`` when jitter > 0."""
        if self.jitter <= 0:
            return {}
        return {"jitter": jax.random.uniform(key_fn(), groups_shape, minval=1.0 - self.jitter,
                                             maxval=1.0 + self.jitter)}  # [G, S, d]

    def route(self, params: dict[str, Array], groups: Array, draws: dict[str, Array], token_mask: Array | None,
              capacity: int) -> RoutingPlan:
        """groups [G, S, d] (and ``draws["router_input"] [G, S, d_r]``, read instead when there) ->
        the routing plan (router logits in float32; the module docstring's ``route``)."""
        router_in = draws.get("router_input", groups).astype(jnp.float32)  # [G, S, d_r]
        if "jitter" in draws:
            router_in = router_in * draws["jitter"]
        if self.input_norm_eps is not None:
            scale = params["router_input_scale"] * router_in.shape[-1] ** -0.5  # [d_r]
            router_in = rms_normalize(router_in, self.input_norm_eps) * scale
        logits = router_in @ params["router_weight"]  # [G, S, E] float32
        if "router_bias" in params:
            logits = logits + params["router_bias"]
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        if self.logit_softcap is not None:
            logits = softcap(logits, self.logit_softcap)
        plan = self.plan(logits, router_in, params, draws, token_mask, capacity)
        if not self.per_expert_scale:
            return plan
        scale = params["expert_scale"].astype(jnp.float32)[plan.token_expert]  # [G, S, K]
        return plan.replace(token_weight=plan.token_weight * scale)

    def expert_inputs(self, groups: Array, plan: RoutingPlan,
                      draws: dict[str, Array] | None = None) -> tuple[Array, RoutingPlan]:
        """What the experts read and the plan that combines their outputs: ``groups [G, S, d]`` and
        ``plan`` as they are; with ``jitter_experts`` (train mode) ``x * jitter``, the router's draw;
        with ``scale_expert_input`` (k = 1) ``w x`` and a combine weight of 1 (0 where the
        assignment was dropped): ``y = FFN_e(w x)``."""
        if self.jitter_experts and draws and "jitter" in draws:
            groups = (groups * draws["jitter"]).astype(groups.dtype)  # [G, S, d]
        if not self.scale_expert_input:
            return groups, plan
        scaled = groups * plan.token_weight[..., :1].astype(groups.dtype)  # [G, S, d]
        return scaled, plan.replace(token_weight=(plan.token_slot >= 0).astype(jnp.float32))  # [G, S, 1]

    def plan(self, logits: Array, router_in: Array, params: dict[str, Array], draws: dict[str, Array],
             token_mask: Array | None, capacity: int) -> RoutingPlan:
        """float32 logits [G, S, E] (and the router input, for routers with more weights) -> the plan."""
        raise NotImplementedError
