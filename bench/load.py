"""Load against `cablectl serve` (its own process) on loopback, with a scripted upstream, once
per kernel start mode (``kernels.start``: fork and spawn, two proxies measured in turn in one run):

- fast path: 1,000 requests at concurrency 50 (a static program becomes tool_calls, no kernel);
- kernel path: 200 sessions at concurrency 20 (a program calls a client tool twice in a
  kernel: three requests per session, two of them resuming the program).

Two rounds of both, so that memory after the second can be set against the first (sessions
live 10 s here, so each round's have expired when memory is read). Reports errors, latency
p50/p99 per phase, the proxy's CPU per request, its RSS (after warm-up, after each round),
and the kernel pool from /metrics once sessions have idled out. Exits 1 if any request failed or the
pool did not return to idle; asserts nothing about time. Bounded by --max-seconds.

The kernel path also reports its first step (the request that needs a fresh kernel) apart, and
the sessions/s and first-step p99 of fork against spawn.

    .venv/bin/python bench/load.py [--requests 1000] [--sessions 200] [--starts fork,spawn]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loop import KERNEL, STATIC, TEMPS, TOOLS, Responder  # noqa: E402
from bench.stats import machine_cpu_seconds, pct, process_cpu_seconds, tree_cpu_seconds  # noqa: E402
from tests.servers import UvicornThread, free_port  # noqa: E402

SESSION_TTL = 10.0  # short, so that a round's sessions expire before memory is read


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.overhead: list[float] = []  # x-cablectl-overhead-ms: the proxy's own time
        self.errors: list[str] = []
        self.first: list[float] = []  # a kernel session's first request: the one that takes a kernel

    def line(self, name: str, wall: float, count: int, unit: str) -> str:
        ms = self.latencies
        return (
            f"  {name:<44} {count:5d} {unit} in {wall:6.1f} s ({count / wall:6.1f}/s)  errors {len(self.errors)}  "
            f"p50 {pct(ms, 0.5):7.1f} ms  p99 {pct(ms, 0.99):7.1f} ms  "
            f"(proxy's own time p50 {pct(self.overhead, 0.5):.1f} ms, p99 {pct(self.overhead, 0.99):.1f} ms)"
        )


async def post(client: httpx.AsyncClient, messages: list[Any], tally: Tally) -> dict[str, Any] | None:
    started = time.perf_counter()
    try:
        response = await client.post(
            "/v1/chat/completions", json={"model": "gpt", "messages": messages, "tools": TOOLS}
        )
    except httpx.HTTPError as exc:
        tally.errors.append(f"{type(exc).__name__}: {exc}")
        return None
    tally.latencies.append((time.perf_counter() - started) * 1000)
    tally.overhead.append(float(response.headers.get("x-cablectl-overhead-ms", "nan")))
    if response.status_code != 200:
        tally.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
        return None
    return orjson.loads(response.content)  # type: ignore[no-any-return]


async def fast_request(client: httpx.AsyncClient, tally: Tally) -> None:
    body = await post(client, [{"role": "user", "content": "Weather in Paris and Rome?"}], tally)
    if body is not None and len(body["choices"][0]["message"].get("tool_calls") or []) != 2:
        tally.errors.append(f"expected two tool_calls, got {body['choices'][0]['message']}")


async def kernel_session(client: httpx.AsyncClient, tally: Tally) -> None:
    messages: list[Any] = [{"role": "user", "content": "Which city is hotter?"}]
    body = await post(client, messages, tally)
    if tally.latencies:
        tally.first.append(tally.latencies[-1])
    while body is not None and body["choices"][0]["finish_reason"] == "tool_calls":
        message = body["choices"][0]["message"]
        messages.append(message)
        messages += [
            {
                "role": "tool",
                "tool_call_id": c["id"],
                "content": str(TEMPS[orjson.loads(c["function"]["arguments"])["city"]]),
            }
            for c in message["tool_calls"]
        ]
        body = await post(client, messages, tally)
    if body is not None and body["choices"][0]["message"]["content"] != "Rome.":
        tally.errors.append(f"unexpected answer {body['choices'][0]['message']['content']!r}")


async def phase(base: str, job: Any, count: int, concurrency: int, deadline: float) -> tuple[Tally, float]:
    tally = Tally()
    todo = list(range(count))
    async with httpx.AsyncClient(
        base_url=base, timeout=120, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def worker() -> None:
            while todo and time.monotonic() < deadline:
                todo.pop()
                await job(client, tally)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    if todo:
        tally.errors.append(f"{len(todo)} not run: --max-seconds reached")
    return tally, wall


def start_proxy(config: Path) -> subprocess.Popen[bytes]:
    """``cablectl serve``; its log goes to ``proxy.log`` beside the config (printed on errors)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CABLECTL_", "OPENAI_"))}
    with (config.parent / "proxy.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_ready(proxy: subprocess.Popen[bytes], base: str, deadline: float) -> bool:
    while proxy.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False


def gauges(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics").text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("cablectl_kernels{", "cablectl_sessions_active ")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def replays(base: str) -> float:
    """Sessions replayed onto a fresh kernel so far (every reason)."""
    text = httpx.get(base + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cablectl_session_replays_total{")
    )


def wait_idle(base: str, deadline: float) -> dict[str, float]:
    while True:
        seen = gauges(base)
        if seen.get('cablectl_kernels{state="busy"}', 1) == 0 or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


async def main(requests: int, sessions: int, max_seconds: float, starts: list[str]) -> int:
    deadline = time.monotonic() + max_seconds
    upstream = Responder()
    with UvicornThread(upstream, lifespan="off") as up:
        proxies: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        for start in starts:
            port = free_port()
            config = {
                "model_list": [
                    {
                        "model_name": "gpt",
                        "litellm_params": {"model": "openai/gpt", "api_base": up.url + "/v1"},
                    }
                ],
                "kernels": {
                    "min_idle": 8,
                    "max_total": 24,
                    "acquire_timeout": 120,
                    "session_idle_seconds": 2,
                    "start": start,
                },
                "sessions": {"ttl_seconds": SESSION_TTL},
                "server": {"log_level": "warning", "port": port},
            }
            path = Path(tempfile.mkdtemp()) / "config.yaml"
            path.write_text(yaml.safe_dump(config))
            proxies[start] = (start_proxy(path), f"http://127.0.0.1:{port}")
        failed = 0
        summary: dict[str, list[tuple[float, float]]] = {start: [] for start in starts}
        try:
            for start, (proxy, base) in proxies.items():
                if not wait_ready(proxy, base, deadline):
                    print(f"the proxy ({start}) did not start")
                    return 1
            memory: dict[str, list[tuple[str, float]]] = {}
            for _, base in proxies.values():
                # warm-up: connections, caches, the grammar and toolset caches, the first kernels
                upstream.program = STATIC
                await phase(base, fast_request, 100, 10, deadline)
                upstream.program = KERNEL
                await phase(base, kernel_session, 20, 10, deadline)
                wait_idle(base, deadline)
            await asyncio.sleep(SESSION_TTL + 2)  # the warm-up's sessions expire and are purged
            for start, (proxy, _) in proxies.items():
                memory[start] = [("after warm-up", rss_mib(proxy.pid))]
            print(
                "load against cablectl serve, scripted upstream, loopback; kernels.start: "
                + ", ".join(starts)
            )
            for round_ in (1, 2):
                for start, (proxy, base) in proxies.items():
                    upstream.program = STATIC
                    cpu = process_cpu_seconds(proxy.pid, children=False)
                    fast, wall = await phase(base, fast_request, requests, 50, deadline)
                    print(fast.line(f"round {round_} {start}: fast path, c=50", wall, requests, "requests"))
                    print(
                        f"    proxy CPU per request {(process_cpu_seconds(proxy.pid, children=False) - cpu) / requests * 1000:.2f} ms"
                    )
                    upstream.program = KERNEL
                    cpu, tree, machine = (
                        process_cpu_seconds(proxy.pid, children=False),
                        tree_cpu_seconds(proxy.pid),
                        machine_cpu_seconds(),
                    )
                    own, replayed = time.process_time(), replays(base)
                    kernel, wall = await phase(base, kernel_session, sessions, 20, deadline)
                    replayed = replays(base) - replayed
                    tree, machine = tree_cpu_seconds(proxy.pid) - tree, machine_cpu_seconds() - machine
                    own = time.process_time() - own
                    print(
                        kernel.line(
                            f"round {round_} {start}: kernel path (3 requests each), c=20",
                            wall,
                            sessions,
                            "sessions",
                        )
                    )
                    print(
                        f"    replays {replayed:.0f};  first step (takes a kernel) p50 {pct(kernel.first, 0.5):.1f} ms  "
                        f"p99 {pct(kernel.first, 0.99):.1f} ms;  proxy CPU per session "
                        f"{(process_cpu_seconds(proxy.pid, children=False) - cpu) / sessions * 1000:.2f} ms (kernel processes not included)"
                    )
                    print(
                        f"    CPU per session: whole machine {machine / sessions * 1000:.1f} ms (busy "
                        f"{machine / wall / (os.cpu_count() or 1):.0%}), of which the proxy's process tree "
                        f"{tree / sessions * 1000:.1f} ms (kernels orphaned by a kill escape it) and this "
                        f"bench's client and upstream {own / sessions * 1000:.1f} ms"
                    )
                    summary[start].append((sessions / wall, pct(kernel.first, 0.99)))
                    for tally in (fast, kernel):
                        failed += len(tally.errors)
                        for error in tally.errors[:5]:
                            print(f"    error: {error}")
                    if fast.errors or kernel.errors:
                        print(f"    the proxy's log: {Path(str(proxy.args[-1])).parent / 'proxy.log'}")
                    idle = wait_idle(base, deadline)
                    print(f"    pool after sessions idled out: {idle}")
                    if idle.get('cablectl_kernels{state="busy"}', 1) != 0:
                        print("    the pool did not return to idle")
                        failed += 1
                await asyncio.sleep(SESSION_TTL + 2)
                for start, (proxy, _) in proxies.items():
                    memory[start].append((f"after round {round_}", rss_mib(proxy.pid)))
            for start in starts:
                rounds = memory[start]
                print(f"  proxy RSS ({start}): " + ", ".join(f"{name} {mib:.1f} MiB" for name, mib in rounds))
                growth = rounds[2][1] - rounds[1][1]
                print(
                    f"  RSS growth from round 1 to round 2 ({start}): {growth:+.1f} MiB ({growth / rounds[1][1]:+.1%})"
                )
            if "fork" in summary and "spawn" in summary:
                rate = {s: max(r for r, _ in v) for s, v in summary.items()}
                first = {s: max(p for _, p in v) for s, v in summary.items()}
                print(
                    f"  kernel path at c=20: fork {rate['fork']:.1f} sessions/s vs spawn {rate['spawn']:.1f} "
                    f"({rate['fork'] / rate['spawn']:.1f}x; target >= 4x); first step p99 fork "
                    f"{first['fork']:.0f} ms vs spawn {first['spawn']:.0f} ms (target: fork <= 1000 ms)"
                )
        finally:
            for proxy, _ in proxies.values():
                proxy.send_signal(signal.SIGTERM)
            for proxy, _ in proxies.values():
                try:
                    proxy.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proxy.kill()
    print(f"errors: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=1800)
    parser.add_argument("--starts", default="fork,spawn", help="kernels.start modes, one proxy each")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.requests, args.sessions, args.max_seconds, args.starts.split(","))))
