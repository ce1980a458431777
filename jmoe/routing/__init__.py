"""Routing: expert capacity, the routing plan, and the routers behind one registry.

A router (:class:`~jmoe.routing.router.Router`) turns router logits ``[G, S, E]`` into a
:class:`RoutingPlan`; the routers are pure functions of the logits plus thin option
classes, and nothing here knows about Flax layers. Registered (:data:`ROUTERS`):

  tokens_choose   Switch (k=1), GShard (k=2), top-k         :mod:`jmoe.routing.token_choice`
  experts_choose  expert choice (Zhou et al. 2022)          :mod:`jmoe.routing.expert_choice`
  noisy_top_k     noisy top-k gating (Shazeer et al. 2017)  :mod:`jmoe.routing.noisy`
  group_limited   sigmoid / softmax / sqrt-softplus scores,  :mod:`jmoe.routing.group_limited`
                  selection bias, group-limited top-k
                  (DeepSeek-V2/V3/V4, Llama 4)
  token_hash      experts a fixed function of the token id  :mod:`jmoe.routing.token_hash`
                  (Hash Layers; DeepSeek-V4's first layers)
  sparsemixer     SparseMixer's top-2 (Phi-3.5-MoE), eval   :mod:`jmoe.routing.sparsemixer`
  top2_gate       fairseq's Top2Gate (NLLB-MoE): GShard's   :mod:`jmoe.routing.top2_gate`
                  top-2, renormalised after the drops,
                  sampled 2nd expert, expert output masking
  product_key     E = K^2 experts by two K-key halves        :mod:`jmoe.routing.product_key`
                  (product keys, PEER; Doge's CDMoE)
  shared_sink     group-limited routing that also weights   :mod:`jmoe.routing.shared_sink`
                  the shared experts (Inkling)

A new router is one module (a :class:`Router` subclass) plus one line in ``ROUTERS``; a
user's own router is a :class:`Router` subclass given to the layer as an object
(``jmoe.MoE(..., router=MyRouter())``), no registration needed. The layer takes its router
as a name (the router's defaults) or a configured object (:func:`as_router`); ``k`` is the
layer's and binds the router. :func:`make_router` builds one from flat options (a config
file's keys).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jmoe.routing.capacity import expert_capacity
from jmoe.routing.expert_choice import ExpertsChoose, experts_choose
from jmoe.routing.group_limited import GroupLimited, group_limited_top_k
from jmoe.routing.noisy import NoisyTopK
from jmoe.routing.product_key import ProductKey
from jmoe.routing.plan import BALANCE_LOSSES, ExtraLoss, RoutingPlan, router_probabilities, z_loss
from jmoe.routing.router import Router
from jmoe.routing.shared_sink import SharedSink
from jmoe.routing.sparsemixer import SparseMixer
from jmoe.routing.token_hash import TokenHash
from jmoe.routing.top2_gate import Top2Gate
from jmoe.routing.token_choice import (PRIORITIES, SECOND_EXPERT_POLICIES, TokensChoose, plan_from_choices,
                                      tokens_choose)

__all__ = ["BALANCE_LOSSES", "DEFAULT_ROUTER", "EXTRA_LOSSES", "STATE_PARAMS", "group_limited_top_k", "ExtraLoss",
           "ExpertsChoose", "GroupLimited", "NAMES", "NoisyTopK", "PARAM_NAMES", "PRIORITIES", "ProductKey", "ROUTERS", "Router",
           "RoutingPlan", "SECOND_EXPERT_POLICIES", "SharedSink", "SparseMixer", "TokenHash", "TokensChoose", "Top2Gate", "as_router", "complete_aux", "expert_capacity",
           "experts_choose", "make_router", "plan_from_choices", "router_probabilities", "tokens_choose", "z_loss"]

ROUTERS: dict[str, type[Router]] = {cls.name: cls for cls in (TokensChoose, ExpertsChoose, NoisyTopK, GroupLimited,
                                                               TokenHash, SparseMixer, Top2Gate, ProductKey, SharedSink)}
NAMES = tuple(ROUTERS)
DEFAULT_ROUTER = TokensChoose.name

# Every router's parameter names (all float32, replicated on a mesh).
PARAM_NAMES = tuple(dict.fromkeys(name for cls in ROUTERS.values() for name in cls.params))

# Of those, the ones that are state (no gradient, no optimizer): a selection bias.
STATE_PARAMS = tuple(dict.fromkeys(name for cls in ROUTERS.values() for name in cls.state_params))

# Every router's own losses, already weighted by the layer (a model adds them to its
# objective): the layer's aux has all of them (0 where a router has none); and the
# unweighted balance losses (BALANCE_LOSSES) likewise.
EXTRA_LOSSES = tuple(dict.fromkeys(name for cls in ROUTERS.values() for name in cls.extra_losses))


def _inert_values(name: str) -> list:
    """The values at which router option ``name`` changes nothing: a field's ``off`` metadata
    (e.g. a loss weight of 0), else its default."""
    return [f.metadata.get("off", f.default) for cls in ROUTERS.values() for f in dataclasses.fields(cls)
            if f.name == name]


def make_router(name: str, **options) -> Router:
    """The router ``name`` with ``options`` (its dataclass fields).

    An option another router owns is ignored where it would change nothing there (its
    default, or its ``off`` value such as a loss weight of 0) and is an error otherwise
    (e.g. a non-zero load-loss weight for a router without that loss).
    """
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {NAMES}, got {name!r}")
    cls = ROUTERS[name]
    own = {f.name for f in dataclasses.fields(cls)}
    for option, value in list(options.items()):
        if option in own:
            continue
        owners = [n for n, c in ROUTERS.items() if option in {f.name for f in dataclasses.fields(c)}]
        if not owners:
            raise TypeError(f"unknown router option {option!r}")
        if value not in _inert_values(option):
            raise ValueError(f"{option}={value!r} needs router={owners[0]!r}"
                             f"{' (or ' + ', '.join(map(repr, owners[1:])) + ')' if owners[1:] else ''}, "
                             f"got router={name!r}")
        del options[option]
    return cls(**options)


def as_router(router: str | Router, k: int) -> Router:
    """The layer's router bound to its ``k``: a name of :data:`ROUTERS` (that router's
    defaults) or a configured :class:`Router` object (a registered one or a user's own
    subclass) whose ``k`` is unset or equal to ``k``."""
    if isinstance(router, str):
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {NAMES} or a jmoe.routing.Router object, got {router!r}")
        return ROUTERS[router](k=k)
    if not isinstance(router, Router):
        raise TypeError(f"router must be a name of {NAMES} or a jmoe.routing.Router object, got "
                        f"{type(router).__name__}: {router!r}")
    if router.k is not None and router.k != k:
        raise ValueError(f"k is the layer's: jmoe.MoE(k={k}) was given a router with k={router.k}; leave the "
                         f"router's k unset")
    return dataclasses.replace(router, k=k)


def complete_aux(aux: dict) -> dict:
    """``aux`` with every registered router's extra losses and the balance losses (0.0
    where absent), so a layer's aux has the same keys whatever its router."""
    zero = jnp.zeros((), jnp.float32)
    return {**aux, **{name: aux.get(name, zero) for name in EXTRA_LOSSES + BALANCE_LOSSES}}
