"""The training loop (:func:`train`: resume, step, log, evaluate, checkpoint, stop on a non-finite loss) and
the evaluation over the validation set.

Loss: ``lm + lb_weight * sum_layers(<lb_loss>) + z_weight * sum_layers(z_loss)`` (plus the
noisy top-k router's own weighted losses, see :func:`jmoe.training.model.total_loss`); bits per byte
``= lm / ln 2`` (one token is one byte).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jmoe.training import data as data_lib
from jmoe.training.config import Config
from jmoe.training.build import LN2, Setup, init_opt_state, setup
from jmoe.training.checkpoints import (check_compatible, checkpoint_manager, close_manager, read_checkpoint_config,
                                       restore_checkpoint, restore_newest, save_checkpoint)
from jmoe.training.interrupt import StopOnSigint
from jmoe.training.lock import out_dir_lock
from jmoe.training.logs import MetricsLog, main_warn, peak_flops, progress_line, write_plots
from jmoe.training.mesh import batch_sharding, training_mesh

Array = jax.Array


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN / inf loss; the last good checkpoint is kept."""


def global_batch(s: Setup, local: tuple[np.ndarray, np.ndarray]) -> tuple[Array, Array]:
    """This process's rows -> global [B, S] arrays sharded over the mesh."""
    sharding = batch_sharding(s.mesh)
    shape = (s.cfg.batch_size, s.cfg.seq_len)
    return tuple(jax.make_array_from_process_local_data(sharding, x, shape) for x in local)


def evaluate(s: Setup, params, val: np.ndarray, balance: dict | None = None) -> dict[str, Any]:
    """Mean validation loss over ``eval_batches`` fixed batches; ``val_bpb = val_loss / ln 2``. ``balance``: the
    selection biases (default ``s.balance``: the initial ones, or those :func:`load_for_inference` restored)."""
    cfg = s.cfg
    balance = s.balance if balance is None else balance
    losses, drops = [], []
    for i in range(cfg.eval_batches):
        local = data_lib.val_batch(val, i, cfg.eval_batches, cfg.batch_size, cfg.seq_len,
                                   jax.process_index(), jax.process_count())
        out = s.eval_step(params, balance, *global_batch(s, local))
        losses.append(out["lm_loss"])
        drops.append(out["dropped_fraction"])
    losses, drops = jax.device_get((losses, drops))
    val_loss = float(np.mean(losses))
    return {"val_loss": val_loss, "val_bpb": val_loss / LN2,
            "val_dropped_fraction": np.mean(np.stack(drops), axis=0).tolist()}


def _to_python(x):
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x.tolist()


class _TrainMetrics:
    """The train steps' metrics, left on the device until :meth:`flush` fetches them together and logs them.

    Tokens/s (and MFU) are measured over the steps between two clock starts: the clock starts at the first
    flush (after the compiling first step), at every flush, and after each evaluation and save.
    """

    def __init__(self, s: Setup, log: MetricsLog, mgr: ocp.CheckpointManager):
        self.s, self.log, self.mgr = s, log, mgr
        self.tokens_per_step = s.cfg.batch_size * s.cfg.seq_len
        self.peak = peak_flops(jax.devices()[0])
        self.pending: list[tuple[int, dict]] = []
        self.clock: float | None = None  # tokens/s clock, started after the first (compiling) step
        self.clock_steps = 0
        self.records: list[dict] = []  # every flushed train record

    def add(self, step: int, metrics: dict) -> bool:
        """Queue the metrics of ``step`` (device arrays); True for the first one (the clock has not started)."""
        self.pending.append((step, metrics))
        first = self.clock is None
        if not first:
            self.clock_steps += 1
        return first

    def flush(self) -> dict:
        """Fetch and log the queued records; returns the last. Raises :class:`NonFiniteLossError` (after
        logging the bad record and letting pending saves finish) on a NaN / inf loss or gradient norm."""
        fetched = jax.device_get([m for _, m in self.pending])
        now = time.perf_counter()
        clock, clock_steps = self.clock, self.clock_steps
        tps = clock_steps * self.tokens_per_step / (now - clock) if clock is not None and clock_steps else None
        for (step, _), m in zip(self.pending, fetched):
            rec = {"kind": "train", "step": step, **{k: _to_python(v) for k, v in m.items()}}
            rec["tokens_per_s"] = tps
            rec["mfu"] = tps * self.s.flops_per_token / (self.peak * self.s.mesh.size) if tps and self.peak else None
            if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])):
                self.log.write(rec)
                self.mgr.wait_until_finished()
                msg = (f"non-finite loss ({rec['loss']}) or gradient norm ({rec['grad_norm']}) at step "
                       f"{step}: stopping. The last good checkpoint is step {self.mgr.latest_step()} in "
                       f"{self.mgr.directory}; rerun to resume from it (lower lr or raise grad_clip).")
                raise NonFiniteLossError(msg)
            self.log.write(rec)
            self.records.append(rec)
        self.pending.clear()
        self.clock, self.clock_steps = now, 0
        return self.records[-1]

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()


