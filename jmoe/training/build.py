"""What a run is built from: the model, the optimizer and its schedule, and the :class:`Setup` holding the
model's graph, the shardings and the jit-compiled train / eval / next-logits steps (cached per config and mesh).

The model is rebuilt inside each step with ``nnx.merge(graphdef, params, balance, rngs)``. ``balance`` is
the MoE layers' selection biases (:class:`jmoe.SelectionBias`, ``selection_bias=1``): state, not
parameters, carried from step to step beside ``params`` and never seen by the optimizer; the train step
returns them updated by aux-loss-free balancing (:func:`jmoe.update_selection_biases` with
``bias_update_rate``, from the load that step's forward counted over its global batch). ``{}`` when the
model has none. The rest of the non-parameter state (the router RNG streams, the layers' load counters,
zero at the start of every step) is not carried between steps: step ``i`` uses the initial keys folded
with ``i`` (:func:`fold_rngs`).
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

import jmoe
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe.options import layer_arguments
from jmoe.training import data as data_lib
from jmoe.training import model as model_lib
from jmoe.training.config import RUN_ONLY_KEYS, Config
from jmoe.training.mesh import batch_sharding, opt_state_shardings, param_shardings, runs_expert_parallel

Array = jax.Array
LN2 = math.log(2.0)


def build_model(cfg: Config, rngs: nnx.Rngs, mesh=None) -> model_lib.LM:
    """The LM described by ``cfg`` (vocabulary 256: bytes); MoE layers run expert-parallel on ``mesh``
    when its expert axis is > 1."""
    moe_kwargs = layer_arguments(dict(  # the config's flat keys -> the layer's router and shared-expert objects
        k=cfg.k, capacity_factor=None if cfg.dropless else cfg.capacity_factor,
        eval_capacity_factor=cfg.eval_capacity_factor, priority=cfg.priority,
        second_expert_policy=cfg.second_expert_policy, router=cfg.router, dispatch=cfg.dispatch, jitter=cfg.jitter,
        group_size=cfg.group_size or None, grouped_matmul=cfg.grouped_matmul, dropless_exchange=cfg.dropless_exchange,
        dropless_buffer_factor=cfg.dropless_buffer_factor or None,
        dropless_overflow=cfg.dropless_overflow if cfg.dropless else "rounds",  # unused without dropless=1
        shared_d_ff=cfg.shared_d_ff or None, shared_gate=bool(cfg.shared_gate), **cfg.moe_router_kwargs(),
    ))
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
    rngs_state: Any  # the rest of the non-parameter state, initial values (router RNG streams, load counters)
    abstract_params: dict
    param_shardings: dict
    abstract_balance: dict  # the selection biases' shapes ({} when the model has none)
    balance_shardings: dict  # replicated
    balance: dict  # selection biases evaluate / sample use when given none: the initial ones (or a restored run's)
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
    initial params, initialised directly with their shardings (the initial selection biases are
    ``s.balance``)."""
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
        _, params, balance, rest = nnx.split(model, nnx.Param, jmoe.SelectionBias, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(balance), rest

    abstract_model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(params=cfg.seed, router=cfg.seed + 1), mesh))
    graphdef, abstract_state, abstract_balance, _ = nnx.split(abstract_model, nnx.Param, jmoe.SelectionBias, ...)
    abstract_model.eval()
    eval_graphdef = nnx.split(abstract_model, nnx.Param, jmoe.SelectionBias, ...)[0]
    abstract_model.train()
    abstract_params = nnx.to_pure_dict(abstract_state)
    abstract_balance = nnx.to_pure_dict(abstract_balance)
    shardings = param_shardings(mesh, abstract_params)
    repl = NamedSharding(mesh, P())
    balance_shardings = jax.tree.map(lambda _: repl, abstract_balance)
    init_fn = jax.jit(init, out_shardings=(shardings, balance_shardings, repl))
    _, balance, rngs_state = init_fn()
    tx = make_optimizer(cfg)
    s = Setup(
        cfg=cfg, mesh=mesh, graphdef=graphdef, eval_graphdef=eval_graphdef, rngs_state=rngs_state,
        abstract_params=abstract_params, param_shardings=shardings, abstract_balance=abstract_balance,
        balance_shardings=balance_shardings, balance=balance,
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
    """``step_fn(params, opt_state, balance, step, inputs, targets, nan_at_step) -> (params, opt_state, balance,
    metrics)``, jitted. ``balance`` is the selection biases (``{}`` when the model has none): the returned ones
    are ``b + bias_update_rate * sign(mean(load) - load)`` per MoE layer (:func:`jmoe.update_selection_biases`),
    ``load`` what that layer kept over this step's global batch; they never reach the optimizer and no gradient
    reaches them. ``step`` is the 0-based step index (it folds the RNGs and sets the lr); the log numbers that
    step ``step + 1`` (the steps done). ``nan_at_step`` (a debug hook for the non-finite-loss path) is a step
    number as logged: the loss of the step logged as ``nan_at_step`` is NaN; -1 never.

    Metrics (device arrays): ``loss`` (total), ``lm_loss``, ``bits_per_byte``, the aux losses summed over
    layers (``load_balancing_loss``, ``z_loss``, ``sequence_balance_loss``, ``global_load_balancing_loss``,
    the routers' own), ``grad_norm``, ``lr``, and per MoE layer ``dropped_fraction`` [L], ``exchange_rounds`` [L]
    (the dropless exchange's rounds on an expert mesh; 1 otherwise),
    ``padding_fraction`` [L], ``router_entropy`` [L], ``tokens_per_expert`` [L, E], ``load_max_over_mean``
    [L] (max_e / mean_e of tokens_per_expert); with selection biases also ``selection_bias`` [L, E] (the
    biases this step chose with, before its update).
    """
    cfg, schedule = s.cfg, make_schedule(s.cfg)

    def loss_fn(params, balance, rngs_state, step, inputs, targets, nan_at_step):
        model = nnx.merge(s.graphdef, params, balance, fold_rngs(rngs_state, step))
        logits, aux = model(inputs)  # [B, S, V]; train mode: each MoE layer counts its load (expert_load)
        lm = model_lib.lm_loss(logits, targets)
        loss = model_lib.total_loss(lm, aux, cfg.lb_weight, cfg.z_weight, cfg.lb_loss)
        loss = loss * jnp.where(step + 1 == nan_at_step, jnp.nan, 1.0)  # step + 1: the logged number
        # The bias update depends only on the biases and this step's load (integer counts: no gradient), so it
        # is the same here as after the optimizer step; as aux it is outside the differentiated output.
        jmoe.update_selection_biases(model, cfg.bias_update_rate)
        return loss, (lm, aux, nnx.to_pure_dict(nnx.state(model, jmoe.SelectionBias)))

    def step_fn(params, opt_state, balance, step, inputs, targets, nan_at_step):
        (loss, (lm, aux, new_balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, balance, s.rngs_state, step, inputs, targets, nan_at_step
        )
        updates, opt_state = s.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        tpe = aux["tokens_per_expert"]  # [L, E]; [0, 0] for the dense baseline
        load_ratio = (jnp.max(tpe, axis=-1) / jnp.maximum(jnp.mean(tpe, axis=-1), 1e-9) if tpe.size
                      else jnp.zeros((tpe.shape[0],), jnp.float32))
        metrics = {
            "loss": loss, "lm_loss": lm, "bits_per_byte": lm / LN2,
            "grad_norm": global_norm(grads), "lr": schedule(step),
            **{name: aux[name] for name in model_lib.AUX_LOSSES + model_lib.LAYER_METRICS},
            "load_max_over_mean": load_ratio,
        }
        if balance:
            metrics["selection_bias"] = jnp.stack(jax.tree.leaves(balance))  # [L, E], in layer order
        return params, opt_state, new_balance, metrics

    repl = NamedSharding(s.mesh, P())
    data = batch_sharding(s.mesh)
    return jax.jit(
        step_fn,
        in_shardings=(s.param_shardings, s.opt_shardings, s.balance_shardings, repl, data, data, repl),
        out_shardings=(s.param_shardings, s.opt_shardings, s.balance_shardings, repl),
        donate_argnums=(0, 1),  # not the biases: the Setup keeps the initial ones (tiny anyway)
    )


def make_eval_step(s: Setup) -> Callable:
    """``eval_fn(params, balance, inputs, targets) -> {lm_loss, dropped_fraction [L]}`` in eval mode, jitted."""
    def eval_fn(params, balance, inputs, targets):
        model = nnx.merge(s.eval_graphdef, params, balance, s.rngs_state)
        logits, aux = model(inputs)
        return {"lm_loss": model_lib.lm_loss(logits, targets), "dropped_fraction": aux["dropped_fraction"]}

    data = batch_sharding(s.mesh)
    return jax.jit(eval_fn, in_shardings=(s.param_shardings, s.balance_shardings, data, data),
                   out_shardings=NamedSharding(s.mesh, P()))


def make_next_logits(s: Setup) -> Callable:
    """``next_logits(params, balance, window [1, S] int32, last) -> [V]``: eval-mode logits at position
    ``last``; positions after ``last`` are padding (masked out of the MoE routing)."""
    def next_logits(params, balance, window, last):
        model = nnx.merge(s.eval_graphdef, params, balance, s.rngs_state)
        mask = jnp.arange(window.shape[1])[None, :] <= last  # [1, S]
        logits, _ = model(window, mask)  # [1, S, V]
        return logits[0, last]  # [V]

    return jax.jit(next_logits)
