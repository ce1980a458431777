"""A bank of E independent expert FFNs held as stacked weights, and the shared expert.

Plain FFN:  ``y_e = act(u) W_out[e] + b_out[e]`` with ``u = x W_in[e] + b_in[e]``
Gated FFN:  ``y_e = act(u, g) W_out[e] + b_out[e]`` with also ``g = x W_gate[e] + b_gate[e]``
(the biases exist with ``use_bias=True``; GPT-OSS has them on the gate, the up and the down
projection). The activations (:class:`Activation`, one function each in :data:`PLAIN` /
:data:`GATED_FUNCTIONS`; L = ``swiglu_limit``, alpha = ``swiglu_alpha``, c_g / c_u =
``gate_softcap`` / ``up_softcap``, ``cap(v, c) = c tanh(v / c)``):

  relu               relu(u)
  gelu               gelu(u)
  relu2              relu(u)^2                                squared ReLU (Primer; Nemotron-H)
  silu               silu(u)                                  (Doge's single-neuron experts)
  swiglu             silu(g) * u                              (Shazeer 2020)
  geglu              gelu(g) * u
  clamped_swiglu     g' = min(g, L), u' = clip(u, -L, L),     GPT-OSS (alpha 1.702, L 7.0)
                     (u' + 1) * g' * sigmoid(alpha * g')
  limited_swiglu     silu(min(g, L)) * clip(u, -L, L)         SwiGLU with GPT-OSS's clamps but
                                                              neither its alpha nor its + 1
                                                              (DeepSeek-V4, HY-V4, GLM-5-Next)
  post_limited_swiglu  min(silu(g), L) * clip(u, -L, L)       the clamp after the activation
                                                              (Step-3.5 / 3.7)
  softcapped_swiglu  cap(g, c_g) * sigmoid(g) * cap(u, c_u)   the sigmoid sees the raw gate
                                                              (Inkling-2)

An activation may carry an :class:`OutputNorm`: an RMSNorm on every expert's output ``y_e``
before its combine weight, with a learned weight per expert (``per_expert=True``, Ergo:
``norm_weight [E, d]``) or one weight the routed experts share (Muse Spark: ``tied_norm_weight
[d]``); the shared expert's own is ``norm_weight [d]``.

Weights are ``[E, d, f]`` and ``[E, f, d]``: each projection is one batched
matmul over experts, never a Python loop. Each expert is initialised like a
dense FFN: truncated normal with variance ``1 / fan_in`` per projection.

The shared expert (:class:`SharedExpert`; DeepSeek-MoE, Qwen2-MoE, Llama 4) is one
dense FFN of its own width that every token goes through, with the experts'
activation or its own, optionally scaled per token by ``sigmoid(x w_g)`` (Qwen2-MoE);
the layer takes it as a :class:`Shared` object (``jmoe.MoE(..., shared=Shared(d_ff))``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.checks import finite_number, int_at_least, positive_number
from jmoe.elementwise import check_softcap, rms_norm, rms_normalize, softcap

Array = jax.Array


def clamped_swiglu(act: "Activation", up: Array, gate: Array) -> Array:
    """GPT-OSS: ``(clip(u, -L, L) + 1) * g' * sigmoid(alpha * g')``, ``g' = min(g, L)``."""
    gate = jnp.minimum(gate, act.swiglu_limit)
    up = jnp.clip(up, -act.swiglu_limit, act.swiglu_limit)
    return (up + 1.0) * gate * jax.nn.sigmoid(act.swiglu_alpha * gate)


def limited_swiglu(act: "Activation", up: Array, gate: Array) -> Array:
    """``silu(min(g, L)) * clip(u, -L, L)``: GPT-OSS's clamps on a plain SwiGLU."""
    return jax.nn.silu(jnp.minimum(gate, act.swiglu_limit)) * jnp.clip(up, -act.swiglu_limit, act.swiglu_limit)


