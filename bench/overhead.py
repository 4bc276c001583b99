"""Added latency of cablectl against a direct call and against LiteLLM's proxy, in one run.

Three servers run as separate processes on loopback: the scripted upstream,
``cablectl serve`` and ``litellm --config`` (from the bench environment, see
bench/README.md). The same requests go three ways, interleaved in rounds so
drift hits all three alike, at concurrency 1 and 32, streaming and not.
Added latency = a path's percentile minus the direct path's. Prints a table and
the ratio cablectl/LiteLLM; asserts nothing about time.

    .venv/bin/python bench/overhead.py [--requests 400] [--rounds 4] [--litellm .venv-bench/bin/litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stats import pct  # noqa: E402
from tests.servers import free_port  # noqa: E402

BODY = {
    "model": "bench",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Reply with a greeting."},
    ],
    "max_tokens": 16,
}


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready")


@contextmanager
def process(args: list[str], ready_url: str, env: dict[str, str] | None = None) -> Iterator[None]:
    proc = subprocess.Popen(
        args, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_ready(ready_url, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _one(session: aiohttp.ClientSession, url: str, stream: bool) -> float:
    body = {**BODY, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    async with session.post(url, json=body, headers={"authorization": "Bearer sk-bench"}) as response:
        data = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {data[:200]!r}")
        if stream and not data.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"{url}: stream did not finish")
    return (time.perf_counter() - started) * 1000


async def _batch(url: str, n: int, concurrency: int, stream: bool) -> list[float]:
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    out: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = list(range(n))

        async def worker() -> None:
            while queue:
                queue.pop()
                out.append(await _one(session, url, stream))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400, help="requests per path, per round, per case")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--litellm", default=str(ROOT / ".venv-bench" / "bin" / "litellm"))
    args = parser.parse_args()
    litellm_bin = args.litellm if Path(args.litellm).exists() else shutil.which("litellm")
    if not litellm_bin:
        print("LiteLLM's proxy is not installed: run bench/setup first", file=sys.stderr)
        return 2

    ports = {name: free_port() for name in ("upstream", "cablectl", "litellm")}
    upstream_base = f"http://127.0.0.1:{ports['upstream']}/v1"
    tmp = Path(tempfile.mkdtemp(prefix="cablectl-bench-"))
    model_list = [
        {
            "model_name": "bench",
            "litellm_params": {"model": "openai/bench", "api_base": upstream_base, "api_key": "sk-up"},
        }
    ]
    # both proxies check the same API key, as they would in production
    (tmp / "cablectl.yaml").write_text(
        yaml.safe_dump(
            {
                "model_list": model_list,
                "keys": [{"id": "bench", "key": "sk-bench"}],
                "server": {"log_level": "warning"},
            }
        )
    )
    (tmp / "litellm.yaml").write_text(
        yaml.safe_dump(
            {
                "model_list": model_list,
                "general_settings": {"master_key": "sk-bench"},
                "litellm_settings": {"set_verbose": False, "telemetry": False},
            }
        )
    )
    quiet = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    python = sys.executable
    cablectl = str(Path(python).with_name("cablectl"))
    targets = {
        "direct": f"{upstream_base}/chat/completions",
        "cablectl": f"http://127.0.0.1:{ports['cablectl']}/v1/chat/completions",
        "litellm": f"http://127.0.0.1:{ports['litellm']}/v1/chat/completions",
    }
    cases = [(c, s) for c in (1, 32) for s in (False, True)]
    results: dict[tuple[int, bool, str], list[float]] = {}
    with (
        process(
            [python, str(ROOT / "bench" / "upstream_server.py"), str(ports["upstream"])],
            f"{upstream_base}/models",
        ),
        process(
            [cablectl, "serve", "--config", str(tmp / "cablectl.yaml"), "--port", str(ports["cablectl"])],
            f"http://127.0.0.1:{ports['cablectl']}/ready",
        ),
        process(
            [
                litellm_bin,
                "--config",
                str(tmp / "litellm.yaml"),
                "--port",
                str(ports["litellm"]),
                "--num_workers",
                "1",
            ],
            f"http://127.0.0.1:{ports['litellm']}/health/liveliness",
            env=quiet,
        ),
    ):
        for concurrency, stream in cases:
            for url in targets.values():  # warm up connections and caches
                asyncio.run(_batch(url, 50, concurrency, stream))
            for _ in range(args.rounds):
                for name, url in targets.items():
                    results.setdefault((concurrency, stream, name), []).extend(
                        asyncio.run(_batch(url, args.requests, concurrency, stream))
                    )

    print(f"requests per cell: {args.requests * args.rounds}; latency in ms; added = path - direct")
    header = (
        f"{'case':<22}{'direct p50':>11}{'p99':>8}{'cablectl +p50':>15}{'+p99':>8}"
        f"{'litellm +p50':>14}{'+p99':>8}{'ratio p50':>11}"
    )
    print(header)
    for concurrency, stream in cases:
        d = results[(concurrency, stream, "direct")]
        c = results[(concurrency, stream, "cablectl")]
        llm = results[(concurrency, stream, "litellm")]
        d50, d99 = pct(d, 0.5), pct(d, 0.99)
        c50, c99 = pct(c, 0.5) - d50, pct(c, 0.99) - d99
        l50, l99 = pct(llm, 0.5) - d50, pct(llm, 0.99) - d99
        ratio = c50 / l50 if l50 > 0 else float("nan")
        label = f"c={concurrency} {'stream' if stream else 'plain'}"
        print(
            f"{label:<22}{d50:>11.2f}{d99:>8.2f}{c50:>15.2f}{c99:>8.2f}{l50:>14.2f}{l99:>8.2f}{ratio:>11.3f}"
        )
        means = f"mean direct {statistics.fmean(d):.2f}, cablectl {statistics.fmean(c):.2f}"
        print(f"{'':<22}({means}, litellm {statistics.fmean(llm):.2f})")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
