"""Training: mesh, optimizer, the jit-compiled train / eval steps, checkpoints, logging, plots.

The train state is two plain pytrees of arrays: ``params`` (the model's
``nnx.Param`` values as a nested dict, ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``)
and the optax ``opt_state`` over them. The model is rebuilt inside each step
with ``nnx.merge(graphdef, params, rngs)``; the non-parameter state (the MoE
layers' router RNG streams) is not carried between steps: step ``i`` uses the
initial keys folded with ``i``, so a step's randomness depends only on
``(seed, i)`` and a resumed run repeats an uninterrupted one exactly.

Checkpoints (orbax, one directory per step under ``<out_dir>/checkpoints``)
hold three items: ``params`` and ``opt_state`` flattened to ``{"path": array}``
dicts, and the run's ``config`` as JSON. Orbax writes a step to a temporary
directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint loadable. They are restored with the target shardings of
the current mesh, so a checkpoint moves between meshes.

Loss: ``lm + lb_weight * sum_layers(load_balancing) + z_weight * sum_layers(z_loss)`` (plus the
noisy top-k router's own weighted losses, see :func:`jmoe.model.total_loss`); bits per byte
``= lm / ln 2`` (one token is one byte).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe import data as data_lib
from jmoe import model as model_lib
from jmoe import parallel
from jmoe import config as config_lib
from jmoe.config import Config

Array = jax.Array
LN2 = math.log(2.0)


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN / inf loss; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------
# Multi-host and mesh
# ----------------------------------------------------------------------------

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed(mode: str, coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> bool:
    """Call ``jax.distributed.initialize`` when asked to (before any other JAX use).

    ``mode="on"``, or ``"auto"`` with an explicit ``coordinator_address`` or one of
    the usual environment variables (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI,
    TPU pod), initializes; arguments left at 0 / -1 / "" come from the environment
    (JAX's cluster auto-detection). Returns whether it initialized.
    """
    if mode == "off":
        return False
    if mode == "auto" and not coordinator_address and not any(v in os.environ for v in _ENV_HINTS):
        return False
    try:  # CPU processes exchange collectives over gloo (GPU / TPU backends ignore this option)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # pragma: no cover - option renamed or removed
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator_address or None,
        num_processes=num_processes or None,
        process_id=None if process_id < 0 else process_id,
    )
    return True


def make_mesh(expert_parallel: int = 1, num_devices: int = 0) -> jax.sharding.Mesh:
    """The training mesh over the first ``num_devices`` devices (0 = all, every process):
    :func:`jmoe.parallel.make_mesh` with ``expert=expert_parallel`` and ``data`` the rest
    (``model`` 1). The batch is split over (data, expert); with ``expert > 1`` the MoE layers run
    expert-parallel (shard_map + all_to_all) and their expert weights are split over ``expert``.
    """
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"num_devices={n} but only {len(devices)} devices are available")
    if n % expert_parallel:
        raise ValueError(f"{n} devices cannot form an expert axis of size {expert_parallel}")
    return parallel.make_mesh(expert=expert_parallel, data=n // expert_parallel, devices=devices[:n])


def batch_sharding(mesh) -> NamedSharding:
    """Batch rows split over the token axes: ``P(("data", "expert"))``."""
    return NamedSharding(mesh, P(parallel.MeshAxes.of(mesh).token_axes))


def param_shardings(mesh, params: dict) -> dict:
    """Expert weights (paths through ``experts``) per :func:`jmoe.parallel.expert_param_specs`;
    everything else replicated."""
    def spec(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if "experts" in keys and keys[-1] in ("w_in", "w_gate", "w_out", "b_in", "b_out"):
            return NamedSharding(mesh, parallel.expert_param_specs({keys[-1]: x}, mesh)[keys[-1]])
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(spec, params)


# ----------------------------------------------------------------------------
# Model, optimizer
# ----------------------------------------------------------------------------


def build_model(cfg: Config, rngs: nnx.Rngs, mesh=None) -> model_lib.LM:
    """The LM described by ``cfg`` (vocabulary 256: bytes); MoE layers run expert-parallel on ``mesh``
    when its expert axis is > 1."""
    moe_kwargs = dict(
        k=cfg.k, capacity_factor=None if cfg.dropless else cfg.capacity_factor,
        eval_capacity_factor=cfg.eval_capacity_factor, priority=cfg.priority,
        second_expert_policy=cfg.second_expert_policy, router=cfg.router, dispatch=cfg.dispatch, jitter=cfg.jitter,
        group_size=cfg.group_size or None, grouped_matmul=cfg.grouped_matmul, dropless_exchange=cfg.dropless_exchange,
        dropless_buffer_factor=cfg.dropless_buffer_factor or None,
    )
    if mesh is not None and parallel.uses_mesh(mesh):
        moe_kwargs["mesh"] = mesh
    return model_lib.LM(
        vocab_size=data_lib.VOCAB_SIZE, d_model=cfg.d_model, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, d_ff=cfg.d_ff, num_experts=cfg.num_experts,
        expert_d_ff=cfg.expert_d_ff, moe_every=cfg.moe_every, activation=cfg.activation,
        rope_base=cfg.rope_base, dtype=jnp.dtype(cfg.dtype), moe_kwargs=moe_kwargs, rngs=rngs,
    )


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1) if cfg.steps > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio
    )


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (weight decay on matrices only, ndim >= 2)."""
    adamw = optax.adamw(
        make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
        mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw


@dataclasses.dataclass
class Setup:
    """What a run is built from: the model's graph (train / eval), shardings, optimizer."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: Any  # train mode
    eval_graphdef: Any  # eval mode (eval capacity factor, no jitter)
    rngs_state: Any  # the router RNG streams' initial state (replicated)
    abstract_params: dict
    param_shardings: dict
    opt_shardings: Any  # the optax state's shardings (moments follow their parameter)
    tx: optax.GradientTransformation
    num_params: int
    active_params: int
    flops_per_token: float
    init_fn: Callable = None  # jitted () -> (params, rngs_state), built with their shardings
    train_step: Callable = None  # see make_train_step
    eval_step: Callable = None  # see make_eval_step
    next_logits: Callable = None  # see sample


def setup(cfg: Config, mesh) -> tuple[Setup, dict]:
    """The :class:`Setup` of ``cfg`` on ``mesh`` (cached, with its jitted functions) and the
    initial params, initialised directly with their shardings."""
    s = dataclasses.replace(_cached_setup(_compile_key(cfg), mesh), cfg=cfg)
    return s, s.init_fn()[0]


# Keys that change nothing inside the compiled functions (data, logging, checkpointing, sampling, the
# debug NaN step, which is a runtime argument): normalised away in the setup cache's key.
RUN_ONLY_KEYS = ("data", "val_percent", "out_dir", "eval_every", "eval_batches", "log_every", "ckpt_every",
                 "keep_ckpts", "nan_at_step", "distributed", "coordinator_address", "num_processes",
                 "process_id", "prompt", "sample_len", "temperature", "top_k")


def _compile_key(cfg: Config) -> Config:
    defaults = Config()
    return dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in RUN_ONLY_KEYS})


@functools.lru_cache(maxsize=4)
def _cached_setup(cfg: Config, mesh) -> Setup:
    """Build the model abstractly; the jitted functions are made once per (config, mesh), so a
    second run of the same config in one process (a resumed run, an evaluation) compiles nothing."""
    def init():
        model = build_model(cfg, nnx.Rngs(params=cfg.seed, router=cfg.seed + 1), mesh)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return nnx.to_pure_dict(params), rest

    abstract_model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(params=cfg.seed, router=cfg.seed + 1), mesh))
    graphdef, abstract_state, _ = nnx.split(abstract_model, nnx.Param, ...)
    abstract_model.eval()
    eval_graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
    abstract_model.train()
    abstract_params = nnx.to_pure_dict(abstract_state)
    shardings = param_shardings(mesh, abstract_params)
    init_fn = jax.jit(init, out_shardings=(shardings, NamedSharding(mesh, P())))
    tx = make_optimizer(cfg)
    s = Setup(
        cfg=cfg, mesh=mesh, graphdef=graphdef, eval_graphdef=eval_graphdef, rngs_state=init_fn()[1],
        abstract_params=abstract_params, param_shardings=shardings,
        opt_shardings=opt_state_shardings(mesh, tx, abstract_params, shardings), tx=tx,
        num_params=model_lib.count_params(abstract_model),
        active_params=model_lib.active_params_per_token(abstract_model),
        flops_per_token=model_lib.flops_per_token(abstract_model, cfg.seq_len),
        init_fn=init_fn,
    )
    s.train_step, s.eval_step, s.next_logits = make_train_step(s), make_eval_step(s), make_next_logits(s)
    return s


def opt_state_shardings(mesh, tx, abstract_params: dict, shardings: dict):
    """Shardings of ``tx.init(params)``: a leaf whose path ends with a parameter's path (Adam's
    moments) gets that parameter's sharding; the rest (counts, ...) are replicated."""
    by_path = flatten(shardings)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)

    def pick(path, _):
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        for p, sh in by_path.items():
            if key == p or key.endswith("/" + p):
                return sh
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def init_opt_state(s: Setup, params: dict):
    return jax.jit(s.tx.init, out_shardings=s.opt_shardings)(params)


