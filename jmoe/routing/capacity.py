"""Expert capacity: slots per expert and per group (Switch Transformer's formula)."""

from __future__ import annotations

import math

def expert_capacity(
    tokens_per_group: int,
    num_experts: int,
    *,
    k: int = 1,
    capacity_factor: float = 1.0,
    min_capacity: int = 1,
    multiple_of: int = 1,
) -> int:
    """Slots per expert and per group.

    ``C = ceil(k * capacity_factor * tokens_per_group / num_experts)``, then
    ``C = max(C, min_capacity)``, then C is rounded up to a multiple of
    ``multiple_of``.

    Switch Transformer's example: 6 tokens, 3 experts, k=1: factor 1.0 gives 2,
    factor 1.5 gives 3.

    Raises:
      ValueError: naming the bad argument, for non-integer or non-positive sizes,
        a factor that is not finite and > 0, ``k < 1`` or ``k > num_experts``, negative
        ``min_capacity``, ``multiple_of < 1``, or a capacity that comes out 0.
    """
    for name, value, low in (("tokens_per_group", tokens_per_group, 1), ("num_experts", num_experts, 1),
                             ("k", k, 1), ("min_capacity", min_capacity, 0), ("multiple_of", multiple_of, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if k > num_experts:
        raise ValueError(f"k={k} must be <= num_experts={num_experts}")
    if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor must be finite and > 0, got {capacity_factor}")
    # Rounded to 9 digits first so that 1.1 * 10 / 11 stays exactly 1 (no float noise).
    capacity = math.ceil(round(k * capacity_factor * tokens_per_group / num_experts, 9))
    capacity = max(capacity, min_capacity)
    capacity = -(-capacity // multiple_of) * multiple_of
    if capacity == 0:
        raise ValueError(
            "capacity came out 0 (capacity_factor * k * tokens_per_group / num_experts "
            "rounds to 0 and min_capacity is 0): every token would be dropped; raise "
            "capacity_factor or min_capacity"
        )
    return capacity


