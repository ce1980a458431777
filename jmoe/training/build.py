"""What a run is built from: the model, the optimizer and its schedule, and the :class:`Setup` holding the
model's graph, the shardings and the jit-compiled train / eval / next-logits steps (cached per config and mesh).

The model is rebuilt inside each step with ``nnx.merge(graphdef, params, rngs)``; the non-parameter
state (the MoE layers' router RNG streams) is not carried between steps: step ``i`` uses the initial keys
folded with ``i`` (:func:`fold_rngs`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe.training import data as data_lib
from jmoe.training import model as model_lib
from jmoe.training.config import RUN_ONLY_KEYS, Config
from jmoe.training.mesh import batch_sharding, opt_state_shardings, param_shardings, runs_expert_parallel

Array = jax.Array
LN2 = math.log(2.0)


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
    if mesh is not None and runs_expert_parallel(mesh):
        moe_kwargs["mesh"] = mesh
    return model_lib.LM(
        vocab_size=data_lib.VOCAB_SIZE, d_model=cfg.d_model, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, d_ff=cfg.d_ff, num_experts=cfg.num_experts,
        expert_d_ff=cfg.expert_d_ff, moe_every=cfg.moe_every, activation=cfg.activation,
        rope_base=cfg.rope_base, dtype=jnp.dtype(cfg.dtype), moe_kwargs=moe_kwargs, attention=cfg.attention,
        embedding=cfg.embedding, rngs=rngs,
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
    s = cached_setup(cfg, mesh)
    return s, s.init_fn()[0]


def cached_setup(cfg: Config, mesh) -> Setup:
    """The :class:`Setup` of ``cfg`` on ``mesh`` without initial params: built once per config (up to
    its :data:`~jmoe.training.config.RUN_ONLY_KEYS`) and mesh, then given ``cfg`` itself."""
    return dataclasses.replace(_cached_setup(_compile_key(cfg), mesh), cfg=cfg)


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
    jitted. ``step`` is the 0-based step index (it folds the RNGs and sets the lr); the log numbers that step
    ``step + 1`` (the steps done). ``nan_at_step`` (a debug hook for the non-finite-loss path) is a step number
    as logged: the loss of the step logged as ``nan_at_step`` is NaN; -1 never.

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
        loss = loss * jnp.where(step + 1 == nan_at_step, jnp.nan, 1.0)  # step + 1: the logged number
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
