"""jmoe: sparse Mixture-of-Experts layers for JAX / Flax NNX."""

from jmoe.balancing import ExpertLoad, SelectionBias, update_selection_biases
from jmoe.dispatch import BACKENDS
from jmoe.experts import Activation, ExpertBank, OutputNorm, Shared, ZeroExperts
from jmoe.layer import MoE, sown_aux
from jmoe import routing
from jmoe.routing import RoutingPlan, expert_capacity, experts_choose, tokens_choose

__all__ = [
    "Activation",
    "BACKENDS",
    "ExpertBank",
    "ExpertLoad",
    "SelectionBias",
    "MoE",
    "OutputNorm",
    "RoutingPlan",
    "Shared",
    "ZeroExperts",
    "expert_capacity",
    "routing",
    "experts_choose",
    "sown_aux",
    "tokens_choose",
    "update_selection_biases",
]
__version__ = "0.1.0"


def __getattr__(name):
    """``jmoe.hf`` (checkpoint loading; needs ``pip install 'jmoe[hf]'``) is imported on first use."""
    if name == "hf":
        import importlib

        return importlib.import_module("jmoe.hf")
    raise AttributeError(f"module 'jmoe' has no attribute {name!r}")
