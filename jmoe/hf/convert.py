"""``load_moe`` / ``save_moe`` / ``moe_kwargs`` / ``moe_block``: one MoE layer of a Hugging Face
checkpoint as a :class:`jmoe.MoE` (or the :mod:`jmoe.hf.blocks` module around one, where the block
holds more) and back. The family tables are in :mod:`jmoe.hf.families`, the files in
:mod:`jmoe.hf.files`."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmoe.hf import blocks, families
from jmoe.hf.files import Checkpoint, CheckpointError, checkpoint_dir, hub_array, read_config, write_tensors
from jmoe.layer import MoE
from jmoe.options import layer_arguments


def moe_kwargs(config: dict, layer: int | None = None, stack: str | None = None) -> dict:
    """The :class:`jmoe.MoE` arguments of a checkpoint's MoE block, from its ``config.json``
    (a dict), so ``jmoe.MoE(**moe_kwargs(config), rngs=nnx.Rngs(0))`` is a fresh layer of that
    family's shape and semantics (``d_model``, ``d_ff``, ``num_experts`` included; a multimodal
    config's ``text_config`` is used). The families that never drop a token
    (transformers computes every choice) are dropless (``capacity_factor=None``); Switch keeps
    its per-sequence ``expert_capacity``. ``layer``: the block of that layer, for a family with
    per-layer options (Step-3.5's ``swiglu_limits``; without it they must agree across layers);
    ``stack``: an encoder-decoder's ``"encoder"`` or ``"decoder"``, for per-stack options (NLLB-MoE's
    ``encoder_ffn_dim``; without it they must agree across the stacks). A family whose block
    holds more than the experts (:mod:`jmoe.hf.blocks`: Gemma 4's norms and dense MLP, Muse
    Spark's projections, ...): the ``jmoe.MoE`` inside it (:func:`moe_block` builds the whole
    block)."""
    family = families.family_of(config.get("model_type"))
    return layer_arguments(family.moe_kwargs(_resolved(family, config, layer, stack)))


def moe_block(config: dict, layer: int | None = None, *, stack: str | None = None, rngs: nnx.Rngs | None = None,
              **overrides):
    """A fresh module of the family's MoE block from its ``config.json`` (a dict): the
    ``jmoe.MoE(**moe_kwargs(config, layer, stack), **overrides)``, or where the block holds more
    (norms, projections, a dense branch, an output bias, modality-isolated experts) the
    :mod:`jmoe.hf.blocks` module around it (its ``moe`` attribute); what :func:`load_moe` fills
    with a checkpoint's weights. ``rngs``: default ``nnx.Rngs(0)``."""
    family = families.family_of(config.get("model_type"))
    config = _resolved(family, config, layer, stack)
    kwargs = {**layer_arguments(family.moe_kwargs(config)), **overrides}
    return blocks.build(family.block(config), kwargs, rngs=rngs or nnx.Rngs(0))


def _resolved(family: families.Family, config: dict, layer: int | None, stack: str | None) -> dict:
    """The config with the stack's (``stack`` not None) and then the layer's (``layer`` not None)
    own options resolved (:attr:`Family.at_stack`, :attr:`Family.at_layer`)."""
    if stack is not None:
        config = family.at_stack(config, _stack(family, config.get("model_type"), stack))
    return config if layer is None else family.at_layer(config, layer)


def _stack(family: families.Family, model_type: str, stack: str | None) -> str | None:
    if not family.stacks:
        if stack is not None:
            raise CheckpointError(f"{model_type}: stack={stack!r} is only for encoder-decoder families")
        return None
    stack = family.stacks[0] if stack is None else stack
    if stack not in family.stacks:
        raise CheckpointError(f"{model_type}: stack must be one of {family.stacks}, got {stack!r}")
    return stack


def _check_layer(family: families.Family, config: dict, layer: int, stack: str | None) -> None:
    count = family.layer_count(config, stack)
    where = f" of the {stack}" if stack else ""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < count:
        raise CheckpointError(f"layer={layer!r}: this {config.get('model_type')} checkpoint has {count} layers{where} "
                              f"(0..{count - 1})")
    reason = family.dense_reason(config, layer, stack)
    if reason is not None:
        moe_layers = [i for i in range(count) if family.dense_reason(config, i, stack) is None]
        raise CheckpointError(f"layer {layer}{where} of this {config.get('model_type')} checkpoint is dense (a plain "
                              f"FFN, no experts): {reason}; its MoE layers are {moe_layers}")


