"""The layer's options, grouped by what they configure; each group validates itself.

``jmoe.MoE`` assembles its keyword arguments into these groups; its router, activation and
shared expert are objects of their own (:class:`jmoe.routing.Router`,
:class:`jmoe.experts.Activation`, :class:`jmoe.experts.Shared`) that validate themselves.
:func:`check_combination` holds the few rules that span groups. Every check runs at
construction, before any tracing.

Flat option sources (``train.py``'s config keys, a Hugging Face ``config.json``'s
translation in :mod:`jmoe.hf.families`) name every option as one key; :func:`layer_arguments`
is the one translation of such a dict into the layer's arguments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe import grouped_matmul as gmm_lib
from jmoe.dispatch import BACKENDS
from jmoe.parallel.dropless_exchange import DROPLESS_EXCHANGES, OVERFLOWS, check_buffer_factor
from jmoe.checks import int_at_least, positive_number
from jmoe.experts import Activation, Shared, ZeroExperts
from jmoe.routing import DEFAULT_ROUTER, ROUTERS, Router, expert_capacity, make_router

# The flat keys that are router options: every registered router's dataclass fields but k (the layer's).
ROUTER_OPTIONS = tuple(dict.fromkeys(f.name for cls in ROUTERS.values() for f in dataclasses.fields(cls)
                                     if f.name != "k"))
ACTIVATION_OPTIONS = tuple(f.name for f in dataclasses.fields(Activation) if f.name != "name")


@dataclasses.dataclass(frozen=True)
class CapacityOptions:
    """Slots per expert and group (:func:`jmoe.routing.expert_capacity`), train and eval.

    ``capacity_factor=None`` makes the layer dropless (``eval_capacity_factor`` unused).
    """

    capacity_factor: float | None = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 1
    multiple_of: int = 1

    def __post_init__(self):
        if self.capacity_factor is not None:
            positive_number("capacity_factor", self.capacity_factor)
        if not (self.dropless and self.eval_capacity_factor is None):
            positive_number("eval_capacity_factor", self.eval_capacity_factor)
        int_at_least("min_capacity", self.min_capacity, 0)
        int_at_least("capacity_multiple_of", self.multiple_of, 1)

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    def slots(self, group_size: int, num_experts: int, k: int, train: bool) -> int | None:
        """C for the mode (train / eval), at most what a group can fill (S, rounded up to
        ``multiple_of``: a token takes an expert at most once); None for a dropless layer."""
        if self.dropless:
            return None
        capacity = expert_capacity(group_size, num_experts, k=k,
                                   capacity_factor=self.capacity_factor if train else self.eval_capacity_factor,
                                   min_capacity=self.min_capacity, multiple_of=self.multiple_of)
        return min(capacity, -(-group_size // self.multiple_of) * self.multiple_of)


@dataclasses.dataclass(frozen=True)
class DroplessOptions:
    """A dropless layer's grouped matmul, and on a mesh its row exchange, its buffers
    (c >= 1: about c * T_l * K rows per device and round; None: ``jmoe.parallel.DEFAULT_BUFFER_FACTOR``)
    and what the rows that do not fit one round do (``overflow``: ``"rounds"``, more
    rounds, nothing dropped; ``"drop"``: dropped and counted)."""

    grouped_matmul: str = "auto"
    exchange: str = "auto"
    buffer_factor: float | None = None
    overflow: str = "rounds"

    def __post_init__(self):
        gmm_lib.GROUPED_MATMULS.check(self.grouped_matmul)
        DROPLESS_EXCHANGES.check(self.exchange)
        if self.buffer_factor is not None:
            check_buffer_factor(self.buffer_factor)
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"dropless_overflow must be one of {OVERFLOWS}, got {self.overflow!r}")


@dataclasses.dataclass(frozen=True)
class MeshOptions:
    """Expert parallelism: the mesh (None: the ambient one of ``jax.set_mesh``), the
    two-step exchange (capacity: 2DH all-to-all; dropless: one row per (token, node)), the
    capacity path's chunks (each must divide C), and
    the mesh axes that hold experts / split their hidden dim (None: jmoe's names)."""

    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None
    hierarchical_a2a: bool = False
    a2a_chunks: int = 1
    expert_axes: tuple[str, ...] | None = None
    model_axis: str | None = None

    def __post_init__(self):
        int_at_least("a2a_chunks", self.a2a_chunks, 1)
        if self.expert_axes is not None:
            if isinstance(self.expert_axes, str) or not all(isinstance(a, str) for a in self.expert_axes):
                raise ValueError(f"expert_axes must be a tuple of mesh axis names, got {self.expert_axes!r}")
            object.__setattr__(self, "expert_axes", tuple(self.expert_axes))


def layer_arguments(flat: dict) -> dict:
    """:class:`jmoe.MoE` keyword arguments from ``flat`` options, where every option is one key:
    ``router`` (a name) and its options (:data:`ROUTER_OPTIONS`, via
    :func:`jmoe.routing.make_router`, which rejects an option of another router) -> ``router=``
    a router object; ``activation`` (a name) with its options (:data:`ACTIVATION_OPTIONS`:
    ``swiglu_alpha``, ``swiglu_limit``, ...) -> ``activation=`` an :class:`Activation`;
    ``shared_d_ff`` / ``shared_gate`` / ``shared_activation`` -> ``shared=`` a :class:`Shared`;
    ``zero_identity`` / ``zero_constant`` -> ``zero_experts=`` a :class:`ZeroExperts`. A key that is absent stays absent (the layer's default); the other keys
    pass through unchanged."""
    flat = dict(flat)
    router_options = {name: flat.pop(name) for name in ROUTER_OPTIONS if name in flat}
    if "router" in flat or router_options:
        router = flat.get("router", DEFAULT_ROUTER)
        if isinstance(router, str):
            flat["router"] = make_router(router, **router_options)
        elif router_options:
            raise ValueError(f"router options {sorted(router_options)} go on the router object, got {router!r}")
    activation_options = {name: flat.pop(name) for name in ACTIVATION_OPTIONS if name in flat}
    if "activation" in flat or activation_options:
        activation = flat.get("activation", Activation().name)
        if isinstance(activation, str):
            flat["activation"] = Activation(activation, **activation_options)
        elif activation_options:
            raise ValueError(f"{sorted(activation_options)} go on the Activation object, got {activation!r}")
    shared_d_ff, shared_gate = flat.pop("shared_d_ff", None), flat.pop("shared_gate", False)
    shared_activation = flat.pop("shared_activation", None)
    if (shared_gate or shared_activation is not None) and shared_d_ff is None:
        raise ValueError("shared_gate / shared_activation configure the shared expert: it needs shared_d_ff")
    if shared_d_ff is not None:
        flat["shared"] = Shared(shared_d_ff, gate=bool(shared_gate), activation=shared_activation)
    zero = {name: flat.pop(f"zero_{name}") for name in ("identity", "constant") if f"zero_{name}" in flat}
    if zero:
        flat["zero_experts"] = ZeroExperts(**zero)
    return flat


def check_layer(d_model, d_ff, num_experts, dtype, param_dtype) -> None:
    """Sizes are integers >= 1; the activation and parameter dtypes are floating point."""
    for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
        int_at_least(name, value, 1)
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        try:
            ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a floating-point dtype, got {value!r}")


def check_combination(router: Router, num_experts: int, capacity: CapacityOptions, dropless: DroplessOptions,
                      mesh: MeshOptions, dispatch: str, dtype, shared: Shared | None = None) -> None:
    """The rules that span option groups."""
    router.check_experts(num_experts)
    weighted = router.weighted_shared_experts
    if weighted and (shared is None or shared.d_ff % weighted):
        raise ValueError(f"router={router.name!r} weights {weighted} shared experts: the layer needs shared=Shared(d_ff) "
                         f"holding them side by side, d_ff a multiple of {weighted}, got shared={shared!r}")
    BACKENDS.check(dispatch)
    gmm_lib.check_dtype(dropless.grouped_matmul, dtype)
    if capacity.dropless and not router.supports_dropless:
        raise ValueError(f"capacity_factor=None (dropless) needs a router that tokens choose; "
                         f"router={router.name!r} needs a capacity")
    if dropless.buffer_factor is not None and not capacity.dropless:
        raise ValueError(f"dropless_buffer_factor={dropless.buffer_factor} is for a dropless layer "
                         f"(capacity_factor=None), got capacity_factor={capacity.capacity_factor}")
    if dropless.overflow != "rounds" and not capacity.dropless:
        raise ValueError(f"dropless_overflow={dropless.overflow!r} is for a dropless layer "
                         f"(capacity_factor=None), got capacity_factor={capacity.capacity_factor}")
    if capacity.dropless and mesh.a2a_chunks != 1:
        raise ValueError(
            f"a dropless layer (capacity_factor=None) on a mesh does not support a2a_chunks > 1 (got "
            f"a2a_chunks={mesh.a2a_chunks}): its rows go in rounds of bounded buffers, not chunks of a capacity"
        )
