"""Small helpers shared by the benchmarks."""

from __future__ import annotations

__all__ = ["pct"]


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank; NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
