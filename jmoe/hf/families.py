"""What each Hugging Face MoE family stores, and how it maps onto :class:`jmoe.MoE`.

All family knowledge of jmoe lives here (the layer knows no model names). A family is

* ``moe_kwargs(config)``: the ``jmoe.MoE`` arguments of its MoE block (transformers 5.x
  semantics, checked against transformers' own block outputs in tests/test_hf.py);
* ``prefix``: where layer i's MoE block lives in the checkpoint (the hub's name first, then
  other names the same weights have been saved under, e.g. Llama 4's text model inside the
  multimodal one as ``language_model.model.`` or ``model.language_model.``);
* ``dense_reason(config, i)``: why layer i has no MoE block (a dense FFN), or None;
* ``rules``: the tensors, each a :class:`Rule` between one jmoe weight and its hub tensor(s).

jmoe's weights: ``router_weight [d, E]``, ``router_bias [E]``, ``selection_bias [E]`` (float32),
``experts.w_gate / w_in [E, d, f]``, ``experts.w_out [E, f, d]``, ``experts.b_gate / b_in [E, f]``,
``experts.b_out [E, d]``, ``shared_expert.w_gate / w_in [d, F]``, ``shared_expert.w_out [F, d]``,
``shared_expert.gate_weight [d, 1]``. torch's ``nn.Linear.weight`` is ``[out, in]``: transposed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jmoe.hf.files import CheckpointError

# Switch Transformers' capacity is an absolute number per sequence (config.expert_capacity): jmoe's
# C = max(ceil(k * factor * S / E), min_capacity), capped at S; with this factor the first term is
# at most 1, so C = min(expert_capacity, S) per sequence, in train and eval mode alike.
FIXED_CAPACITY_FACTOR = 1e-9

GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
PLAIN_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


# ---------------------------------------------------------------- rules: jmoe weight <-> hub tensors


@dataclasses.dataclass(frozen=True)
class Rule:
    """One jmoe weight (``path``, e.g. ``experts.w_gate``) and the hub tensors it comes from.

    ``hub(shape, E)``: hub name (relative to the layer prefix) -> expected shape, from the jmoe
    weight's shape; ``to_jmoe(tensors)``: the jmoe weight from those tensors (float32);
    ``to_hub(value)``: the inverse."""

    path: str
    hub: Callable[[tuple[int, ...]], dict[str, tuple[int, ...]]]
    to_jmoe: Callable[[dict[str, np.ndarray]], np.ndarray]
    to_hub: Callable[[np.ndarray], dict[str, np.ndarray]]

    @property
    def paths(self) -> tuple[str]:
        return (self.path,)


def same(path: str, name: str) -> Rule:
    """A tensor stored as jmoe holds it (a vector; GPT-OSS / Llama 4 fused ``[E, in, out]``)."""
    return Rule(path, lambda shape: {name: shape}, lambda t: t[name], lambda v: {name: v})


def linear(path: str, name: str) -> Rule:
    """One torch Linear weight ``[out, in]`` <-> jmoe ``[in, out]``."""
    return Rule(path, lambda shape: {name: shape[::-1]}, lambda t: t[name].T, lambda v: {name: v.T})


def per_expert(path: str, template: str) -> Rule:
    """E torch Linear weights ``template.format(j)`` ``[out, in]`` <-> jmoe ``[E, in, out]``."""
    def hub(shape):
        return {template.format(j): (shape[2], shape[1]) for j in range(shape[0])}

    def to_jmoe(t):
        return np.stack([t[template.format(j)].T for j in range(len(t))])

    return Rule(path, hub, to_jmoe, lambda v: {template.format(j): v[j].T for j in range(v.shape[0])})


@dataclasses.dataclass(frozen=True)
class PairRule:
    """GPT-OSS / Llama 4's fused ``gate_up_proj [E, d, 2f]`` (or its bias ``[E, 2f]``): two jmoe
    weights (``gate``, ``up`` paths) in one hub tensor ``name``, interleaved (even / odd columns:
    GPT-OSS) or in two halves (gate first: Llama 4)."""

    gate: str
    up: str
    name: str
    interleaved: bool

    @property
    def paths(self) -> tuple[str, str]:
        return self.gate, self.up

    def hub(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {self.name: (*shape[:-1], 2 * shape[-1])}

    def to_jmoe(self, tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        value = tensors[self.name]
        if self.interleaved:
            return value[..., 0::2], value[..., 1::2]
        half = value.shape[-1] // 2
        return value[..., :half], value[..., half:]

    def to_hub(self, gate: np.ndarray, up: np.ndarray) -> dict[str, np.ndarray]:
        if not self.interleaved:
            return {self.name: np.concatenate([gate, up], axis=-1)}
        out = np.empty((*gate.shape[:-1], 2 * gate.shape[-1]), np.float32)
        out[..., 0::2], out[..., 1::2] = gate, up
        return {self.name: out}


def fused_pair(gate: str, up: str, name: str, *, interleaved: bool) -> PairRule:
    return PairRule(gate, up, name, interleaved)


def gated_experts(gate: str, up: str, down: str) -> list:
    """Per-expert SwiGLU weights ``experts.{j}.<gate|up|down>.weight`` (Mixtral's w1/w3/w2,
    Qwen / DeepSeek / OLMoE's gate_proj / up_proj / down_proj)."""
    return [per_expert("experts.w_gate", f"experts.{{}}.{gate}.weight"),
            per_expert("experts.w_in", f"experts.{{}}.{up}.weight"),
            per_expert("experts.w_out", f"experts.{{}}.{down}.weight")]


def shared_mlp(module: str) -> list:
    return [linear("shared_expert.w_gate", f"{module}.gate_proj.weight"),
            linear("shared_expert.w_in", f"{module}.up_proj.weight"),
            linear("shared_expert.w_out", f"{module}.down_proj.weight")]


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


def mixtral_kwargs(c: dict) -> dict:
    return dict(d_model=need(c, "hidden_size"), d_ff=need(c, "intermediate_size"),
                num_experts=need(c, "num_local_experts", "num_experts"), k=need(c, "num_experts_per_tok"),
                activation=activation(c, gated=True), normalize=True, capacity_factor=None)


def qwen_kwargs(c: dict) -> dict:
    kwargs = dict(d_model=need(c, "hidden_size"), d_ff=need(c, "moe_intermediate_size", "intermediate_size"),
                  num_experts=need(c, "num_experts", "num_local_experts"), k=need(c, "num_experts_per_tok"),
                  activation=activation(c, gated=True), normalize=bool(c.get("norm_topk_prob", False)),
                  capacity_factor=None)
    shared = c.get("shared_expert_intermediate_size")
    if c.get("model_type") == "qwen2_moe" and shared:
        kwargs.update(shared_d_ff=shared, shared_gate=True)
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
    v3 = c.get("model_type") == "deepseek_v3"
    experts = need(c, "n_routed_experts", "num_local_experts", "num_experts")
    kwargs = dict(d_model=need(c, "hidden_size"), d_ff=need(c, "moe_intermediate_size"), num_experts=experts,
                  k=need(c, "num_experts_per_tok"), activation=activation(c, gated=True), router="group_limited",
                  routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)), capacity_factor=None)
    if v3:  # sigmoid scores + the selection bias, groups by the sum of their top-2 (noaux_tc)
        scoring = c.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise CheckpointError(f"deepseek_v3: scoring_func={scoring!r}; transformers' DeepSeek-V3 block (and "
                                  f"jmoe.hf) computes sigmoid scores")
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
    shared = c.get("n_shared_experts") or 0
    if shared:
        kwargs["shared_d_ff"] = shared * need(c, "moe_intermediate_size")
    return kwargs