def global_norm(tree) -> Array:
    """``sqrt(sum of squares of every leaf)`` in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def fold_rngs(rngs_state, step: Array):
    """Every PRNG key in the state folded with ``step`` (counts left at their initial values)."""
    def fold(x):
        return jax.random.fold_in(x, step) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    return jax.tree.map(fold, rngs_state)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


def make_train_step(s: Setup) -> Callable:
    """``step_fn(params, opt_state, step, inputs, targets, nan_at_step) -> (params, opt_state, metrics)``,
    jitted. ``nan_at_step`` (a debug hook for the non-finite-loss path) makes step ``step == nan_at_step``'s
    loss NaN; -1 never does.

    Metrics (device arrays): ``loss`` (total), ``lm_loss``, ``bits_per_byte``,
    ``load_balancing_loss`` and ``z_loss`` (summed over layers), ``grad_norm``,
    ``lr``, and per MoE layer ``dropped_fraction`` [L], ``padding_fraction`` [L],
    ``router_entropy`` [L], ``tokens_per_expert`` [L, E].
    """
    cfg, schedule = s.cfg, make_schedule(s.cfg)

    def loss_fn(params, rngs_state, step, inputs, targets, nan_at_step):
        model = nnx.merge(s.graphdef, params, fold_rngs(rngs_state, step))
        logits, aux = model(inputs)  # [B, S, V]
        lm = model_lib.lm_loss(logits, targets)
        loss = model_lib.total_loss(lm, aux, cfg.lb_weight, cfg.z_weight)
        loss = loss * jnp.where(step == nan_at_step, jnp.nan, 1.0)
        return loss, (lm, aux)

    def step_fn(params, opt_state, step, inputs, targets, nan_at_step):
        (loss, (lm, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, s.rngs_state, step, inputs, targets, nan_at_step
        )
        updates, opt_state = s.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss, "lm_loss": lm, "bits_per_byte": lm / LN2,
            "grad_norm": global_norm(grads), "lr": schedule(step),
            **{name: aux[name] for name in model_lib.AUX_LOSSES + model_lib.LAYER_METRICS},
        }
        return params, opt_state, metrics

    repl = NamedSharding(s.mesh, P())
    data = batch_sharding(s.mesh)
    return jax.jit(
        step_fn,
        in_shardings=(s.param_shardings, s.opt_shardings, repl, data, data, repl),
        out_shardings=(s.param_shardings, s.opt_shardings, repl),
        donate_argnums=(0, 1),
    )


def make_eval_step(s: Setup) -> Callable:
    """``eval_fn(params, inputs, targets) -> {lm_loss, dropped_fraction [L]}`` in eval mode, jitted."""
    def eval_fn(params, inputs, targets):
        model = nnx.merge(s.eval_graphdef, params, s.rngs_state)
        logits, aux = model(inputs)
        return {"lm_loss": model_lib.lm_loss(logits, targets), "dropped_fraction": aux["dropped_fraction"]}

    data = batch_sharding(s.mesh)
    return jax.jit(eval_fn, in_shardings=(s.param_shardings, data, data), out_shardings=NamedSharding(s.mesh, P()))


def make_next_logits(s: Setup) -> Callable:
    """``next_logits(params, window [1, S] int32, last) -> [V]``: eval-mode logits at position
    ``last``; positions after ``last`` are padding (masked out of the MoE routing)."""
    def next_logits(params, window, last):
        model = nnx.merge(s.eval_graphdef, params, s.rngs_state)
        mask = jnp.arange(window.shape[1])[None, :] <= last  # [1, S]
        logits, _ = model(window, mask)  # [1, S, V]
        return logits[0, last]  # [V]

    return jax.jit(next_logits)


def global_batch(s: Setup, local: tuple[np.ndarray, np.ndarray]) -> tuple[Array, Array]:
    """This process's rows -> global [B, S] arrays sharded over the mesh."""
    sharding = batch_sharding(s.mesh)
    shape = (s.cfg.batch_size, s.cfg.seq_len)
    return tuple(jax.make_array_from_process_local_data(sharding, x, shape) for x in local)


