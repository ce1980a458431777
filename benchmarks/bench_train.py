"""Time train.py's real jitted train step, one variant of a config after another, and profile it (issue 16).

    PYTHONPATH=. python benchmarks/bench_train.py --config small_gpu --budget 200 --out results/   # a GPU
    PYTHONPATH=. python benchmarks/bench_train.py --smoke --out /tmp/bt     # CPU smoke (~1 min, not a measurement)
    PYTHONPATH=. python benchmarks/bench_train.py --config small --set seq_len=1024 --variants base,cudnn

The step is :func:`jmoe.training.build.make_train_step`'s (model, loss, backward, clipping, AdamW, the
metrics), compiled for the config with ``--set`` overrides and then each variant's own overrides, on random
byte tokens. Variants (each is the base plus one change, so each gain is measured alone):

  base          the config with ``attention=xla embedding=gather`` (XLA's unfused attention: what
                train.py ran before issue 16)
  cudnn         attention=cudnn (cuDNN's fused flash attention; GPU only)
  onehot        embedding=onehot (one-hot matmul embedding, float32 backward)
  capacity_1.0  capacity_factor=1.0
  dropless_X    dropless=1 grouped_matmul=X: ragged_dot, mosaic and pallas (GPU), megablox (TPU), scan
  batch_2x      twice the tokens per step, with attention=auto (cuDNN on a GPU: compare with cudnn)
  dense         num_experts=0 (the dense baseline; FLOP-matched when k * expert_d_ff = d_ff, as in
                small_gpu)
  combined      every single change that beat base (the faster attention, embedding, and capacity /
                dropless choice), measured together

Per variant: compile seconds (variants compile ``--compile-workers`` at a time, ahead of the timed runs, so
no compile runs while a step is timed), ms/step over ``--steps`` steps after 2 warm-up steps, tokens/s, and
MFU = tokens/s x FLOPs/token / peak, where the peak is the device kind's dense bf16 FLOP/s
(:data:`jmoe.training.logs.PEAK_FLOPS`: H100 SXM 989, H100 PCIe 756, H200 989 TFLOP/s) and FLOPs/token is
:func:`jmoe.training.model.flops_per_token`: ``6 x active parameters + 6 x layers x seq x d``, the attention
counted for the causal half (what a causal kernel computes; XLA's unfused path computes the masked half
too, which is not counted). ``of_matmul`` is the same achieved rate over the card's dense matmul rate
measured in the same run (an [n, n] bf16 matmul). Also XLA's own FLOP count of the compiled step, and
memory: the compiled program's (arguments + outputs - aliased + temporaries, XLA's memory analysis) and the
device's peak so far (where the backend reports it).

The base and the fastest variant are profiled (``--profile-steps`` steps under ``jax.profiler.trace``):
each op's time in the trace is mapped to the compiled HLO instruction of the same name, whose metadata
holds the Python call stack that made it (the module's stack-frame table). The innermost jmoe frame names
the category: attention, norm_rope (RMSNorm and rotary), embedding, loss (output head + cross-entropy),
routing, dispatch_combine (dispatch / combine, and dropless sorting), experts (MoE expert FFNs and grouped
matmuls), dense_ffn (the non-MoE blocks' FFNs), moe_other (the MoE layer's own glue), optimizer (optax,
clipping, gradient norm), other (residual adds, copies, no stack). A fusion is named by its own metadata,
else by the most common category of its fused instructions. On a GPU the times are the device kernels'; on
CPU, XLA:CPU's per-thunk trace events (both carry ``hlo_op``). Op times are summed, so ops that overlap
(XLA:CPU's thread pool, concurrent GPU streams) can add up to more than the step's wall time. The JSON has
the categories, the top ops and source lines, the whole op table in ``bench_train_ops_<variant>.json``.
"""

from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import dataclasses
import datetime
import functools
import glob
import gzip
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp

from benchtools import matmul_tflops  # noqa: E402  (a script's own folder is on sys.path)
from jmoe.training import config as config_lib
from jmoe.training import model as model_lib
from jmoe import platform as jmoe_platform
from jmoe.grouped_matmul import NAMES as GROUPED_MATMUL_NAMES
from jmoe.training import build
from jmoe.training.logs import PEAK_FLOPS, peak_flops
from jmoe.training import mesh as mesh_lib
from jmoe.training.mesh import batch_sharding

