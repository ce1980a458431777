"""What each Hugging Face MoE family stores, and how it maps onto :class:`jmoe.MoE`.

All family knowledge of jmoe lives here (the layer knows no model names). A family is

* ``moe_kwargs(config)``: the options of its MoE block as flat keys (``router="group_limited",
  n_group=..., shared_d_ff=...``; :func:`jmoe.options.layer_arguments` turns them into the
  ``jmoe.MoE`` arguments: router, activation and shared-expert objects) (transformers 5.x
  semantics, checked against transformers' own block outputs in tests/test_hf.py);
* ``prefix``: where layer i's MoE block lives in the checkpoint (the hub's name first, then
  other names the same weights have been saved under, e.g. Llama 4's text model inside the
  multimodal one as ``language_model.model.`` or ``model.language_model.``);
* ``dense_reason(config, i)``: why layer i has no MoE block (a dense FFN), or None;
* ``at_layer(config, i)``: the config with layer i's per-layer options resolved (Step-3.5's
  ``swiglu_limits``), which ``moe_kwargs`` then reads (default: the config); ``at_stack(config,
  stack)`` likewise an encoder-decoder's per-stack options (NLLB-MoE's ``encoder_ffn_dim``);
* ``rules``: the tensors, each a :class:`Rule` between one jmoe weight and its hub tensor(s);
* ``block(config)``: the pieces a block holds around its ``jmoe.MoE`` (norms, projections, a
  dense branch, an output bias: a :class:`jmoe.hf.blocks.BlockSpec`; a second expert set by
  modality: a :class:`jmoe.hf.blocks.ModalitySpec`), or None: the block is the ``jmoe.MoE``
  itself. With a block, ``moe_kwargs`` describes the ``jmoe.MoE`` inside and the rules' paths
  start at the block (``moe.experts.w_gate``, ``post_norm.scale``: :func:`within`).

jmoe's weights: ``router_weight [d, E]``, ``router_bias [E]``, ``selection_bias [E]`` (float32),
``experts.w_gate / w_in [E, d, f]``, ``experts.w_out [E, f, d]``, ``experts.b_gate / b_in [E, f]``,
``experts.b_out [E, d]``, the experts' output-norm weight ``experts.norm_weight [E, d]`` (per expert)
or ``experts.tied_norm_weight [d]``, ``shared_expert.w_gate / w_in [d, F]``,
``shared_expert.w_out [F, d]``, ``shared_expert.gate_weight [d, 1]``, ``shared_expert.norm_weight [d]``,
``token_experts [vocab, k]`` (int32, a hash router's table). torch's ``nn.Linear.weight`` is ``[out, in]``: transposed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

from jmoe.experts import Activation, OutputNorm, Shared
from jmoe.hf.blocks import BlockSpec, ModalitySpec, Norm
from jmoe.hf.files import CheckpointError

# Switch Transformers' capacity is an absolute number per sequence (config.expert_capacity): jmoe's
# C = max(ceil(k * factor * S / E), min_capacity), capped at S; with this factor the first term is
# at most 1, so C = min(expert_capacity, S) per sequence, in train and eval mode alike.
FIXED_CAPACITY_FACTOR = 1e-9

GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
PLAIN_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu2": "relu2",
                     "silu": "silu", "swish": "silu"}


# ---------------------------------------------------------------- rules: jmoe weight <-> hub tensors


@dataclasses.dataclass(frozen=True)
class Rule:
    """One jmoe weight (``path``, e.g. ``experts.w_gate``) and the hub tensors it comes from.

    ``hub(shape, E)``: hub name (relative to the layer prefix) -> expected shape, from the jmoe
    weight's shape; ``to_jmoe(tensors)``: the jmoe weight from those tensors (float32);
    ``to_hub(value)``: the inverse. ``either_layout``: a tensor stored with its last two axes
    swapped is read (and written back) in that layout, as transformers' ``Transpose(check_dims=True)``
    reads it: both layouts of Qwen3-VL-MoE's fused experts are on the hub."""

    path: str
    hub: Callable[[tuple[int, ...]], dict[str, tuple[int, ...]]]
    to_jmoe: Callable[[dict[str, np.ndarray]], np.ndarray]
    to_hub: Callable[[np.ndarray], dict[str, np.ndarray]]
    either_layout: bool = False  # the hub also stores its tensors with the last two axes swapped

    @property
    def paths(self) -> tuple[str]:
        return (self.path,)


def same(path: str, name: str) -> Rule:
    """A tensor stored as jmoe holds it (a vector; GPT-OSS / Llama 4 fused ``[E, in, out]``)."""
    return Rule(path, lambda shape: {name: shape}, lambda t: t[name], lambda v: {name: v})


def linear(path: str, name: str) -> Rule:
    """One torch Linear weight ``[out, in]`` <-> jmoe ``[in, out]``."""
    return Rule(path, lambda shape: {name: shape[::-1]}, lambda t: t[name].T, lambda v: {name: v.T})


def per_expert(path: str, template: str, first: int = 0) -> Rule:
    """E torch Linear weights ``template.format(first + j)`` ``[out, in]`` <-> jmoe ``[E, in, out]``
    (``first``: where this expert set starts in a list the hub numbers on: Ernie 4.5-VL's vision
    experts follow its text experts)."""
    def hub(shape):
        return {template.format(first + j): (shape[2], shape[1]) for j in range(shape[0])}

    def to_jmoe(t):
        return np.stack([t[template.format(first + j)].T for j in range(len(t))])

    return Rule(path, hub, to_jmoe, lambda v: {template.format(first + j): v[j].T for j in range(v.shape[0])})