def evaluate(s: Setup, params, val: np.ndarray) -> dict[str, Any]:
    """Mean validation loss over ``eval_batches`` fixed batches; ``val_bpb = val_loss / ln 2``."""
    cfg = s.cfg
    losses, drops = [], []
    for i in range(cfg.eval_batches):
        local = data_lib.val_batch(val, i, cfg.eval_batches, cfg.batch_size, cfg.seq_len,
                                   jax.process_index(), jax.process_count())
        out = s.eval_step(params, *global_batch(s, local))
        losses.append(out["lm_loss"])
        drops.append(out["dropped_fraction"])
    losses, drops = jax.device_get((losses, drops))
    val_loss = float(np.mean(losses))
    return {"val_loss": val_loss, "val_bpb": val_loss / LN2,
            "val_dropped_fraction": np.mean(np.stack(drops), axis=0).tolist()}


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def flatten(tree) -> dict[str, Any]:
    """A pytree -> ``{"key/path": leaf}`` (the form checkpoints hold)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): x for path, x in flat}


def unflatten_like(tree, flat: dict[str, Any]):
    """Inverse of :func:`flatten` given a tree of the same structure."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [flat[jax.tree_util.keystr(p, simple=True, separator="/")] for p, _ in paths]
    )


def checkpoint_manager(out_dir: str, keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(out_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
        item_names=("params", "opt_state", "config"),
    )


def save_checkpoint(mgr: ocp.CheckpointManager, step: int, params, opt_state, cfg: Config) -> None:
    """Save (asynchronously) ``step``; every process calls this, orbax coordinates the writes."""
    mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(flatten(params)),
        opt_state=ocp.args.StandardSave(flatten(opt_state)),
        config=ocp.args.JsonSave(cfg.to_dict()),
    ))