def post_limited_swiglu(act: "Activation", up: Array, gate: Array) -> Array:
    """``min(silu(g), L) * clip(u, -L, L)``: the gate clamped after its activation."""
    return jnp.minimum(jax.nn.silu(gate), act.swiglu_limit) * jnp.clip(up, -act.swiglu_limit, act.swiglu_limit)


def softcapped_swiglu(act: "Activation", up: Array, gate: Array) -> Array:
    """``cap(g, c_g) * sigmoid(g) * cap(u, c_u)``: SwiGLU whose linear gate factor and up are softcapped."""
    return softcap(gate, act.gate_softcap) * jax.nn.sigmoid(gate) * softcap(up, act.up_softcap)


# name -> h from the up projection u (plain FFNs) / from (u, g) (gated FFNs); each reads its options from act.
PLAIN = {
    "relu": lambda act, up: jax.nn.relu(up),
    "gelu": lambda act, up: jax.nn.gelu(up),
    "relu2": lambda act, up: jnp.square(jax.nn.relu(up)),
    "silu": lambda act, up: jax.nn.silu(up),
}
GATED_FUNCTIONS = {
    "swiglu": lambda act, up, gate: jax.nn.silu(gate) * up,
    "geglu": lambda act, up, gate: jax.nn.gelu(gate) * up,
    "clamped_swiglu": clamped_swiglu,
    "limited_swiglu": limited_swiglu,
    "post_limited_swiglu": post_limited_swiglu,
    "softcapped_swiglu": softcapped_swiglu,
}
ACTIVATIONS = (*PLAIN, *GATED_FUNCTIONS)
GATED = tuple(GATED_FUNCTIONS)
NEEDS_SOFTCAP = ("softcapped_swiglu",)


@dataclasses.dataclass(frozen=True)
class OutputNorm:
    """An RMSNorm on each expert FFN's output ``y [..., d]`` (after ``w_out`` and ``b_out``, and
    after the sum over a model axis, so it reads all of d; before the combine weight), with a
    learned weight ``g [d]``, eps inside the square root, in float32:

        scale_first=False:  y / sqrt(mean_d(y^2) + eps) * (offset + g)
        scale_first=True:   y' / sqrt(mean_d(y'^2) + eps),  y' = y * (offset + g)

    ``per_expert``: each expert its own ``g`` (the bank's ``norm_weight [E, d]``; Ergo), else one
    ``g`` the routed experts share (``tied_norm_weight [d]``, replicated on a mesh; Muse Spark):
    two names, because placement goes by the name (a tied ``[L, d]`` stacked over L layers and a
    per-expert ``[E, d]`` have the same rank).
    ``g`` is initialised so that ``offset + g = 1``. A shared expert has its own ``norm_weight
    [d]``; it inherits the routed experts' norm only when that is per expert (a tied weight is
    theirs). Ergo's is ``OutputNorm(eps, per_expert=True)``; Muse Spark's ``post_expert_norm``
    ``OutputNorm(eps, scale_first=True, offset=1.0)`` (its input-scaled RMSNorm, ``g``
    zero-initialised)."""

    eps: float = 1e-6
    scale_first: bool = False
    offset: float = 0.0
    per_expert: bool = False

    def __post_init__(self):
        positive_number("OutputNorm.eps", self.eps)
        finite_number("OutputNorm.offset", self.offset)
        if not isinstance(self.per_expert, bool):
            raise TypeError(f"OutputNorm.per_expert must be a bool, got {self.per_expert!r}")

    @property
    def weight_name(self) -> str:
        """The name of an expert bank's weight ``g``: ``norm_weight [E, d]`` or ``tied_norm_weight [d]``."""
        return "norm_weight" if self.per_expert else "tied_norm_weight"

    def __call__(self, y: Array, weight: Array) -> Array:
        """``y [..., d]`` (any float dtype) and ``weight`` (``g``, broadcast to y: ``[d]``, or each
        row's expert's) -> the normed ``y``, in y's dtype."""
        if self.scale_first:
            scale = self.offset + weight.astype(jnp.float32)
            return rms_normalize(y.astype(jnp.float32) * scale, self.eps).astype(y.dtype)
        return rms_norm(y, weight, self.eps, self.offset)


