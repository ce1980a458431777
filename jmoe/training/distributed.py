"""Multi-host start-up: ``jax.distributed.initialize`` when the command line or the environment asks for it."""

from __future__ import annotations

import os

import jax

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