def _abstract(tree, shardings=None):
    """ShapeDtypeStructs carrying the target shardings (from ``shardings`` or the arrays' own)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def read_checkpoint_config(mgr: ocp.CheckpointManager, step: int) -> dict:
    return mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def restore_checkpoint(mgr: ocp.CheckpointManager, step: int, params_target, opt_state_target=None):
    """Restore ``step`` onto the shardings of the targets (arrays or ShapeDtypeStructs with shardings).

    ``opt_state_target=None`` restores the params only (for sampling / evaluation).
    """
    items = {"params": ocp.args.StandardRestore(flatten(params_target))}
    if opt_state_target is not None:
        items["opt_state"] = ocp.args.StandardRestore(flatten(opt_state_target))
    out = mgr.restore(step, args=ocp.args.Composite(**items))
    params = unflatten_like(params_target, out["params"])
    if opt_state_target is None:
        return params, None
    return params, unflatten_like(opt_state_target, out["opt_state"])


def check_compatible(saved: dict, cfg: Config) -> None:
    """A checkpoint restores only into a model with the same parameter-defining keys."""
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in Config.MODEL_KEYS if saved.get(k) != getattr(cfg, k)}
    if diff:
        raise ValueError(
            "the checkpoint's model differs from this config (saved, requested): "
            + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
            + "; use another out_dir or the saved values"
        )


# ----------------------------------------------------------------------------
# Logging, progress, plots
# ----------------------------------------------------------------------------

# bf16 dense peak FLOP/s per device, matched against jax's device_kind (lower case).
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12), ("a10g", 125e12),
    ("l4", 121e12), ("v100", 125e12), ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12), ("tpu v5", 459e12), ("tpu v4", 275e12),
)


def peak_flops(device) -> float | None:
    """The device's bf16 dense peak FLOP/s if known (MFU is reported against it), else None."""
    kind = getattr(device, "device_kind", "").lower()
    for name, peak in PEAK_FLOPS:
        if name in kind:
            return peak
    return None