def deepseek_dense_reason(c: dict, i: int, stack) -> str | None:
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


def gpt_oss_rules(c: dict) -> list:
    return [linear("router_weight", "router.weight"), same("router_bias", "router.bias"),
            fused_pair("experts.w_gate", "experts.w_in", "experts.gate_up_proj", interleaved=True),
            fused_pair("experts.b_gate", "experts.b_in", "experts.gate_up_proj_bias", interleaved=True),
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


def llama4_prefix(c: dict, stack) -> tuple[str, ...]:
    text, multimodal = "model.layers.{i}.feed_forward.", ("language_model.model.layers.{i}.feed_forward.",
                                                            "model.language_model.layers.{i}.feed_forward.")
    return (*multimodal, text) if c.get("model_type") == "llama4" else (text, *multimodal)


FAMILIES: dict[str, Family] = {}
for family in (
    Family(("mixtral",), mixtral_kwargs, lambda c, s: ("model.layers.{i}.block_sparse_moe.",),
           lambda c: [linear("router_weight", "gate.weight"), *gated_experts("w1", "w3", "w2")]),
    Family(("qwen2_moe", "qwen3_moe"), qwen_kwargs, lambda c, s: ("model.layers.{i}.mlp.",), qwen_rules,
           qwen_dense_reason),
    Family(("olmoe",), qwen_kwargs, lambda c, s: ("model.layers.{i}.mlp.",), qwen_rules),
    Family(("deepseek_v3", "deepseek_v2"), deepseek_kwargs, lambda c, s: ("model.layers.{i}.mlp.",), deepseek_rules,
           deepseek_dense_reason),
    Family(("gpt_oss",), gpt_oss_kwargs, lambda c, s: ("model.layers.{i}.mlp.",), gpt_oss_rules),
    Family(("llama4", "llama4_text"), llama4_kwargs, llama4_prefix, llama4_rules, llama4_dense_reason,
           lambda c, s: num_layers(llama4_text_config(c)), llama4_text_config),
    Family(("switch_transformers",), switch_kwargs, switch_prefix, switch_rules, switch_dense_reason,
           switch_layer_count, stacks=("encoder", "decoder")),
):
    for model_type in family.model_types:
        FAMILIES[model_type] = family

SUPPORTED = tuple(FAMILIES)


def family_of(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type {model_type!r} is not supported by jmoe.hf; supported: "
                              f"{', '.join(SUPPORTED)}")
    return FAMILIES[model_type]
