"""Small helpers shared by the networks."""

from __future__ import annotations


def as_triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    """``3 -> (3, 3, 3)``; a triple is returned as a tuple."""
    if isinstance(value, int):
        return (value, value, value)
    triple = tuple(int(v) for v in value)
    if len(triple) != 3:
        raise ValueError(f"expected an int or 3 values, got {value!r}")
    return triple  # type: ignore[return-value]
