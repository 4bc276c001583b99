"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["machine_cpu_seconds", "pct"]


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all but idle and iowait), every core summed."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(f) for f in fields) - int(fields[3]) - int(fields[4])
    return busy / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank; NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
