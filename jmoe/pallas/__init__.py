"""Pallas kernels: GPU (Triton, Mosaic GPU) and TPU (megablox); off their platforms they are an
error unless tests opt in to interpret mode (:func:`jmoe.platform.interpret`).

``pallas_dispatch`` / ``pallas_combine`` are the ``dispatch="pallas"`` backend of
:mod:`jmoe.dispatch`; the row kernels they are built from are in
:mod:`jmoe.pallas.kernels`, each with a pure-jnp reference.
"""

from jmoe.pallas.dispatch import (
    DEFAULT_CONFIG,
    combine_reference,
    dispatch_reference,
    pallas_combine,
    pallas_dispatch,
)
from jmoe.pallas.kernels import KernelConfig, resolve_interpret

__all__ = [
    "DEFAULT_CONFIG",
    "KernelConfig",
    "combine_reference",
    "dispatch_reference",
    "pallas_combine",
    "pallas_dispatch",
    "resolve_interpret",
]