@dataclasses.dataclass(frozen=True)
class Activation:
    """An expert FFN's hidden activation ``h = act(up, gate)`` (static, hashable): ``name`` (the
    module docstring's table) and its options, ``swiglu_alpha`` / ``swiglu_limit``
    (``clamped_swiglu``; the limit also ``limited_swiglu`` / ``post_limited_swiglu``) and ``gate_softcap`` / ``up_softcap``
    (needed by ``softcapped_swiglu``); ``output_norm``: an :class:`OutputNorm` on the FFN's output
    (None: not normalised; an :class:`ExpertBank` then holds its weight, ``norm_weight [E, d]``
    per expert or ``tied_norm_weight [d]``)."""

    name: str = "gelu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    gate_softcap: float | None = None
    up_softcap: float | None = None
    output_norm: OutputNorm | None = None

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.name!r}")
        positive_number("swiglu_alpha", self.swiglu_alpha)
        positive_number("swiglu_limit", self.swiglu_limit)
        check_softcap("gate_softcap", self.gate_softcap)
        check_softcap("up_softcap", self.up_softcap)
        if self.name in NEEDS_SOFTCAP and (self.gate_softcap is None or self.up_softcap is None):
            raise ValueError(f"activation {self.name!r} needs gate_softcap and up_softcap > 0: "
                             f"Activation({self.name!r}, gate_softcap=c_g, up_softcap=c_u)")
        if self.output_norm is not None and not isinstance(self.output_norm, OutputNorm):
            raise TypeError(f"output_norm must be a jmoe.experts.OutputNorm (or None), got {self.output_norm!r}")

    @property
    def gated(self) -> bool:
        return self.name in GATED

    def __call__(self, up: Array, gate: Array | None = None) -> Array:
        if self.gated:
            return GATED_FUNCTIONS[self.name](self, up, gate)
        return PLAIN[self.name](self, up)


def as_activation(activation: str | Activation) -> Activation:
    """``activation`` as an :class:`Activation` (a name takes the default alpha and limit)."""
    if isinstance(activation, Activation):
        return activation
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a name of {ACTIVATIONS} or a jmoe.experts.Activation, "
                        f"got {activation!r}")
    return Activation(activation)


@dataclasses.dataclass(frozen=True)
class Shared:
    """The shared expert's options (DeepSeek-MoE, Qwen2-MoE, Llama 4): its hidden width
    ``d_ff`` (``n_shared_experts * d_ff`` for DeepSeek's several), ``gate`` (Qwen2-MoE's
    per-token ``sigmoid(x w_g)``, ``w_g [d, 1]``) and ``activation`` (a name or an
    :class:`Activation`; None: the routed experts')."""

    d_ff: int
    gate: bool = False
    activation: str | Activation | None = None

    def __post_init__(self):
        int_at_least("Shared.d_ff", self.d_ff, 1)
        if self.activation is not None:
            object.__setattr__(self, "activation", as_activation(self.activation))

    def activation_for(self, experts: Activation) -> Activation:
        """Its activation: its own, else the routed experts' ``experts``, with their output norm
        when that is per expert (the shared expert then normalises with its own ``norm_weight
        [d]``) and without a tied one (its one weight is the routed experts')."""
        if self.activation is not None:
            return self.activation
        if experts.output_norm is not None and not experts.output_norm.per_expert:
            return dataclasses.replace(experts, output_norm=None)
        return experts


