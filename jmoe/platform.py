"""The one place that looks at the platform: "auto" choices, interpret mode, collectives.

Every implementation registry of jmoe (dispatch backends, grouped matmuls, dropless
exchanges) is a :class:`Registry`: a name -> implementation table plus, per platform,
the name ``"auto"`` resolves to. Nothing else in jmoe asks which backend it runs on.
"""

from __future__ import annotations

import warnings
from typing import Generic, TypeVar

import jax

T = TypeVar("T")

PLATFORMS = ("cpu", "gpu", "tpu")


def current() -> str:
    """``"cpu"``, ``"gpu"`` (CUDA or ROCm) or ``"tpu"``: the default backend's platform."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def interpret(flag: bool | None) -> bool:
    """A kernel's interpret flag: None -> interpret unless the platform is a GPU (with a
    warning, once: the GPU kernels then run in Pallas's interpreter, correct but slow)."""
    if flag is None:
        flag = current() != "gpu"
        if flag and not _warned:
            _warned.append(True)
            warnings.warn(f"jmoe: a GPU kernel runs in Pallas's interpreter on {current()} (slow; for tests); "
                          f"choose an 'auto' or XLA implementation here", InterpretedKernelWarning, stacklevel=3)
    return bool(flag)


_warned: list[bool] = []  # once per process


class InterpretedKernelWarning(UserWarning):
    """A GPU kernel ran in Pallas's interpreter (off GPU)."""


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