# the training mesh's constructor (training_mesh; make_mesh before it was renamed)
training_mesh = getattr(mesh_lib, "training_mesh", None) or getattr(mesh_lib, "make_mesh")

CATEGORIES = ("attention", "norm_rope", "embedding", "loss", "routing", "dispatch_combine", "experts",
              "dense_ffn", "moe_other", "optimizer", "other")
BASE = {"attention": "xla", "embedding": "gather"}
SMOKE_SET = {"d_model": 64, "num_layers": 2, "num_heads": 2, "d_ff": 128, "expert_d_ff": 128, "seq_len": 64,
             "batch_size": 4, "num_devices": 1}
GPU_KERNELS = ("pallas", "mosaic")  # grouped matmuls that are GPU kernels (interpreted elsewhere: not timed)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    name: str
    overrides: dict
    skip: str | None = None  # why it is not run here


def variants(cfg: config_lib.Config, on_gpu: bool, only: list[str] | None, smoke: bool = False,
             on_tpu: bool = False) -> list[Variant]:
    """The single-change variants in the order they are wanted (``combined`` is built after them)."""
    out = [Variant("base", {}),
           Variant("cudnn", {"attention": "cudnn"}, None if on_gpu else "cuDNN attention needs a GPU"),
           Variant("onehot", {"embedding": "onehot"})]
    moe = cfg.num_experts > 0
    out.append(Variant("capacity_1.0", {"capacity_factor": 1.0, "dropless": 0},
                       None if moe else "no MoE layer"))
    for gmm in ("ragged_dot", "mosaic", "pallas", "megablox"):
        skip = None if moe else "no MoE layer"
        if gmm in GPU_KERNELS and not on_gpu:
            skip = "a GPU kernel (compiled only on a GPU)"
        if gmm == "megablox" and not on_tpu:
            skip = "a TPU kernel (compiled only on a TPU)"
        if gmm not in GROUPED_MATMUL_NAMES:
            skip = f"grouped_matmul {gmm!r} is not in this jmoe"
        out.append(Variant(f"dropless_{gmm}", {"dropless": 1, "grouped_matmul": gmm}, skip))
    # with attention=auto: XLA's attention keeps a [B, N, S, S] float32 score tensor per layer for the backward
    # (3.2 GB per layer at small_gpu's batch: ~40 GB at 1x, ~80 GB at 2x, an estimate); auto is cuDNN on a GPU
    out.append(Variant("batch_2x", {"batch_size": 2 * cfg.batch_size, "attention": "auto"},
                       "smoke: the base step at twice the batch (a compile the smoke run saves)" if smoke else None))
    out.append(Variant("dense", {"num_experts": 0, "dropless": 0}, None if moe else "already dense"))
    # scan (a loop over experts; CPU's choice) last of the singles: the least likely to win on a GPU
    out.append(Variant("dropless_scan", {"dropless": 1, "grouped_matmul": "scan"}, None if moe else "no MoE layer"))
    out.append(Variant("combined", {}))  # overrides chosen after the single changes ran
    if only:
        unknown = set(only) - {v.name for v in out}
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(v.name for v in out)}")
        out = [v for v in out if v.name in only or v.name == "base"]  # base: the reference, always
    return out


def combined_overrides(rows: dict[str, dict]) -> dict:
    """Every single change that beat base: the faster attention / embedding, the fastest capacity or
    dropless choice (same tokens per step and model, so ms/step compares)."""
    def ms(name):
        r = rows.get(name)
        return r["ms_per_step"] if r and "ms_per_step" in r else float("inf")

    base, out = ms("base"), {}
    for name in ("cudnn", "onehot"):
        if ms(name) < base:
            out.update(rows[name]["overrides"])
    moe_choices = [n for n in rows if n == "capacity_1.0" or n.startswith("dropless_")]
    best = min(moe_choices, key=ms, default=None)
    if best is not None and ms(best) < base:
        out.update(rows[best]["overrides"])
    return out


# ----------------------------------------------------------------------------
# Compile and time
# ----------------------------------------------------------------------------


def make_config(name: str, base_set: dict, overrides: dict) -> config_lib.Config:
    return config_lib.load_config(name, {**BASE, **base_set, **overrides})


def _inputs(s: build.Setup, seed: int = 0):
    sharding = batch_sharding(s.mesh)
    shape = (s.cfg.batch_size, s.cfg.seq_len)
    tokens = jax.random.randint(jax.random.key(seed), (shape[0], shape[1] + 1), 0, 256, jnp.int32)
    return jax.device_put(tokens[:, :-1], sharding), jax.device_put(tokens[:, 1:], sharding)


