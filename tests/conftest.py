"""Test set-up: 8 emulated CPU devices, set before jax is imported anywhere.

On a GPU machine the same tests run with the GPU as the default backend (Pallas
kernels compiled); the emulated CPU devices are still there for mesh tests.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# Tests compare against float64 references: on a GPU, float32 matmuls must not drop to TF32.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
