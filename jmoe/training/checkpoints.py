"""Checkpoints: orbax, one directory per step under ``<out_dir>/checkpoints``.

A checkpoint holds three items: ``params`` and ``opt_state`` flattened to ``{"path": array}``
dicts, and the run's ``config`` as JSON. Orbax writes a step to a temporary
directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint loadable. They are restored with the target shardings of
the current mesh, so a checkpoint moves between meshes. A checkpoint restores only into a config
with the same :data:`~jmoe.config.MODEL_KEYS` (:func:`check_compatible`, before anything is read).
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from jmoe.config import MODEL_KEYS, Config
from jmoe.training.trees import flatten, unflatten_like


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
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in MODEL_KEYS if saved.get(k) != getattr(cfg, k)}
    if diff:
        raise ValueError(
            "the checkpoint's model differs from this config (saved, requested): "
            + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
            + "; use another out_dir or the saved values"
        )
