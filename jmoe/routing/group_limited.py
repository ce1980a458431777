"""Top-k over router *scores* with a selection bias and group-limited choice
(DeepSeek-V2 / V3; with one group, Llama 4's router).

Per token, from float32 logits ``l = x W_r`` ``[G, S, E]``::

    s      = sigmoid(l)                      score_function="sigmoid" (DeepSeek-V3, Llama 4)
           | softmax(l)                      score_function="softmax" (DeepSeek-V2)
           | sqrt(softplus(l))               score_function="sqrt_softplus" (DeepSeek-V4)
    c      = s + b                           the choice is made on c; b [E] is the selection bias
                                             (state, not a parameter: no gradient reaches it;
                                             :mod:`jmoe.balancing` updates it between steps)
           | l + b                           bias_on="logits" (Kolibri): the biased logits
    groups: the E experts form n_group equal, contiguous groups; a group's score is
           the sum of its 2 highest c (group_score="top2_sum", DeepSeek-V3) or its
           highest c (group_score="max", DeepSeek-V2's device-limited routing);
           the topk_group best groups are kept (ties: the lower group index)
    top-k of c among the kept groups' experts (ties: the lower expert index; the other
           groups' experts are -inf, as in DeepSeek's reference code, Megatron-Core and
           transformers' DeepSeek-V3; excluded_fill="zero": 0.0, as transformers' DeepSeek-V2
           and AXK-2 fill them, so an excluded expert beats a kept one whose c < 0)
    w_e    = s_e                                           the *unbiased* score
           = s_e / (sum_{j in top-k} s_j + eps)            normalize=True (norm_topk_prob), eps =
                                                           normalize_epsilon (1e-20: DeepSeek-V3)
    w_e   *= routed_scaling_factor

With ``n_group=1`` the group step keeps every expert (plain top-k of the scores). The
capacity step is the token-choice one (:func:`jmoe.routing.token_choice.assign_slots`,
choice-major by default). The losses use the normalised scores ``p = s / sum_j s_j`` as the
router probabilities (the softmax itself for ``score_function="softmax"``): the Switch
load-balancing loss ``E sum_e f_e P_e`` of them is k times DeepSeek-V3's sequence-wise
balance loss when the groups are sequences (``aux["sequence_balance_loss"]``).

Group-limited routing bounds a token's fan-out: with the groups equal to the devices of
the expert axes (``n_group`` = the expert-parallel size; experts are placed contiguously,
``E / n`` per device), each token's k experts live on at most ``topk_group`` devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.checks import int_at_least, non_negative_number, positive_number
from jmoe.routing.plan import RoutingPlan, check_logits
from jmoe.routing.router import Router
from jmoe.routing.token_choice import PRIORITIES, plan_from_choices

Array = jax.Array

def sqrt_softplus(logits: Array) -> Array:
    """``sqrt(softplus(l))`` elementwise (DeepSeek-V4's router scores): positive, ~sqrt(l) for large l."""
    return jnp.sqrt(jax.nn.softplus(logits))


# score_function name -> scores [G, S, E] from float32 logits [G, S, E].
SCORE_FUNCTIONS = {
    "sigmoid": jax.nn.sigmoid,
    "softmax": lambda logits: jax.nn.softmax(logits, axis=-1),
    "sqrt_softplus": sqrt_softplus,
}
GROUP_SCORES = ("top2_sum", "max")
BIAS_ON = ("scores", "logits")
EXCLUDED_FILLS = {"-inf": -jnp.inf, "zero": 0.0}  # what an excluded group's experts' choice becomes


def router_scores(logits: Array, score_function: str) -> Array:
    """``SCORE_FUNCTIONS[score_function]`` of the float32 logits ``[G, S, E]``."""
    return SCORE_FUNCTIONS[score_function](logits.astype(jnp.float32))


def choice_values(logits: Array, scores: Array, selection_bias: Array | None, bias_on: str) -> Array:
    """What the choice is made on ``[G, S, E]``: the scores, or with ``bias_on="logits"`` the
    float32 logits, plus the selection bias ``[E]`` (None: 0), read without gradient."""
    choice = scores if bias_on == "scores" else logits.astype(jnp.float32)  # [G, S, E]
    if selection_bias is not None:
        choice = choice + jax.lax.stop_gradient(selection_bias)
    return choice


def group_limited_experts(choice: Array, *, k: int, n_group: int, topk_group: int, group_score: str,
                          excluded_fill: str = "-inf") -> Array:
    """The k experts of each token: top-k of ``choice [G, S, E]`` among the experts of its
    ``topk_group`` best groups, the others' choice set to ``EXCLUDED_FILLS[excluded_fill]``
    (module docstring). Returns ``[G, S, K]`` int32."""
    num_groups, group_size, num_experts = choice.shape
    if n_group > 1 and topk_group < n_group:
        per_group = num_experts // n_group
        grouped = choice.reshape(num_groups, group_size, n_group, per_group)  # [G, S, n_group, E / n_group]
        if group_score == "top2_sum":
            score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [G, S, n_group]
        else:
            score = jnp.max(grouped, axis=-1)  # [G, S, n_group]
        _, kept_groups = jax.lax.top_k(score, topk_group)  # [G, S, topk_group]
        kept = jnp.any(jax.nn.one_hot(kept_groups, n_group, dtype=jnp.bool_), axis=-2)  # [G, S, n_group]
        kept = jnp.repeat(kept, per_group, axis=-1)  # [G, S, E]
        choice = jnp.where(kept, choice, EXCLUDED_FILLS[excluded_fill])
    return jax.lax.top_k(choice, k)[1].astype(jnp.int32)  # [G, S, K]


def group_limited_top_k(
    logits: Array,
    *,
    k: int,
    capacity: int,
    score_function: str = "sigmoid",
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "top2_sum",
    normalize: bool = False,
    routed_scaling_factor: float = 1.0,
    selection_bias: Array | None = None,
    bias_on: str = "scores",
    normalize_epsilon: float = 1e-20,
    excluded_fill: str = "-inf",
    priority: str = "choice",
    token_mask: Array | None = None,
) -> RoutingPlan:
    """The plan of the module docstring's router for float32 ``logits [G, S, E]``;
    ``selection_bias [E]`` (None: 0) is read without gradient and added to the scores or, with
    ``bias_on="logits"``, to the logits the choice is made on. Returns a plan with K = k."""
    mask = check_logits(logits, token_mask)  # [G, S]
    scores = router_scores(logits, score_function)  # [G, S, E]
    choice = choice_values(logits, scores, selection_bias, bias_on)  # [G, S, E]
    top_experts = group_limited_experts(choice, k=k, n_group=n_group, topk_group=topk_group,
                                        group_score=group_score, excluded_fill=excluded_fill)  # [G, S, K]
    return plan_from_scores(logits, scores, score_function, top_experts, mask, normalize=normalize,
                            normalize_epsilon=normalize_epsilon, routed_scaling_factor=routed_scaling_factor,
                            capacity=capacity, priority=priority)


def plan_from_scores(logits: Array, scores: Array, score_function: str, experts: Array, mask: Array, *,
                     normalize: bool, normalize_epsilon: float, routed_scaling_factor: float, capacity: int,
                     priority: str) -> RoutingPlan:
    """The plan of a router whose tokens chose ``experts [G, S, K]`` and are weighted by their
    ``scores [G, S, E]``: ``w = s_e`` (``/ (sum_k s + normalize_epsilon)``) ``* routed_scaling_factor``,
    slots in token order; the losses read ``p = s / sum_e s_e`` (the softmax itself)."""
    num_groups, group_size, _ = logits.shape
    weights = jnp.take_along_axis(scores, experts, axis=-1)  # [G, S, K] unbiased
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + normalize_epsilon)
    weights = weights * routed_scaling_factor
    requested = jnp.broadcast_to(mask[..., None], experts.shape)  # [G, S, K]
    order = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))  # [G, S]
    probs = scores if score_function == "softmax" else scores / jnp.sum(scores, axis=-1, keepdims=True)  # [G, S, E]
    return plan_from_choices(logits, probs, experts, weights, requested, order, mask, capacity=capacity,
                             priority=priority)