@dataclasses.dataclass(frozen=True)
class ZeroExperts:
    """Zero-computation experts (LongCat-Flash; MoE++), routed like the FFN experts: ``identity``
    experts that return their input and ``constant`` experts that return a learned vector
    ``c_i [d]`` (``zero_constants [constant, d]``, zero-initialised). With E FFN experts the
    router chooses among E + identity + constant: a choice e < E is FFN expert e, then the
    identity experts, then the constant ones; a chosen zero-computation expert adds ``w x``
    (identity) or ``w c_i`` (constant) to the token's output, w its combine weight. They cost no
    FFN and no exchange; their slots (capacity) and loads are counted like the others'."""

    identity: int = 0
    constant: int = 0

    def __post_init__(self):
        int_at_least("ZeroExperts.identity", self.identity, 0)
        int_at_least("ZeroExperts.constant", self.constant, 0)
        if self.count == 0:
            raise ValueError("ZeroExperts needs identity >= 1 or constant >= 1 (None: no zero-computation experts)")

    @property
    def count(self) -> int:
        return self.identity + self.constant

    def outputs(self, groups: Array, token_expert: Array, token_weight: Array, num_experts: int,
                constants: Array | None) -> Array:
        """What the zero-computation choices add: ``groups [G, S, d]``, ``token_expert`` /
        ``token_weight [G, S, K]`` (0 where dropped) over E FFN experts first; ``constants
        [constant, d]``. Returns ``sum_k w_k (x or c_{e_k})`` ``[G, S, d]`` float32."""
        is_identity = (token_expert >= num_experts) & (token_expert < num_experts + self.identity)  # [G, S, K]
        w_identity = jnp.sum(jnp.where(is_identity, token_weight, 0.0), axis=-1)  # [G, S]
        y = w_identity[..., None] * groups.astype(jnp.float32)  # [G, S, d]
        if self.constant:
            first = num_experts + self.identity
            w_constant = jnp.where(token_expert >= first, token_weight, 0.0)  # [G, S, K]
            picked = constants.astype(jnp.float32)[jnp.clip(token_expert - first, 0, self.constant - 1)]  # [G, S, K, d]
            y = y + jnp.einsum("gsk,gskd->gsd", w_constant, picked)
        return y


def expert_ffn(x: Array, params: dict[str, Array], activation: str | Activation,
               model_axis: str | None = None, hidden_scale: Array | None = None) -> Array:
    """The bank's math as a pure function of stacked weights.

    Args:
      x: [E, N, d] tokens already dispatched to each expert.
      params: ``w_in [E, d, f]``, ``w_out [E, f, d]``, gated: ``w_gate [E, d, f]``,
        optional ``b_in [E, f]``, ``b_gate [E, f]`` (gated), ``b_out [E, d]``; with the
        activation's ``output_norm`` its weight: each expert's ``norm_weight [E, d]`` or the tied
        ``tied_norm_weight [d]``.
      model_axis: inside ``shard_map``, the mesh axis the hidden dim f is split over
        (:func:`sum_over_model`), or None.
      hidden_scale: [E, N, f] multiplies the activated hidden units before the down
        projection (the shared experts' router weights, :func:`shared_ffn`), or None.
    Returns:
      [E, N, d].
    """
    act = as_activation(activation)
    up = jnp.einsum("end,edf->enf", x, params["w_in"])  # [E, N, f]
    if "b_in" in params:
        up = up + params["b_in"][:, None, :]
    gate = None
    if act.gated:
        gate = jnp.einsum("end,edf->enf", x, params["w_gate"])  # [E, N, f]
        if "b_gate" in params:
            gate = gate + params["b_gate"][:, None, :]
    h = act(up, gate)  # [E, N, f]
    if hidden_scale is not None:
        h = h * hidden_scale.astype(h.dtype)
    y = sum_over_model(jnp.einsum("enf,efd->end", h, params["w_out"]), model_axis)  # [E, N, d]
    if "b_out" in params:
        y = y + params["b_out"][:, None, :]
    if act.output_norm is not None:  # after the sum over the model axis: the norm reads all of d
        weight = params["norm_weight"][:, None, :] if "norm_weight" in params else params["tied_norm_weight"]
        y = act.output_norm(y, weight)  # [E, N, d]
    return y


def sum_over_model(y_partial: Array, model_axis: str | None) -> Array:
    """The FFN output from the shards of its hidden dim: ``y = sum_j act(x W_in[:, f_j])
    W_out[f_j, :]`` (the activation is elementwise in f, so each shard f_j computes its
    part and one ``psum`` over ``model_axis`` adds them, before the output bias)."""
    return y_partial if model_axis is None else jax.lax.psum(y_partial, model_axis)