def lower(cfg: config_lib.Config, mesh):
    """The train step's Setup and its lowered program (tracing runs here, in the caller's thread)."""
    s = build.cached_setup(cfg, mesh)
    params_abs = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                              s.abstract_params, s.param_shardings)
    opt_abs = jax.eval_shape(s.tx.init, params_abs)
    opt_abs = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), opt_abs,
                           s.opt_shardings)
    data = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32, sharding=batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    start = time.perf_counter()
    balance_abs = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                               s.abstract_balance, s.balance_shardings)
    lowered = s.train_step.lower(params_abs, opt_abs, balance_abs, scalar, data, data, scalar)
    return s, lowered, time.perf_counter() - start


def compile_timed(lowered):
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops")) if cost and cost.get("flops") is not None else None
    except Exception:  # noqa: BLE001  (not every backend / version reports it)
        return None


def _memory(compiled) -> dict:
    out = {}
    try:
        m = compiled.memory_analysis()
        if m is not None:
            args, outs = m.argument_size_in_bytes, m.output_size_in_bytes
            alias, temp = m.alias_size_in_bytes, m.temp_size_in_bytes
            out = {"program_bytes": int(args + outs - alias + temp), "temp_bytes": int(temp),
                   "argument_bytes": int(args)}
    except Exception:  # noqa: BLE001
        pass
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes_so_far"] = int(stats["peak_bytes_in_use"])
    return out


def run_steps(compiled, state, inputs, steps: int, start_step: int = 0):
    params, opt_state, balance = state
    metrics = None
    for i in range(steps):
        params, opt_state, balance, metrics = compiled(params, opt_state, balance, jnp.int32(start_step + i), *inputs,
                                                       jnp.int32(-1))
    jax.block_until_ready((params, opt_state, balance, metrics))
    return (params, opt_state, balance), metrics


def time_variant(s: build.Setup, compiled, steps: int, profile_steps: int, profile_dir: str | None):
    """Warm up 2 steps, time ``steps`` steps (dispatched back to back, one sync at the end: as train.py
    runs between its log lines), then optionally trace ``profile_steps`` more."""
    params = s.init_fn()[0]
    state = (params, build.init_opt_state(s, params), s.balance)
    inputs = _inputs(s)
    state, metrics = run_steps(compiled, state, inputs, 2)
    start = time.perf_counter()
    state, metrics = run_steps(compiled, state, inputs, steps, start_step=2)
    seconds = (time.perf_counter() - start) / steps
    loss = float(metrics["loss"])
    trace_dir = None
    if profile_steps and profile_dir:
        trace_dir = tempfile.mkdtemp(prefix="trace_", dir=profile_dir)
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            state, _ = run_steps(compiled, state, inputs, profile_steps, start_step=2 + steps)
    del state
    return seconds, loss, trace_dir


# ----------------------------------------------------------------------------
# Profile -> HLO instruction -> Python stack -> category
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Instr:
    name: str
    opcode: str
    computation: str
    op_name: str = ""
    stack: tuple = ()  # ((file, function, line), ...) innermost first
    calls: tuple = ()
    operands: tuple = ()


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
_OPCODE = re.compile(r"\s(?P<op>[a-z][a-z0-9\-]*)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*\{\s*$")


