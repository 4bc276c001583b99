"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["machine_cpu_seconds", "pct", "process_cpu_seconds", "tree_cpu_seconds"]


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all but idle and iowait), every core summed."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(f) for f in fields) - int(fields[3]) - int(fields[4])
    return busy / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU of one process (every thread), with its reaped children's (cutime, cstime) or not."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = fields[11:15] if children else fields[11:13]
    return sum(int(f) for f in used) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU of ``root`` and of every live process under it, with their reaped children's: what a
    process tree has used so far, unpolluted by the rest of the machine. Read it before a
    sandboxed kernel is killed: its processes are reaped inside the sandbox, out of reach."""
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += process_cpu_seconds(pid)
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile
            continue
    return total


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank; NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