def _stacked_init(key: Array, shape: tuple[int, ...], dtype) -> Array:
    """Truncated normal with variance 1 / fan_in, fan_in = shape[-2] (per expert)."""
    init = jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )
    return init(key, shape, dtype)


class ExpertBank(nnx.Module):
    """E expert FFNs as stacked weights; ``__call__(x [E, N, d]) -> [E, N, d]``.

    ``activation``: a name of :data:`ACTIVATIONS` or an :class:`Activation` (with an
    :class:`OutputNorm`: ``norm_weight [E, d]`` per expert, or ``tied_norm_weight [d]``);
    ``use_bias``: ``b_in [E, f]`` (and ``b_gate [E, f]`` for a gated FFN) and ``b_out [E, d]``."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        *,
        activation: str | Activation = "gelu",
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        sharding: dict[str, dict] | None = None,
        rngs: nnx.Rngs,
    ):
        """``sharding``: Flax variable metadata per weight name (``out_sharding``, ...)."""
        activation = as_activation(activation)
        if min(num_experts, d_model, d_ff) < 1:
            raise ValueError(
                f"num_experts, d_model and d_ff must be >= 1, got {num_experts}, {d_model}, {d_ff}"
            )
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation  # an Activation
        self.dtype = dtype
        e, d, f = num_experts, d_model, d_ff
        meta = (sharding or {}).get
        self.w_in = nnx.Param(_stacked_init(rngs.params(), (e, d, f), param_dtype), **meta("w_in", {}))
        if activation.gated:
            self.w_gate = nnx.Param(_stacked_init(rngs.params(), (e, d, f), param_dtype), **meta("w_gate", {}))
        self.w_out = nnx.Param(_stacked_init(rngs.params(), (e, f, d), param_dtype), **meta("w_out", {}))
        if use_bias:
            self.b_in = nnx.Param(jnp.zeros((e, f), param_dtype), **meta("b_in", {}))
            if activation.gated:
                self.b_gate = nnx.Param(jnp.zeros((e, f), param_dtype), **meta("b_gate", {}))
            self.b_out = nnx.Param(jnp.zeros((e, d), param_dtype), **meta("b_out", {}))
        norm = activation.output_norm
        if norm is not None:  # offset + g = 1 at init
            shape = (e, d) if norm.per_expert else (d,)
            setattr(self, norm.weight_name, nnx.Param(jnp.full(shape, 1.0 - norm.offset, param_dtype),
                                                      **meta(norm.weight_name, {})))

    def params(self) -> dict[str, Array]:
        """The weights as a plain dict (in the compute dtype), for :func:`expert_ffn`."""
        names = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out", "norm_weight", "tied_norm_weight")
        return {n: getattr(self, n)[...].astype(self.dtype) for n in names if hasattr(self, n)}

    def __call__(self, x: Array) -> Array:
        if x.ndim != 3 or x.shape[0] != self.num_experts or x.shape[2] != self.d_model:
            raise ValueError(
                f"expert inputs must be [E={self.num_experts}, N, d={self.d_model}], got {x.shape}"
            )
        return expert_ffn(x.astype(self.dtype), self.params(), self.activation)


def shared_ffn(x: Array, params: dict[str, Array], activation: str | Activation,
               model_axis: str | None = None, expert_weight: Array | None = None) -> Array:
    """The shared expert on tokens ``x [T, d] -> [T, d]``: one dense FFN
    (:func:`expert_ffn` with E = 1; params ``w_in [d, F]``, ``w_gate [d, F]`` when gated,
    ``w_out [F, d]``, ``norm_weight [d]`` with the activation's output norm), times
    ``sigmoid(x w_g)`` per token when ``gate_weight [d, 1]`` is there (Qwen2-MoE's
    shared-expert gate, computed in float32).

    ``expert_weight [T, n]`` (a router that weights the shared experts: ``plan.shared_weight``):
    the FFN is n shared experts side by side, hidden units ``i F/n .. (i + 1) F/n - 1`` expert
    i's, and each one's hidden units are scaled by its weight: ``y = sum_i w_i FFN_i(x)``
    (:func:`shared_unit_weights`)."""
    ffn = {name: params[name][None] for name in ("w_in", "w_gate", "w_out", "norm_weight") if name in params}
    scale = None
    if expert_weight is not None:
        scale = shared_unit_weights(expert_weight, params["w_in"].shape[-1], model_axis)[None]  # [1, T, f]
    y = expert_ffn(x[None], ffn, activation, model_axis, scale)[0]  # [T, d]
    if "gate_weight" in params:
        gate = jax.nn.sigmoid(x.astype(jnp.float32) @ params["gate_weight"].astype(jnp.float32))  # [T, 1]
        y = (gate * y.astype(jnp.float32)).astype(y.dtype)
    return y


def shared_unit_weights(expert_weight: Array, width: int, model_axis: str | None = None) -> Array:
    """Each hidden unit's weight ``[T, width]`` from the n shared experts' ``expert_weight [T, n]``:
    global hidden unit j is shared expert ``j // (F / n)``'s, F the full hidden width. Inside
    ``shard_map`` with the hidden dim split over ``model_axis`` the device holds ``width = F / M``
    units starting at ``axis_index * width`` (an expert's units may span two devices)."""
    n = expert_weight.shape[-1]
    shards = 1 if model_axis is None else jax.lax.axis_size(model_axis)
    first = 0 if model_axis is None else jax.lax.axis_index(model_axis) * width
    units = first + jnp.arange(width)  # [width] global hidden unit indices
    return jnp.take(expert_weight, units // (width * shards // n), axis=-1)  # [T, width]


class SharedExpert(nnx.Module):
    """The shared expert: a dense FFN of width ``d_ff`` every token goes through
    (:func:`shared_ffn`), initialised like one expert; ``gate=True`` adds Qwen2-MoE's
    per-token gate weight ``gate_weight [d, 1]``; an activation with an :class:`OutputNorm` its
    own weight ``norm_weight [d]``."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str | Activation = "gelu", gate: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, sharding: dict[str, dict] | None = None,
                 rngs: nnx.Rngs):
        activation = as_activation(activation)
        if min(d_model, d_ff) < 1:
            raise ValueError(f"d_model and shared_d_ff must be >= 1, got {d_model}, {d_ff}")
        self.d_model, self.d_ff, self.activation, self.dtype = d_model, d_ff, activation, dtype
        meta = (sharding or {}).get
        self.w_in = nnx.Param(_stacked_init(rngs.params(), (1, d_model, d_ff), param_dtype)[0], **meta("w_in", {}))
        if activation.gated:
            self.w_gate = nnx.Param(_stacked_init(rngs.params(), (1, d_model, d_ff), param_dtype)[0],
                                    **meta("w_gate", {}))
        self.w_out = nnx.Param(_stacked_init(rngs.params(), (1, d_ff, d_model), param_dtype)[0], **meta("w_out", {}))
        if gate:
            self.gate_weight = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d_model, 1), param_dtype),
                                         **meta("gate_weight", {}))
        if activation.output_norm is not None:  # its own weight, per expert or not; offset + g = 1 at init
            self.norm_weight = nnx.Param(jnp.full((d_model,), 1.0 - activation.output_norm.offset, param_dtype),
                                         **meta("norm_weight", {}))

    def params(self) -> dict[str, Array]:
        """The weights as a plain dict (in the compute dtype), for :func:`shared_ffn`."""
        names = ("w_in", "w_gate", "w_out", "gate_weight", "norm_weight")
        return {n: getattr(self, n)[...].astype(self.dtype) for n in names if hasattr(self, n)}

    def __call__(self, x: Array) -> Array:
        """x [..., d] -> [..., d]."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"shared expert input's last dim must be d={self.d_model}, got {x.shape}")
        y = shared_ffn(x.reshape(-1, self.d_model).astype(self.dtype), self.params(), self.activation)
        return y.reshape(x.shape)
