"""The argument checks that option classes share (one message each, naming the argument and its value)."""

from __future__ import annotations

import math


def positive_number(name: str, value) -> None:
    """``value`` is a finite int or float > 0 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def non_negative_number(name: str, value) -> None:
    """``value`` is a finite int or float >= 0 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def finite_number(name: str, value) -> None:
    """``value`` is a finite int or float (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def int_at_least(name: str, value, low: int) -> None:
    """``value`` is an int >= ``low`` (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