def _variable(layer: MoE, path: str):
    module = layer
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _assign(variable, value: np.ndarray) -> None:
    """Set an NNX variable, keeping its dtype and its sharding (placed as the layer places it)."""
    old = variable.get_value()
    new = jnp.asarray(value, dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    variable.set_value(jax.device_put(new, sharding) if sharding is not None else new)


def _prefix(family: families.Family, config: dict, stack, layer: int, names) -> str:
    """Layer ``layer``'s prefix: the first of the family's names under which the checkpoint
    (tensor ``names``) holds something of that layer; the hub's name when it holds nothing."""
    candidates = [p.format(i=layer) for p in family.prefix(config, stack)]
    for prefix in candidates:
        if any(name.startswith(prefix) for name in names):
            return prefix
    return candidates[0]


def _rules(family: families.Family, config: dict, layer: MoE) -> list:
    """The family's rules whose jmoe weights this layer has (no shared expert: no shared rules)."""
    return [rule for rule in family.rules(config) if _variable(layer, rule.paths[0]) is not None]


def load_moe(path, layer: int, *, dtype=None, mesh=None, stack: str | None = None, **overrides):
    """Layer ``layer``'s MoE block of the Hugging Face checkpoint in folder ``path`` as a
    :class:`jmoe.MoE` with the family's routing, experts, shared experts and the checkpoint's
    weights (only that layer's tensors are read; a sharded checkpoint's other files are not
    opened). In eval mode (``moe.eval()``) its ``y`` is transformers' MoE block output (routed +
    shared experts, no residual); ``aux`` comes with it as for any jmoe layer.

    Where the block holds more than its experts it is the :mod:`jmoe.hf.blocks` module around
    the ``jmoe.MoE`` (its ``moe`` attribute), called the same way, whose ``y`` is the whole
    block's output: a :class:`~jmoe.hf.blocks.MoEBlock` (A.X-K1's output norm, JetMoE's output
    bias, Muse Spark's and Nemotron-H's projections around the experts and Nemotron-H's shared
    expert, Gemma 4's whole FFN sub-layer: its dense MLP and its MoE with their norms) or a
    :class:`~jmoe.hf.blocks.ModalityMoE` (Ernie 4.5-VL: ``token_type_ids=``).

    Args:
      path: a local checkpoint folder (``config.json`` + ``model.safetensors`` or a sharded
        ``model.safetensors.index.json``). Nothing is downloaded.
      layer: the decoder layer (Switch: the block of ``stack``) index.
      dtype: the layer's compute and expert-weight dtype (default float32); the router is float32.
      mesh: place the weights on this mesh as the layer places them (experts on the expert axis).
      stack: the encoder-decoder families (Switch Transformers, NLLB-MoE): ``"encoder"`` (default)
        or ``"decoder"``.
      overrides: any other :class:`jmoe.MoE` argument, over :func:`moe_kwargs` (e.g.
        ``capacity_factor=1.25`` for capacity routing, ``dispatch="gather"``).

    Supported ``model_type``: :data:`jmoe.hf.SUPPORTED` (mixtral, qwen2_moe, qwen3_moe, deepseek_v3,
    deepseek_v2, olmoe, gpt_oss (also MXFP4), switch_transformers, llama4 (multimodal), llama4_text,
    and transformers 5.25's families on these blocks: glm4_moe, qwen3_next, qwen3_vl_moe, ...;
    a multimodal checkpoint's ``text_config`` and text-model prefix are read); DeepSeek-V3's
    block-scaled FP8 weights are dequantized too. Another known MoE ``model_type`` is an error
    naming what its block needs (``jmoe.hf.families.MISSING``).

    Raises:
      CheckpointError (a ValueError): a dense layer (naming it and why), an unsupported
        model_type (listing the supported), a missing tensor (its name), a shape mismatch (the
        name and both shapes), a non-finite weight (its name), a hub id instead of a folder.
    """
    folder = checkpoint_dir(path)
    config = read_config(folder)
    model_type = config.get("model_type")
    family = families.family_of(model_type)
    stack = _stack(family, model_type, stack)
    _check_layer(family, config, layer, stack)
    # the family's flat options (the stack's and layer's own where they have them) -> its block
    if dtype is not None:
        overrides.update(dtype=dtype, param_dtype=dtype)
    moe = moe_block(config, layer, stack=stack, mesh=mesh, **overrides)  # random weights, all replaced below
    moe.eval()
    checkpoint = Checkpoint(folder, config)
    prefix = _prefix(family, config, stack, layer, checkpoint.names())
    for rule in _rules(family, config, moe):
        variables = [_variable(moe, p) for p in rule.paths]
        expected = rule.hub(tuple(variables[0].get_value().shape))
        tensors = {}
        for name, shape in expected.items():
            full = prefix + name
            if full not in checkpoint and checkpoint.quantization(full) is None:
                raise CheckpointError(f"tensor {full!r} is missing from the checkpoint in {folder} "
                                      f"({model_type}, layer {layer}: {type(moe).__name__} needs it)")
            value = families.in_layout(rule, checkpoint.float32(full), shape)
            if tuple(value.shape) != tuple(shape):
                raise CheckpointError(f"tensor {full!r} has shape {tuple(value.shape)} in the checkpoint, expected "
                                      f"{tuple(shape)} from its config.json")
            if not np.all(np.isfinite(value)):
                raise CheckpointError(f"tensor {full!r} has non-finite values (nan or inf)")
            tensors[name] = value
        values = rule.to_jmoe(tensors)
        for variable, value in zip(variables, values if len(rule.paths) > 1 else (values,)):
            _assign(variable, value)
    return moe


def export_moe(layer: MoE, layer_index: int, model_type: str, *, config: dict | None = None,
               stack: str | None = None, names=()) -> dict[str, np.ndarray]:
    """The layer's weights as the family's checkpoint tensors (float32, integer tables as they are
    (:func:`hub_array`); full hub names; the
    prefix the tensor ``names`` of an existing checkpoint use, else the hub's)."""
    family = families.family_of(model_type)
    config = dict(config or {}, model_type=model_type)
    stack = _stack(family, model_type, stack)
    prefix = _prefix(family, config, stack, layer_index, names)
    out: dict[str, np.ndarray] = {}
    for rule in _rules(family, config, layer):
        values = [hub_array(jax.device_get(_variable(layer, p).get_value())) for p in rule.paths]
        for name, value in rule.to_hub(*values).items():
            out[prefix + name] = hub_array(value)
    return out


def save_moe(layer: MoE, path, layer_index: int, model_type: str, *, stack: str | None = None) -> list[str]:
    """The inverse of :func:`load_moe`: write ``layer``'s weights under the family's names for
    layer ``layer_index``, so a layer fine-tuned with jmoe goes back into its checkpoint.

    Into a checkpoint folder (``model.safetensors`` or a sharded index): each of the layer's
    tensors replaces the stored one in the file that holds it, in its stored dtype (bfloat16
    stays bfloat16), every other tensor unchanged. Into a folder without weights: a new
    ``model.safetensors`` with the layer's tensors in float32 (put the family's config.json next
    to it to load it back). Returns the files written. A checkpoint whose layer is stored
    quantized (MXFP4, FP8) is an error: save into a new folder.
    """
    folder = pathlib.Path(os.fspath(path)).expanduser()
    config = read_config(folder) if (folder / "config.json").exists() else {"model_type": model_type}
    if config.get("model_type") != model_type:
        raise CheckpointError(f"save_moe(model_type={model_type!r}) into {folder}, whose config.json says "
                              f"model_type={config.get('model_type')!r}")
    family = families.family_of(model_type)
    if (folder / "config.json").exists():
        _check_layer(family, config, layer_index, _stack(family, model_type, stack))
    checkpoint = None
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        checkpoint = Checkpoint(folder)
    tensors = export_moe(layer, layer_index, model_type, config=config, stack=stack,
                         names=checkpoint.names() if checkpoint else ())
    if checkpoint is not None:
        for name in tensors:
            kind = checkpoint.quantization(name)
            if kind is not None:
                raise CheckpointError(f"tensor {name!r} is stored {kind}-quantized in {folder}; save_moe writes "
                                      f"unquantized float weights: save into a new folder")
            if name in checkpoint:  # a family's tensor the hub has in either layout: the stored one
                tensors[name] = families.in_layout(None, tensors[name], checkpoint.shape(name))
    return write_tensors(folder, tensors)
