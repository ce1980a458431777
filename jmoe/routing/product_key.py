"""Product-key routing (Lample et al. 2019, "Large Memory Layers with Product Keys"; PEER, He 2024;
Doge's CDMoE): E = K^2 experts addressed by a pair of keys (E a square).

Per token, from float32 router outputs ``r = x W_r`` ``[2K]`` (``W_r [d, 2K]``)::

    a, b   = r[:K], r[K:]                  key_split="token": the token's two halves
           | rows t and S + t of the       key_split="group": the group's outputs [S, 2K] read
             group's outputs read as       row-major as [2S, K] (transformers' Doge, whose
             [2S, K]                       ``view(2, B * S, K)`` mixes tokens; its checkpoints
                                           were trained so; the same as "token" for S = 1)
    s_e    = a_i + b_j                     e = i K + j, i, j < K
    top-k of s                             (the top k of the K^2 sums lie among the sums of a's and
                                           b's own top k: the product-key search; here all K^2
                                           sums are formed, E-sized like any router's logits)
    w      = softmax over the k chosen s   (sums to 1)

The losses and metrics are the token-choice ones on ``p = softmax(s)`` over the E experts
(``p_e = softmax(a)_i softmax(b)_j``) and the z-loss on ``s``. The slots are choice-major.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.routing.plan import RoutingPlan, check_logits, router_probabilities
from jmoe.routing.router import Router
from jmoe.routing.token_choice import plan_from_choices

Array = jax.Array

KEY_SPLITS = ("token", "group")


def num_keys(num_experts: int) -> int:
    """K = sqrt(E), the keys per half; E must be a square."""
    keys = math.isqrt(num_experts)
    if keys * keys != num_experts:
        raise ValueError(f"router='product_key' addresses E = K^2 experts by K x K keys: num_experts={num_experts} "
                         f"is not a square")
    return keys


def key_halves(router_out: Array, key_split: str) -> tuple[Array, Array]:
    """``router_out [G, S, 2K]`` -> the two key scores ``a, b [G, S, K]`` (the module docstring)."""
    num_groups, group_size, two_k = router_out.shape
    if key_split == "token":
        return router_out[..., :two_k // 2], router_out[..., two_k // 2:]
    rows = router_out.reshape(num_groups, 2 * group_size, two_k // 2)  # [G, 2S, K]: row c = token c // 2's half c % 2
    return rows[:, :group_size], rows[:, group_size:]


def product_scores(router_out: Array, key_split: str) -> Array:
    """``s [G, S, E]`` float32, ``s_{iK+j} = a_i + b_j``, from ``router_out [G, S, 2K]``."""
    a, b = key_halves(router_out.astype(jnp.float32), key_split)  # [G, S, K] each
    return (a[..., :, None] + b[..., None, :]).reshape(*a.shape[:-1], -1)  # [G, S, K, K] -> [G, S, E]


@dataclasses.dataclass(frozen=True)
class ProductKey(Router):
    """The module docstring's router: ``router_weight [d, 2K]`` (``router_bias [2K]`` with
    ``router_bias=True``); option ``key_split`` ("token" or "group")."""

    name = "product_key"

    key_split: str = "token"

    def __post_init__(self):
        super().__post_init__()
        if self.key_split not in KEY_SPLITS:
            raise ValueError(f"key_split must be one of {KEY_SPLITS}, got {self.key_split!r}")

    def check_experts(self, num_experts: int) -> None:
        num_keys(num_experts)
        super().check_experts(num_experts)

    def init_params(self, key: Array, d_model: int, num_experts: int) -> dict[str, Array]:
        width = 2 * num_keys(num_experts)
        params = {"router_weight": nnx.initializers.lecun_normal()(key, (d_model, width), jnp.float32)}  # [d, 2K]
        if self.router_bias:
            params["router_bias"] = jnp.zeros((width,), jnp.float32)  # [2K]
        return params

    def plan(self, logits, router_in, params, draws, token_mask, capacity) -> RoutingPlan:
        """``logits`` here are the router outputs ``[G, S, 2K]``; the experts' are their sums."""
        mask = check_logits(logits, token_mask)  # [G, S]
        num_groups, group_size, _ = logits.shape
        scores = product_scores(logits, self.key_split)  # [G, S, E]
        top_scores, experts = jax.lax.top_k(scores, self.k)  # [G, S, k]
        weights = jax.nn.softmax(top_scores, axis=-1)  # [G, S, k]
        requested = jnp.broadcast_to(mask[..., None], experts.shape)  # [G, S, k]
        order = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))  # [G, S]
        return plan_from_choices(scores, router_probabilities(scores), experts, weights, requested, order, mask,
                                 capacity=capacity, priority="choice")
