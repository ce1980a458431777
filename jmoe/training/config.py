"""The flat training configuration: named files in ``configs/`` plus ``key=value`` overrides.

A :class:`Config` is one flat dataclass; ``train.py`` reads it to build the model,
data, optimizer and mesh (nothing below ``train.py`` sees the whole config).
Every key has a type and, where it matters, an allowed range or set of choices;
:func:`load_config` and :func:`parse_overrides` reject unknown keys (listing the
valid ones) and out-of-range values (naming the allowed range). Every key also has a
role (see :data:`ROLES`), from which :data:`MODEL_KEYS` (checked when a checkpoint is
restored) and :data:`RUN_ONLY_KEYS` (left out of the compile cache's key) are derived.

A config file ``configs/NAME.json`` holds a JSON object of keys to values; keys it
leaves out take the defaults below. ``config=NAME`` on the command line picks
``configs/NAME.json``; ``config=PATH.json`` reads any file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from jmoe.dispatch import NAMES as DISPATCH_NAMES
from jmoe.experts import ACTIVATIONS, NEEDS_SOFTCAP
from jmoe.grouped_matmul import NAMES as GROUPED_MATMUL_NAMES
from jmoe.training.model import ATTENTION_IMPLS, EMBEDDINGS
from jmoe.parallel.dropless_exchange import NAMES as DROPLESS_EXCHANGE_NAMES
from jmoe.parallel.dropless_exchange import OVERFLOWS
from jmoe.routing import DEFAULT_ROUTER, PRIORITIES, ROUTERS, SECOND_EXPERT_POLICIES, make_router
from jmoe.routing.group_limited import GROUP_SCORES, SCORE_FUNCTIONS

ROUTER_NAMES = tuple(name for name, cls in ROUTERS.items() if not cls.needs_token_ids)  # the LM passes no ids

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

_POS = (1, None)  # integer >= 1
_NONNEG = (0, None)
_FLAG = (0, 1)  # 0 = off, 1 = on

# What lb_weight multiplies (each summed over the MoE layers; see jmoe.training.model.total_loss):
#   load_balancing_loss         Switch's E * sum_e f_e P_e per routing group (a sequence by default), mean over groups
#   sequence_balance_loss       DeepSeek-V3's sequence-wise balance loss (= load_balancing_loss / k)
#   global_load_balancing_loss  E * sum_e f_e P_e with f and P over the step's whole global batch (every device)
BALANCE_LOSSES = ("load_balancing_loss", "sequence_balance_loss", "global_load_balancing_loss")

# group_limited router options and the values at which they are off (any other router needs these)
GROUP_LIMITED_DEFAULTS = dict(score_function="sigmoid", n_group=1, topk_group=1, group_score="top2_sum",
                              routed_scaling_factor=1.0, selection_bias=0)


# What changing a key does; every field names its role in its metadata (one of):
#   "model":   it defines the model's parameters (their tree and shapes, or what they mean): a checkpoint
#              restores only into the same values (MODEL_KEYS, checked before restoring);
#   "compile": it changes the compiled train / eval functions (part of the setup cache's key);
#   "run":     it changes nothing inside the compiled functions (data, logging, checkpointing, multi-host,
#              sampling, the debug NaN step, which is a runtime argument): RUN_ONLY_KEYS.
ROLES = ("model", "compile", "run")


def _field(default, doc: str, *, role: str, range=None, choices=None):
    if role not in ROLES:
        raise ValueError(f"role={role!r} must be one of {', '.join(ROLES)}")
    return dataclasses.field(default=default, metadata={"doc": doc, "role": role, "range": range, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
    # --- model -------------------------------------------------------------
    d_model: int = _field(128, "model width", role="model", range=_POS)
    num_layers: int = _field(4, "Transformer blocks", role="model", range=_POS)
    num_heads: int = _field(4, "attention heads (d_model must be divisible)", role="model", range=_POS)
    d_ff: int = _field(512, "hidden width of the dense FFNs", role="model", range=_POS)
    num_experts: int = _field(4, "experts per MoE layer; 0 = dense baseline", role="model", range=_NONNEG)
    expert_d_ff: int = _field(512, "hidden width of each expert", role="model", range=_POS)
    moe_every: int = _field(2, "an MoE FFN in every moe_every-th block (2 = Switch)", role="model", range=_POS)
    k: int = _field(1, "experts per token (top-k)", role="compile", range=_POS)
    capacity_factor: float = _field(1.25, "train capacity factor", role="compile", range=(1e-6, None))
    eval_capacity_factor: float = _field(2.0, "eval capacity factor", role="compile", range=(1e-6, None))
    dropless: int = _field(0, "1 = dropless MoE layers (no capacity, grouped matmul; capacity factors unused)",
                           role="compile", range=(0, 1))
    grouped_matmul: str = _field("auto", "dropless: the grouped matmul (auto = scan on CPU, megablox on TPU, ragged_dot on GPU)",
                                 role="compile", choices=GROUPED_MATMUL_NAMES)
    dropless_exchange: str = _field("auto", "dropless on a mesh: how rows move (auto = ragged on GPU/TPU)",
                                    role="compile", choices=DROPLESS_EXCHANGE_NAMES)
    dropless_buffer_factor: float = _field(0.0, "dropless on a mesh: exchange buffers = factor x local "
                                                "assignments per round (>= 1; overflow goes in more rounds); "
                                                "0 = jmoe's default", role="compile", range=(0.0, None))
    dropless_overflow: str = _field("rounds", "dropless on a mesh: rows that do not fit one round: rounds "
                                              "(more rounds, nothing dropped) or drop (dropped and counted)",
                                    role="compile", choices=OVERFLOWS)
    priority: str = _field("choice", "who wins a slot: choice-major or token-major (token keeps a causal LM "
                                           "causal when k > 1)", role="compile", choices=PRIORITIES)
    second_expert_policy: str = _field("all", "GShard's 2nd expert: all, or random (k=2)", role="compile",
                                       choices=SECOND_EXPERT_POLICIES)
    router: str = _field(DEFAULT_ROUTER, "router", role="model",
                         choices=ROUTER_NAMES)
    activation: str = _field("gelu", "FFN / expert activation", role="model",
                             choices=tuple(a for a in ACTIVATIONS if a not in NEEDS_SOFTCAP))
    dispatch: str = _field("auto", "MoE dispatch backend", role="compile",
                           choices=DISPATCH_NAMES)
    jitter: float = _field(0.0, "router input jitter in train mode", role="compile", range=(0.0, 0.999))
    group_size: int = _field(0, "tokens per routing group; 0 = one group per sequence", role="compile", range=_NONNEG)
    dtype: str = _field("float32", "activation dtype (router stays float32)", role="compile",
                        choices=("float32", "bfloat16"))
    rope_base: float = _field(10000.0, "rotary embedding base", role="compile", range=(1.0, None))
    attention: str = _field("auto", "attention implementation (jax.nn.dot_product_attention): auto = cudnn on a "
                                    "GPU when the dtype and head dim allow, else xla", role="compile",
                            choices=ATTENTION_IMPLS)
    embedding: str = _field("gather", "token embedding: a row gather, or a one-hot matmul (same values; float32 "
                                      "backward)", role="compile", choices=EMBEDDINGS)
    score_function: str = _field("sigmoid", "group_limited: router scores, sigmoid (DeepSeek-V3) or softmax "
                                            "(DeepSeek-V2)", role="model", choices=tuple(SCORE_FUNCTIONS))
    n_group: int = _field(1, "group_limited: the experts form n_group equal groups (must divide num_experts)",
                          role="compile", range=_POS)
    topk_group: int = _field(1, "group_limited: a token's experts come from its topk_group best groups (<= n_group)",
                             role="compile", range=_POS)
    group_score: str = _field("top2_sum", "group_limited: a group's score, the sum of its 2 best (DeepSeek-V3) or "
                                          "its best (DeepSeek-V2) biased scores", role="compile", choices=GROUP_SCORES)
    routed_scaling_factor: float = _field(1.0, "group_limited: combine weights x this", role="compile",
                                          range=(1e-6, None))
    normalize: int = _field(0, "1 = combine weights renormalised over the k chosen (norm_topk_prob; tokens_choose "
                               "and group_limited)", role="compile", range=_FLAG)
    selection_bias: int = _field(0, "group_limited: 1 = a selection bias b [E] per MoE layer (state, not a "
                                    "parameter): experts are chosen on score + b (aux-loss-free balancing)",
                                 role="model", range=_FLAG)
    bias_update_rate: float = _field(0.0, "aux-loss-free balancing: after each step b_e += rate * sign(mean load - "
                                          "load_e), the load over the step's global batch (gamma; 0 = off; needs "
                                          "selection_bias=1)", role="compile", range=(0.0, None))
    router_bias: int = _field(0, "1 = a trained router bias, logits = x W_r + b_r (GPT-OSS)", role="model",
                              range=_FLAG)
    scale_expert_input: int = _field(0, "1 = the expert weight scales the expert's input (Llama 4; needs k=1)",
                                     role="compile", range=_FLAG)
    shared_d_ff: int = _field(0, "hidden width of a shared expert every token goes through (DeepSeek, "
                                 "Qwen2-MoE); 0 = none", role="model", range=_NONNEG)
    shared_gate: int = _field(0, "1 = the shared expert scaled by sigmoid(x w_g) per token (Qwen2-MoE; needs "
                                 "shared_d_ff)", role="model", range=_FLAG)
    lb_weight: float = _field(0.01, "weight of the summed balance loss named by lb_loss", role="compile",
                              range=(0.0, None))
    lb_loss: str = _field("load_balancing_loss", "the balance loss lb_weight multiplies: Switch's per group, "
                                                 "DeepSeek-V3's sequence-wise (= Switch's / k) or the global-batch "
                                                 "one", role="compile", choices=BALANCE_LOSSES)
    z_weight: float = _field(0.001, "weight of the summed router z-loss", role="compile", range=(0.0, None))
    # --- data --------------------------------------------------------------
    data: str = _field("", "text file or directory; empty = the Python standard library sources", role="run")
    val_percent: float = _field(5.0, "percent of files held out (of each file's bytes, its tail, for one file "
                                "or a folder too small to split by file)", role="run", range=(0.1, 50.0))
    seq_len: int = _field(128, "tokens (bytes) per sequence", role="compile", range=_POS)
    batch_size: int = _field(16, "global batch size (sequences)", role="compile", range=_POS)
    # --- optimisation -----------------------------------------------------
    steps: int = _field(400, "training steps", role="compile", range=_POS)
    lr: float = _field(3e-3, "peak learning rate", role="compile", range=(0.0, 1.0))
    warmup_steps: int = _field(40, "linear warmup steps", role="compile", range=_NONNEG)
    min_lr_ratio: float = _field(0.1, "final lr / peak lr of the cosine decay", role="compile", range=(0.0, 1.0))
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only)", role="compile", range=(0.0, None))
    b1: float = _field(0.9, "Adam beta1", role="compile", range=(0.0, 0.999999))
    b2: float = _field(0.95, "Adam beta2", role="compile", range=(0.0, 0.999999))
    grad_clip: float = _field(1.0, "global gradient-norm clip; 0 = off", role="compile", range=(0.0, None))
    seed: int = _field(0, "seed of the init and of the data order", role="compile", range=_NONNEG)
    # --- run ---------------------------------------------------------------
    out_dir: str = _field("", "run directory (log, plots, checkpoints); empty = runs/<config>", role="run")
    eval_every: int = _field(100, "evaluate every N steps (and at the end)", role="run", range=_POS)
    eval_batches: int = _field(8, "validation batches per evaluation", role="run", range=_POS)
    log_every: int = _field(10, "fetch metrics / print progress every N steps", role="run", range=_POS)
    ckpt_every: int = _field(200, "checkpoint every N steps (and at the end)", role="run", range=_POS)
    keep_ckpts: int = _field(2, "checkpoints kept", role="run", range=_POS)
    expert_parallel: int = _field(1, "size of the mesh's 'expert' axis", role="compile", range=_POS)
    num_devices: int = _field(0, "devices in the mesh (0 = all)", role="compile", range=_NONNEG)
    nan_at_step: int = _field(-1, "debug: make the loss NaN at this step (numbered from 1 as in the log; -1 = never)",
                              role="run", range=(-1, None))
    # --- multi-host ------------------------------------------------------------
    distributed: str = _field("auto", "jax.distributed.initialize: auto (if env says so), on, off", role="run",
                              choices=("auto", "on", "off"))
    coordinator_address: str = _field("", "host:port of process 0 (or JAX_COORDINATOR_ADDRESS)", role="run")
    num_processes: int = _field(0, "processes in the job (0 = from the environment)", role="run", range=_NONNEG)
    process_id: int = _field(-1, "this process's index (-1 = from the environment)", role="run", range=(-1, None))
    # --- sampling --------------------------------------------------------------
    prompt: str = _field("def ", "sample mode: the prompt", role="run")
    sample_len: int = _field(200, "sample mode: bytes to generate", role="run", range=_POS)
    temperature: float = _field(0.8, "sample mode: temperature (0 = greedy)", role="run", range=(0.0, None))
    top_k: int = _field(0, "sample mode: keep the top_k logits (0 = all)", role="run", range=_NONNEG)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} / num_heads={self.num_heads} must be an even integer (rotary head dim)"
            )
        if self.num_experts and not 1 <= self.k <= self.num_experts:
            raise ValueError(f"k={self.k} must be in [1, num_experts={self.num_experts}]")
        if self.nan_at_step == 0:
            raise ValueError("nan_at_step=0 never happens: steps are numbered from 1, as in the log (-1 = never)")
        if self.dropless_buffer_factor and not (self.dropless and self.dropless_buffer_factor >= 1.0):
            raise ValueError(f"dropless_buffer_factor={self.dropless_buffer_factor} needs dropless=1 and a value "
                             f">= 1 (0 = jmoe's default)")
        self._check_router_options()

    def _check_router_options(self) -> None:
        if self.router != "group_limited":
            on = [f"{k}={getattr(self, k)!r}" for k, off in GROUP_LIMITED_DEFAULTS.items() if getattr(self, k) != off]
            if on:
                raise ValueError(f"{', '.join(on)} need router=group_limited, got router={self.router!r}")
        router = make_router(self.router, k=self.k, **self.moe_router_kwargs())  # the router checks its options
        if self.num_experts:
            router.check_experts(self.num_experts)
        if self.bias_update_rate and not self.selection_bias:
            raise ValueError(f"bias_update_rate={self.bias_update_rate} updates the selection biases: it needs "
                             f"selection_bias=1 (and router=group_limited)")
        if self.shared_gate and not self.shared_d_ff:
            raise ValueError("shared_gate=1 gates the shared expert: it needs shared_d_ff >= 1")

    def moe_router_kwargs(self) -> dict[str, Any]:
        """This config's router options as flat keys (the group_limited ones only for that router; the
        others at their defaults are left to the router), for :func:`jmoe.options.layer_arguments`."""
        out: dict[str, Any] = {"router_bias": bool(self.router_bias), "scale_expert_input": bool(self.scale_expert_input)}
        if self.normalize:
            out["normalize"] = True
        if self.router == "group_limited":
            out.update(score_function=self.score_function, n_group=self.n_group, topk_group=self.topk_group,
                       group_score=self.group_score, routed_scaling_factor=self.routed_scaling_factor,
                       selection_bias=bool(self.selection_bias))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def keys_with_role(role: str) -> tuple[str, ...]:
    """The keys of ``role`` (see :data:`ROLES`), in field order."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["role"] == role)


