"""The one place that looks at the platform: "auto" choices, interpret mode, collectives.

Every implementation registry of jmoe (dispatch backends, grouped matmuls, dropless
exchanges) is a :class:`Registry`: a name -> implementation table plus, per platform,
the name ``"auto"`` resolves to. Nothing else in jmoe asks which backend it runs on.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Generic, TypeVar

import jax

T = TypeVar("T")

PLATFORMS = ("cpu", "gpu", "tpu")


def current() -> str:
    """``"cpu"``, ``"gpu"`` (CUDA or ROCm) or ``"tpu"``: the default backend's platform."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


ALLOW_INTERPRET_ENV = "JMOE_ALLOW_INTERPRET"
_allow_depth = [0]  # open allow_interpret() contexts


@contextlib.contextmanager
def allow_interpret():
    """Within: a kernel off its platforms runs in Pallas's interpreter instead of failing
    (:func:`interpret`). For tests; so is ``JMOE_ALLOW_INTERPRET=1`` (tests/conftest.py)."""
    _allow_depth[0] += 1
    try:
        yield
    finally:
        _allow_depth[0] -= 1


def interpret_allowed() -> bool:
    """True inside :func:`allow_interpret` or with ``JMOE_ALLOW_INTERPRET`` set (not "0")."""
    return _allow_depth[0] > 0 or os.environ.get(ALLOW_INTERPRET_ENV, "0") not in ("", "0")


class UnsupportedPlatformError(ValueError):
    """A kernel was chosen on a backend where it cannot run compiled (and interpreting it
    was not asked for)."""


def interpret(flag: bool | None, what: str = "a Pallas GPU kernel", platforms: tuple[str, ...] = ("gpu",)) -> bool:
    """The one interpret policy of jmoe's kernels: should ``what`` (a kernel that runs
    compiled on ``platforms`` only) run in Pallas's interpreter?

    * ``flag`` True / False: as given (False off ``platforms``: lowering for another
      backend, e.g. ``lower(lowering_platforms=("tpu",))``);
    * None on one of ``platforms``: False (compiled);
    * None elsewhere: True when :func:`interpret_allowed` (tests opt in; with the
      environment variable, an :class:`InterpretedKernelWarning` once per process), else
      :class:`UnsupportedPlatformError` naming the platforms it supports: no silent
      interpreter (correct but orders of magnitude slower) outside tests.
    """
    if flag is not None:
        return bool(flag)
    if current() in platforms:
        return False
    if _allow_depth[0] > 0:
        return True
    if interpret_allowed():
        if not _warned:
            _warned.append(True)
            warnings.warn(f"jmoe: {what} runs in Pallas's interpreter on {current()} ({ALLOW_INTERPRET_ENV} is "
                          f"set: slow, for tests)", InterpretedKernelWarning, stacklevel=3)
        return True
    raise UnsupportedPlatformError(
        f"{what}: compiled only on {' or '.join(platforms)}, and the backend here is {current()}; "
        f"choose 'auto' or an XLA implementation (dispatch 'gather' / 'einsum', grouped_matmul 'scan' / "
        f"'ragged_dot'), or, for tests, opt in to Pallas's interpreter (slow) with {ALLOW_INTERPRET_ENV}=1 "
        f"or jmoe.platform.allow_interpret()")


_warned: list[bool] = []  # once per process


class InterpretedKernelWarning(UserWarning):
    """A kernel ran in Pallas's interpreter off its platforms, allowed by ``JMOE_ALLOW_INTERPRET``."""


def has_ragged_all_to_all() -> bool:
    """XLA implements ``ragged-all-to-all`` on GPU and TPU (not on CPU)."""
    return current() in ("gpu", "tpu")


class Registry(Generic[T]):
    """Implementations of one operation by name, and what ``"auto"`` means per platform.

    ``auto`` maps a platform to a registered name; ``fallback`` is the name for any other
    platform. ``register`` is the one line a new implementation adds.
    """

    def __init__(self, what: str, *, fallback: str, auto: dict[str, str] | None = None):
        self.what, self.fallback, self.auto = what, fallback, dict(auto or {})
        self._entries: dict[str, T] = {}

    def register(self, name: str, implementation: T) -> T:
        if name == "auto" or name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = implementation
        return implementation

    @property
    def names(self) -> tuple[str, ...]:
        """Every accepted name: ``"auto"`` first, then the registered ones."""
        return ("auto", *self._entries)

    def check(self, name: str) -> str:
        """``name`` if accepted, else a ValueError naming the choices."""
        if name != "auto" and name not in self._entries:
            raise ValueError(f"{self.what} must be one of {self.names}, got {name!r}")
        return name

    def resolve(self, name: str) -> str:
        """``"auto"`` -> this platform's choice; any other accepted name -> itself."""
        self.check(name)
        return self.auto.get(current(), self.fallback) if name == "auto" else name

    def get(self, name: str) -> T:
        return self._entries[self.resolve(name)]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]
