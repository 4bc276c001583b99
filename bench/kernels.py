"""Kernel pool figures, measured in one run with real ipykernels:

- warm ``acquire`` from the pool against a cold kernel start (p50, and the ratio);
- a trivial cell's round trip (``1``);
- one tool call through the stdin back-channel (``reply`` until the next call arrives);
- memory per idle kernel (RSS and PSS), and how many would fit in this machine's memory.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stats import pct  # noqa: E402
from proxy.kernels import ExecLimits, Finished, KernelPool, Pending  # noqa: E402
from proxy.kernels.local import LocalKernel, LocalKernelProvider  # noqa: E402
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


def meminfo_kb(field: str) -> int:
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


async def main(samples: int) -> None:
    provider = LocalKernelProvider()
    cold: list[float] = []
    for _ in range(8):
        started = time.perf_counter()
        kernel = await provider.start_kernel()
        cold.append((time.perf_counter() - started) * 1000)
        await kernel.shutdown()

    pool = KernelPool(provider, min_idle=4, max_total=8, limits=ExecLimits(timeout=60))
    async with pool:
        warm: list[float] = []
        for _ in range(24):
            await pool.wait_ready(4, timeout=120)
            started = time.perf_counter()
            kernel = await pool.acquire("bench")
            warm.append((time.perf_counter() - started) * 1000)
            await pool.release(kernel)

        await pool.wait_ready(4, timeout=120)
        kernel = await pool.acquire("bench")
        await kernel.execute(render_kernel_stubs(TOOLS))
        trivial: list[float] = []
        for _ in range(samples):
            started = time.perf_counter()
            result = await kernel.execute("1")
            trivial.append((time.perf_counter() - started) * 1000)
            assert isinstance(result, Finished)

        calls: list[float] = []
        result = await kernel.execute(f"for i in range({samples + 1}):\n    echo(x=i)")
        while isinstance(result, Pending):
            started = time.perf_counter()
            result = await kernel.reply(result.request.arguments["x"])
            if isinstance(result, Pending):
                calls.append((time.perf_counter() - started) * 1000)
        await pool.release(kernel)

        await pool.wait_ready(4, timeout=120)
        idle = [c for c in pool._idle if isinstance(c, LocalKernel)]
        mem = [memory_kb(pid) for c in idle if (pid := c.pid()) is not None]

    rss = statistics.fmean(m[0] for m in mem) / 1024
    pss = statistics.fmean(m[1] for m in mem) / 1024
    total = meminfo_kb("MemTotal") / 1024
    available = meminfo_kb("MemAvailable") / 1024
    print("kernel pool, real ipykernels, IPC transport, 2-core machine")
    print(
        f"  cold kernel start        p50 {pct(cold, 0.5):9.1f} ms   p99 {pct(cold, 0.99):9.1f} ms   ({len(cold)} starts)"
    )
    print(
        f"  warm acquire             p50 {pct(warm, 0.5):9.4f} ms   p99 {pct(warm, 0.99):9.4f} ms   ({len(warm)} acquires)"
    )
    print(
        f"  cold / warm (p50)        {pct(cold, 0.5) / pct(warm, 0.5):,.0f}x   (target >= 500x, warm p50 <= 1 ms)"
    )
    print(
        f"  trivial cell round trip  p50 {pct(trivial, 0.5):9.3f} ms   p99 {pct(trivial, 0.99):9.3f} ms   (target p50 <= 5 ms)"
    )
    print(
        f"  back-channel tool call   p50 {pct(calls, 0.5):9.3f} ms   p99 {pct(calls, 0.99):9.3f} ms   (target p50 <= 5 ms)"
    )
    print(f"  idle kernel memory       RSS {rss:.1f} MiB, PSS {pss:.1f} MiB (PSS counts shared pages once)")
    print(
        f"  kernels that fit         {int(0.8 * total / pss)} by memory (80% of {total / 1024:.1f} GiB over PSS); "
        f"{int(0.8 * available / pss)} in what is free now; CPU: 2 cores, so at most 2 cells compute at once"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=300)
    asyncio.run(main(parser.parse_args().samples))
