"""MoE blocks that hold more than a :class:`jmoe.MoE`: the small Flax NNX modules
:func:`jmoe.hf.load_moe` returns where a Hugging Face block has norms, projections, a dense
branch or an output bias around its experts, or two expert sets chosen per token by modality.

Each is called like ``jmoe.MoE`` (``(x, *, token_mask=None, ...) -> (y, aux)``, x ``[B, S, d]`` or
``[T, d]``) and its ``y`` is the whole block's output, never the residual connection or anything
of the attention. Its ``moe`` attribute is the :class:`jmoe.MoE` inside (what
:func:`jmoe.hf.moe_kwargs` describes), so the family tables address weights as
``moe.experts.w_gate`` or ``post_norm.scale``. Which pieces a block has is data
(:class:`BlockSpec`, from the family table), never a model name.

:class:`MoEBlock`, with every piece optional::

    z = in_norm(in_proj(x))                            the experts' input [.., d_e]
    r = moe(z, router_input=x)                         the router reads x (router_input only when z is not x)
    r = out_norm(out_proj(r))                          [.., d]
    y = r + shared_out_norm(shared(shared_in_norm(x)))  a dense FFN branch on x
    y = post_norm(y) + bias

Gemma 4: ``in_norm`` / ``out_norm`` around the experts (the router reads the un-normed x), its
dense MLP as the branch with its two norms, ``post_norm`` over the sum; A.X-K1: ``post_norm``;
Muse Spark: ``in_proj`` + ``in_norm`` and ``out_proj`` (experts of width ``d_e``); Nemotron-H:
the latent ``in_proj`` / ``out_proj`` and its shared expert on x as the branch; JetMoE: ``bias``.

:class:`ModalityMoE` (Ernie 4.5-VL): a token's experts are the text set or the vision set by its
token type, plus shared experts on every token.

On a mesh given to ``load_moe`` (``mesh=``) the ``jmoe.MoE`` inside places its weights, the block
its shared expert like a dense FFN and the other pieces replicated (:func:`on_mesh_of`); they
run outside the MoE's ``shard_map``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jmoe.checks import finite_number, positive_number
from jmoe.elementwise import rms_norm
from jmoe.experts import Shared, SharedExpert
from jmoe.layer import MoE
from jmoe.parallel.placement import moe_param_spec, to_global

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Norm:
    """An RMSNorm's options: ``eps`` (inside the square root) and ``offset`` (the weight is stored
    as ``g`` and scales by ``offset + g``: 0 for Llama / Gemma 4's ``x * w``, 1 for Muse Spark's
    centered ``x * (1 + w)``)."""

    eps: float = 1e-6
    offset: float = 0.0

    def __post_init__(self):
        positive_number("Norm.eps", self.eps)
        finite_number("Norm.offset", self.offset)


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x^2) + eps) * (offset + g)`` over the last axis, in float32, cast to
    x's dtype; ``g = scale [d]``, initialised so that ``offset + g = 1``."""

    def __init__(self, d: int, norm: Norm, *, param_dtype=jnp.float32):
        self.norm = norm
        self.scale = nnx.Param(jnp.full((d,), 1.0 - norm.offset, param_dtype))

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.norm.eps, self.norm.offset)


class Linear(nnx.Module):
    """``y = x W (+ b)``: ``kernel [d_in, d_out]`` (a torch Linear weight transposed), ``bias
    [d_out]`` when ``use_bias``; computed in ``dtype``."""

    def __init__(self, d_in: int, d_out: int, *, use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d_in, d_out), param_dtype))
        if use_bias:
            self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype))

    def __call__(self, x: Array) -> Array:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)  # [..., d_out]
        if hasattr(self, "bias"):
            y = y + self.bias[...].astype(self.dtype)
        return y


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """The pieces of a :class:`MoEBlock` around its ``jmoe.MoE`` (the module docstring's formula):

    ``expert_width``: the experts' width d_e, reached by ``in_proj [d, d_e]`` and left by
    ``out_proj [d_e, d]`` (None: the experts read x's width, no projections), biased when
    ``proj_bias``; ``in_norm`` / ``out_norm``: RMSNorms on the experts' input / the routed output;
    ``shared``: a dense FFN branch on x (:class:`jmoe.experts.Shared`: its width and activation,
    no gate) with its own ``shared_in_norm`` / ``shared_out_norm``; ``post_norm``: an RMSNorm on
    the sum; ``output_bias``: a learned ``bias [d]`` added last."""

    expert_width: int | None = None
    proj_bias: bool = False
    in_norm: Norm | None = None
    out_norm: Norm | None = None
    shared: Shared | None = None
    shared_in_norm: Norm | None = None
    shared_out_norm: Norm | None = None
    post_norm: Norm | None = None
    output_bias: bool = False

    def __post_init__(self):
        if (self.shared_in_norm or self.shared_out_norm) and self.shared is None:
            raise ValueError("shared_in_norm / shared_out_norm are the dense branch's: they need shared=")
        if self.shared is not None and self.shared.gate:
            raise ValueError("a block's dense branch has no gate (Shared(gate=False))")