# Keys that define the model's parameters: a checkpoint restores only into the same values.
MODEL_KEYS = Config.MODEL_KEYS = keys_with_role("model")
# Keys that change nothing inside the compiled functions: normalised away in the setup cache's key.
RUN_ONLY_KEYS = keys_with_role("run")


def keys() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def describe() -> str:
    """One line per key: name, type, default, allowed values, doc."""
    lines = []
    for f in dataclasses.fields(Config):
        allowed = _allowed(f)
        lines.append(f"  {f.name} ({_type_name(f)}, default {f.default!r}{', ' + allowed if allowed else ''}): "
                     f"{f.metadata['doc']}")
    return "\n".join(lines)


def _type_name(f) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _allowed(f) -> str:
    if f.metadata["choices"]:
        return "one of " + ", ".join(f.metadata["choices"])
    if f.metadata["range"]:
        lo, hi = f.metadata["range"]
        return f"in [{lo}, {'inf' if hi is None else hi}]"
    return ""


def _check_value(f, value) -> None:
    lo_hi, choices = f.metadata["range"], f.metadata["choices"]
    if choices and value not in choices:
        raise ValueError(f"{f.name}={value!r} is not allowed: must be one of {', '.join(choices)}")
    if lo_hi:
        lo, hi = lo_hi
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}={value!r} must be finite, in [{lo}, {hi if hi is not None else 'inf'}]")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{f.name}={value!r} is out of range: must be in [{lo}, {hi if hi is not None else 'inf'}]")