@dataclasses.dataclass(frozen=True)
class PairRule:
    """A fused gate / up projection: two jmoe weights (``gate``, ``up`` paths, ``[..., d, f]`` or
    the bias ``[E, f]``) in one hub tensor ``name`` ``[..., d, 2f]``, interleaved (even / odd
    columns: GPT-OSS) or in two halves (gate first: Llama 4, Aria); ``transposed``: stored as
    torch Linear weights ``[..., 2f, d]`` (transformers 5's ``gate_up_proj``, Granite's
    ``input_linear``); ``either_layout``: as :class:`Rule`."""

    gate: str
    up: str
    name: str
    interleaved: bool
    transposed: bool = False
    either_layout: bool = False

    @property
    def paths(self) -> tuple[str, str]:
        return self.gate, self.up

    def hub(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        fused = (*shape[:-1], 2 * shape[-1])
        return {self.name: (*fused[:-2], fused[-1], fused[-2]) if self.transposed else fused}

    def to_jmoe(self, tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        value = tensors[self.name]
        if self.transposed:
            value = np.swapaxes(value, -1, -2)  # [..., d, 2f]
        if self.interleaved:
            return value[..., 0::2], value[..., 1::2]
        half = value.shape[-1] // 2
        return value[..., :half], value[..., half:]

    def to_hub(self, gate: np.ndarray, up: np.ndarray) -> dict[str, np.ndarray]:
        if not self.interleaved:
            out = np.concatenate([gate, up], axis=-1)
        else:
            out = np.empty((*gate.shape[:-1], 2 * gate.shape[-1]), np.float32)
            out[..., 0::2], out[..., 1::2] = gate, up
        return {self.name: np.swapaxes(out, -1, -2) if self.transposed else out}


@dataclasses.dataclass(frozen=True)
class RowsRule:
    """Two jmoe weights from the rows of one torch Linear weight ``name [a + b, in]``: its first
    a rows are ``first [in, a]``, the last b (``rest_rows``, from the config) ``rest [in, b]``
    (Inkling's router ``gate.weight [E + n, d]``: the routed experts' rows, then the shared
    experts')."""

    first: str
    rest: str
    name: str
    rest_rows: int

    @property
    def paths(self) -> tuple[str, str]:
        return self.first, self.rest

    def hub(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:  # shape: first's [in, a]
        return {self.name: (shape[1] + self.rest_rows, shape[0])}

    def to_jmoe(self, tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        value = tensors[self.name]  # [a + b, in]
        split = value.shape[0] - self.rest_rows
        return value[:split].T, value[split:].T

    def to_hub(self, first: np.ndarray, rest: np.ndarray) -> dict[str, np.ndarray]:
        return {self.name: np.concatenate([first.T, rest.T], axis=0)}


def fused_pair(gate: str, up: str, name: str, *, interleaved: bool, transposed: bool = False,
               either_layout: bool = False) -> PairRule:
    return PairRule(gate, up, name, interleaved, transposed, either_layout)


def per_expert_vector(path: str, template: str) -> Rule:
    """E vectors ``template.format(j)`` ``[n]`` <-> jmoe ``[E, n]`` (per-expert biases: NLLB-MoE's)."""
    return Rule(path, lambda shape: {template.format(j): (shape[1],) for j in range(shape[0])},
                lambda t: np.stack([t[template.format(j)] for j in range(len(t))]),
                lambda v: {template.format(j): v[j] for j in range(v.shape[0])})


def gated_experts(gate: str, up: str, down: str, prefix: str = "experts.") -> list:
    """Per-expert SwiGLU weights ``experts.{j}.<gate|up|down>.weight`` (Mixtral's w1/w3/w2,
    Qwen / DeepSeek / OLMoE's gate_proj / up_proj / down_proj); ``prefix``: the experts' module."""
    return [per_expert("experts.w_gate", f"{prefix}{{}}.{gate}.weight"),
            per_expert("experts.w_in", f"{prefix}{{}}.{up}.weight"),
            per_expert("experts.w_out", f"{prefix}{{}}.{down}.weight")]


def shared_mlp(module: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> list:
    """A shared MLP ``module`` of three torch Linears (DeepSeek's own checkpoints: ``w1`` / ``w3`` / ``w2``)."""
    return [linear("shared_expert.w_gate", f"{module}.{gate}.weight"),
            linear("shared_expert.w_in", f"{module}.{up}.weight"),
            linear("shared_expert.w_out", f"{module}.{down}.weight")]


def stacked_linear(path: str, name: str, *, either_layout: bool = False) -> Rule:
    """E torch Linear weights stacked in one tensor ``[E, out, in]`` <-> jmoe ``[E, in, out]``
    (transformers 5's fused expert tensors as it saves them). ``either_layout``: the hub also
    stores it as ``[E, in, out]`` (transformers' ``Transpose(check_dims=True)`` reads both)."""
    return Rule(path, lambda shape: {name: (*shape[:-2], shape[-1], shape[-2])},
                lambda t: np.swapaxes(t[name], -1, -2), lambda v: {name: np.swapaxes(v, -1, -2)}, either_layout)


def reshaped(path: str, name: str, hub_shape: Callable[[tuple[int, ...]], tuple[int, ...]]) -> Rule:
    """A tensor jmoe holds with other axes of the same order (Ernie's ``[1, E]`` bias)."""
    return Rule(path, lambda shape: {name: hub_shape(shape)}, lambda t: t[name].reshape(-1),
                lambda v: {name: v.reshape(hub_shape(v.shape))})


def flat_experts(path: str, name: str, *, num_experts: int, transposed: bool) -> Rule:
    """DBRX's ``[E * f, d]`` expert matrices: jmoe ``[E, d, f]`` (``transposed``: w1 / v1, each
    expert's ``[f, d]`` block a torch Linear weight) or ``[E, f, d]`` (w2, as jmoe holds it)."""
    def hub(shape):  # jmoe [E, d, f] (transposed) or [E, f, d]
        return {name: (shape[0] * shape[2], shape[1]) if transposed else (shape[0] * shape[1], shape[2])}

    def to_jmoe(t):
        blocks = t[name].reshape(num_experts, -1, t[name].shape[-1])  # [E, f, d]
        return np.swapaxes(blocks, 1, 2) if transposed else blocks

    def to_hub(v):
        blocks = np.swapaxes(v, 1, 2) if transposed else v  # [E, f, d]
        return {name: blocks.reshape(-1, blocks.shape[-1])}

    return Rule(path, hub, to_jmoe, to_hub)


def scaled(rule: Rule, factor: float) -> Rule:
    """``rule`` with jmoe's weight ``factor`` times the hub's (an exact power of 2 here: Cohere2-MoE's
    ``average`` of routed and shared output as a shared ``w_out`` halved)."""
    return Rule(rule.path, rule.hub, lambda t: rule.to_jmoe(t) * factor, lambda v: rule.to_hub(v / factor))


def in_layout(rule, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` in ``shape``'s layout when it is stored with its last two axes swapped and ``rule``
    reads either layout (None: any rule, for writing back in the stored layout); else as it is."""
    swapped = (*shape[:-2], shape[-1], shape[-2]) if len(shape) >= 2 else tuple(shape)
    either = rule is None or getattr(rule, "either_layout", False)
    if either and tuple(value.shape) != tuple(shape) and tuple(value.shape) == swapped:
        return np.swapaxes(value, -1, -2)
    return value


# ---------------------------------------------------------------- config helpers


def get(config: dict, *names, default=None):
    """The first of ``names`` the config has (transformers renames keys across versions)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def need(config: dict, *names):
    value = get(config, *names)
    if value is None:
        raise CheckpointError(f"config.json of this {config.get('model_type')!r} checkpoint has no {names[0]!r}")
    return value


def activation(config: dict, *, gated: bool, key: str = "hidden_act", default: str = "silu") -> str:
    name = config.get(key) or default
    table = GATED_ACTIVATIONS if gated else PLAIN_ACTIVATIONS
    if name not in table:
        raise CheckpointError(f"{config.get('model_type')!r}: {key}={name!r} has no jmoe activation "
                              f"(jmoe has {sorted(table)} for this family)")
    return table[name]


def num_layers(config: dict) -> int:
    return int(get(config, "num_hidden_layers", "num_layers", default=0))


EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def top_k(c: dict, *, d_ff=("moe_intermediate_size", "intermediate_size"), k=("num_experts_per_tok",),
          normalize: bool | None = None) -> dict:
    """The sizes and softmax top-k routing every family here has (``normalize``: None reads
    ``norm_topk_prob``); dropless, as transformers computes every choice."""
    if normalize is None:
        normalize = bool(c.get("norm_topk_prob", False))
    return dict(d_model=need(c, "hidden_size"), d_ff=need(c, *d_ff), num_experts=need(c, *EXPERT_COUNTS),
                k=need(c, *k), activation=activation(c, gated=True), normalize=normalize, capacity_factor=None)


# ---------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    moe_kwargs: Callable[[dict], dict]
    prefix: Callable[[dict, str | None], tuple[str, ...]]  # (config, stack) -> ("model.layers.{i}.mlp.", ...)
    rules: Callable[[dict], list]
    dense_reason: Callable[[dict, int, str | None], str | None] = lambda config, i, stack: None
    layer_count: Callable[[dict, str | None], int] = lambda config, stack: num_layers(config)
    text_config: Callable[[dict], dict] = lambda config: config
    stacks: tuple[str, ...] = ()
    at_layer: Callable[[dict, int], dict] = lambda config, i: config
    block: Callable[[dict], BlockSpec | ModalitySpec | None] = lambda config: None
    at_stack: Callable[[dict, str | None], dict] = lambda config, stack: config  # the stack's options (NLLB's ffn_dim)


def mixtral_kwargs(c: dict) -> dict:
    return top_k(c, d_ff=("intermediate_size",), normalize=True)


def qwen_kwargs(c: dict, *, shared: str | None = None, normalize: bool | None = None) -> dict:
    """Qwen's softmax top-k block; ``shared``: "gated" (Qwen2-MoE / Qwen3-Next's
    ``sigmoid(x w_g)``-scaled shared expert of ``shared_expert_intermediate_size``), "plain" (no
    gate) or None; ``normalize``: None reads ``norm_topk_prob`` (Qwen3-VL / Qwen3.5 always do)."""
    kwargs = top_k(c, normalize=normalize)
    width = c.get("shared_expert_intermediate_size")
    if shared and width:
        kwargs.update(shared_d_ff=width, shared_gate=shared == "gated")
    return kwargs


def qwen_dense_reason(c: dict, i: int, stack) -> str | None:
    if i in (c.get("mlp_only_layers") or []):
        return f"it is in mlp_only_layers={c['mlp_only_layers']}"
    step = c.get("decoder_sparse_step", 1) or 1
    if not (get(c, "num_experts", "num_local_experts", default=0) > 0 and (i + 1) % step == 0):
        return f"decoder_sparse_step={step}: layer i has experts iff (i + 1) % {step} == 0"
    return None


def qwen_rules(c: dict) -> list:
    rules = [linear("router_weight", "gate.weight"), *gated_experts("gate_proj", "up_proj", "down_proj")]
    return rules + shared_mlp("shared_expert") + [linear("shared_expert.gate_weight", "shared_expert_gate.weight")]


def deepseek_kwargs(c: dict) -> dict:
    v3 = c.get("model_type") != "deepseek_v2"  # DeepSeek-V3 and the families built on its block
    experts = need(c, "n_routed_experts", "num_local_experts", "num_experts")
    kwargs = dict(d_model=need(c, "hidden_size"), d_ff=need(c, "moe_intermediate_size"), num_experts=experts,
                  k=need(c, "num_experts_per_tok"), activation=activation(c, gated=True), router="group_limited",
                  routed_scaling_factor=float(c.get("routed_scaling_factor") or 1.0), capacity_factor=None)
    if v3:  # sigmoid scores + the selection bias, groups by the sum of their top-2 (noaux_tc)
        scoring = c.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise CheckpointError(f"{c.get('model_type')}: scoring_func={scoring!r}; transformers' DeepSeek-V3 block "
                                  f"(and jmoe.hf) computes sigmoid scores")
        kwargs.update(score_function="sigmoid", n_group=c.get("n_group") or 1, topk_group=c.get("topk_group") or 1,
                      group_score="top2_sum", normalize=bool(c.get("norm_topk_prob", True)), selection_bias=True)
    else:  # DeepSeek-V2: softmax; greedy or group_limited_greedy (groups by their max); transformers never renormalises
        method = c.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise CheckpointError(f"deepseek_v2: topk_method={method!r}; transformers' DeepSeek-V2 block (and "
                                  f"jmoe.hf) has 'greedy' and 'group_limited_greedy'")
        if c.get("mlp_bias"):
            raise CheckpointError("deepseek_v2: mlp_bias=True is not supported by jmoe.hf (the shared experts' "
                                  "biases have no jmoe weight)")
        grouped = method == "group_limited_greedy"
        kwargs.update(score_function="softmax", n_group=(c.get("n_group") or 1) if grouped else 1,
                      topk_group=(c.get("topk_group") or 1) if grouped else 1, group_score="max", normalize=False)
    shared = get(c, "n_shared_experts", "num_shared_experts", default=0)
    if shared:
        kwargs["shared_d_ff"] = shared * need(c, "moe_intermediate_size")
    return kwargs


def deepseek_dense_reason(c: dict, i: int, stack) -> str | None:
    types = c.get("mlp_layer_types")  # newer configs: "dense" / "sparse" per layer (from first_k_dense_replace)
    if types is not None:
        return None if i < len(types) and types[i] == "sparse" else f"mlp_layer_types[{i}] is not 'sparse': {types}"
    first = c.get("first_k_dense_replace", 0) or 0
    if i < first:
        return f"first_k_dense_replace={first}: layers 0..{first - 1} are dense"
    return None


def deepseek_rules(c: dict) -> list:
    return [linear("router_weight", "gate.weight"), same("selection_bias", "gate.e_score_correction_bias"),
            *gated_experts("gate_proj", "up_proj", "down_proj"), *shared_mlp("shared_experts")]


def gpt_oss_kwargs(c: dict) -> dict:
    return dict(d_model=need(c, "hidden_size"), d_ff=need(c, "intermediate_size"),
                num_experts=need(c, "num_local_experts"), k=need(c, "num_experts_per_tok"),
                activation="clamped_swiglu", swiglu_alpha=float(c.get("swiglu_alpha", 1.702)),
                swiglu_limit=float(c.get("swiglu_limit", 7.0)), use_bias=True, router_bias=True,
                normalize=True,  # softmax over the top-k logits == the full softmax renormalised over the k
                capacity_factor=None)


def gpt_oss_rules(c: dict, *, interleaved: bool = True) -> list:
    """GPT-OSS's router (bias) and fused experts with biases, gate / up interleaved (OpenAI's
    privacy filter: in halves)."""
    return [linear("router_weight", "router.weight"), same("router_bias", "router.bias"),
            fused_pair("experts.w_gate", "experts.w_in", "experts.gate_up_proj", interleaved=interleaved),
            fused_pair("experts.b_gate", "experts.b_in", "experts.gate_up_proj_bias", interleaved=interleaved),
            same("experts.w_out", "experts.down_proj"), same("experts.b_out", "experts.down_proj_bias")]


def llama4_text_config(c: dict) -> dict:
    return c.get("text_config") or c if c.get("model_type") == "llama4" else c


def llama4_kwargs(c: dict) -> dict:
    t = llama4_text_config(c)
    k = need(t, "num_experts_per_tok")
    if k != 1:
        raise CheckpointError(f"llama4: num_experts_per_tok={k}; jmoe's input-scaled experts (Llama 4) need top-1")
    return dict(d_model=need(t, "hidden_size"), d_ff=need(t, "intermediate_size"),
                num_experts=need(t, "num_local_experts"), k=1, activation=activation(t, gated=True),
                router="group_limited", score_function="sigmoid", n_group=1, topk_group=1, normalize=False,
                scale_expert_input=True, shared_d_ff=need(t, "intermediate_size"), capacity_factor=None)


def llama4_moe_layers(t: dict) -> list[int]:
    if t.get("moe_layers") is not None:
        return list(t["moe_layers"])
    step = t.get("interleave_moe_layer_step", 1) or 1
    return list(range(step - 1, num_layers(t), step))


def llama4_dense_reason(c: dict, i: int, stack) -> str | None:
    t = llama4_text_config(c)
    layers = llama4_moe_layers(t)
    if i not in layers:
        return (f"it is not in moe_layers={layers}" if t.get("moe_layers") is not None else
                f"interleave_moe_layer_step={t.get('interleave_moe_layer_step', 1)}: MoE layers are {layers}")
    return None


def llama4_rules(c: dict) -> list:
    return [linear("router_weight", "router.weight"),
            fused_pair("experts.w_gate", "experts.w_in", "experts.gate_up_proj", interleaved=False),
            same("experts.w_out", "experts.down_proj"), *shared_mlp("shared_expert")]


def switch_kwargs(c: dict) -> dict:
    return dict(d_model=need(c, "d_model"), d_ff=need(c, "d_ff"), num_experts=need(c, "num_experts"), k=1,
                activation=activation(c, gated=False, key="dense_act_fn", default="relu"), normalize=False,
                router_bias=bool(c.get("router_bias", False)), jitter=float(c.get("router_jitter_noise", 0.0)),
                capacity_factor=FIXED_CAPACITY_FACTOR, eval_capacity_factor=FIXED_CAPACITY_FACTOR,
                min_capacity=need(c, "expert_capacity"))


def switch_step(c: dict, stack: str) -> int:
    step = c.get(f"{stack}_sparse_step")
    if step is None:  # older configs: num_sparse_*_layers
        layers = c.get("num_layers" if stack == "encoder" else "num_decoder_layers", 0) or 0
        sparse = c.get(f"num_sparse_{stack}_layers", 0) or 0
        step = layers // sparse if sparse else 0
    return step


def switch_dense_reason(c: dict, i: int, stack: str) -> str | None:
    step = switch_step(c, stack)
    sparse = (i % step == 1 or step == 1) if step > 0 else False
    if not sparse:
        return (f"{stack}_sparse_step={step}: the {stack}'s sparse blocks are those with i % {step} == 1"
                if step > 1 else f"{stack}_sparse_step={step}: the {stack} has no sparse blocks")
    return None


def switch_layer_count(c: dict, stack: str) -> int:
    return int(c.get("num_layers", 0) if stack == "encoder" else c.get("num_decoder_layers") or c.get("num_layers", 0))


def switch_rules(c: dict) -> list:
    return [linear("router_weight", "router.classifier.weight"), same("router_bias", "router.classifier.bias"),
            per_expert("experts.w_in", "experts.expert_{}.wi.weight"),
            per_expert("experts.w_out", "experts.expert_{}.wo.weight")]


def switch_prefix(c: dict, stack: str) -> tuple[str, ...]:
    return ("encoder.block.{i}.layer.1.mlp.",) if stack == "encoder" else ("decoder.block.{i}.layer.2.mlp.",)


def nllb_kwargs(c: dict) -> dict:
    """NLLB-MoE's sparse block (fairseq's ``MOELayer``): fairseq's Top2Gate (``router="top2_gate"``:
    renormalised after the capacity drops unless ``normalize_router_prob_before_dropping``,
    ``second_expert_policy``, ``batch_prioritized_routing``, expert output masking =
    ``moe_token_dropout``), plain FFN experts with biases.

    transformers 5.25's block mixes the wrong experts (``NllbMoeExperts`` reads the 0/1 top-1 mask
    as expert indices: every token through experts 0 and 1); jmoe computes the intended
    ``sum_e w_e FFN_e(x)``, its router being transformers' (fairseq's) gate.

    Capacity: train ``expert_capacity`` slots (transformers; without it fairseq's ``2 ceil(S / E)``),
    eval ``ceil(moe_eval_capacity_token_fraction * S)`` (0: the train rule); jmoe's ``min_capacity``
    and ``capacity_multiple_of`` hold in both modes, so the eval capacity is at least the train's
    ``expert_capacity`` (exact when ``expert_capacity <= ceil(fraction * S)`` or fraction >= 1, as in
    the released config). S is a routing group's tokens (a sequence, or ``group_size``): fairseq
    and transformers count all the tokens of a call. The per-stack width ``encoder_ffn_dim`` /
    ``decoder_ffn_dim`` comes from ``at_stack`` (``ffn_dim``)."""
    width = c.get("ffn_dim")
    if width is None:
        widths = {need(c, f"{stack}_ffn_dim") for stack in ("encoder", "decoder")}
        if len(widths) > 1:
            raise CheckpointError(f"nllb-moe: encoder_ffn_dim={c['encoder_ffn_dim']} and decoder_ffn_dim="
                                  f"{c['decoder_ffn_dim']} differ: give the stack (jmoe.hf.moe_kwargs(config, "
                                  f"stack='encoder'); load_moe does)")
        width = widths.pop()
    experts, fixed = need(c, "num_experts"), c.get("expert_capacity")
    train = (dict(capacity_factor=FIXED_CAPACITY_FACTOR, min_capacity=int(fixed)) if fixed else
             dict(capacity_factor=1.0, capacity_multiple_of=2))  # 2 ceil(S / E) = ceil(2 S / E) rounded up to even
    fraction = float(c.get("moe_eval_capacity_token_fraction", 1.0) or 0.0)
    return dict(d_model=need(c, "d_model"), d_ff=width, num_experts=experts, k=2, use_bias=True,
                activation=activation(c, gated=False, key="activation_function", default="relu"), router="top2_gate",
                router_bias=bool(c.get("router_bias", False)),
                second_expert_policy=c.get("second_expert_policy") or "all",
                normalize_before_dropping=bool(c.get("normalize_router_prob_before_dropping", False)),
                batch_prioritized=bool(c.get("batch_prioritized_routing", False)),
                expert_output_masking=float(c.get("moe_token_dropout") or 0.0), **train,
                eval_capacity_factor=fraction * experts / 2 if fraction > 0 else train["capacity_factor"])


def nllb_dense_reason(c: dict, i: int, stack: str) -> str | None:
    step = c.get(f"{stack}_sparse_step", 0) or 0
    if not (step > 0 and (i + 1) % step == 0):
        return f"{stack}_sparse_step={step}: the {stack}'s sparse layers are those with (i + 1) % {step} == 0"
    return None


def nllb_rules(c: dict) -> list:
    return [linear("router_weight", "router.classifier.weight"), same("router_bias", "router.classifier.bias"),
            per_expert("experts.w_in", "experts.expert_{}.fc1.weight"),
            per_expert_vector("experts.b_in", "experts.expert_{}.fc1.bias"),
            per_expert("experts.w_out", "experts.expert_{}.fc2.weight"),
            per_expert_vector("experts.b_out", "experts.expert_{}.fc2.bias")]


def llama4_prefix(c: dict, stack) -> tuple[str, ...]:
    text, multimodal = "model.layers.{i}.feed_forward.", ("language_model.model.layers.{i}.feed_forward.",
                                                            "model.language_model.layers.{i}.feed_forward.")
    return (*multimodal, text) if c.get("model_type") == "llama4" else (text, *multimodal)


# ---------------------------------------------------------------- families built on the blocks above
# (transformers 5.25; each checked against its block's output in tests/test_hf.py)

def text_config(c: dict) -> dict:
    """The text model's config of a multimodal checkpoint (``text_config``, Qwen3-Omni's
    ``thinker_config.text_config``), else ``c``."""
    return c.get("text_config") or (c.get("thinker_config") or {}).get("text_config") or c


def on_text(fn: Callable) -> Callable:
    """``fn`` (of a config, ...) applied to the text model's config (:func:`text_config`)."""
    return lambda c, *args: fn(text_config(c), *args)


def layer_prefix(module: str) -> Callable[[dict, str | None], tuple[str, ...]]:
    """Layer i's ``module`` under the text model (``model.layers.{i}``), the hub's multimodal
    layouts (``model.language_model.``, ``language_model.model.``, Qwen3-Omni's ``thinker.model.``
    and transformers 5's ``thinker.model.language_model.``) or a bare text model (``layers.{i}``);
    a multimodal config's first."""
    block = f"layers.{{i}}.{module}." if module else "layers.{i}."
    text, bare = "model." + block, block
    multimodal = ("model.language_model." + block, "language_model.model." + block, "thinker.model." + block,
                  "thinker.model.language_model." + block)
    return lambda c, stack: (*multimodal, text, bare) if text_config(c) is not c else (text, *multimodal, bare)


def sigmoid_top_k(c: dict, *, scale_key: str | None = "routed_scaling_factor", bias: bool = True,
                  normalize: bool | None = True, **sizes) -> dict:
    """Sigmoid scores, the top-k of ``scores + e_score_correction_bias`` (``bias``), weights the
    unbiased scores (renormalised: ``normalize``, None reads ``norm_topk_prob``) times
    ``c[scale_key]``: DeepSeek-V3's router with one group (MiniMax-M2, AFMoE, HY-V3, Flint, ...)."""
    kwargs = top_k(c, normalize=normalize, **sizes)
    scale = float((c.get(scale_key) if scale_key else None) or 1.0)
    kwargs.update(router="group_limited", score_function="sigmoid", n_group=1, topk_group=1,
                  selection_bias=bias, routed_scaling_factor=scale)
    return kwargs


def fused_experts(prefix: str = "experts.", *, either_layout: bool = False) -> list:
    """transformers 5's own expert tensors, as it saves a family without a conversion to per-expert
    names: ``gate_up_proj [E, 2f, d]`` (gate half first) and ``down_proj [E, d, f]``."""
    return [fused_pair("experts.w_gate", "experts.w_in", prefix + "gate_up_proj", interleaved=False, transposed=True,
                       either_layout=either_layout),
            stacked_linear("experts.w_out", prefix + "down_proj", either_layout=either_layout)]


def qwen3_vl_rules(c: dict) -> list:
    """Qwen3-VL-MoE's fused experts as transformers 5 saves them or transposed (``[E, d, 2f]``,
    ``[E, f, d]``) as the hub has them."""
    return [linear("router_weight", "gate.weight"), *fused_experts(either_layout=True)]


def deepseek_v2_kwargs(c: dict) -> dict:
    """DeepSeek-V2's block under another model type (the OCR models' text decoders: their
    group-limited greedy fills the other groups with 0.0, which no positive softmax score loses to)."""
    return deepseek_kwargs(dict(c, model_type="deepseek_v2"))


def mistral4_kwargs(c: dict) -> dict:
    """Mistral 4's DeepSeek-V2-based router: softmax scores, groups by their top-2 sum (the other
    groups' experts 0.0, which no positive softmax score loses to), norm_topk_prob,
    routed_scaling_factor; shared experts."""
    kwargs = deepseek_v2_kwargs(dict(c, topk_method="greedy"))
    kwargs.update(n_group=c.get("n_group") or 1, topk_group=c.get("topk_group") or 1, group_score="top2_sum",
                  normalize=bool(c.get("norm_topk_prob", True)))
    return kwargs


def hunyuan_kwargs(c: dict) -> dict:
    """Hunyuan-MoE-V1: softmax top-``moe_topk`` renormalised, the experts and the always-on shared
    MLP both of ``intermediate_size``."""
    per_layer = [c.get(name) for name in ("num_experts", "moe_topk") if isinstance(c.get(name), list)]
    if any(len(set(values)) > 1 for values in per_layer):
        raise CheckpointError("hunyuan_v1_moe: num_experts / moe_topk differ per layer; jmoe.hf needs one value")
    flat = {name: (c[name][0] if isinstance(c.get(name), list) else c.get(name)) for name in ("num_experts", "moe_topk")}
    kwargs = top_k(dict(c, **flat), d_ff=("intermediate_size",), k=("moe_topk",), normalize=True)
    kwargs["shared_d_ff"] = need(c, "intermediate_size")
    return kwargs


def ernie_kwargs(c: dict) -> dict:
    """Ernie 4.5-MoE: softmax scores, the top-k of ``scores + e_score_correction_bias`` (``[1, E]``,
    ``moe_statics``), weights the unbiased scores renormalised; shared experts (bias-free)."""
    if c.get("use_bias"):
        raise CheckpointError("ernie4_5_moe: use_bias=True gives the shared experts biases, which jmoe's shared "
                              "expert does not have")
    kwargs = top_k(c, k=("num_experts_per_tok", "moe_k"), normalize=True)
    kwargs.update(router="group_limited", score_function="softmax", n_group=1, topk_group=1, selection_bias=True)
    shared = c.get("moe_num_shared_experts") or 0
    if shared:
        kwargs["shared_d_ff"] = shared * need(c, "moe_intermediate_size")
    return kwargs


def ernie_dense_reason(c: dict, i: int, stack) -> str | None:
    start, end, every = c.get("moe_layer_start_index", 0), c.get("moe_layer_end_index", -1), c.get("moe_layer_interval", 1)
    end = num_layers(c) - 1 if end in (None, -1) else end
    if not ((i + 1) % (every or 1) == 0 and start <= i <= end):
        return f"MoE layers are i in [moe_layer_start_index={start}, {end}] with (i + 1) % moe_layer_interval={every} == 0"
    return None


def dbrx_kwargs(c: dict) -> dict:
    """DBRX: softmax top-k, weights divided by their p-norm (``moe_normalize_expert_weights``; 1:
    renormalised, None: not), multiplicative router jitter in training."""
    ffn = c.get("ffn_config") or {}
    p = ffn.get("moe_normalize_expert_weights", 1)
    if p not in (None, 1, 1.0):
        raise CheckpointError(f"dbrx: moe_normalize_expert_weights={p}: jmoe renormalises by the sum (p=1) only")
    name = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
    return dict(d_model=need(c, "d_model"), d_ff=need(ffn, "ffn_hidden_size"), num_experts=need(ffn, "moe_num_experts"),
                k=need(ffn, "moe_top_k"), activation=activation({"hidden_act": name}, gated=True), normalize=p is not None,
                jitter=float(ffn.get("moe_jitter_eps") or 0.0), capacity_factor=None)


def dbrx_rules(c: dict) -> list:
    experts = need(c.get("ffn_config") or {}, "moe_num_experts")
    return [linear("router_weight", "router.layer.weight"),
            flat_experts("experts.w_gate", "experts.mlp.w1", num_experts=experts, transposed=True),
            flat_experts("experts.w_in", "experts.mlp.v1", num_experts=experts, transposed=True),
            flat_experts("experts.w_out", "experts.mlp.w2", num_experts=experts, transposed=False)]


def granite_kwargs(c: dict) -> dict:
    """Granite-MoE: the top-k logits softmaxed (= the softmax renormalised over the top k);
    GraniteMoeShared / Hybrid / SWA add an unweighted shared MLP of ``shared_intermediate_size``."""
    kwargs = top_k(c, d_ff=("intermediate_size",), normalize=True)
    if c.get("shared_intermediate_size"):
        kwargs["shared_d_ff"] = c["shared_intermediate_size"]
    return kwargs


def granite_shared(c: dict) -> list:  # the decoder layer's shared MLP, its input_linear [2F, d] gate half first
    return [fused_pair("shared_expert.w_gate", "shared_expert.w_in", "shared_mlp.input_linear.weight",
                       interleaved=False, transposed=True),
            linear("shared_expert.w_out", "shared_mlp.output_linear.weight")]


def granite_rules(c: dict) -> list:  # under model.layers.{i}.: the block (its hub names) and the shared MLP
    return [linear("router_weight", "block_sparse_moe.router.layer.weight"),
            fused_pair("experts.w_gate", "experts.w_in", "block_sparse_moe.input_linear.weight", interleaved=False,
                       transposed=True),
            stacked_linear("experts.w_out", "block_sparse_moe.output_linear.weight"), *granite_shared(c)]


def granite_swa_rules(c: dict) -> list:  # Granite-MoE-SWA: transformers 5's names (no conversion to the old ones)
    return [linear("router_weight", "block_sparse_moe.router.weight"), *fused_experts("block_sparse_moe.experts."),
            *granite_shared(c)]


def aria_kwargs(c: dict) -> dict:
    """Aria: the top-k logits softmaxed (the softmax renormalised over the top k); shared experts
    of ``moe_num_shared_experts * intermediate_size``; the routed experts are always SiLU-gated,
    the shared ones use ``hidden_act`` (silu in Aria's configs)."""
    kwargs = top_k(c, d_ff=("intermediate_size",), k=("moe_topk",), normalize=True)
    if kwargs["activation"] != "swiglu":
        raise CheckpointError(f"aria_text: hidden_act={c.get('hidden_act')!r} for the shared experts, the routed ones "
                              f"SiLU: a shared expert with its own activation is not in jmoe.hf's flat options yet")
    kwargs["shared_d_ff"] = (c.get("moe_num_shared_experts") or 1) * need(c, "intermediate_size")
    return kwargs


def aria_rules(c: dict) -> list:  # experts.fc1 [E, d, 2f] (gate half first), fc2 [E, f, d]: x @ W as stored
    return [linear("router_weight", "router.weight"),
            fused_pair("experts.w_gate", "experts.w_in", "experts.fc1.weight", interleaved=False),
            same("experts.w_out", "experts.fc2.weight"), *shared_mlp("shared_experts")]


def cohere2_kwargs(c: dict) -> dict:
    """Cohere2-MoE: the top-k of the logits, weights their softmax, or their sigmoid (renormalised
    with norm_topk_prob: ``expert_selection_fn``); shared experts summed with the routed output or
    averaged with it (``shared_expert_combination_strategy``: the routed weights halved here, the
    shared ``w_out`` in :func:`cohere2_rules`)."""
    fn = c.get("expert_selection_fn", "softmax")
    if fn not in ("softmax", "sigmoid"):
        raise CheckpointError(f"cohere2_moe: expert_selection_fn={fn!r}; transformers has 'softmax' and 'sigmoid'")
    kwargs = top_k(c, d_ff=("intermediate_size",), normalize=fn == "softmax" or bool(c.get("norm_topk_prob", True)))
    shared = c.get("num_shared_experts") or 0
    average = shared and c.get("shared_expert_combination_strategy", "average") == "average"
    kwargs.update(router="group_limited", score_function=fn, n_group=1, topk_group=1,
                  routed_scaling_factor=0.5 if average else 1.0)
    if shared:
        kwargs["shared_d_ff"] = shared * need(c, "intermediate_size")
    return kwargs


def cohere2_rules(c: dict) -> list:
    shared = shared_mlp("shared_experts")
    if (c.get("num_shared_experts") or 0) and c.get("shared_expert_combination_strategy", "average") == "average":
        shared[2] = scaled(shared[2], 0.5)
    return [linear("router_weight", "gate.weight"), *gated_experts("gate_proj", "up_proj", "down_proj"), *shared]


def afmoe_dense_reason(c: dict, i: int, stack) -> str | None:
    dense = c.get("num_dense_layers", 0) or 0
    return f"num_dense_layers={dense}: layers 0..{dense - 1} are dense" if i < dense else None


def jamba_dense_reason(c: dict, i: int, stack) -> str | None:
    period, offset = c.get("expert_layer_period", 1) or 1, c.get("expert_layer_offset", 0) or 0
    if (c.get("num_experts", 1) or 1) <= 1 or i % period != offset:
        return f"expert_layer_period={period}, expert_layer_offset={offset}: MoE layers are i % {period} == {offset}"
    return None


def attribute_map(fn: Callable[[dict], dict], **names: str) -> Callable[[dict], dict]:
    """``fn`` of a config whose keys ``names.values()`` stand for ``names.keys()`` (as a
    transformers config's ``attribute_map`` says: Kimi-Linear's ``num_experts_per_token`` is
    ``num_experts_per_tok``)."""
    return lambda c: fn({**c, **{standard: c[key] for standard, key in names.items() if key in c}})


def shared_kwargs(kwargs_fn: Callable[[dict], dict], *keys: str, times: str | None = None) -> Callable[[dict], dict]:
    """``kwargs_fn`` plus an unweighted shared expert of width ``c[keys[0]]`` (or the next key the
    config has), times ``c[times]`` when given (a count of shared experts)."""
    def kwargs(c):
        out = kwargs_fn(c)
        width, count = get(c, *keys), (c.get(times) or 0) if times else 1
        if width and count:
            out["shared_d_ff"] = width * count
        return out
    return kwargs


def minimax_m3_kwargs(c: dict) -> dict:
    """MiniMax-M3-VL's text model: sigmoid + selection bias renormalised, the routed output times
    ``routed_scaling_factor``; experts and the shared MLP with GPT-OSS's clamped SwiGLU (alpha, +1)."""
    kwargs = sigmoid_top_k(c, d_ff=("intermediate_size",))
    kwargs.update(activation="clamped_swiglu", swiglu_alpha=float(c.get("swiglu_alpha", 1.702)),
                  swiglu_limit=float(c.get("swiglu_limit", 7.0)), shared_d_ff=need(c, "shared_intermediate_size"))
    return kwargs


def lfm2_kwargs(c: dict) -> dict:
    """LFM2-MoE: sigmoid scores, the top-k of ``scores + expert_bias`` (``use_expert_bias``),
    renormalised (``norm_topk_prob``) with epsilon 1e-6, times ``routed_scaling_factor``."""
    kwargs = sigmoid_top_k(c, bias=bool(c.get("use_expert_bias", True)), normalize=bool(c.get("norm_topk_prob", True)))
    kwargs["normalize_epsilon"] = 1e-6
    return kwargs


def lfm2_rules(c: dict) -> list:
    return [*mixtral_rules(c), *([same("selection_bias", "expert_bias")] if c.get("use_expert_bias", True) else [])]


def laguna_kwargs(c: dict) -> dict:
    """Laguna: the router logits softcapped (``c tanh(l / c)``, ``moe_router_logit_softcapping``
    > 0), then sigmoid + selection bias renormalised (no epsilon), the routed output times
    ``moe_routed_scaling_factor``; an unweighted shared expert."""
    if c.get("moe_apply_router_weight_on_input"):
        raise CheckpointError("laguna: moe_apply_router_weight_on_input=True is not supported (nor by transformers)")
    kwargs = shared_kwargs(functools.partial(sigmoid_top_k, scale_key="moe_routed_scaling_factor"),
                           "shared_expert_intermediate_size")(c)
    kwargs["normalize_epsilon"] = 0.0
    cap = float(c.get("moe_router_logit_softcapping") or 0.0)
    if cap > 0:
        kwargs["logit_softcap"] = cap
    return kwargs


def laguna_dense_reason(c: dict, i: int, stack) -> str | None:  # no mlp_layer_types: the first layer dense
    types = c.get("mlp_layer_types") or ["dense"] + ["sparse"] * (num_layers(c) - 1)
    return deepseek_dense_reason(dict(c, mlp_layer_types=types), i, stack)


def kolibri_kwargs(c: dict) -> dict:
    """Kolibri-1: the top-k of ``logits + e_score_correction_bias`` (the bias on the logits), weights
    the chosen logits' sigmoid, renormalised without epsilon (``norm_topk_prob``); an unweighted
    shared expert."""
    kwargs = shared_kwargs(functools.partial(sigmoid_top_k, scale_key=None, normalize=None),
                           "shared_expert_intermediate_size")(c)
    kwargs.update(bias_on="logits", normalize_epsilon=0.0)
    return kwargs


def kolibri_dense_reason(c: dict, i: int, stack) -> str | None:  # Kolibri-1.1's default: layers 0 and 1 dense
    if c.get("model_type") == "kolibri1_1" and c.get("mlp_only_layers") is None:
        c = dict(c, mlp_only_layers=[j for j in (0, 1) if j < num_layers(c)])
    return qwen_dense_reason(c, i, stack)


def kolibri_rules(c: dict) -> list:  # under model.layers.{i}.: the block's mlp. and the bias's moe.router.
    return [linear("router_weight", "mlp.gate.weight"), same("selection_bias", "moe.router.expert_bias"),
            *gated_experts("gate_proj", "up_proj", "down_proj", prefix="mlp.experts."),
            *shared_mlp("mlp.shared_experts")]


def limited(kwargs_fn: Callable[[dict], dict], *, name: str = "limited_swiglu", shared: bool = True,
            limit: Callable[[dict], float] = lambda c: float(need(c, "swiglu_limit"))) -> Callable[[dict], dict]:
    """``kwargs_fn`` with the SiLU-gated experts clamped by ``limit(c)``: ``name`` is
    ``limited_swiglu`` (``silu(min(g, L)) * clip(u, -L, L)``: HY-V4, GLM-5-Next) or
    ``post_limited_swiglu`` (the clamp after the SiLU: Step-3.5 / 3.7); ``shared``: the shared
    expert clamped alike (else a plain SwiGLU)."""
    def kwargs(c):
        out = kwargs_fn(c)
        plain = out["activation"]
        if plain != "swiglu":
            raise CheckpointError(f"{c.get('model_type')}: hidden_act={c.get('hidden_act')!r}; its clamped experts are "
                                  f"SiLU-gated (jmoe's {name})")
        out.update(activation=name, swiglu_limit=limit(c))
        if not shared and "shared_d_ff" in out:
            out["shared_activation"] = plain
        return out
    return kwargs


def longcat_kwargs(c: dict) -> dict:
    """LongCat-Flash: a softmax over the ``n_routed_experts`` FFN experts and ``zero_expert_num``
    identity experts (jmoe's ``ZeroExperts``: a chosen one adds ``w x``), the top-k of ``scores +
    e_score_correction_bias``, weights the unbiased scores, not renormalised, times
    ``routed_scaling_factor``. transformers' router reads only the classifier's weight (a
    ``router_bias`` is never added), so jmoe reads only that too."""
    kwargs = top_k(c, d_ff=("expert_ffn_hidden_size",), k=("moe_topk", "num_experts_per_tok"), normalize=False)
    kwargs.update(num_experts=need(c, "n_routed_experts"), router="group_limited", score_function="softmax",
                  n_group=1, topk_group=1, selection_bias=True,
                  routed_scaling_factor=float(c.get("routed_scaling_factor") or 1.0))
    if c.get("zero_expert_num"):
        kwargs["zero_identity"] = c["zero_expert_num"]
    return kwargs


def doge_kwargs(c: dict) -> dict:
    """Doge's CDMoE: product-key routing (``router="product_key"``, ``router_gate [2K, d]``, E = K^2,
    weights the softmax over the k chosen sums; ``key_split="group"``: transformers' ``view(2, B * S,
    K)`` of the router outputs, which mixes tokens and which Doge's checkpoints were trained with:
    exact when the routing group holds all the tokens of a call, e.g. one sequence) over
    single-neuron experts (``d_ff=1``: ``act(x . down_embed[e]) up_embed[e]``, ``hidden_act``
    plain), plus the block's dense SwiGLU MLP of ``intermediate_size`` as an unweighted shared
    expert."""
    if c.get("mlp_bias"):
        raise CheckpointError("doge: mlp_bias=True gives the dense MLP biases, which jmoe's shared expert does "
                              "not have")
    act = activation(c, gated=False, default="silu")
    return dict(d_model=need(c, "hidden_size"), d_ff=1, num_experts=need(c, "num_experts"),
                k=need(c, "num_experts_per_tok"), activation=act, router="product_key", key_split="group",
                shared_d_ff=need(c, "intermediate_size"), shared_activation=activation(c, gated=True),
                capacity_factor=None)


def doge_rules(c: dict) -> list:
    """``down_embed`` / ``up_embed [E, d]``: the experts' ``w_in [E, d, 1]`` / ``w_out [E, 1, d]``;
    the block's own gate_proj / up_proj / down_proj: the shared expert."""
    return [linear("router_weight", "router_gate.weight"),
            Rule("experts.w_in", lambda shape: {"down_embed.weight": shape[:2]},
                 lambda t: t["down_embed.weight"][..., None], lambda v: {"down_embed.weight": v[..., 0]}),
            Rule("experts.w_out", lambda shape: {"up_embed.weight": (shape[0], shape[2])},
                 lambda t: t["up_embed.weight"][:, None, :], lambda v: {"up_embed.weight": v[:, 0, :]}),
            linear("shared_expert.w_gate", "gate_proj.weight"), linear("shared_expert.w_in", "up_proj.weight"),
            linear("shared_expert.w_out", "down_proj.weight")]


def phimoe_kwargs(c: dict) -> dict:
    """Phi-3.5-MoE: SparseMixer's top-2 with ``eps = router_jitter_noise`` (``router="sparsemixer"``;
    eval mode: the argmax and a softmax over the logits within 2 eps of it, twice, not
    renormalised; train mode: each round's expert sampled, Heun's third-order estimator).
    ``input_jitter_noise`` jitters the block's input in train mode, the router's and the experts'
    (``jitter``, ``jitter_experts``; transformers 5.25 jitters it twice, in the block and again in
    the router, in place: Microsoft's Phi-3.5-MoE code once)."""
    kwargs = mixtral_kwargs(c)
    if kwargs["k"] != 2:
        raise CheckpointError(f"phimoe: num_experts_per_tok={kwargs['k']}; SparseMixer (and jmoe's) chooses 2")
    del kwargs["normalize"]  # not a SparseMixer option
    kwargs.update(router="sparsemixer", jitter_eps=float(need(c, "router_jitter_noise")))
    jitter = float(c.get("input_jitter_noise") or 0.0)
    if jitter > 0:
        kwargs.update(jitter=jitter, jitter_experts=True)
    return kwargs


STEP3P5_LIMITS = ("swiglu_limits", "swiglu_limits_shared")  # per layer; 0 or absent: no clamp


def step3p5_at_layer(c: dict, i: int) -> dict:
    """Layer i's clamps of Step-3.5 / 3.7 (``swiglu_limits[i]``, ``swiglu_limits_shared[i]``) as
    one value each."""
    return dict(c, **{key: [(c.get(key) or [])[i] if i < len(c.get(key) or []) else None] for key in STEP3P5_LIMITS})


def step3p5_kwargs(c: dict) -> dict:
    """Step-3.5 / 3.7: sigmoid + selection bias, renormalised (no epsilon), the routed output times
    ``moe_router_scaling_factor``; the experts' and the shared expert's SwiGLU clamped after the
    SiLU by their layer's ``swiglu_limits`` / ``swiglu_limits_shared`` (:func:`post_limits`)."""
    if c.get("mlp_bias"):
        raise CheckpointError(f"{c.get('model_type')}: mlp_bias=True gives the shared expert biases, which jmoe's "
                              f"shared expert does not have")
    kwargs = shared_kwargs(functools.partial(sigmoid_top_k, scale_key="moe_router_scaling_factor"),
                           "share_expert_dim")(c)
    kwargs.update(num_experts=need(c, "n_routed_experts", "num_local_experts"), normalize_epsilon=0.0)
    return post_limits(kwargs, c)


def post_limits(kwargs: dict, c: dict) -> dict:
    """``kwargs`` with Step-3.7's clamps: the experts' and the shared expert's SwiGLU clamped after
    the SiLU (``post_limited_swiglu``) by the layer's ``swiglu_limits`` / ``swiglu_limits_shared``
    (0 or none: a plain SwiGLU; Step-3.5 / 3.7, Ling-2). The limits are per layer: without a layer
    (``at_layer``) every layer's must be the same."""
    if kwargs["activation"] != "swiglu":
        raise CheckpointError(f"{c.get('model_type')}: hidden_act={c.get('hidden_act')!r}; jmoe.hf reads SiLU experts")
    limits = []
    for key in STEP3P5_LIMITS:
        values = {float(v or 0.0) for v in (c.get(key) or [None])}
        if len(values) > 1:
            raise CheckpointError(f"{c.get('model_type')}: {key}={c[key]} differ per layer: give the layer "
                                  f"(jmoe.hf.moe_kwargs(config, layer=i); load_moe does)")
        limits.append(values.pop())
    routed, shared = limits
    if routed:
        kwargs.update(activation="post_limited_swiglu", swiglu_limit=routed)
    if shared != routed and "shared_d_ff" in kwargs:
        kwargs["shared_activation"] = Activation("post_limited_swiglu", swiglu_limit=shared) if shared else "swiglu"
    return kwargs


def mixtral_rules(c: dict) -> list:
    return [linear("router_weight", "gate.weight"), *gated_experts("w1", "w3", "w2")]


def routed_rules(router: str = "gate.weight", *extra: Rule, shared: str | None = None) -> Callable[[dict], list]:
    """A router ``router``, per-expert gate_proj / up_proj / down_proj, ``extra`` rules (a selection
    bias) and a shared MLP ``shared``: the most common layout."""
    return lambda c: [linear("router_weight", router), *extra, *gated_experts("gate_proj", "up_proj", "down_proj"),
                      *(shared_mlp(shared) if shared else [])]



# Ling-2's config names (transformers' BailingHybridConfig.attribute_map) for the DeepSeek / Step keys
LING_NAMES = dict(norm_topk_prob="moe_renormalize", n_group="num_expert_group", n_routed_experts="num_experts",
                  num_experts_per_tok="num_experts_per_token", n_shared_experts="num_shared_experts",
                  swiglu_limits="expert_swiglu_limit_list", swiglu_limits_shared="share_expert_swiglu_limit_list")


def ling(c: dict) -> dict:
    """Ling-2's config with the DeepSeek / Step names its keys stand for (:data:`LING_NAMES`) and
    its default of 2 leading dense layers."""
    c = {**c, **{standard: c[key] for standard, key in LING_NAMES.items() if key in c}}
    return c if "first_k_dense_replace" in c else dict(c, first_k_dense_replace=2)


def ling_kwargs(c: dict) -> dict:
    """Ling-2 (bailing_hybrid): DeepSeek-V3's router (sigmoid, groups by their top-2 sum, the
    selection bias ``gate.expert_bias``, renormalised + 1e-20, ``routed_scaling_factor``) and
    shared experts of ``num_shared_experts * moe_intermediate_size``; the experts and the shared
    expert clamped after the SiLU as Step-3.7's, by the layer's ``expert_swiglu_limit_list`` /
    ``share_expert_swiglu_limit_list`` (:func:`post_limits`)."""
    return post_limits(deepseek_kwargs(ling(c)), ling(c))


def ling_at_layer(c: dict, i: int) -> dict:
    """Layer i's clamps (:func:`step3p5_at_layer`) under Ling-2's own keys."""
    layer = step3p5_at_layer(ling(c), i)
    return dict(c, **{LING_NAMES[key]: layer[key] for key in STEP3P5_LIMITS})


# DeepSeek-V4 / Inkling-2's scoring_func (transformers' ACT2FN name) -> jmoe's score function
V4_SCORES = {"sqrtsoftplus": "sqrt_softplus", "sigmoid": "sigmoid"}


def v4_score(c: dict, default: str) -> str:
    name = c.get("scoring_func") or default
    if name not in V4_SCORES:
        raise CheckpointError(f"{c.get('model_type')}: scoring_func={name!r}; its router (and jmoe.hf) has "
                              f"{sorted(V4_SCORES)}")
    return V4_SCORES[name]


def deepseek_v4_layer_types(c: dict) -> list[str]:
    """``mlp_layer_types`` ("hash_moe" / "moe" per layer), or transformers' default: the first
    ``num_hash_layers`` (3) hash layers."""
    if c.get("mlp_layer_types") is not None:
        return list(c["mlp_layer_types"])
    n, hashed = num_layers(c), c.get("num_hash_layers", 3)
    return ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)


def deepseek_v4_at_layer(c: dict, i: int) -> dict:
    return dict(c, mlp_layer_types=[deepseek_v4_layer_types(c)[i]])


def deepseek_v4_kwargs(c: dict) -> dict:
    """DeepSeek-V4: ``scoring_func`` scores (``sqrt(softplus(l))``), renormalised over the k
    (+ 1e-20), times ``routed_scaling_factor``; a "moe" layer chooses the top-k of ``scores +
    e_score_correction_bias`` (one group), a "hash_moe" layer takes token t's experts from the
    fixed table ``tid2eid [vocab_size, k]`` (``router="token_hash"``: the layer is called with
    ``token_ids=``). One shared expert of ``moe_intermediate_size`` (transformers' DeepseekV4MLP).
    The SwiGLU clamps are :func:`limited`'s. The layer kinds differ per layer: without a layer
    (``at_layer``) they must agree."""
    if c.get("mlp_bias"):
        raise CheckpointError("deepseek_v4: mlp_bias=True gives the shared expert biases, which jmoe's shared "
                              "expert does not have")
    kinds = set(deepseek_v4_layer_types(c))
    if len(kinds) > 1:
        raise CheckpointError(f"deepseek_v4: mlp_layer_types={deepseek_v4_layer_types(c)} mix hash and top-k "
                              f"layers: give the layer (jmoe.hf.moe_kwargs(config, layer=i); load_moe does)")
    kwargs = top_k(c, normalize=True)
    kwargs.update(score_function=v4_score(c, "sqrtsoftplus"), shared_d_ff=need(c, "moe_intermediate_size"),
                  routed_scaling_factor=float(c.get("routed_scaling_factor") or 1.0))
    if kinds == {"hash_moe"}:
        kwargs.update(router="token_hash", vocab_size=need(c, "vocab_size"))
    else:
        kwargs.update(router="group_limited", n_group=1, topk_group=1, selection_bias=True)
    return kwargs


def token_table(path: str, name: str) -> Rule:
    """An integer table stored as an int64 tensor (DeepSeek-V4's ``tid2eid [vocab_size, k]``)."""
    return Rule(path, lambda shape: {name: shape}, lambda t: t[name], lambda v: {name: np.asarray(v, np.int64)})


def deepseek_v4_rules(c: dict) -> list:  # DeepSeek's own names under layers.{i}.ffn. (transformers saves them)
    return [linear("router_weight", "gate.weight"), same("selection_bias", "gate.bias"),
            token_table("token_experts", "gate.tid2eid"), *gated_experts("w1", "w3", "w2"),
            *shared_mlp("shared_experts", "w1", "w3", "w2")]


def inkling2_kwargs(c: dict) -> dict:
    """Inkling-2: DeepSeek-V4's top-k router (``scoring_func`` scores, the top-k of ``scores +
    e_score_correction_bias``, renormalised + 1e-20, times ``route_scale``), the experts'
    softcapped SwiGLU ``cap(g, mlp_gate_softcap) sigmoid(g) cap(u, mlp_up_softcap)``; no shared
    expert. transformers' defaults where a config leaves a key out."""
    kwargs = top_k(c, normalize=True)
    kwargs.update(router="group_limited", score_function=v4_score(c, "sigmoid"), n_group=1, topk_group=1,
                  selection_bias=True, activation="softcapped_swiglu",
                  routed_scaling_factor=float(get(c, "route_scale", "routed_scaling_factor", default=8.0)),
                  gate_softcap=float(get(c, "mlp_gate_softcap", default=4.0)),
                  up_softcap=float(get(c, "mlp_up_softcap", default=25.0)))
    return kwargs


def inkling2_rules(c: dict) -> list:  # the original names: w13_weight [E, 2f, d] gate / up interleaved, w2_weight
    return [linear("router_weight", "gate.weight"), same("selection_bias", "gate.bias"),
            fused_pair("experts.w_gate", "experts.w_in", "experts.w13_weight", interleaved=True, transposed=True),
            stacked_linear("experts.w_out", "experts.w2_weight")]


def with_prefix(fam: "Family", *prefixes: str) -> "Family":
    """``fam`` with ``prefixes`` tried before its own (Inkling-2's ``model.llm.layers.{i}.mlp.``)."""
    return dataclasses.replace(fam, prefix=lambda c, stack: (*prefixes, *fam.prefix(c, stack)))


def ergo_kwargs(c: dict) -> dict:
    """Ergo: sigmoid + selection bias (``router_bias``), renormalised + 1e-20, times
    ``moe_routed_scaling_factor``; squared-ReLU experts and shared expert
    (``shared_intermediate_size``), each output RMS-normalised with ``rms_norm_eps`` and its own
    learned scale (``Activation("relu2", output_norm=OutputNorm(eps, per_expert=True))``; the shared
    expert inherits it with its own scale). The decoder layer's norms before and after the block
    are outside it, as every family's are."""
    kwargs = sigmoid_top_k(c, scale_key=None)
    kwargs.update(activation="relu2", output_norm=OutputNorm(float(c.get("rms_norm_eps") or 1e-12), per_expert=True),
                  routed_scaling_factor=float(get(c, "moe_routed_scaling_factor", default=8 ** 0.5)),
                  shared_d_ff=need(c, "shared_intermediate_size"))
    return kwargs


def ergo_dense_reason(c: dict, i: int, stack) -> str | None:  # no mlp_layer_types: num_dense_blocks (1) dense
    dense = c.get("num_dense_blocks", 1) or 0
    types = c.get("mlp_layer_types") or ["dense"] * dense + ["sparse"] * (num_layers(c) - dense)
    return deepseek_dense_reason(dict(c, mlp_layer_types=types), i, stack)


def ergo_rules(c: dict) -> list:  # its training framework's names, every weight x @ W as jmoe holds it
    return [same("router_weight", "gate_kernel"), same("selection_bias", "router_bias"),
            same("experts.w_in", "up_proj"), same("experts.w_out", "down_proj"),
            same("experts.norm_weight", "expert_output_norm.scale"), same("shared_expert.w_in", "shared_up_proj"),
            same("shared_expert.w_out", "shared_down_proj"),
            same("shared_expert.norm_weight", "shared_expert_output_norm.scale")]


def inkling_kwargs(c: dict) -> dict:
    """Inkling: its router scores the ``n_shared_experts`` shared experts beside the routed ones
    (``gate.weight [E + n, d]``): sigmoid scores, the top-k of ``scores +
    e_score_correction_bias``, then one softmax of the log-sigmoid scores of the k chosen and the
    n shared (``s / sum``, no epsilon), times ``route_scale`` and the learned ``global_scale``
    (``router="shared_sink"``, ``learned_scale``); the n shared SwiGLU experts of
    ``moe_intermediate_size`` side by side, each weighted by its share. transformers scores the
    shared experts whatever ``shared_expert_sink`` says, and so does jmoe."""
    shared = need(c, "n_shared_experts")
    kwargs = top_k(c, normalize=True)
    kwargs.update(router="shared_sink", score_function="sigmoid", n_group=1, topk_group=1, selection_bias=True,
                  shared_experts=shared, learned_scale=True, normalize_epsilon=0.0,
                  routed_scaling_factor=float(get(c, "route_scale", default=8.0)),
                  shared_d_ff=shared * need(c, "moe_intermediate_size"))
    return kwargs


def shared_experts_stacked(path: str, name: str, count: int, *, down: bool = False) -> Rule:
    """n shared experts' torch weights stacked in one tensor (Inkling's ``shared_experts.gate_proj
    [n, F, d]``, ``down_proj [n, d, F]``) <-> the jmoe shared expert that holds them side by side
    (``w_gate [d, n F]``, ``w_out [n F, d]``: hidden units ``i F .. (i + 1) F - 1`` are expert i's)."""
    if down:  # jmoe [n F, d] <-> hub [n, d, F]
        return Rule(path, lambda shape: {name: (count, shape[1], shape[0] // count)},
                    lambda t: np.swapaxes(t[name], 1, 2).reshape(-1, t[name].shape[1]),
                    lambda v: {name: np.swapaxes(v.reshape(count, -1, v.shape[1]), 1, 2)})
    return Rule(path, lambda shape: {name: (count, shape[1] // count, shape[0])},  # jmoe [d, n F] <-> hub [n, F, d]
                lambda t: t[name].reshape(-1, t[name].shape[-1]).T, lambda v: {name: v.T.reshape(count, -1, v.shape[0])})


def inkling_rules(c: dict) -> list:  # transformers' own names (it converts none for inkling_text)
    shared = need(c, "n_shared_experts")
    return [RowsRule("router_weight", "shared_router_weight", "gate.weight", shared),
            same("router_scale", "gate.global_scale"), same("selection_bias", "gate.e_score_correction_bias"),
            *fused_experts(), shared_experts_stacked("shared_expert.w_gate", "shared_experts.gate_proj", shared),
            shared_experts_stacked("shared_expert.w_in", "shared_experts.up_proj", shared),
            shared_experts_stacked("shared_expert.w_out", "shared_experts.down_proj", shared, down=True)]


def family(model_types: tuple[str, ...], kwargs: Callable[[dict], dict], module: str, rules: Callable[[dict], list],
           dense_reason: Callable[[dict, int, str | None], str | None] | None = None,
           at_layer: Callable[[dict, int], dict] | None = None,
           block: Callable[[dict], BlockSpec | ModalitySpec | None] | None = None) -> Family:
    """A decoder family whose layer i's block is ``module`` (:func:`layer_prefix`), its config the
    text model's (a multimodal checkpoint's ``text_config`` is read); ``at_layer(text config, i)``:
    per-layer options resolved; ``block(text config)``: the pieces around its ``jmoe.MoE``
    (:class:`Family`)."""
    return Family(model_types, on_text(kwargs), layer_prefix(module), on_text(rules),
                  on_text(dense_reason) if dense_reason else (lambda c, i, stack: None),
                  lambda c, stack: num_layers(text_config(c)), text_config,
                  at_layer=(lambda c, i: with_text(c, at_layer(text_config(c), i))) if at_layer else
                  (lambda c, i: c), block=on_text(block) if block else (lambda c: None))


def with_text(c: dict, text: dict) -> dict:
    """``c`` with its text model's config (:func:`text_config`) replaced by ``text``."""
    if text_config(c) is c:
        return text
    if c.get("text_config"):
        return dict(c, text_config=text)
    return dict(c, thinker_config=dict(c["thinker_config"], text_config=text))


# ---------------------------------------------------------------- blocks with pieces around the experts
# (jmoe.hf.blocks: load_moe returns a MoEBlock / ModalityMoE whose `moe` is the jmoe.MoE)


@dataclasses.dataclass(frozen=True)
class StackedRule:
    """Several jmoe weights ``paths`` (each ``[...]``) stacked along a new first axis in one hub
    tensor ``name`` ``[len(paths), ...]`` (Ernie 4.5-VL's text and vision selection biases in one
    ``moe_statics.e_score_correction_bias [2, E]``)."""

    paths: tuple[str, ...]
    name: str

    def hub(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {self.name: (len(self.paths), *shape)}

    def to_jmoe(self, tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        return tuple(tensors[self.name][i] for i in range(len(self.paths)))

    def to_hub(self, *values: np.ndarray) -> dict[str, np.ndarray]:
        return {self.name: np.stack(values)}


def within(module: str, rules: list) -> list:
    """``rules`` of a ``jmoe.MoE`` as rules of the block whose attribute ``module`` holds it
    (``experts.w_gate`` -> ``moe.experts.w_gate``)."""
    def moved(rule):
        if isinstance(rule, PairRule):
            return dataclasses.replace(rule, gate=f"{module}.{rule.gate}", up=f"{module}.{rule.up}")
        if isinstance(rule, StackedRule):
            return dataclasses.replace(rule, paths=tuple(f"{module}.{p}" for p in rule.paths))
        return dataclasses.replace(rule, path=f"{module}.{rule.path}")
    return [moved(rule) for rule in rules]


def axk1_block(c: dict) -> BlockSpec:  # A.X-K1: DeepSeek-V3's block, then an RMSNorm on its output
    return BlockSpec(post_norm=Norm(float(c.get("rms_norm_eps") or 1e-6)))


def axk1_rules(c: dict) -> list:
    """Under ``model.layers.{i}.``: DeepSeek-V3's ``mlp.`` and the layer-level ``post_mlp_layernorm``
    (where the hub and transformers' save keep it)."""
    return [*within("moe", [linear("router_weight", "mlp.gate.weight"),
                            same("selection_bias", "mlp.gate.e_score_correction_bias"),
                            *gated_experts("gate_proj", "up_proj", "down_proj", prefix="mlp.experts."),
                            *shared_mlp("mlp.shared_experts")]),
            same("post_norm.scale", "post_mlp_layernorm.weight")]


def axk2_kwargs(c: dict) -> dict:
    """A.X-K2: DeepSeek-V3's router with the excluded groups' experts filled with 0.0 (so an excluded
    expert beats a kept one whose biased score is negative; no group step without ``n_group``). Its
    gated RMSNorm (``post_attention_layernorm``) is the decoder layer's norm before the block, as
    every family's pre-FFN norm: outside the block."""
    kwargs = deepseek_kwargs(c)
    kwargs["excluded_fill"] = "zero"
    return kwargs


def jetmoe_kwargs(c: dict) -> dict:
    """JetMoE: the top-k logits softmaxed (the softmax renormalised over the k), SwiGLU experts
    (``activation_function``); the block adds its output ``bias [d]`` (:func:`jetmoe_block`)."""
    kwargs = top_k(c, d_ff=("intermediate_size",), normalize=True)
    kwargs["activation"] = activation(c, gated=True, key="activation_function")
    return kwargs


def jetmoe_rules(c: dict) -> list:  # input_linear [E, 2f, d] (gate half first), output_linear [E, d, f], bias [d]
    return [*within("moe", [linear("router_weight", "router.layer.weight"),
                            fused_pair("experts.w_gate", "experts.w_in", "input_linear.weight", interleaved=False,
                                       transposed=True),
                            stacked_linear("experts.w_out", "output_linear.weight")]),
            same("bias", "bias")]


def muse_spark_kwargs(c: dict) -> dict:
    """Muse Spark's experts (width ``moe_hidden_size``, each output RMS-normed after scaling by ``1 +
    g``, one ``g`` for all experts: ``post_expert_norm``, eps ``post_norm_eps``) and router (on the block's input of
    ``hidden_size``: logits times ``output_multiplier``, sigmoid + selection bias renormalised with
    epsilon 1e-15, times ``routed_scaling_factor``)."""
    kwargs = sigmoid_top_k(c, d_ff=("moe_intermediate_size",))
    if kwargs["activation"] != "swiglu":
        raise CheckpointError(f"muse_spark_text: hidden_act={c.get('hidden_act')!r}; jmoe.hf reads SiLU experts")
    norm = OutputNorm(float(c.get("post_norm_eps") or 1e-8), scale_first=True, offset=1.0)
    kwargs.update(d_model=need(c, "moe_hidden_size"), router_d_model=need(c, "hidden_size"), normalize_epsilon=1e-15,
                  activation=Activation("swiglu", output_norm=norm),
                  logit_multiplier=float(c.get("output_multiplier") or 1.0))
    return kwargs


def muse_spark_block(c: dict) -> BlockSpec:  # pre_expert_proj + its centered norm (1 + g), post_expert_proj
    return BlockSpec(expert_width=need(c, "moe_hidden_size"), in_norm=Norm(float(c.get("rms_norm_eps") or 1e-5),
                                                                          offset=1.0))


def muse_spark_rules(c: dict) -> list:
    return [*within("moe", [linear("router_weight", "gate.weight"),
                            same("selection_bias", "gate.e_score_correction_bias"), *fused_experts(),
                            same("experts.tied_norm_weight", "experts.post_expert_norm.weight")]),
            linear("in_proj.kernel", "pre_expert_proj.weight"), same("in_norm.scale", "pre_expert_norm.weight"),
            linear("out_proj.kernel", "post_expert_proj.weight")]


NEMOTRON_H_LAYERS = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def nemotron_h_layer_types(c: dict) -> list[str]:
    """``layers_block_type`` (or the older ``hybrid_override_pattern``, one letter a layer)."""
    if c.get("layers_block_type") is not None:
        return list(c["layers_block_type"])
    return [NEMOTRON_H_LAYERS.get(ch, ch) for ch in c.get("hybrid_override_pattern") or ""]


def nemotron_h_dense_reason(c: dict, i: int, stack) -> str | None:
    types = nemotron_h_layer_types(c)
    return None if types[i] == "moe" else f"layers_block_type[{i}] is {types[i]!r}, not 'moe': {types}"


def nemotron_h_kwargs(c: dict) -> dict:
    """Nemotron-H: DeepSeek-V3's router (sigmoid, selection bias, groups by their top-2 sum,
    norm_topk_prob, scaling) over non-gated squared-ReLU experts (``mlp_hidden_act``); a shared
    expert of ``moe_shared_expert_intermediate_size`` with the same activation. With
    ``moe_latent_size`` the experts read the hidden state projected to that width (the router the
    hidden state itself) and the shared expert is the block's (:func:`nemotron_h_block`)."""
    if c.get("mlp_bias"):
        raise CheckpointError("nemotron_h: mlp_bias=True gives the shared expert biases, which jmoe's shared expert "
                              "does not have")
    kwargs = deepseek_kwargs(c)
    kwargs.pop("shared_d_ff", None)
    kwargs["activation"] = activation(c, gated=False, key="mlp_hidden_act", default="relu2")
    latent = c.get("moe_latent_size")
    if latent:
        kwargs.update(d_model=latent, router_d_model=need(c, "hidden_size"))
    else:
        kwargs["shared_d_ff"] = need(c, "moe_shared_expert_intermediate_size")
    return kwargs


def nemotron_h_block(c: dict) -> BlockSpec | None:  # the latent projections, the shared expert on the hidden state
    latent = c.get("moe_latent_size")
    if not latent:
        return None
    return BlockSpec(expert_width=latent, shared=Shared(need(c, "moe_shared_expert_intermediate_size")))


def nemotron_h_rules(c: dict) -> list:
    routed = [linear("router_weight", "gate.weight"), same("selection_bias", "gate.e_score_correction_bias"),
              per_expert("experts.w_in", "experts.{}.up_proj.weight"),
              per_expert("experts.w_out", "experts.{}.down_proj.weight")]
    shared = [linear("shared_expert.w_in", "shared_experts.up_proj.weight"),
              linear("shared_expert.w_out", "shared_experts.down_proj.weight")]
    if not c.get("moe_latent_size"):
        return routed + shared  # the jmoe.MoE's own shared expert
    return [*within("moe", routed), *shared, linear("in_proj.kernel", "fc1_latent_proj.weight"),
            linear("out_proj.kernel", "fc2_latent_proj.weight")]


def nemotron_h_prefix(c: dict, stack) -> tuple[str, ...]:  # the hub's backbone., transformers' in-memory model.
    return ("backbone.layers.{i}.mixer.", "model.layers.{i}.mixer.")


def gemma4_kwargs(c: dict) -> dict:
    """Gemma 4's MoE: softmax top-k renormalised, each weight times its expert's
    ``per_expert_scale``; the router reads the block's input RMS-normed (no weight), times its
    ``scale`` and ``hidden_size**-0.5``; GeGLU experts (``hidden_activation``)."""
    return dict(d_model=need(c, "hidden_size"), d_ff=need(c, "moe_intermediate_size"),
                num_experts=need(c, "num_experts"), k=need(c, "top_k_experts"), activation=activation(c, gated=True, key="hidden_activation"),
                router="tokens_choose", normalize=True, input_norm_eps=float(c.get("rms_norm_eps") or 1e-6),
                per_expert_scale=True, capacity_factor=None)


def gemma4_block(c: dict) -> BlockSpec:
    """Gemma 4's FFN sub-layer: the dense MLP (``pre_feedforward_layernorm``, ``mlp``,
    ``post_feedforward_layernorm_1``) and the MoE (``pre_feedforward_layernorm_2`` on the experts'
    input, ``post_feedforward_layernorm_2``) in parallel, ``post_feedforward_layernorm`` over the
    sum. The MLP is twice as wide on a KV-shared layer with ``use_double_wide_mlp`` (:func:`gemma4_at_layer`)."""
    norm = Norm(float(c.get("rms_norm_eps") or 1e-6))
    mlp = Shared(need(c, "intermediate_size"), activation=activation(c, gated=True, key="hidden_activation"))
    return BlockSpec(in_norm=norm, out_norm=norm, shared=mlp, shared_in_norm=norm, shared_out_norm=norm, post_norm=norm)


def gemma4_at_layer(c: dict, i: int) -> dict:
    """Layer i's dense MLP width: doubled on the KV-shared layers (the last ``num_kv_shared_layers``)
    with ``use_double_wide_mlp``."""
    shared = i >= num_layers(c) - (c.get("num_kv_shared_layers") or 0)
    if c.get("use_double_wide_mlp") and shared:
        return dict(c, intermediate_size=2 * need(c, "intermediate_size"))
    return c


def gemma4_dense_reason(c: dict, i: int, stack) -> str | None:
    return None if c.get("enable_moe_block") else "enable_moe_block is false: no layer of this model has experts"


def gemma4_rules(c: dict) -> list:  # under model.layers.{i}.: the router, experts, mlp and the five norms
    return [*within("moe", [linear("router_weight", "router.proj.weight"), same("router_input_scale", "router.scale"),
                            same("expert_scale", "router.per_expert_scale"), *fused_experts()]),
            same("in_norm.scale", "pre_feedforward_layernorm_2.weight"),
            same("out_norm.scale", "post_feedforward_layernorm_2.weight"),
            *shared_mlp("mlp"), same("shared_in_norm.scale", "pre_feedforward_layernorm.weight"),
            same("shared_out_norm.scale", "post_feedforward_layernorm_1.weight"),
            same("post_norm.scale", "post_feedforward_layernorm.weight")]


def ernie_vl_sizes(c: dict) -> tuple[int, int]:
    sizes = need(c, "moe_intermediate_size")
    sizes = sizes if isinstance(sizes, list) else [sizes, sizes]
    if len(sizes) != 2:
        raise CheckpointError(f"ernie4_5_vl_moe: moe_intermediate_size={sizes}; jmoe.hf reads [text, vision]")
    return sizes[0], sizes[1]


def ernie_vl_kwargs(c: dict) -> dict:
    """Ernie 4.5-VL's text experts (:func:`ernie_kwargs`'s router: softmax + selection bias,
    renormalised) of ``moe_intermediate_size[0]``; the vision experts and the shared experts are the
    block's (:func:`ernie_vl_block`)."""
    text, _ = ernie_vl_sizes(c)
    return ernie_kwargs(dict(c, moe_intermediate_size=text, moe_num_shared_experts=0))


def ernie_vl_block(c: dict) -> ModalitySpec:  # vision experts of moe_intermediate_size[1]; shared experts
    text, vision = ernie_vl_sizes(c)
    shared = c.get("moe_num_shared_experts") or 0
    return ModalitySpec(vision_d_ff=vision, shared=Shared(shared * text) if shared else None)


def ernie_vl_rules(c: dict) -> list:
    """The hub's multimodal layout: ``gate.weight`` / ``gate.weight_1`` ``[d, E]`` (text / vision),
    both selection biases in ``moe_statics.e_score_correction_bias [2, E]``, one list of 2E
    per-expert projections (text first), ``shared_experts``."""
    experts = need(c, *EXPERT_COUNTS)
    vision = [per_expert(f"vision_moe.experts.{w}", f"experts.{{}}.{name}.weight", first=experts)
              for w, name in (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj"))]
    return [same("moe.router_weight", "gate.weight"), same("vision_moe.router_weight", "gate.weight_1"),
            StackedRule(("moe.selection_bias", "vision_moe.selection_bias"), "moe_statics.e_score_correction_bias"),
            *within("moe", gated_experts("gate_proj", "up_proj", "down_proj")), *vision, *shared_mlp("shared_experts")]


def ernie_vl_text_rules(c: dict) -> list:
    """The text model as transformers saves it (its own names: ``text_moe.`` / ``vision_moe.``, each a
    router ``gate.weight [E, d]``, ``gate.moe_statics.e_score_correction_bias [1, E]`` and fused experts)."""
    rules = shared_mlp("shared_experts")
    for module, hub in (("moe", "text_moe"), ("vision_moe", "vision_moe")):
        rules += within(module, [linear("router_weight", f"{hub}.gate.weight"),
                                 reshaped("selection_bias", f"{hub}.gate.moe_statics.e_score_correction_bias",
                                          lambda shape: (1, *shape)), *fused_experts(f"{hub}.experts.")])
    return rules


FAMILIES: dict[str, Family] = {}
for family in (
    Family(("mixtral",), mixtral_kwargs, lambda c, s: ("model.layers.{i}.block_sparse_moe.",), mixtral_rules),
    Family(("qwen2_moe",), functools.partial(qwen_kwargs, shared="gated"), lambda c, s: ("model.layers.{i}.mlp.",),
           qwen_rules, qwen_dense_reason),
    Family(("qwen3_moe",), qwen_kwargs, lambda c, s: ("model.layers.{i}.mlp.",), qwen_rules, qwen_dense_reason),
    Family(("olmoe",), qwen_kwargs, lambda c, s: ("model.layers.{i}.mlp.",), qwen_rules),
    Family(("deepseek_v3", "deepseek_v2"), deepseek_kwargs, lambda c, s: ("model.layers.{i}.mlp.",), deepseek_rules,
           deepseek_dense_reason),
    Family(("gpt_oss",), gpt_oss_kwargs, lambda c, s: ("model.layers.{i}.mlp.",), gpt_oss_rules),
    Family(("llama4", "llama4_text"), llama4_kwargs, llama4_prefix, llama4_rules, llama4_dense_reason,
           lambda c, s: num_layers(llama4_text_config(c)), llama4_text_config),
    Family(("switch_transformers",), switch_kwargs, switch_prefix, switch_rules, switch_dense_reason,
           switch_layer_count, stacks=("encoder", "decoder")),
    Family(("nllb-moe",), nllb_kwargs, lambda c, stack: (f"model.{stack}.layers.{{i}}.ffn.",), nllb_rules,
           nllb_dense_reason, lambda c, stack: int(c.get(f"{stack}_layers") or 0), stacks=("encoder", "decoder"),
           at_stack=lambda c, stack: dict(c, ffn_dim=need(c, f"{stack}_ffn_dim")) if stack else c),
    # DeepSeek-V3's block: sigmoid group-limited routing, e_score_correction_bias, shared experts
    family(("glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm4v_moe_text", "dots1", "deepseek_v32", "glm_moe_dsa",
            "sarvam_mla", "solar_open", "minicpm5_moe", "mimo_v2_flash"),
           deepseek_kwargs, "mlp", deepseek_rules, deepseek_dense_reason),
    family(("kimi_linear",), attribute_map(deepseek_kwargs, norm_topk_prob="moe_renormalize", n_group="num_expert_group",
                                           n_routed_experts="num_experts", num_experts_per_tok="num_experts_per_token",
                                           n_shared_experts="num_shared_experts"),
           "block_sparse_moe", lambda c: [*mixtral_rules(c), same("selection_bias", "gate.e_score_correction_bias"),
                                          *shared_mlp("shared_experts")], deepseek_dense_reason),
    family(("sarvam_moe",), deepseek_kwargs, "mlp",
           routed_rules("gate.weight", same("selection_bias", "gate.expert_bias"), shared="shared_experts"),
           deepseek_dense_reason),
    family(("exaone_moe",), deepseek_kwargs, "mlp",
           routed_rules("gate.weight", same("selection_bias", "e_score_correction_bias"), shared="shared_experts"),
           deepseek_dense_reason),
    family(("mistral4",), mistral4_kwargs, "mlp",
           lambda c: [linear("router_weight", "gate.weight"), *fused_experts(), *shared_mlp("shared_experts")],
           deepseek_dense_reason),
    family(("mistral_large4_text",), mistral4_kwargs, "",  # Mistral's own names: layers.{i}.experts.{j}.w1, ...
           lambda c: [*mixtral_rules(c), *shared_mlp("shared_experts")], deepseek_dense_reason),
    # Qwen's softmax top-k block
    family(("qwen3_next", "qwen4_exp_text"), functools.partial(qwen_kwargs, shared="gated"), "mlp", qwen_rules,
           qwen_dense_reason),
    family(("qwen3_5_moe", "qwen3_5_moe_text"), functools.partial(qwen_kwargs, shared="gated", normalize=True), "mlp",
           qwen_rules, qwen_dense_reason),
    family(("qwen3_vl_moe", "qwen3_vl_moe_text"), functools.partial(qwen_kwargs, normalize=True), "mlp",
           qwen3_vl_rules, qwen_dense_reason),
    family(("qwen3_omni_moe", "qwen3_omni_moe_text", "mellum"), qwen_kwargs, "mlp", qwen_rules, qwen_dense_reason),
    family(("flex_olmo",), qwen_kwargs, "mlp", qwen_rules),
    family(("lara_mini",), functools.partial(qwen_kwargs, shared="plain"), "mlp",
           lambda c: [linear("router_weight", "gate.weight"), *fused_experts(), *shared_mlp("shared_expert")],
           qwen_dense_reason),
    family(("hunyuan_v1_moe",), hunyuan_kwargs, "mlp", routed_rules("gate.wg.weight", shared="shared_mlp")),
    family(("ernie4_5_moe",), ernie_kwargs, "mlp",
           routed_rules("gate.weight", reshaped("selection_bias", "moe_statics.e_score_correction_bias",
                                                lambda shape: (1, *shape)), shared="shared_experts"),
           ernie_dense_reason),
    family(("jamba",), functools.partial(top_k, d_ff=("intermediate_size",)), "feed_forward",
           routed_rules("router.weight"), jamba_dense_reason),
    family(("cohere2_moe",), cohere2_kwargs, "mlp", cohere2_rules),
    # Mixtral's block (w1 / w3 / w2) and MiniMax-M2's sigmoid one on it
    family(("minimax",), mixtral_kwargs, "block_sparse_moe", mixtral_rules),
    family(("minimax_m2",), sigmoid_top_k, "block_sparse_moe",
           lambda c: [*mixtral_rules(c), same("selection_bias", "e_score_correction_bias")]),
    # sigmoid top-k (a selection bias, scaling, shared experts)
    family(("afmoe",), shared_kwargs(functools.partial(sigmoid_top_k, scale_key="route_scale"), "moe_intermediate_size",
                                     times="num_shared_experts"), "mlp",
           routed_rules("router.gate.weight", same("selection_bias", "expert_bias"), shared="shared_experts"),
           afmoe_dense_reason),
    family(("hy_v3",), shared_kwargs(functools.partial(sigmoid_top_k, scale_key="router_scaling_factor"),
                                     "moe_intermediate_size", times="num_shared_experts"), "mlp",
           routed_rules("router.gate.weight", same("selection_bias", "expert_bias"), shared="shared_mlp"),
           deepseek_dense_reason),
    family(("flint",), shared_kwargs(functools.partial(sigmoid_top_k, scale_key=None, bias=False, normalize=None),
                                     "shared_expert_intermediate_size"), "mlp",
           routed_rules("gate.weight", shared="shared_expert"), qwen_dense_reason),
    family(("minimax_m3_vl_text",), minimax_m3_kwargs, "mlp",
           lambda c: [linear("router_weight", "gate.weight"), same("selection_bias", "gate.e_score_correction_bias"),
                      *fused_experts(), fused_pair("shared_expert.w_gate", "shared_expert.w_in",
                                                   "shared_experts.gate_up_proj.weight", interleaved=False,
                                                   transposed=True),
                      linear("shared_expert.w_out", "shared_experts.down_proj.weight")],
           deepseek_dense_reason),
    family(("beam",), deepseek_kwargs, "mlp", deepseek_rules, deepseek_dense_reason),  # V3's router, no shared expert
    family(("dots3_note_text",), shared_kwargs(deepseek_kwargs, "shared_experts_intermediate_size",
                                               times="n_shared_experts"), "mlp", deepseek_rules, deepseek_dense_reason),
    # DeepSeek-V2's block (softmax, greedy or group-limited greedy) in the OCR models' text decoders
    family(("unlimited_ocr_text",), deepseek_v2_kwargs, "mlp", deepseek_rules, deepseek_dense_reason),
    family(("deepseek_ocr2_text",), deepseek_v2_kwargs, "mlp",
           lambda c: [linear("router_weight", "gate.weight"), *fused_experts(), *shared_mlp("shared_experts")],
           deepseek_dense_reason),
    # GPT-OSS's block with gate / up in halves; its top-k softmax / k times k (the block's "additional scaling")
    family(("openai_privacy_filter",), gpt_oss_kwargs, "mlp", functools.partial(gpt_oss_rules, interleaved=False)),
    # fused expert tensors
    family(("granitemoe", "granitemoeshared", "granitemoehybrid"), granite_kwargs, "", granite_rules),
    family(("granitemoe_swa",), granite_kwargs, "", granite_swa_rules),
    family(("aria_text",), aria_kwargs, "mlp", aria_rules),
    # sigmoid routers with the newer options: epsilon, softcapped logits, the bias on the logits
    family(("lfm2_moe",), lfm2_kwargs, "feed_forward", lfm2_rules, afmoe_dense_reason),
    family(("laguna",), laguna_kwargs, "mlp",
           routed_rules("gate.weight", same("selection_bias", "experts.e_score_correction_bias"),
                        shared="shared_expert"), laguna_dense_reason),
    family(("kolibri1", "kolibri1_1"), kolibri_kwargs, "", kolibri_rules, kolibri_dense_reason),
    # DeepSeek-V3's router, SwiGLU clamped without GPT-OSS's alpha and + 1
    family(("hy_v4", "hy_v4_vl_text"), limited(deepseek_kwargs, shared=False), "mlp",
           lambda c: [linear("router_weight", "gate.weight"), same("selection_bias", "gate.e_score_correction_bias"),
                      *fused_experts(), linear("shared_expert.w_gate", "shared_experts.linear_gate.weight"),
                      *shared_mlp("shared_experts")[1:]], deepseek_dense_reason),
    family(("glm5_next_text",), limited(deepseek_kwargs), "mlp", deepseek_rules, deepseek_dense_reason),
    # zero-computation (identity) experts routed with the FFN experts
    family(("longcat_flash",), longcat_kwargs, "mlp",
           routed_rules("router.classifier.weight", same("selection_bias", "router.e_score_correction_bias"))),
    family(("phimoe",), phimoe_kwargs, "block_sparse_moe", mixtral_rules),  # SparseMixer routing on Mixtral's names
    family(("doge",), doge_kwargs, "mlp", doge_rules,  # product keys over single-neuron experts + a dense MLP
           lambda c, i, stack: None if c.get("is_moe") else "is_moe=False: every layer's MLP is dense"),
    family(("step3p5",), step3p5_kwargs, "mlp",
           lambda c: [linear("router_weight", "gate.weight"), same("selection_bias", "gate.e_score_correction_bias"),
                      *fused_experts(), *shared_mlp("shared_experts")], deepseek_dense_reason, step3p5_at_layer),
    # Step-3.7's multimodal checkpoint: StepFun's names under model.layers.{i}. (stacked [E, out, in] experts)
    family(("step3p7",), step3p5_kwargs, "",
           lambda c: [linear("router_weight", "moe.gate.weight"), same("selection_bias", "moe.router_bias"),
                      stacked_linear("experts.w_gate", "moe.gate_proj.weight"),
                      stacked_linear("experts.w_in", "moe.up_proj.weight"),
                      stacked_linear("experts.w_out", "moe.down_proj.weight"), *shared_mlp("share_expert")],
           deepseek_dense_reason, step3p5_at_layer),
    # Ling-2: DeepSeek-V3's router on Ling's config names, Step-3.7's per-layer clamps
    family(("bailing_hybrid",), ling_kwargs, "mlp",
           routed_rules("gate.weight", same("selection_bias", "gate.expert_bias"), shared="shared_experts"),
           lambda c, i, stack: deepseek_dense_reason(ling(c), i, stack), ling_at_layer),
    # DeepSeek-V4: sqrt(softplus) scores, hash layers (the token ids' fixed experts), limited SwiGLU; DeepSeek's names
    family(("deepseek_v4",), limited(deepseek_v4_kwargs), "ffn", deepseek_v4_rules, at_layer=deepseek_v4_at_layer),
    # Inkling-2 (and its looped variant): DeepSeek-V4's top-k router, softcapped SwiGLU; the original names
    with_prefix(family(("inkling2_text", "inkling2", "inkling2_loop_text", "inkling2_loop"), inkling2_kwargs, "mlp",
                       inkling2_rules), "model.llm.layers.{i}.mlp."),
    # Ergo: squared-ReLU experts and shared expert with an output RMSNorm each; its own names under layers.{i}.
    with_prefix(family(("ergo",), ergo_kwargs, "feed_forward", ergo_rules, ergo_dense_reason),
                "layers.{i}.feed_forward."),
    # Inkling: the router weights the shared experts too (one normalisation over the k chosen and the shared)
    family(("inkling_text",), inkling_kwargs, "mlp", inkling_rules, deepseek_dense_reason),
    Family(("dbrx",), dbrx_kwargs, lambda c, s: ("transformer.blocks.{i}.ffn.",), dbrx_rules,
           layer_count=lambda c, s: int(get(c, "n_layers", "num_hidden_layers", default=0))),
    # blocks with pieces around the experts: load_moe returns a jmoe.hf.blocks module whose `moe` is the jmoe.MoE
    family(("axk1",), deepseek_kwargs, "", axk1_rules, deepseek_dense_reason, block=axk1_block),
    family(("axk2",), axk2_kwargs, "mlp", deepseek_rules, deepseek_dense_reason),
    family(("jetmoe",), jetmoe_kwargs, "mlp", jetmoe_rules, block=lambda c: BlockSpec(output_bias=True)),
    family(("muse_spark", "muse_spark_text"), muse_spark_kwargs, "mlp", muse_spark_rules, deepseek_dense_reason,
           block=muse_spark_block),
    Family(("nemotron_h",), nemotron_h_kwargs, nemotron_h_prefix, nemotron_h_rules, nemotron_h_dense_reason,
           lambda c, s: len(nemotron_h_layer_types(c)), block=nemotron_h_block),
    family(("gemma4", "gemma4_text"), gemma4_kwargs, "", gemma4_rules, gemma4_dense_reason, gemma4_at_layer,
           block=gemma4_block),
    family(("diffusion_gemma_text",), gemma4_kwargs, "", gemma4_rules, at_layer=gemma4_at_layer, block=gemma4_block),
    family(("ernie4_5_vl_moe",), ernie_vl_kwargs, "mlp", ernie_vl_rules, deepseek_dense_reason, block=ernie_vl_block),
    family(("ernie4_5_vl_moe_text",), ernie_vl_kwargs, "mlp", ernie_vl_text_rules, deepseek_dense_reason,
           block=ernie_vl_block),
):
    for model_type in family.model_types:
        FAMILIES[model_type] = family

SUPPORTED = tuple(FAMILIES)

# transformers' MoE model types jmoe.hf does not load yet, and what their block needs
# (the survey: tests/data/hf/FAMILIES.md)
MISSING = {
    "gemma4_unified_text": "an MoE block: transformers 5.25's Gemma 4 Unified text model has none (its config drops "
                           "enable_moe_block / num_experts; every layer's MLP is dense)",
    "zaya": "its router state carried from layer to layer (layer i > 0 routes on x W_down + b + s * r, r the "
            "router hidden state of layer i - 1, and hands its own on to layer i + 1: a block of two inputs and two "
            "outputs, which a layer loaded alone cannot compute), routed by an MLP over E + 1 classes (a skip expert)",
}


def family_of(model_type: str | None) -> Family:
    if model_type in MISSING:
        raise CheckpointError(f"{model_type}: needs {MISSING[model_type]}, not supported by jmoe.hf yet "
                              f"(supported: {', '.join(SUPPORTED)})")
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type {model_type!r} is not supported by jmoe.hf; supported: "
                              f"{', '.join(SUPPORTED)}")
    return FAMILIES[model_type]