@dataclasses.dataclass
class _Run:
    """What the loop's helpers share: the setup, the data, the checkpoints, the log and the messages."""

    s: Setup
    corpus: data_lib.Corpus
    mgr: ocp.CheckpointManager
    log: MetricsLog
    say: Callable
    metrics: _TrainMetrics
    stop: StopOnSigint  # Ctrl-C: stop after the current step
    evals: list[dict] = dataclasses.field(default_factory=list)  # evaluations after step 0

    def evaluate(self, params, balance, step: int) -> dict[str, Any]:
        """:func:`evaluate` at ``step``, logged and printed."""
        ev = evaluate(self.s, params, self.corpus.val, balance)
        self.log.write({"kind": "eval", "step": step, **ev})
        self.say(f"step {step:>6} | val loss {ev['val_loss']:.4f} | val bpb {ev['val_bpb']:.3f}")
        return ev


def _open_log(s: Setup, corpus: data_lib.Corpus, out_dir: str, start: int, is_main: bool, warn) -> MetricsLog:
    """Write ``config.json``, open ``metrics.jsonl`` (dropping records after ``start``) and log the start."""
    cfg, mesh = s.cfg, s.mesh
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=1)
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), start, is_main, warn)
    log.write({"kind": "start", "step": start, "num_params": s.num_params, "active_params": s.active_params,
               "flops_per_token": s.flops_per_token, "devices": len(mesh.devices.flat),
               "device_kind": jax.devices()[0].device_kind, "processes": jax.process_count(),
               "mesh": dict(mesh.shape), "train_bytes": len(corpus.train), "val_bytes": len(corpus.val),
               "data": corpus.source})
    return log


def _run_steps(run: _Run, params, opt_state, balance, start: int, stop_after: int | None) -> tuple[Any, Any, int]:
    """Steps ``start + 1 ..`` to ``steps`` (or ``stop_after``): flush / print every ``log_every``, evaluate
    every ``eval_every``, save every ``ckpt_every`` (and at the end); stop early after ``stop_after`` or a Ctrl-C
    (``run.stop``). Returns the params, the selection biases and the last saved step."""
    s, cfg = run.s, run.s.cfg
    last_good = start
    for i in range(start, cfg.steps):
        local = data_lib.train_batch(run.corpus.train, cfg.seed, i, cfg.batch_size, cfg.seq_len,
                                     jax.process_index(), jax.process_count())
        params, opt_state, balance, metrics = s.train_step(params, opt_state, balance, jnp.int32(i),
                                                           *global_batch(s, local), jnp.int32(cfg.nan_at_step))
        done = i + 1
        first = run.metrics.add(done, metrics)
        at_eval = done % cfg.eval_every == 0 or done == cfg.steps
        at_ckpt = done % cfg.ckpt_every == 0 or done == cfg.steps
        if first or done % cfg.log_every == 0 or at_eval or at_ckpt:
            rec = run.metrics.flush()  # the first flush (after compilation) starts the tokens/s clock
            run.say(_progress(done, cfg.steps, rec))
        if at_eval:
            run.evals.append({"step": done, **run.evaluate(params, balance, done)})
        if at_ckpt:
            save_checkpoint(run.mgr, done, params, opt_state, cfg, balance)
            last_good = done
        if at_eval or at_ckpt:
            run.metrics.restart_clock()  # leave evaluation and saving out of tokens/s
        if (stop_after is not None and done >= stop_after) or run.stop.requested:
            break
    return params, balance, last_good


def _progress(step: int, total: int, rec: dict) -> str:
    """The progress line, with the worst MoE layer's load max / mean when the model has MoE layers."""
    line = progress_line(step, total, rec)
    ratios = rec.get("load_max_over_mean") or []
    return f"{line} | load max/mean {max(ratios):.2f}" if ratios else line


