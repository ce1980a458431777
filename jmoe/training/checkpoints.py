"""Checkpoints: orbax, one directory per step under ``<out_dir>/checkpoints``.

A checkpoint holds ``params`` and ``opt_state`` flattened to ``{"path": array}`` dicts, the run's
``config`` as JSON, and, for a model with selection biases (``selection_bias=1``), ``balance``: the
MoE layers' biases, flattened likewise (state carried beside the parameters, never in the optimizer). Orbax writes a step to a temporary
directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint loadable. They are restored with the target shardings of
the current mesh, so a checkpoint moves between meshes. A checkpoint restores only into a config
with the same :data:`~jmoe.training.config.MODEL_KEYS` (:func:`check_compatible`, before anything is read).

A step that does not restore (a truncated or emptied file) is reported by number and set aside, renamed
``<step>.corrupt`` (kept for inspection, invisible to orbax), and the next older step is tried
(:func:`restore_newest`): a resumed run loses only the steps after the newest checkpoint that restores.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jmoe.training.config import MODEL_KEYS, Config
from jmoe.training.trees import flatten, unflatten_like


def checkpoint_manager(out_dir: str, keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(out_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
        item_names=("params", "opt_state", "config", "balance"),
    )


def save_checkpoint(mgr: ocp.CheckpointManager, step: int, params, opt_state, cfg: Config,
                    balance: dict | None = None) -> None:
    """Save (asynchronously) ``step``; every process calls this, orbax coordinates the writes. ``balance``
    (the selection biases) is saved when the model has any."""
    items = dict(params=ocp.args.StandardSave(flatten(params)), opt_state=ocp.args.StandardSave(flatten(opt_state)),
                 config=ocp.args.JsonSave(cfg.to_dict()))
    if balance:
        items["balance"] = ocp.args.StandardSave(flatten(balance))
    mgr.save(step, args=ocp.args.Composite(**items))


def read_checkpoint_config(mgr: ocp.CheckpointManager, step: int) -> dict:
    return mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def restore_checkpoint(mgr: ocp.CheckpointManager, step: int, params_target, opt_state_target=None,
                       balance_target: dict | None = None):
    """Restore ``step`` onto the shardings of the targets (arrays or ShapeDtypeStructs with shardings).

    ``opt_state_target=None`` restores the params only (for sampling / evaluation). Returns ``(params,
    opt_state)``, or ``(params, opt_state, balance)`` when ``balance_target`` (the selection biases) is given
    (``{}``: the model has none; then ``{}`` comes back). A checkpoint without the biases a non-empty target
    asks for is an :class:`IncompatibleCheckpointError` (not corruption)."""
    items = {"params": ocp.args.StandardRestore(flatten(params_target))}
    if opt_state_target is not None:
        items["opt_state"] = ocp.args.StandardRestore(flatten(opt_state_target))
    if balance_target:
        if not os.path.isdir(os.path.join(str(mgr.directory), str(step), "balance")):
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {mgr.directory} holds no selection biases but this model has them "
                f"(selection_bias=1): it was saved by a model without them, or by a version before they were "
                f"checkpointed; use another out_dir or selection_bias=0")
        items["balance"] = ocp.args.StandardRestore(flatten(balance_target))
    out = mgr.restore(step, args=ocp.args.Composite(**items))
    params = unflatten_like(params_target, out["params"])
    opt_state = None if opt_state_target is None else unflatten_like(opt_state_target, out["opt_state"])
    if balance_target is None:
        return params, opt_state
    return params, opt_state, unflatten_like(balance_target, out["balance"]) if balance_target else {}


class IncompatibleCheckpointError(ValueError):
    """The checkpoint is intact but holds another model (its :data:`~jmoe.training.config.MODEL_KEYS` differ)."""


def check_compatible(saved: dict, cfg: Config) -> None:
    """A checkpoint restores only into a model with the same parameter-defining keys."""
    defaults = Config()  # a key the saved config lacks was saved before it existed: the model had its default
    saved = {k: saved.get(k, getattr(defaults, k)) for k in MODEL_KEYS}
    diff = {k: (saved[k], getattr(cfg, k)) for k in MODEL_KEYS if saved[k] != getattr(cfg, k)}
    if diff:
        raise IncompatibleCheckpointError(
            "the checkpoint's model differs from this config (saved, requested): "
            + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
            + "; use another out_dir or the saved values"
        )


def describe_error(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` of the innermost cause (orbax / tensorstore wrap the telling error in
    generic ones; their messages run to pages)."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def set_aside(mgr: ocp.CheckpointManager, step: int) -> str:
    """Rename step ``step``'s directory to ``<step>.corrupt`` (``.corrupt-N`` if taken; process 0 renames,
    every process waits for it) and make ``mgr`` forget the step. Returns the new path."""
    src = os.path.join(str(mgr.directory), str(step))
    dst, n = src + ".corrupt", 1
    while os.path.exists(dst):
        dst, n = f"{src}.corrupt-{n}", n + 1
    if jax.process_index() == 0:
        os.rename(src, dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jmoe_set_aside_{step}")
    mgr.reload()
    return dst


def restore_newest(mgr: ocp.CheckpointManager, restore: Callable[[int], Any], warn: Callable[[str], None], *,
                   move: bool = True) -> tuple[int | None, Any]:
    """``(step, restore(step))`` for the newest step whose ``restore`` succeeds, or ``(None, None)``.

    A step that fails is reported through ``warn`` by number and set aside (:func:`set_aside`; only skipped
    when ``move=False``). An :class:`IncompatibleCheckpointError` is not corruption: it propagates.
    """
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            return step, restore(step)
        except IncompatibleCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore / json raise many types for a bad file
            where = os.path.join(str(mgr.directory), str(step))
            action = f"set aside as {set_aside(mgr, step)}" if move else "skipped"
            warn(f"checkpoint step {step} ({where}) does not restore ({describe_error(e)}): {action}; "
                 f"trying the previous checkpoint")
    return None, None


def latest_on_disk(mgr: ocp.CheckpointManager) -> int | None:
    """The newest committed step in the manager's directory (read from the disk, not the manager's cache)."""
    try:
        steps = [int(d) for d in os.listdir(str(mgr.directory)) if d.isdigit()]
    except OSError:
        return None
    return max(steps, default=None)


def close_manager(mgr: ocp.CheckpointManager, warn: Callable[[str], None], unwinding: bool = False) -> int | None:
    """Let the save in flight finish (Ctrl-C meanwhile: exit at once), close ``mgr``; returns the newest complete
    step. Also on the way out of an exception: an interpreter shutting down under orbax's writer thread can
    hang. When ``unwinding``, an error here is only reported, not to hide the exception being raised."""
    from jmoe.training.interrupt import default_sigint_while

    def close():
        mgr.wait_until_finished()
        mgr.close()

    try:
        default_sigint_while(close)
    except Exception as e:  # noqa: BLE001
        if not unwinding:
            raise
        warn(f"closing the checkpoint manager of {mgr.directory} failed: {describe_error(e)}")
    return latest_on_disk(mgr)
