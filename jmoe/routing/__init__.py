"""Routing: expert capacity, the routing plan, and the routers behind one registry.

A router (:class:`~jmoe.routing.router.Router`) turns router logits ``[G, S, E]`` into a
:class:`RoutingPlan`; the routers are pure functions of the logits plus thin option
classes, and nothing here knows about Flax layers. Registered (:data:`ROUTERS`):

  tokens_choose   Switch (k=1), GShard (k=2), top-k         :mod:`jmoe.routing.token_choice`
  experts_choose  expert choice (Zhou et al. 2022)          :mod:`jmoe.routing.expert_choice`
  noisy_top_k     noisy top-k gating (Shazeer et al. 2017)  :mod:`jmoe.routing.noisy`
  group_limited   sigmoid / softmax scores, selection bias,  :mod:`jmoe.routing.group_limited`
                  group-limited top-k (DeepSeek-V2/V3, Llama 4)

A new router is one module (a :class:`Router` subclass) plus one line in ``ROUTERS``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jmoe.routing.capacity import expert_capacity
from jmoe.routing.expert_choice import ExpertsChoose, experts_choose
from jmoe.routing.group_limited import GroupLimited, group_limited_top_k
from jmoe.routing.noisy import NoisyTopK
from jmoe.routing.plan import BALANCE_LOSSES, ExtraLoss, RoutingPlan, router_probabilities, z_loss
from jmoe.routing.router import Router
from jmoe.routing.token_choice import PRIORITIES, SECOND_EXPERT_POLICIES, TokensChoose, tokens_choose

__all__ = ["BALANCE_LOSSES", "DEFAULT_ROUTER", "EXTRA_LOSSES", "STATE_PARAMS", "group_limited_top_k", "ExtraLoss", "NAMES", "PARAM_NAMES", "PRIORITIES", "ROUTERS", "Router", "RoutingPlan",
           "SECOND_EXPERT_POLICIES", "complete_aux", "expert_capacity", "experts_choose", "make_router",
           "router_probabilities", "tokens_choose", "z_loss"]

ROUTERS: dict[str, type[Router]] = {cls.name: cls for cls in (TokensChoose, ExpertsChoose, NoisyTopK, GroupLimited)}
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


def complete_aux(aux: dict) -> dict:
    """``aux`` with every registered router's extra losses and the balance losses (0.0
    where absent), so a layer's aux has the same keys whatever its router."""
    zero = jnp.zeros((), jnp.float32)
    return {**aux, **{name: aux.get(name, zero) for name in EXTRA_LOSSES + BALANCE_LOSSES}}