def _resume(mgr: ocp.CheckpointManager, cfg: Config, params, opt_state, balance, say,
            warn) -> tuple[int, Any, Any, Any]:
    """``(start, params, opt_state, balance)`` from the newest checkpoint that restores (a corrupt newer one is
    reported and set aside), or ``(0, params, opt_state, balance)`` unchanged when none does."""
    def restore(step):
        check_compatible(read_checkpoint_config(mgr, step), cfg)
        return restore_checkpoint(mgr, step, params, opt_state, balance)

    start, restored = restore_newest(mgr, restore, warn)
    if start is None:
        return 0, params, opt_state, balance
    say(f"resumed from {mgr.directory} step {start}")
    return start, *restored


def _interrupted(latest: int | None, mgr: ocp.CheckpointManager) -> str:
    return (f"interrupted (Ctrl-C): the last complete checkpoint is step {latest} in {mgr.directory}; "
            f"rerun the same command to resume from it")


def train(cfg: Config, out_dir: str, *, print_fn=print, warn_fn=None, plots: bool = True,
          stop_after: int | None = None) -> dict:
    """Train (resuming from the newest checkpoint in ``out_dir`` that restores); returns a summary dict.

    ``stop_after`` ends the run after that step without a final checkpoint (as if it
    were killed; for tests of resumption).

    Raises :class:`NonFiniteLossError` on a NaN / inf loss (no checkpoint is written
    after it; the last good one is kept), :class:`KeyboardInterrupt` after a Ctrl-C (the loop stops after the
    current step and the save in flight finishes first, see :mod:`~jmoe.training.interrupt`), and :class:`~jmoe.training.lock.OutDirInUseError` at once when
    another live process runs in ``out_dir`` (process 0 holds ``<out_dir>/.lock`` for the whole run).
    """
    is_main = jax.process_index() == 0
    say = print_fn if is_main else (lambda *a, **k: None)
    warn = (warn_fn or main_warn) if is_main else (lambda *a, **k: None)
    with out_dir_lock(out_dir, warn) if is_main else contextlib.nullcontext():
        return _train(cfg, out_dir, say, warn, plots, stop_after)


def _train(cfg: Config, out_dir: str, say, warn, plots: bool, stop_after: int | None) -> dict:
    is_main = jax.process_index() == 0
    mesh = training_mesh(cfg.expert_parallel, cfg.num_devices)
    corpus = data_lib.load_corpus(cfg.data, cfg.val_percent, min_bytes=cfg.seq_len + 2)
    s, params = setup(cfg, mesh)
    opt_state, balance = init_opt_state(s, params), s.balance
    mgr = checkpoint_manager(out_dir, cfg.keep_ckpts)
    with StopOnSigint() as stop:
        try:
            start, params, opt_state, balance = _resume(mgr, cfg, params, opt_state, balance, say, warn)
            log = _open_log(s, corpus, out_dir, start, is_main, warn)
            say(f"{s.num_params / 1e6:.2f}M parameters ({s.active_params / 1e6:.2f}M active/token), "
                f"mesh {dict(mesh.shape)}, data {corpus.source} ({len(corpus.train) / 1e6:.1f}M train bytes)")
            run = _Run(s, corpus, mgr, log, say, _TrainMetrics(s, log, mgr), stop)
            if start == 0:
                run.evaluate(params, balance, 0)
            params, balance, last_good = _run_steps(run, params, opt_state, balance, start, stop_after)
            if run.metrics.pending:
                run.metrics.flush()
        except BaseException as e:
            latest = close_manager(mgr, warn, unwinding=True)
            if isinstance(e, KeyboardInterrupt):
                warn(_interrupted(latest, mgr))
            raise
        latest = close_manager(mgr, warn)
    if stop.requested:
        warn(_interrupted(latest, mgr))
        raise KeyboardInterrupt
    paths = write_plots(log.path) if plots and is_main else []
    if paths:
        say("plots: " + ", ".join(paths))
    history = {"train": run.metrics.records, "eval": run.evals}
    # the returned setup evaluates / samples with the trained selection biases by default
    return {"history": history, "last_checkpoint": last_good, "params": params, "balance": balance,
            "setup": dataclasses.replace(s, balance=balance)}
