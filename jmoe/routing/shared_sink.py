"""Shared experts weighted by the router (Inkling's shared-expert sink).

The router scores the layer's n shared experts beside its E routed ones: every token takes its
k routed experts (chosen as :mod:`jmoe.routing.group_limited` chooses them) and all n shared
ones, and one normalisation gives them all their weights. Per token, from the float32 router
input x::

    l       = x W_r                       [E]  the routed experts' logits (router_weight [d, E])
    m       = x W_s                       [n]  the shared experts' logits
                                               (shared_router_weight [d, n])
    s, t    = score_function(l), score_function(m)     sigmoid or sqrt_softplus (elementwise)
    top-k   of s + b within the kept groups           group-limited routing's choice (b: the
                                                       selection bias, n_group, topk_group, ...)
    D       = sum_{j in top-k} s_j + sum_i t_i + normalize_epsilon        normalize=True
            | 1                                                           normalize=False
    w_e     = c s_e / D                   the routed experts' combine weights
    gamma_i = c t_i / D                   the shared experts' weights, ``plan.shared_weight [G, S, n]``
    c       = routed_scaling_factor       (x ``router_scale [1]``, a learned scalar, with
                                          ``learned_scale=True``)

Inkling: sigmoid scores, ``normalize=True`` and ``normalize_epsilon=0`` (its softmax of the
log-sigmoid scores over the k + n chosen is ``s / D`` exactly), c = route_scale x global_scale.
The layer's shared expert is the n shared experts side by side (``Shared(n * F)``: hidden units
``i F .. (i + 1) F - 1`` are shared expert i's) and scales each one's hidden units by its gamma
(:func:`jmoe.experts.shared_ffn`), so ``y = sum_k w_k FFN_{e_k}(x) + sum_i gamma_i
FFN_i^shared(x)``. Slots, drops and the losses are group-limited routing's, from the routed
experts' scores alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.checks import int_at_least
from jmoe.elementwise import softcap
from jmoe.routing.group_limited import GroupLimited, choice_values, group_limited_experts, plan_from_scores, router_scores
from jmoe.routing.plan import RoutingPlan, check_logits

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SharedSink(GroupLimited):
    """The module docstring's router: :class:`GroupLimited`'s options and choice, plus
    ``shared_experts`` (n, the shared experts it weights; the layer's ``Shared(d_ff)`` must hold
    them side by side, ``d_ff`` a multiple of n) and ``learned_scale`` (a learned scalar
    ``router_scale [1]``, initialised to 1, multiplies every weight)."""

    name = "shared_sink"
    params = (*GroupLimited.params, "shared_router_weight", "router_scale")

    shared_experts: int = 1
    learned_scale: bool = False

    def __post_init__(self):
        super().__post_init__()
        int_at_least("shared_experts", self.shared_experts, 1)
        if self.score_function == "softmax":
            raise ValueError("router='shared_sink' scores each shared expert on its own: it needs an elementwise "
                             "score_function ('sigmoid' or 'sqrt_softplus'), got 'softmax'")

    @property
    def weighted_shared_experts(self) -> int:
        return self.shared_experts

    def init_params(self, key, d_model: int, num_experts: int) -> dict[str, Array]:
        key, shared_key = jax.random.split(key)
        params = super().init_params(key, d_model, num_experts)
        params["shared_router_weight"] = nnx.initializers.lecun_normal()(
            shared_key, (d_model, self.shared_experts), jnp.float32)  # [d, n]
        if self.learned_scale:
            params["router_scale"] = jnp.ones((1,), jnp.float32)
        return params

    def plan(self, logits, router_in, params, draws, token_mask, capacity) -> RoutingPlan:
        mask = check_logits(logits, token_mask)  # [G, S]
        scores = router_scores(logits, self.score_function)  # [G, S, E]
        choice = choice_values(logits, scores, params.get("selection_bias"), self.bias_on)  # [G, S, E]
        experts = group_limited_experts(choice, k=self.k, n_group=self.n_group, topk_group=self.topk_group,
                                        group_score=self.group_score, excluded_fill=self.excluded_fill)  # [G, S, K]
        shared_logits = router_in @ params["shared_router_weight"]  # [G, S, n] float32
        if self.logit_softcap is not None:
            shared_logits = softcap(shared_logits, self.logit_softcap)
        shared_scores = router_scores(shared_logits, self.score_function)  # [G, S, n]
        scale = float(self.routed_scaling_factor) * (params["router_scale"][0] if self.learned_scale else 1.0)
        if self.normalize:
            chosen = jnp.sum(jnp.take_along_axis(scores, experts, axis=-1), axis=-1)  # [G, S]
            factor = scale / (chosen + jnp.sum(shared_scores, axis=-1) + self.normalize_epsilon)  # [G, S]
        else:
            factor = jnp.full(mask.shape, scale, jnp.float32)  # [G, S]
        # w = s_e * factor: the scores rescaled per token (the losses' normalised scores do not change)
        plan = plan_from_scores(logits, scores * factor[..., None], self.score_function, experts, mask,
                                normalize=False, normalize_epsilon=0.0, routed_scaling_factor=1.0, capacity=capacity,
                                priority=self.priority)
        return plan.replace(shared_weight=shared_scores * factor[..., None])  # [G, S, n]