def call_moe(moe: MoE, x: Array, **kwargs) -> tuple[Array, dict | None]:
    """``moe(x, **kwargs)`` as ``(y, aux)`` (aux None for a ``sow_aux=True`` layer, which sows it)."""
    out = moe(x, **kwargs)
    return (out, None) if moe.sow_aux else out


def finish(moe: MoE, y: Array, aux: dict | None, token_mask: Array | None):
    """``y`` with masked tokens 0 (as ``jmoe.MoE`` gives them), returned as the MoE inside returns."""
    if token_mask is not None:
        y = jnp.where(token_mask[..., None], y, jnp.zeros((), y.dtype))
    return y if moe.sow_aux else (y, aux)


class MoEBlock(nnx.Module):
    """A ``jmoe.MoE`` with the :class:`BlockSpec`'s pieces around it (the module docstring's
    formula); ``__call__(x [..., d], *, token_mask=None, token_ids=None) -> (y [..., d], aux)``,
    aux the ``jmoe.MoE``'s. x's width d is the MoE's router input width (``router_d_model``:
    the router reads x); the MoE's ``d_model`` is ``spec.expert_width`` when set. The pieces
    compute in the MoE's dtype, the norms in float32."""

    def __init__(self, moe: MoE, spec: BlockSpec, *, rngs: nnx.Rngs):
        d, dtype = moe.router_d_model, moe.dtype
        param_dtype = moe.experts.w_in.get_value().dtype
        width = d if spec.expert_width is None else spec.expert_width
        if moe.d_model != width:
            raise ValueError(f"the MoE's d_model={moe.d_model} must be the experts' width {width} (its "
                             f"router_d_model={d} is the block's input width)")
        self.spec, self.d_model = spec, d
        if spec.expert_width is not None:
            self.in_proj = Linear(d, width, use_bias=spec.proj_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if spec.in_norm is not None:
            self.in_norm = RMSNorm(width, spec.in_norm, param_dtype=param_dtype)
        self.moe = moe
        if spec.expert_width is not None:
            self.out_proj = Linear(width, d, use_bias=spec.proj_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if spec.out_norm is not None:
            self.out_norm = RMSNorm(d, spec.out_norm, param_dtype=param_dtype)
        if spec.shared is not None:
            self.shared_expert = SharedExpert(d, spec.shared.d_ff, activation=spec.shared.activation_for(
                moe.experts.activation), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for name in ("shared_in_norm", "shared_out_norm", "post_norm"):
            if getattr(spec, name) is not None:
                setattr(self, name, RMSNorm(d, getattr(spec, name), param_dtype=param_dtype))
        if spec.output_bias:
            self.bias = nnx.Param(jnp.zeros((d,), param_dtype))

    @property
    def routes_on_input(self) -> bool:
        """Whether the experts read something else than x (then the router reads x)."""
        return hasattr(self, "in_proj") or hasattr(self, "in_norm")

    def __call__(self, x: Array, *, token_mask: Array | None = None, token_ids: Array | None = None):
        if x.shape[-1] != self.d_model:
            raise ValueError(f"block input's last dim must be d_model={self.d_model}, got shape {x.shape}")
        z = x
        if hasattr(self, "in_proj"):
            z = self.in_proj(z)  # [..., d_e]
        if hasattr(self, "in_norm"):
            z = self.in_norm(z)
        r, aux = call_moe(self.moe, z, token_mask=token_mask, token_ids=token_ids,
                          router_input=x if self.routes_on_input else None)  # [..., d_e]
        if hasattr(self, "out_proj"):
            r = self.out_proj(r)  # [..., d]
        if hasattr(self, "out_norm"):
            r = self.out_norm(r)
        y = r.astype(x.dtype)
        if hasattr(self, "shared_expert"):
            s = self.shared_in_norm(x) if hasattr(self, "shared_in_norm") else x
            s = self.shared_expert(s)  # [..., d]
            y = y + (self.shared_out_norm(s) if hasattr(self, "shared_out_norm") else s).astype(x.dtype)
        if hasattr(self, "post_norm"):
            y = self.post_norm(y)
        if hasattr(self, "bias"):
            y = y + self.bias[...].astype(y.dtype)
        return finish(self.moe, y, aux, token_mask)


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    """A :class:`ModalityMoE`: the vision experts' width ``vision_d_ff`` (the rest of their
    ``jmoe.MoE`` as the text experts') and the shared experts (None: none)."""

    vision_d_ff: int
    shared: Shared | None = None


def build(spec: BlockSpec | ModalitySpec | None, moe_kwargs: dict, *, rngs: nnx.Rngs):
    """A fresh module of ``spec`` around ``jmoe.MoE(**moe_kwargs)`` (its arguments, as
    :func:`jmoe.options.layer_arguments` gives them); None: that ``jmoe.MoE`` alone."""
    moe = MoE(**moe_kwargs, rngs=rngs)
    if spec is None:
        return moe
    if isinstance(spec, ModalitySpec):
        block = ModalityMoE(moe, MoE(**dict(moe_kwargs, d_ff=spec.vision_d_ff), rngs=rngs), spec.shared, rngs=rngs)
    else:
        block = MoEBlock(moe, spec, rngs=rngs)
    return on_mesh_of(moe, block)


def on_mesh_of(moe: MoE, block: nnx.Module) -> nnx.Module:
    """``block`` with every variable on the mesh its ``jmoe.MoE`` was given (``mesh=``): the MoE's as
    it placed them, a shared expert like a dense FFN, the other pieces replicated
    (:func:`jmoe.parallel.placement.moe_param_spec`), so one jit sees one set of devices."""
    mesh = moe.mesh_options.mesh
    if not isinstance(mesh, jax.sharding.Mesh):
        return block

    def place(path, value):
        if not hasattr(value, "shape"):
            return value
        return to_global(value, mesh, moe_param_spec(path, mesh, value.shape) or PartitionSpec())

    nnx.update(block, jax.tree_util.tree_map_with_path(place, nnx.state(block)))
    return block


class ModalityMoE(nnx.Module):
    """Modality-isolated experts (Ernie 4.5-VL): ``moe`` (the text experts) routes the text tokens,
    ``vision_moe`` (its own router, experts and width) the others, each token through its own set
    only, plus an optional dense ``shared_expert`` on every token::

        y = moe(x, text tokens) + vision_moe(x, vision tokens) + shared(x)

    ``__call__(x [..., d], *, token_type_ids=None, token_mask=None)``: ``token_type_ids`` (x's shape
    without d, integers): 0 a text token, anything else a vision one (image / video); None: all
    text. Each set is a ``jmoe.MoE`` called with a token mask, so a token takes no slot of the
    other set and gets 0 from it. aux: the text experts' values, the vision experts' under
    ``vision_`` + their name (add both losses to an objective)."""

    def __init__(self, moe: MoE, vision_moe: MoE, shared: Shared | None, *, rngs: nnx.Rngs):
        if moe.d_model != vision_moe.d_model:
            raise ValueError(f"the text and vision experts read the same tokens: d_model {moe.d_model} != "
                             f"{vision_moe.d_model}")
        self.moe, self.vision_moe, self.d_model = moe, vision_moe, moe.d_model
        if shared is not None:
            self.shared_expert = SharedExpert(moe.d_model, shared.d_ff, activation=shared.activation_for(
                moe.experts.activation), dtype=moe.dtype, param_dtype=moe.experts.w_in.get_value().dtype, rngs=rngs)

    def __call__(self, x: Array, *, token_type_ids: Array | None = None, token_mask: Array | None = None):
        if token_type_ids is not None and token_type_ids.shape != x.shape[:-1]:
            raise ValueError(f"token_type_ids must have shape {x.shape[:-1]}, got {token_type_ids.shape}")
        valid = jnp.ones(x.shape[:-1], jnp.bool_) if token_mask is None else token_mask  # [...]
        vision = jnp.zeros_like(valid) if token_type_ids is None else token_type_ids != 0  # [...]
        y, aux = call_moe(self.moe, x, token_mask=valid & ~vision)
        y_vision, aux_vision = call_moe(self.vision_moe, x, token_mask=valid & vision)
        y = y + y_vision
        if hasattr(self, "shared_expert"):
            y = y + self.shared_expert(x).astype(y.dtype)
        if aux is not None:
            aux = {**aux, **{f"vision_{name}": value for name, value in aux_vision.items()}}
        return finish(self.moe, y, aux, token_mask)