def parse_hlo(text: str) -> dict[str, Instr]:
    """Instructions of a compiled HLO module's text by name, with their op_name and call stack (from the
    module's FileNames / FunctionNames / FileLocations / StackFrames tables, or the older
    source_file / source_line metadata)."""
    tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    section, comp, instrs = None, "", {}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in tables:
            section = stripped
            continue
        if section:
            m = re.match(r"^(\d+)\s+(.*)$", stripped)
            if m:
                key, value = int(m.group(1)), m.group(2)
                if value.startswith('"'):
                    tables[section][key] = value.strip('"')
                else:
                    tables[section][key] = {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", value)}
                continue
            if stripped:
                section = None
            else:
                continue
        c = _COMP.match(line)
        if c and "=" not in line.split("(")[0]:
            comp = c.group("name")
            continue
        m = _INSTR.match(line)
        if not m or not comp:
            continue
        rest = m.group("rest")
        op = _OPCODE.search(" " + rest)
        ins = Instr(m.group("name").lstrip("%"), op.group("op") if op else "", comp)
        meta = re.search(r'op_name="([^"]*)"', rest)
        ins.op_name = meta.group(1) if meta else ""
        calls = re.search(r"calls=([^,\s]+(?:,\s*%[^,\s]+)*)", rest)
        if calls:
            ins.calls = tuple(x.strip().lstrip("%") for x in calls.group(1).split(","))
        args = (" " + rest)[op.end():] if op else ""
        ins.operands = tuple(re.findall(r"%([^\s,()]+)", args.split("), ")[0]))
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        if frame:
            ins.stack = _stack(tables, int(frame.group(1)))
        else:
            src = re.search(r'source_file="([^"]*)"\s+source_line=(\d+)', rest)
            if src:
                ins.stack = ((src.group(1), "", int(src.group(2))),)
        instrs[ins.name] = ins
    return instrs


def _stack(tables: dict, frame_id: int) -> tuple:
    frames, locs = tables["StackFrames"], tables["FileLocations"]
    # XLA prints parent_frame_id one above the frame it names (1 = no parent: a root frame shows as its own
    # parent). Where no frame is its own parent the ids are taken as printed (0 = none).
    shifted = any(f.get("parent_frame_id") == i for i, f in frames.items())
    out, seen = [], set()
    while frame_id in frames and frame_id not in seen:
        seen.add(frame_id)
        frame = frames[frame_id]
        loc = locs.get(frame.get("file_location_id"), {})
        out.append((tables["FileNames"].get(loc.get("file_name_id"), "?"),
                    tables["FunctionNames"].get(loc.get("function_name_id"), "?"), loc.get("line", 0)))
        parent = frame.get("parent_frame_id", 0)
        frame_id = parent - 1 if shifted else parent
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _qualnames(path: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function in a source file."""
    try:
        tree = ast.parse(open(path).read())
    except (OSError, SyntaxError, ValueError):
        return []
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((child.lineno, child.end_lineno, name))
                visit(child, name + ".")
    visit(tree, "")
    return out


def qualname(path: str, line: int, function: str) -> str:
    best = None
    for first, last, name in _qualnames(path):
        if first <= line <= last and (best is None or first >= best[0]):
            best = (first, name)
    return best[1] if best else function


@functools.lru_cache(maxsize=None)
def _line(path: str, line: int) -> str:
    try:
        return open(path).read().splitlines()[line - 1]
    except (OSError, IndexError):
        return ""


MODEL_FUNCTIONS = {
    "rms_norm": "norm_rope", "RMSNorm.__call__": "norm_rope", "rotary_angles": "norm_rope",
    "apply_rotary": "norm_rope", "Attention.__call__": "attention", "attention_impl": "attention",
    "onehot_embed": "embedding", "_onehot_embed_fwd": "embedding", "_onehot_embed_bwd": "embedding",
    "_onehot": "embedding", "lm_loss": "loss", "total_loss": "loss", "collect_aux": "routing",
    "DenseFFN.__call__": "dense_ffn", "Block.__call__": "other",
}
DROPLESS_FUNCTIONS = {"grouped_ffn": "experts", "dropless_experts": "experts"}  # else dispatch_combine
FORWARD_FUNCTIONS = {"LocalExchange.capacity_experts": "experts", "LocalExchange.dropless_experts": "experts",
                     "LocalExchange.reduce_aux": "routing"}
LAYER_FUNCTIONS = {"MoE.route": "routing", "MoE.draws": "routing", "router_stream": "routing"}


def classify(stack: tuple) -> tuple[str, str]:
    """(category, the deciding frame as 'file:line function') for a call stack, innermost first."""
    rel = lambda path: os.path.relpath(path, REPO) if path.startswith(REPO) else path  # noqa: E731
    if any(p.endswith("jmoe/training/model.py") and qualname(p, ln, fn) == "DenseFFN.__call__" for p, fn, ln in stack):
        p, fn, ln = next(f for f in stack if f[0].endswith("jmoe/training/model.py"))
        return "dense_ffn", f"{rel(p)}:{ln} {qualname(p, ln, fn)}"
    for path, function, line in stack:
        where = f"{rel(path)}:{line} {function}"
        p = path.replace(os.sep, "/")
        if "/optax/" in p:  # optax's cross-entropy is the loss; the rest of optax is the update
            in_loss = "/optax/losses/" in p or any(f[0].endswith("jmoe/training/model.py") for f in stack)
            return ("loss" if in_loss else "optimizer"), where
        if "/jmoe/" not in p:
            continue  # flax, numpy wrappers: the caller decides
        q = qualname(path, line, function)
        where = f"{rel(path)}:{line} {q}"
        if p.endswith("jmoe/training/model.py"):
            if q in MODEL_FUNCTIONS:
                return MODEL_FUNCTIONS[q], where
            if q == "LM.__call__":
                text = _line(path, line)
                return ("embedding" if "embed" in text else "loss" if "head" in text else "other"), where
            continue
        if "/jmoe/routing/" in p:
            return "routing", where
        if p.endswith("jmoe/dispatch.py") or p.endswith("jmoe/pallas/dispatch.py") or "/jmoe/parallel/" in p:
            return "dispatch_combine", where
        if p.endswith("jmoe/dropless.py"):
            return DROPLESS_FUNCTIONS.get(q, "dispatch_combine"), where
        if p.endswith("jmoe/experts.py") or "/jmoe/grouped_matmul/" in p or "grouped_matmul" in p:
            return "experts", where
        if p.endswith("jmoe/forward.py"):
            return FORWARD_FUNCTIONS.get(q, "moe_other"), where
        if p.endswith("jmoe/layer.py"):
            return LAYER_FUNCTIONS.get(q, "moe_other"), where
        if p.endswith("jmoe/training/build.py"):
            return ("loss" if q.endswith("loss_fn") else "optimizer"), where
    return "other", (f"{rel(stack[0][0])}:{stack[0][2]} {stack[0][1]}" if stack else "")


def instr_category(name: str, instrs: dict[str, Instr], _depth: int = 0) -> tuple[str, str]:
    """(category, deciding frame) of an HLO instruction: its own stack; else (a fusion) the most common
    category of the instructions it calls; else (no metadata: an instruction XLA rewrote, e.g. a
    weight-gradient dot) its operands' category, a matmul's (attention, experts, ...) before an
    elementwise one's (a norm feeding the matmul). Memoised per module."""
    memo = _memo(instrs)
    if (name, _depth) in memo["cat"]:
        return memo["cat"][(name, _depth)]
    ins, out = instrs.get(name), ("other", "")
    if ins is not None and ins.stack:
        out = classify(ins.stack)
    elif ins is not None:
        if ins.calls and _depth < 3:
            votes, where = collections.Counter(), {}
            for comp in ins.calls:
                for other in memo["by_comp"].get(comp, ()):
                    if other.opcode not in ("parameter", "constant"):
                        cat, w = instr_category(other.name, instrs, _depth + 1)
                        votes[cat] += 1
                        where.setdefault(cat, w)
            best = max(votes, key=lambda c: (votes[c], c != "other"), default="other")
            if best != "other":
                out = best, where[best]
        if out[0] == "other" and ins.operands and _depth < 3:
            found = [(operand, *instr_category(operand, instrs, _depth + 1)) for operand in ins.operands]
            found = sorted((f for f in found if f[1] != "other"), key=lambda f: f[1] == "norm_rope")
            if found:
                out = found[0][1], f"(operand {found[0][0]}) {found[0][2]}"
    memo["cat"][(name, _depth)] = out
    return out


_MEMOS: dict[int, dict] = {}


def _memo(instrs: dict[str, Instr]) -> dict:
    key = id(instrs)
    if key not in _MEMOS or _MEMOS[key]["instrs"] is not instrs:
        by_comp = collections.defaultdict(list)
        for ins in instrs.values():
            by_comp[ins.computation].append(ins)
        _MEMOS[key] = {"instrs": instrs, "by_comp": by_comp, "cat": {}}
    return _MEMOS[key]


CONTROL_FLOW = ("while", "conditional", "call")  # their events contain their bodies' events


def trace_events(trace_dir: str, module: str) -> tuple[list[dict], str]:
    """The perfetto trace's complete events of ``module``'s HLO ops: device events where the trace has
    any (a GPU), else host events (XLA:CPU's per-thunk events)."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        return [], "none"
    data = json.load(gzip.open(paths[0]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    pid_names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    ops = [e for e in events if e.get("ph") == "X" and (e.get("args") or {}).get("hlo_op")]
    mine = [e for e in ops if e["args"].get("hlo_module", module) == module]
    ops = mine or ops  # a trace naming the module otherwise: every op event (the step is all that ran)
    device = [e for e in ops if "/device:" in pid_names.get(e.get("pid"), "")]
    return (device, "device") if device else (ops, "host")


def profile_summary(trace_dir: str, compiled, steps: int, wall_ms: float, out_json: str | None) -> dict:
    text = compiled.as_text()
    module = re.match(r"HloModule\s+(\S+?),?\s", text).group(1)
    instrs = parse_hlo(text)
    events, events_from = trace_events(trace_dir, module)
    per_op = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        name = e["args"]["hlo_op"]
        if instrs.get(name) and instrs[name].opcode in CONTROL_FLOW:
            continue
        per_op[name][0] += float(e.get("dur", 0.0)) / 1e3 / steps  # us -> ms per step
        per_op[name][1] += 1
    table = []
    for name, (ms, count) in per_op.items():
        cat, where = instr_category(name, instrs)
        ins = instrs.get(name)
        table.append({"op": name, "category": cat, "ms": ms, "calls_per_step": count / steps,
                      "opcode": ins.opcode if ins else "", "source": where,
                      "op_name": (ins.op_name if ins else "")[:200], "in_hlo": ins is not None})
    table.sort(key=lambda r: -r["ms"])
    categories = {c: 0.0 for c in CATEGORIES}
    lines = collections.defaultdict(lambda: [0.0, ""])
    for r in table:
        categories[r["category"]] += r["ms"]
        lines[r["source"]][0] += r["ms"]
        lines[r["source"]][1] = r["category"]
    total = sum(r["ms"] for r in table)
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(table, fh, indent=1)
    return {
        "source": "jax.profiler trace (per-op events) + compiled HLO stack frames",
        "events": events_from,  # device: GPU kernels; host: XLA:CPU thunks (or a GPU trace without device op events)
        "steps": steps, "ops_traced": len(table), "op_ms_per_step": total, "wall_ms_per_step": wall_ms,
        "unmapped_ms": sum(r["ms"] for r in table if not r["in_hlo"]),
        "categories_ms": categories,
        "categories_share": {c: (v / total if total else 0.0) for c, v in categories.items()},
        "top_ops": table[:25],
        "top_source_lines": [{"source": k, "ms": v[0], "category": v[1]}
                             for k, v in sorted(lines.items(), key=lambda kv: -kv[1][0])[:25]],
        "ops_file": os.path.basename(out_json) if out_json else None,
    }


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def device_info() -> dict:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "")
    peak = peak_flops(dev)
    match = next((name for name, _ in PEAK_FLOPS if name in kind.lower()), None)
    return {"platform": jmoe_platform.current(), "device_kind": kind, "devices": jax.device_count(),
            "peak_flops": peak, "peak_matched": match, "jax": jax.__version__,
            "python": platform.python_version(), "host": platform.node()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="small_gpu")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the config")
    ap.add_argument("--variants", default="", help="comma-separated names (base always runs); default all")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for everything (later variants skip)")
    ap.add_argument("--compile-workers", type=int, default=4)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke: tiny shapes, 2 steps (not a measurement)")
    ap.add_argument("--out", default="results")
    ap.add_argument("--trace-dir", default="", help="keep the profiler traces here (default: a temporary "
                                                     "folder, removed; the op tables stay in --out)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    if args.smoke:
        args.config = "tiny" if args.config == "small_gpu" else args.config
        base_set = {**SMOKE_SET, **config_lib.parse_overrides(args.set)}
        args.steps, args.profile_steps, args.matmul_n = min(args.steps, 2), min(args.profile_steps, 2), 256
        args.compile_workers = min(args.compile_workers, 2)
    else:
        base_set = config_lib.parse_overrides(args.set)
    os.makedirs(args.out, exist_ok=True)
    trace_root = args.trace_dir or tempfile.mkdtemp(prefix="bench_train_traces_")
    os.makedirs(trace_root, exist_ok=True)
    out_path = os.path.join(args.out, "bench_train.json")
    info = device_info()
    on_gpu = info["platform"] == "gpu"
    matmul_dtype = jnp.bfloat16 if on_gpu or info["platform"] == "tpu" else jnp.float32
    matmul = matmul_tflops(args.matmul_n, matmul_dtype, iters=5 if args.smoke else 10)
    cfg0 = make_config(args.config, base_set, {})
    mesh = training_mesh(cfg0.expert_parallel, cfg0.num_devices)
    result = {
        "what": "bench_train: train.py's jitted train step per variant (issue 16)" +
                (" - CPU SMOKE, NOT A MEASUREMENT" if args.smoke else ""),
        "smoke": args.smoke, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "machine": info, "config": args.config, "set": base_set, "base_overrides": BASE,
        "steps": args.steps, "budget_s": args.budget,
        "matmul_tflops": {"n": args.matmul_n, "dtype": jnp.dtype(matmul_dtype).name, "tflops": matmul},
        "mfu_formula": "tokens/s * flops_per_token / peak_flops; flops_per_token = 6 * active params + "
                       "6 * layers * seq * d (attention: the causal half); of_matmul = achieved FLOP/s / "
                       "measured matmul FLOP/s",
        "variants": {}, "skipped": {}, "profiles": {},
    }

    def save():
        result["elapsed_s"] = time.perf_counter() - t0
        with open(out_path + ".part", "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(out_path + ".part", out_path)

    todo = variants(cfg0, on_gpu, [v for v in args.variants.split(",") if v] or None, smoke=args.smoke,
                    on_tpu=info["platform"] == "tpu")
    for v in todo:
        if v.skip:
            result["skipped"][v.name] = v.skip
    runnable = [v for v in todo if not v.skip and v.name != "combined"]
    pool = concurrent.futures.ThreadPoolExecutor(max(1, args.compile_workers))
    compiles = {}
    # Lower each variant here (tracing holds the GIL) and compile it in the pool (XLA releases it); no step
    # is timed until every started compile is done, so no compile runs during a timed step.
    for v in runnable:
        if time.perf_counter() > t0 + 0.5 * args.budget:
            result["skipped"][v.name] = "budget: not lowered within half the budget"
            continue
        try:
            cfg = make_config(args.config, base_set, v.overrides)
            s, lowered, lower_s = lower(cfg, mesh)
            compiles[v.name] = (cfg, s, lower_s, pool.submit(compile_timed, lowered))
        except Exception as e:  # noqa: BLE001
            result["variants"][v.name] = {"overrides": v.overrides, "error": _error(e)}
    compile_deadline = t0 + 0.6 * args.budget
    for name, (_, _, _, fut) in compiles.items():
        try:
            fut.result(timeout=max(1.0, compile_deadline - time.perf_counter()))
        except concurrent.futures.TimeoutError:
            if fut.cancel():
                result["skipped"][name] = "budget: not compiled within 60% of the budget"
        except Exception:  # noqa: BLE001  (reported below)
            pass
    concurrent.futures.wait([c[3] for n, c in compiles.items() if not c[3].cancelled()])
    save()

    def measure(name, overrides, cfg, s, lower_s, compiled, compile_s, profile: bool):
        tokens = cfg.batch_size * cfg.seq_len
        profile_dir = trace_root if profile else None
        seconds, loss, trace_dir = time_variant(s, compiled, args.steps, args.profile_steps if profile else 0,
                                                profile_dir)
        tflops = tokens * s.flops_per_token / seconds / 1e12
        row = {
            "overrides": overrides, "tokens_per_step": tokens, "lower_s": lower_s, "compile_s": compile_s,
            "ms_per_step": 1e3 * seconds, "tokens_per_s": tokens / seconds, "loss_after": loss,
            "params": s.num_params, "active_params": s.active_params, "flops_per_token": s.flops_per_token,
            "attention_flops_per_token": 6.0 * cfg.num_layers * cfg.seq_len * cfg.d_model,  # causal half, counted
            "achieved_tflops": tflops,
            "mfu": tflops * 1e12 / info["peak_flops"] if info["peak_flops"] else None,
            "of_matmul": tflops / matmul if matmul else None,
            "xla_flops_per_step": _cost_flops(compiled),
            "attention_impl": model_lib.attention_impl(cfg.attention, jnp.dtype(cfg.dtype),
                                                      cfg.d_model // cfg.num_heads),
            **_memory(compiled),
        }
        if trace_dir:
            try:
                ops_file = os.path.join(args.out, f"bench_train_ops_{name}.json")
                result["profiles"][name] = profile_summary(trace_dir, compiled, args.profile_steps,
                                                           1e3 * seconds, ops_file)
            except Exception as e:  # noqa: BLE001
                result["profiles"][name] = {"error": _error(e)}
        return row

    executables = {}  # name -> (Setup, compiled): the fastest is profiled without compiling it again
    # time kept for combined (a compile and a run) and the fastest variant's profile
    reserve = (0.2 if any(v.name == "combined" for v in todo) else 0.1) * args.budget
    for v in runnable:
        if v.name not in compiles or v.name in result["skipped"]:
            continue
        cfg, s, lower_s, fut = compiles[v.name]
        if time.perf_counter() > deadline - (5 if v.name == "base" else reserve):
            result["skipped"][v.name] = "budget: no time left to run"
            continue
        try:
            compiled, compile_s = fut.result()
            executables[v.name] = (s, compiled)
            result["variants"][v.name] = measure(v.name, v.overrides, cfg, s, lower_s, compiled, compile_s,
                                                 profile=v.name == "base")
        except Exception as e:  # noqa: BLE001
            result["variants"][v.name] = {"overrides": v.overrides, "error": _error(e)}
        _print_row(v.name, result["variants"][v.name])
        save()
    pool.shutdown(wait=False)

    # combined: every single change that beat base, compiled and timed together (then the fastest is profiled)
    rows = result["variants"]
    if any(v.name == "combined" for v in todo):
        over = combined_overrides(rows)
        same = next((n for n, r in rows.items() if r.get("overrides") == over and "ms_per_step" in r), None)
        if not over:
            result["skipped"]["combined"] = "no single change beat base"
        elif same:
            result["skipped"]["combined"] = f"only one change beat base: the same as {same}"
        elif time.perf_counter() > deadline - 10:
            result["skipped"]["combined"] = "budget: no time left"
        else:
            try:
                cfg = make_config(args.config, base_set, over)
                s, lowered, lower_s = lower(cfg, mesh)
                compiled, compile_s = compile_timed(lowered)
                executables["combined"] = (s, compiled)
                rows["combined"] = measure("combined", over, cfg, s, lower_s, compiled, compile_s, profile=False)
            except Exception as e:  # noqa: BLE001
                rows["combined"] = {"overrides": over, "error": _error(e)}
            _print_row("combined", rows["combined"])
            save()
    timed = {n: r for n, r in rows.items() if "tokens_per_s" in r and n != "dense"}  # the same model
    if timed:
        fastest = max(timed, key=lambda n: timed[n]["tokens_per_s"])
        result["fastest"] = fastest
        if fastest != "base" and time.perf_counter() < deadline - 5:
            try:
                s, compiled = executables[fastest]
                _, _, trace_dir = time_variant(s, compiled, 1, args.profile_steps, trace_root)
                result["profiles"][fastest] = profile_summary(
                    trace_dir, compiled, args.profile_steps, rows[fastest]["ms_per_step"],
                    os.path.join(args.out, f"bench_train_ops_{fastest}.json"))
            except Exception as e:  # noqa: BLE001
                result["profiles"][fastest] = {"error": _error(e)}
        elif fastest != "base":
            result["profiles"][fastest] = {"error": "budget: no time left to profile"}
    save()
    if not args.trace_dir:
        shutil.rmtree(trace_root, ignore_errors=True)
    _print_profiles(result)
    print(f"wrote {out_path} ({result['elapsed_s']:.0f} s)")
    return 0


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:600]}" + ("" if len(str(e)) < 600 else " ...") + \
        f" @ {traceback.extract_tb(e.__traceback__)[-1].filename.rsplit('/', 1)[-1] if e.__traceback__ else ''}"


def _print_row(name: str, r: dict) -> None:
    if "error" in r:
        print(f"{name:<18} error: {r['error'][:300]}", flush=True)
        return
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "    -"
    print(f"{name:<18} {r['ms_per_step']:9.2f} ms/step {r['tokens_per_s'] / 1e3:9.1f}k tok/s  MFU {mfu}  "
          f"of matmul {100 * r['of_matmul']:5.1f}%  compile {r['compile_s']:5.1f} s  "
          f"program {r.get('program_bytes', 0) / 2**30:6.2f} GiB", flush=True)


def _print_profiles(result: dict) -> None:
    for name, p in result["profiles"].items():
        if "error" in p:
            print(f"profile {name}: {p['error'][:300]}")
            continue
        cats = ", ".join(f"{c} {v:.2f}" for c, v in sorted(p["categories_ms"].items(), key=lambda kv: -kv[1]) if v)
        print(f"profile {name} (ms/step of op time {p['op_ms_per_step']:.2f}, wall {p['wall_ms_per_step']:.2f}): {cats}")
        for r in p["top_ops"][:8]:
            print(f"   {r['ms']:8.3f} ms  {r['category']:<16} {r['op'][:40]:<40} {r['source'][:70]}")


if __name__ == "__main__":
    sys.exit(main())
