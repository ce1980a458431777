"""Inference from a run directory: load a checkpoint with its saved config on a fresh mesh, and sample bytes."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe.training import config as config_lib
from jmoe.training import data as data_lib
from jmoe.training.build import Setup, cached_setup
from jmoe.training.checkpoints import (checkpoint_manager, describe_error, read_checkpoint_config,
                                       restore_checkpoint, restore_newest)
from jmoe.training.lock import is_locked
from jmoe.training.logs import main_warn
from jmoe.training.mesh import training_mesh
from jmoe.training.trees import abstract


def load_for_inference(out_dir: str, *, expert_parallel: int = 1, num_devices: int = 0,
                       step: int | None = None, warn_fn=None) -> tuple[Setup, dict, int]:
    """The newest checkpoint of ``out_dir`` that restores (or ``step``), with its saved config, on a fresh mesh:
    ``(setup, params, step)``; the setup's ``balance`` is the checkpoint's selection biases (what
    :func:`~jmoe.training.evaluate` and :func:`sample` use by default).

    A newer step that does not restore is reported through ``warn_fn`` by number and set aside as
    ``<step>.corrupt`` (only skipped while a run holds the ``out_dir`` lock: that run owns the directory).
    """
    mgr = checkpoint_manager(out_dir)
    mesh = training_mesh(expert_parallel, num_devices)

    def restore(st):
        saved = read_checkpoint_config(mgr, st)
        known = set(config_lib.keys())  # a checkpoint from an older version may hold retired keys
        cfg = config_lib.from_dict({**{k: v for k, v in saved.items() if k in known},
                                    "expert_parallel": expert_parallel, "num_devices": num_devices})
        s = cached_setup(cfg, mesh)
        params, _, balance = restore_checkpoint(mgr, st, abstract(s.abstract_params, s.param_shardings),
                                                balance_target=abstract(s.abstract_balance, s.balance_shardings))
        return dataclasses.replace(s, balance=balance), params

    try:
        if step is None:
            step, restored = restore_newest(mgr, restore, warn_fn or main_warn, move=not is_locked(out_dir))
            if step is None:
                raise FileNotFoundError(f"no checkpoint (that restores) in {os.path.join(out_dir, 'checkpoints')}")
        else:
            try:
                restored = restore(step)
            except Exception as e:  # noqa: BLE001 - orbax / tensorstore / json raise many types
                raise ValueError(f"checkpoint step {step} in {mgr.directory} does not restore: "
                                 f"{describe_error(e)}") from e
    finally:
        mgr.close()
    return restored[0], restored[1], step


def sample(s: Setup, params, prompt: str, length: int, temperature: float = 0.8, top_k: int = 0,
           seed: int = 0, balance: dict | None = None) -> str:
    """Generate ``length`` bytes after ``prompt`` (eval mode, no KV cache: each new byte re-reads the
    last ``seq_len`` bytes, a static-shape window, so one compiled function serves every position).
    ``top_k`` keeps the ``top_k`` largest logits; 0, or a value of at least the vocabulary (256), keeps all.
    ``balance``: the selection biases (default ``s.balance``)."""
    seq_len = s.cfg.seq_len
    balance = s.balance if balance is None else balance
    repl = NamedSharding(s.mesh, P())
    tokens = list(data_lib.encode(prompt)) or [ord("\n")]
    rng = np.random.default_rng(seed)
    for _ in range(length):
        ctx = tokens[-seq_len:]
        window = np.zeros((1, seq_len), np.int32)
        window[0, :len(ctx)] = ctx  # right padding is invisible to the causal model
        logits = np.asarray(s.next_logits(params, balance, jax.device_put(window, repl), len(ctx) - 1), np.float64)
        if temperature <= 0:
            tokens.append(int(np.argmax(logits)))
            continue
        logits = logits / temperature
        if 0 < top_k < len(logits):  # top_k >= the vocabulary keeps every logit
            logits[logits < np.sort(logits)[-top_k]] = -np.inf
        p = np.exp(logits - logits.max())
        tokens.append(int(rng.choice(len(p), p=p / p.sum())))
    return data_lib.decode(tokens)
