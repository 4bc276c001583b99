"""Kernel pool figures, measured in one run with real ipykernels, without a sandbox and in
bubblewrap sandboxes (``kernels.sandbox``), each started as a new process or forked from the
fork server (``kernels.start: spawn | fork``), side by side (samples interleaved):

- warm ``acquire`` from the pool against a cold kernel start (p50, and the ratio);
- a trivial cell's round trip (``1``);
- one tool call through the stdin back-channel (``reply`` until the next call arrives);
- memory per idle kernel (RSS and PSS of its process tree), and how many would fit;
- CPU per cold start and shutdown, and per session (start, stubs, a program with two tool
  calls, shutdown): the machine's, and that of our own processes only (this one, the kernel's
  process tree, the fork server), which a busy neighbour does not inflate.

    .venv/bin/python bench/kernels.py [--samples 300]

Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stats import machine_cpu_seconds, pct, process_cpu_seconds, tree_cpu_seconds  # noqa: E402
from proxy.actions.artifacts import Artifacts  # noqa: E402
from proxy.actions.runtime import setup_cell  # noqa: E402
from proxy.kernels import ExecLimits, Finished, KernelPool, Pending  # noqa: E402
from proxy.kernels.base import KernelConnection  # noqa: E402
from proxy.kernels.execution import CellRun  # noqa: E402
from proxy.kernels.local import LocalKernelProvider  # noqa: E402
from proxy.kernels.sandbox import Bubblewrap  # noqa: E402
from translators.kernel_stubs import render_kernel_stubs  # noqa: E402
from translators.tools import Toolset  # noqa: E402

TOOLS = Toolset.from_openai(
    [
        {
            "type": "function",
            "function": {
                "name": "echo",
                "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
            },
        }
    ]
)


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB."""
    rss = pss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/smaps_rollup") as smaps:
        for line in smaps:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def tree(pid: int) -> list[int]:
    """The process and its descendants (a sandboxed kernel is bwrap's grandchild)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out += tree(int(child))
    return out


def tree_memory_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    for member in tree(pid):
        r, p = memory_kb(member)
        rss, pss = rss + r, pss + p
    return rss, pss


def meminfo_kb(field: str) -> int:
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


async def session(kernel: KernelConnection) -> None:
    """What the runtime does with a fresh kernel in a session of bench/load.py: the stubs (as
    the runtime installs them), then a program that calls a tool twice."""
    run = CellRun(kernel)
    state = await run.start(setup_cell(render_kernel_stubs(TOOLS) + "\n" + Artifacts.definition))
    assert isinstance(state, Finished) and state.output.error is None, state
    run = CellRun(kernel)
    state = await run.start("a = echo(x=1)\nb = echo(x=2)\nprint(a + b)", Artifacts.expressions(1 << 20))
    while isinstance(state, Pending):
        state = await run.reply(state.request.arguments["x"])
    assert isinstance(state, Finished) and state.output.stdout == "3\n", state


async def measure(providers: dict[str, LocalKernelProvider], samples: int) -> dict[str, dict[str, Any]]:
    """Each figure for every provider, their samples interleaved (A, B, A, B, ...), so a busy
    neighbour on a shared machine slows both columns alike."""
    out: dict[str, dict[str, Any]] = {
        name: {
            k: [] for k in ("cold", "cold_cpu", "cold_own_cpu", "session_own_cpu", "warm", "trivial", "calls")
        }
        for name in providers
    }
    for _ in range(20):
        for name, provider in providers.items():
            for kind in ("cold", "session"):
                forks = provider._forks.pid if provider._forks is not None else None
                server = process_cpu_seconds(forks, children=False) if forks is not None else 0.0
                cpu, own = machine_cpu_seconds(), time.process_time()
                started = time.perf_counter()
                kernel = await provider.start_kernel()
                if kind == "cold":
                    out[name]["cold"].append((time.perf_counter() - started) * 1000)
                else:
                    await session(kernel)
                pid = kernel.pid()
                used = tree_cpu_seconds(pid) if pid is not None else 0.0  # before the kill: see there
                await kernel.shutdown()
                if kind == "cold":  # the whole machine's (10 ms a tick: a mean over many starts)
                    out[name]["cold_cpu"].append((machine_cpu_seconds() - cpu) * 1000)
                # this process's own (not its reaped children's) + the kernel's tree + the fork
                # server's own: what it cost, whatever else the machine runs
                if forks is not None:
                    used += process_cpu_seconds(forks, children=False) - server
                out[name][f"{kind}_own_cpu"].append((time.process_time() - own + used) * 1000)

    pools = {
        name: KernelPool(provider, min_idle=4, max_total=8, limits=ExecLimits(timeout=60))
        for name, provider in providers.items()
    }
    for pool in pools.values():
        await pool.start()
    try:
        for _ in range(24):
            for name, pool in pools.items():
                await pool.wait_ready(4, timeout=120)
                started = time.perf_counter()
                kernel = await pool.acquire("bench")
                out[name]["warm"].append((time.perf_counter() - started) * 1000)
                await pool.release(kernel)

        kernels = {}
        for name, pool in pools.items():
            await pool.wait_ready(4, timeout=120)
            kernels[name] = await pool.acquire("bench")
            await kernels[name].execute(render_kernel_stubs(TOOLS))
        for _ in range(samples // 10):
            for name, kernel in kernels.items():
                for _ in range(10):
                    started = time.perf_counter()
                    result = await kernel.execute("1")
                    out[name]["trivial"].append((time.perf_counter() - started) * 1000)
                    assert isinstance(result, Finished)

        pending = {
            name: await kernel.execute(f"for i in range({samples + 1}):\n    echo(x=i)")
            for name, kernel in kernels.items()
        }
        while any(isinstance(p, Pending) for p in pending.values()):
            for name, kernel in kernels.items():
                result = pending[name]
                if isinstance(result, Pending):
                    started = time.perf_counter()
                    pending[name] = await kernel.reply(result.request.arguments["x"])
                    if isinstance(pending[name], Pending):
                        out[name]["calls"].append((time.perf_counter() - started) * 1000)
        for name, kernel in kernels.items():
            await pools[name].release(kernel)

        for name, pool in pools.items():
            await pool.wait_ready(4, timeout=120)
            idle = list(pool._idle)
            out[name]["mem"] = [tree_memory_kb(pid) for c in idle if (pid := c.pid()) is not None]
    finally:
        for pool in pools.values():
            await pool.aclose()
    return out


def ratio(results: dict[str, dict[str, Any]], key: str, a: str, b: str) -> str:
    if a not in results or b not in results:
        return ""
    return f"  {a}/{b} p50 {pct(results[a][key], 0.5) / pct(results[b][key], 0.5):.2f}x"


async def main(samples: int) -> None:
    bwrap = Bubblewrap.find()
    usable = bwrap is not None and bwrap.problem() is None
    # all without the host's network, as kernels run by default
    providers = {
        "none/spawn": LocalKernelProvider(network=False, start="spawn"),
        "none/fork": LocalKernelProvider(network=False, start="fork"),
    }
    if usable:
        providers["bwrap/spawn"] = LocalKernelProvider(network=False, sandbox=bwrap, start="spawn")
        providers["bwrap/fork"] = LocalKernelProvider(network=False, sandbox=bwrap, start="fork")
    try:
        results = await measure(providers, samples)
    finally:
        for provider in providers.values():
            await provider.aclose()
    total = meminfo_kb("MemTotal") / 1024
    print(
        "kernel pool, real ipykernels, IPC transport; sandbox none vs bwrap, started by spawn vs fork, "
        "samples interleaved"
    )
    if not usable:
        print("  (bubblewrap cannot make a sandbox here: only 'none' measured)")
    rows = [
        ("cold kernel start", "cold", "ms", "(targets: bwrap/spawn <= 1.5x none/spawn; fork <= 0.2x spawn)"),
        ("warm acquire", "warm", "ms", ""),
        ("trivial cell round trip", "trivial", "ms", "(target: within 10% across columns)"),
        ("back-channel tool call", "calls", "ms", "(target: within 10% across columns)"),
    ]
    for label, key, unit, target in rows:
        print(f"  {label} {target}")
        for name, r in results.items():
            print(f"    {name:<12} p50 {pct(r[key], 0.5):8.3f}  p99 {pct(r[key], 0.99):8.3f} {unit}")
        print(
            "   "
            + ratio(results, key, "bwrap/spawn", "none/spawn")
            + ratio(results, key, "none/fork", "none/spawn")
            + ratio(results, key, "bwrap/fork", "bwrap/spawn")
        )
    print(
        "  CPU per cold start and shutdown (mean): the machine's (every core; polluted by anything "
        "else running) and ours (this process + the kernel's process tree + the fork server's own); "
        "and ours per session (a start, the stubs, a program with two tool calls, shutdown)"
    )
    for name, r in results.items():
        print(
            f"    {name:<12} machine {statistics.fmean(r['cold_cpu']):8.1f} ms   "
            f"ours {statistics.fmean(r['cold_own_cpu']):8.1f} ms   "
            f"per session {statistics.fmean(r['session_own_cpu']):8.1f} ms"
        )
    for name, r in results.items():
        rss = statistics.fmean(m[0] for m in r["mem"]) / 1024
        pss = statistics.fmean(m[1] for m in r["mem"]) / 1024
        print(
            f"  idle kernel memory ({name:<11}) RSS {rss:6.1f} MiB, PSS {pss:6.1f} MiB; "
            f"{int(0.8 * total / pss)} fit in 80% of {total / 1024:.1f} GiB"
        )
    print(
        "  cold / warm (p50, none/spawn) "
        f"{pct(results['none/spawn']['cold'], 0.5) / pct(results['none/spawn']['warm'], 0.5):,.0f}x"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=300)
    asyncio.run(main(parser.parse_args().samples))