def _parse(f, text: str):
    kind = _type_name(f)
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        return text
    except ValueError:
        raise ValueError(f"{f.name}={text!r} is not a valid {kind} ({_allowed(f) or f.metadata['doc']})") from None


def _unknown(names) -> ValueError:
    return ValueError(f"unknown config key(s) {sorted(names)}; valid keys:\n{describe()}")


def config_path(name: str) -> str:
    """``configs/NAME.json`` for a bare name, else the path itself; an error lists the named configs."""
    path = name if name.endswith(".json") else os.path.join(CONFIG_DIR, f"{name}.json")
    if not os.path.isfile(path):
        names = sorted(p[:-5] for p in os.listdir(CONFIG_DIR) if p.endswith(".json")) if os.path.isdir(CONFIG_DIR) else []
        raise FileNotFoundError(f"no config {name!r} (looked for {path}); named configs: {', '.join(names)}")
    return path


def load_config(name: str = "tiny", overrides: dict[str, Any] | None = None) -> Config:
    """The named config (or JSON file), with ``overrides`` (already typed values) applied."""
    with open(config_path(name)) as fh:
        values = json.load(fh)
    values.pop("_comment", None)
    values.update(overrides or {})
    return from_dict(values)


def from_dict(values: dict[str, Any]) -> Config:
    """A :class:`Config` from a dict; unknown keys are an error listing the valid keys."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = set(values) - set(fields)
    if unknown:
        raise _unknown(unknown)
    typed = {}
    for name, value in values.items():
        kind = _type_name(fields[name])
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        expected = {"int": int, "float": float, "str": str}[kind]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be a {kind}")
        typed[name] = value
    return Config(**typed)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> typed values; unknown keys and bad values are errors."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    out: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"expected key=value, got {arg!r}; valid keys:\n{describe()}")
        name, text = arg.split("=", 1)
        if name not in fields:
            raise _unknown([name])
        out[name] = _parse(fields[name], text)
    return out