def check_score_options(router) -> None:
    """The options of a router weighted by :func:`plan_from_scores`: ``score_function``,
    ``priority``, ``routed_scaling_factor`` > 0, ``normalize_epsilon`` >= 0."""
    if router.score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {tuple(SCORE_FUNCTIONS)}, got {router.score_function!r}")
    if router.priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {router.priority!r}")
    positive_number("routed_scaling_factor", router.routed_scaling_factor)
    non_negative_number("normalize_epsilon", router.normalize_epsilon)


@dataclasses.dataclass(frozen=True)
class GroupLimited(Router):
    """:func:`group_limited_top_k` as a router. Options: ``score_function``, ``n_group`` /
    ``topk_group`` / ``group_score`` (the group limit), ``normalize`` (norm_topk_prob),
    ``routed_scaling_factor``, ``selection_bias`` (a float32 state ``selection_bias [E]``,
    zero-initialised, no gradient: aux-loss-free balancing, :mod:`jmoe.balancing`) and
    ``bias_on`` (what it is added to: the scores or the logits), ``normalize_epsilon`` (added to
    the sum of the k scores when normalising), ``excluded_fill`` (what an excluded group's experts
    are chosen on: "-inf" or "zero"), ``priority`` (who wins a slot over capacity)."""

    name = "group_limited"
    params = (*Router.params, "selection_bias")
    state_params = ("selection_bias",)

    score_function: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    normalize: bool = False
    routed_scaling_factor: float = 1.0
    selection_bias: bool = False
    bias_on: str = "scores"
    normalize_epsilon: float = 1e-20
    excluded_fill: str = "-inf"
    priority: str = "choice"

    def __post_init__(self):
        super().__post_init__()
        check_score_options(self)
        if self.excluded_fill not in EXCLUDED_FILLS:
            raise ValueError(f"excluded_fill must be one of {tuple(EXCLUDED_FILLS)}, got {self.excluded_fill!r}")
        if self.bias_on not in BIAS_ON:
            raise ValueError(f"bias_on must be one of {BIAS_ON}, got {self.bias_on!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        int_at_least("n_group", self.n_group, 1)
        int_at_least("topk_group", self.topk_group, 1)
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")

    def check_experts(self, num_experts: int) -> None:
        super().check_experts(num_experts)
        if num_experts % self.n_group:
            raise ValueError(f"num_experts={num_experts} is not divisible by n_group={self.n_group}: n_group must "
                             f"divide num_experts (the experts form n_group equal groups)")
        per_group = num_experts // self.n_group
        if self.n_group > 1 and self.group_score == "top2_sum" and per_group < 2:
            raise ValueError(f"group_score='top2_sum' sums each group's 2 best experts: it needs >= 2 experts per "
                             f"group, got num_experts={num_experts} / n_group={self.n_group}")
        if self.k > self.topk_group * per_group:
            raise ValueError(f"k={self.k} experts cannot be chosen from topk_group={self.topk_group} groups of "
                             f"{per_group} experts")

    def init_params(self, key, d_model: int, num_experts: int) -> dict[str, Array]:
        params = super().init_params(key, d_model, num_experts)
        if self.selection_bias:
            params["selection_bias"] = jnp.zeros((num_experts,), jnp.float32)  # [E]
        return params

    def plan(self, logits, router_in, params, draws, token_mask, capacity) -> RoutingPlan:
        return group_limited_top_k(
            logits, k=self.k, capacity=capacity, score_function=self.score_function, n_group=self.n_group,
            topk_group=self.topk_group, group_score=self.group_score, normalize=self.normalize,
            routed_scaling_factor=float(self.routed_scaling_factor), selection_bias=params.get("selection_bias"),
            bias_on=self.bias_on, normalize_epsilon=float(self.normalize_epsilon), excluded_fill=self.excluded_fill,
            priority=self.priority,
            token_mask=token_mask,
        )