class MetricsLog:
    """JSON lines at ``path`` (process 0 only). On resume from step N, lines after N are dropped."""

    def __init__(self, path: str, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        kept = []
        if resume_step > 0 and os.path.exists(path):
            with open(path) as fh:
                kept = [line for line in fh if json.loads(line).get("step", 0) <= resume_step]
        with open(path, "w") as fh:
            fh.writelines(kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


def read_log(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def progress_line(step: int, total: int, rec: dict, width: int = 20) -> str:
    done = int(width * step / total)
    tps = rec.get("tokens_per_s")
    drop = rec.get("dropped_fraction") or []
    parts = [f"step {step:>6}/{total} [{'#' * done}{'.' * (width - done)}]", f"loss {rec['loss']:.4f}",
             f"lm {rec['lm_loss']:.4f}"]
    if drop:
        parts.append(f"drop {np.mean(drop):.3f}")
    parts.append(f"{tps / 1e3:.1f}k tok/s" if tps else "- tok/s")
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)


def write_plots(log_path: str) -> list[str]:
    """``loss.png`` (train / validation loss) and, for MoE runs, ``expert_load.png`` (per MoE layer,
    the fraction of kept assignments per expert over steps) next to the log. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out_dir, paths = os.path.dirname(log_path), []

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="train LM loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "loss.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    loads = [r for r in train if r.get("tokens_per_expert")]
    if loads:
        tpe = np.asarray([r["tokens_per_expert"] for r in loads], np.float64)  # [T, L, E]
        frac = tpe / np.maximum(tpe.sum(-1, keepdims=True), 1e-9)  # [T, L, E]
        steps = [r["step"] for r in loads]
        num_layers = frac.shape[1]
        fig, axes = plt.subplots(num_layers, 1, figsize=(8, 2.2 * num_layers), squeeze=False)
        for layer in range(num_layers):
            ax = axes[layer, 0]
            im = ax.imshow(frac[:, layer].T, aspect="auto", origin="lower", cmap="viridis",
                           extent=(steps[0], steps[-1], -0.5, frac.shape[2] - 0.5), vmin=0)
            ax.set_ylabel(f"MoE layer {layer}\nexpert")
            fig.colorbar(im, ax=ax, label="share of tokens")
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "expert_load.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def _to_python(x):
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x.tolist()


def train(cfg: Config, out_dir: str, *, print_fn=print, plots: bool = True, stop_after: int | None = None) -> dict:
    """Train (resuming from the latest checkpoint in ``out_dir``); returns a summary dict.

    ``stop_after`` ends the run after that step without a final checkpoint (as if it
    were killed; for tests of resumption).

    Raises :class:`NonFiniteLossError` on a NaN / inf loss (no checkpoint is written
    after it; the last good one is kept).
    """
    is_main = jax.process_index() == 0
    say = print_fn if is_main else (lambda *a, **k: None)
    mesh = make_mesh(cfg.expert_parallel, cfg.num_devices)
    corpus = data_lib.load_corpus(cfg.data, cfg.val_percent, min_bytes=cfg.seq_len + 2)
    s, params = setup(cfg, mesh)
    opt_state = init_opt_state(s, params)
    mgr = checkpoint_manager(out_dir, cfg.keep_ckpts)
    start = mgr.latest_step() or 0
    if start:
        check_compatible(read_checkpoint_config(mgr, start), cfg)
        params, opt_state = restore_checkpoint(mgr, start, params, opt_state)
        say(f"resumed from {mgr.directory} step {start}")
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=1)
    log_path = os.path.join(out_dir, "metrics.jsonl")
    log = MetricsLog(log_path, start, is_main)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    peak = peak_flops(jax.devices()[0])
    log.write({"kind": "start", "step": start, "num_params": s.num_params, "active_params": s.active_params,
               "flops_per_token": s.flops_per_token, "devices": len(mesh.devices.flat),
               "device_kind": jax.devices()[0].device_kind, "processes": jax.process_count(),
               "mesh": dict(mesh.shape), "train_bytes": len(corpus.train), "val_bytes": len(corpus.val),
               "data": corpus.source})
    say(f"{s.num_params / 1e6:.2f}M parameters ({s.active_params / 1e6:.2f}M active/token), "
        f"mesh {dict(mesh.shape)}, data {corpus.source} ({len(corpus.train) / 1e6:.1f}M train bytes)")

    if start == 0:
        ev = evaluate(s, params, corpus.val)
        log.write({"kind": "eval", "step": 0, **ev})
        say(f"step {0:>6} | val loss {ev['val_loss']:.4f} | val bpb {ev['val_bpb']:.3f}")
    pending: list[tuple[int, dict]] = []
    last_good = start
    clock: float | None = None  # tokens/s clock, started after the first (compiling) step
    clock_steps = 0
    history = {"train": [], "eval": []}

    def flush():
        nonlocal clock, clock_steps
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        tps = clock_steps * tokens_per_step / (now - clock) if clock is not None and clock_steps else None
        for (step, _), m in zip(pending, fetched):
            rec = {"kind": "train", "step": step, **{k: _to_python(v) for k, v in m.items()}}
            rec["tokens_per_s"] = tps
            rec["mfu"] = tps * s.flops_per_token / (peak * mesh.size) if tps and peak else None
            if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])):
                log.write(rec)
                mgr.wait_until_finished()
                msg = (f"non-finite loss ({rec['loss']}) or gradient norm ({rec['grad_norm']}) at step "
                       f"{step}: stopping. The last good checkpoint is step {mgr.latest_step()} in "
                       f"{mgr.directory}; rerun to resume from it (lower lr or raise grad_clip).")
                raise NonFiniteLossError(msg)
            log.write(rec)
            history["train"].append(rec)
        pending.clear()
        clock, clock_steps = now, 0
        return history["train"][-1]

    for i in range(start, cfg.steps):
        local = data_lib.train_batch(corpus.train, cfg.seed, i, cfg.batch_size, cfg.seq_len,
                                     jax.process_index(), jax.process_count())
        params, opt_state, metrics = s.train_step(params, opt_state, jnp.int32(i), *global_batch(s, local),
                                                  jnp.int32(cfg.nan_at_step))
        done = i + 1
        pending.append((done, metrics))
        first = clock is None
        if not first:
            clock_steps += 1
        at_eval = done % cfg.eval_every == 0 or done == cfg.steps
        at_ckpt = done % cfg.ckpt_every == 0 or done == cfg.steps
        if first or done % cfg.log_every == 0 or at_eval or at_ckpt:
            rec = flush()  # the first flush (after compilation) starts the tokens/s clock
            say(progress_line(done, cfg.steps, rec))
        if at_eval:
            ev = evaluate(s, params, corpus.val)
            log.write({"kind": "eval", "step": done, **ev})
            history["eval"].append({"step": done, **ev})
            say(f"step {done:>6} | val loss {ev['val_loss']:.4f} | val bpb {ev['val_bpb']:.3f}")
        if at_ckpt:
            save_checkpoint(mgr, done, params, opt_state, cfg)
            last_good = done
        if at_eval or at_ckpt:
            clock = time.perf_counter()  # leave evaluation and saving out of tokens/s
        if stop_after is not None and done >= stop_after:
            break
    if pending:
        flush()
    mgr.wait_until_finished()
    mgr.close()
    paths = write_plots(log_path) if plots and is_main else []
    if paths:
        say("plots: " + ", ".join(paths))
    return {"history": history, "last_checkpoint": last_good, "params": params, "setup": s}


# ----------------------------------------------------------------------------
# Evaluation of a checkpoint, sampling
# ----------------------------------------------------------------------------


def load_for_inference(out_dir: str, *, expert_parallel: int = 1, num_devices: int = 0,
                       step: int | None = None) -> tuple[Setup, dict, int]:
    """The latest (or ``step``) checkpoint of ``out_dir``, with its saved config, on a fresh mesh."""
    mgr = checkpoint_manager(out_dir)
    step = step if step is not None else mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(out_dir, 'checkpoints')}")
    saved = read_checkpoint_config(mgr, step)
    known = set(config_lib.keys())  # a checkpoint from an older version may hold retired keys
    cfg = config_lib.from_dict({**{k: v for k, v in saved.items() if k in known},
                                "expert_parallel": expert_parallel, "num_devices": num_devices})
    mesh = make_mesh(expert_parallel, num_devices)
    s = dataclasses.replace(_cached_setup(_compile_key(cfg), mesh), cfg=cfg)
    params, _ = restore_checkpoint(mgr, step, _abstract(s.abstract_params, s.param_shardings))
    mgr.close()
    return s, params, step


def sample(s: Setup, params, prompt: str, length: int, temperature: float = 0.8, top_k: int = 0,
           seed: int = 0) -> str:
    """Generate ``length`` bytes after ``prompt`` (eval mode, no KV cache: each new byte re-reads the
    last ``seq_len`` bytes, a static-shape window, so one compiled function serves every position)."""
    seq_len = s.cfg.seq_len
    repl = NamedSharding(s.mesh, P())
    tokens = list(data_lib.encode(prompt)) or [ord("\n")]
    rng = np.random.default_rng(seed)
    for _ in range(length):
        ctx = tokens[-seq_len:]
        window = np.zeros((1, seq_len), np.int32)
        window[0, :len(ctx)] = ctx  # right padding is invisible to the causal model
        logits = np.asarray(s.next_logits(params, jax.device_put(window, repl), len(ctx) - 1), np.float64)
        if temperature <= 0:
            tokens.append(int(np.argmax(logits)))
            continue
        logits = logits / temperature
        if top_k:
            logits[logits < np.sort(logits)[-top_k]] = -np.inf
        p = np.exp(logits - logits.max())
        tokens.append(int(rng.choice(len(p), p=p / p.sum())))
    return data_lib.decode(tokens)


def main_print(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True, file=sys.stdout)
