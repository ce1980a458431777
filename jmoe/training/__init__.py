"""Training: mesh, optimizer, the jit-compiled train / eval steps, checkpoints, logging, plots.

The train state is three plain pytrees of arrays: ``params`` (the model's
``nnx.Param`` values as a nested dict, ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``),
the optax ``opt_state`` over them, and ``balance``: the MoE layers' selection biases
(:class:`jmoe.SelectionBias`, ``selection_bias=1``; ``{}`` when the model has none), state that
the optimizer never sees and no gradient reaches. The model is rebuilt inside each step
with ``nnx.merge(graphdef, params, balance, rngs)``; the step returns the biases moved by
aux-loss-free balancing (``b_e += bias_update_rate * sign(mean load - load_e)``, the load over
that step's global batch, every device: :func:`jmoe.update_selection_biases`). The rest of the
non-parameter state (the router RNG streams, the layers' load counters) is not carried between
steps: step ``i`` uses the initial keys folded with ``i``, so a step's randomness depends only on
``(seed, i)`` and a resumed run repeats an uninterrupted one exactly.

Checkpoints (orbax, one directory per step under ``<out_dir>/checkpoints``)
hold ``params`` and ``opt_state`` flattened to ``{"path": array}``
dicts, the run's ``config`` as JSON, and ``balance`` (flattened) when the model has selection biases. Orbax writes a step to a temporary
directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint loadable. They are restored with the target shardings of
the current mesh, so a checkpoint moves between meshes.

Loss: ``lm + lb_weight * sum_layers(<lb_loss>) + z_weight * sum_layers(z_loss)``, ``lb_loss`` one of
Switch's ``load_balancing_loss`` (per routing group), DeepSeek-V3's ``sequence_balance_loss`` or the
``global_load_balancing_loss`` (f and P over the whole global batch) (plus the
noisy top-k router's own weighted losses, see :func:`jmoe.training.model.total_loss`); bits per byte
``= lm / ln 2`` (one token is one byte).

Modules (each name below is also importable from ``jmoe.training``):

- :mod:`~jmoe.training.distributed`: ``jax.distributed.initialize`` when asked to;
- :mod:`~jmoe.training.mesh`: the mesh and the batch / parameter / optimizer-state shardings (the one
  module that calls :mod:`jmoe.parallel`);
- :mod:`~jmoe.training.build`: the model, the optimizer, the cached :class:`Setup` and its jitted steps;
- :mod:`~jmoe.training.trees`: pytrees as ``{"key/path": leaf}`` dicts;
- :mod:`~jmoe.training.checkpoints`: save / restore, the model-compatibility check, and the fallback past a
  corrupt checkpoint (set aside as ``<step>.corrupt``);
- :mod:`~jmoe.training.interrupt`: Ctrl-C stops the loop after the current step (the save in flight finishes);
- :mod:`~jmoe.training.lock`: one run per ``out_dir`` (``flock`` on ``<out_dir>/.lock``);
- :mod:`~jmoe.training.logs`: the metrics log, the progress line, peak FLOP/s, plots;
- :mod:`~jmoe.training.loop`: :func:`train` and :func:`evaluate`;
- :mod:`~jmoe.training.sampling`: :func:`load_for_inference` and :func:`sample`.
"""

from jmoe.training.config import RUN_ONLY_KEYS
from jmoe.training.build import (LN2, Setup, build_model, cached_setup, fold_rngs, global_norm, init_opt_state,
                                 make_eval_step, make_next_logits, make_optimizer, make_schedule, make_train_step,
                                 setup)
from jmoe.training.checkpoints import (IncompatibleCheckpointError, check_compatible, checkpoint_manager,
                                       read_checkpoint_config, restore_checkpoint, restore_newest, save_checkpoint,
                                       set_aside)
from jmoe.training.distributed import maybe_initialize_distributed
from jmoe.training.lock import OutDirInUseError, is_locked, out_dir_lock
from jmoe.training.logs import PEAK_FLOPS, MetricsLog, main_print, main_warn, peak_flops, progress_line, read_log, write_plots
from jmoe.training.loop import NonFiniteLossError, evaluate, global_batch, train
from jmoe.training.mesh import batch_sharding, opt_state_shardings, param_shardings, training_mesh
from jmoe.training.sampling import load_for_inference, sample
from jmoe.training.trees import flatten, unflatten_like

__all__ = [
    "IncompatibleCheckpointError",
    "LN2",
    "PEAK_FLOPS",
    "RUN_ONLY_KEYS",
    "MetricsLog",
    "NonFiniteLossError",
    "OutDirInUseError",
    "Setup",
    "batch_sharding",
    "build_model",
    "cached_setup",
    "check_compatible",
    "checkpoint_manager",
    "evaluate",
    "flatten",
    "fold_rngs",
    "global_batch",
    "global_norm",
    "init_opt_state",
    "is_locked",
    "load_for_inference",
    "main_print",
    "main_warn",
    "make_eval_step",
    "training_mesh",
    "make_next_logits",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "maybe_initialize_distributed",
    "opt_state_shardings",
    "out_dir_lock",
    "param_shardings",
    "peak_flops",
    "progress_line",
    "read_checkpoint_config",
    "read_log",
    "restore_checkpoint",
    "restore_newest",
    "sample",
    "save_checkpoint",
    "set_aside",
    "setup",
    "train",
    "unflatten_like",
    "write_plots",
]
