"""Test set-up: 8 emulated CPU devices, set before jax is imported anywhere.

On a GPU machine the same tests run with the GPU as the default backend (Pallas
kernels compiled); the emulated CPU devices are still there for mesh tests.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
if "PYTEST_XDIST_WORKER" in os.environ:  # several test processes share one GPU: none takes 75% of it up front
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Tests compare against float64 references: on a GPU, float32 matmuls must not drop to TF32.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("JMOE_ALLOW_INTERPRET", "1")  # the kernel tests run GPU / TPU kernels interpreted on CPU

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    # Real text from a fixed source, so the test does not depend on the machine's stdlib version.
    lines = [f"def function_{i}(x, y):\n    return x * {i} + y  # value {i % 7}\n\n" for i in range(600)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(lines))
    return str(path)


