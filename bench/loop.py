"""The action loop's own cost, measured against a scripted upstream in one run:

- proxy time per step, model time excluded (the ``x-cablectl-overhead-ms`` header:
  total minus time waiting on the upstream), for a fast-path step (a static program
  becomes tool_calls, no kernel) and a kernel-path step (a tool result resumes a
  program, which runs on to its next tool call);
- sessions per second at concurrency 32, fast path and kernel path;
- LLM round trips for a multi-step task, code actions against JSON function calling.

    .venv/bin/python bench/loop.py [--sessions 96]

Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
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

from bench.stats import pct  # noqa: E402
from proxy.app import create_app  # noqa: E402
from proxy.config import load_settings  # noqa: E402
from tests.servers import UvicornThread  # noqa: E402
from tests.upstream import Reply, ScriptedUpstream, canned_completion  # noqa: E402

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "to_fahrenheit",
            "parameters": {
                "type": "object",
                "properties": {"celsius": {"type": "number"}},
                "required": ["celsius"],
            },
        },
    },
]
CITIES = ["Paris", "Rome", "Oslo", "Cairo", "Lima"]
TEMPS = {"Paris": 18, "Rome": 24, "Oslo": 9, "Cairo": 31, "Lima": 20}
STATIC = '```python\nget_weather(city="Paris")\nget_weather(city="Rome")\n```'
KERNEL = "```python\nt = {c: get_weather(city=c) for c in ['Paris', 'Rome']}\nprint(max(t, key=t.get))\n```"
TASK = (
    "```python\n"
    f"temps = {{c: get_weather(city=c) for c in {CITIES!r}}}\n"
    "hottest = max(temps, key=temps.get)\n"
    "print(hottest, to_fahrenheit(celsius=temps[hottest]))\n"
    "```"
)


class Responder(ScriptedUpstream):
    """Answers by what it is asked: the program for a question, a final answer after an observation."""

    program = STATIC

    def _default(self, body: bytes) -> Reply:  # type: ignore[override]
        last = orjson.loads(body)["messages"][-1]
        content = str(last.get("content") or "")
        done = last.get("role") == "tool" or content.startswith("Observation")
        return Reply(json=canned_completion("scripted", "Rome." if done else self.program))


def reply(content: str, tool_calls: list[dict[str, Any]] | None = None) -> Reply:
    body = canned_completion("scripted", content)
    if tool_calls:
        body["choices"][0]["message"]["tool_calls"] = tool_calls
        body["choices"][0]["finish_reason"] = "tool_calls"
    return Reply(json=body)


async def post(client: httpx.AsyncClient, model: str, messages: list[Any]) -> tuple[dict[str, Any], float]:
    response = await client.post(
        "/v1/chat/completions", json={"model": model, "messages": messages, "tools": TOOLS}
    )
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    return orjson.loads(response.content), float(response.headers["x-cablectl-overhead-ms"])


async def session(client: httpx.AsyncClient, steps: dict[str, list[float]]) -> None:
    """One conversation to its final answer, answering every tool call."""
    messages: list[Any] = [{"role": "user", "content": "Which city is hotter?"}]
    body, overhead = await post(client, "gpt", messages)
    steps["first"].append(overhead)
    while body["choices"][0]["finish_reason"] == "tool_calls":
        message = body["choices"][0]["message"]
        messages.append(message)
        calls = message["tool_calls"]
        messages += [
            {
                "role": "tool",
                "tool_call_id": c["id"],
                "content": str(TEMPS[orjson.loads(c["function"]["arguments"])["city"]]),
            }
            for c in calls
        ]
        body, overhead = await post(client, "gpt", messages)
        steps["resume"].append(overhead)


async def run_sessions(
    base: str, upstream: Responder, program: str, n: int, concurrency: int
) -> tuple[float, dict[str, list[float]]]:
    upstream.program = program
    upstream.reset()
    steps: dict[str, list[float]] = {"first": [], "resume": []}
    queue = list(range(n))
    async with httpx.AsyncClient(
        base_url=base, timeout=120, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def worker() -> None:
            while queue:
                queue.pop()
                await session(client, steps)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return n / elapsed, steps


async def round_trips(base: str, upstream: ScriptedUpstream) -> tuple[int, int]:
    """LLM calls for: the hottest of five cities, converted to Fahrenheit, then an answer."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        # JSON function calling (code actions off): 5 parallel calls, then the conversion, then the answer
        upstream.reset()
        calls = [
            {
                "id": f"c{i}",
                "type": "function",
                "function": {"name": "get_weather", "arguments": orjson.dumps({"city": c}).decode()},
            }
            for i, c in enumerate(CITIES)
        ]
        convert = [
            {
                "id": "c9",
                "type": "function",
                "function": {"name": "to_fahrenheit", "arguments": '{"celsius": 31}'},
            }
        ]
        upstream.plan(reply("", calls), reply("", convert), reply("Cairo, 87.8F."))
        messages: list[Any] = [{"role": "user", "content": "Hottest of five cities, in F?"}]
        for planned in (calls, convert):
            await client.post(
                "/v1/chat/completions", json={"model": "json-fc", "messages": messages, "tools": TOOLS}
            )
            messages.append({"role": "assistant", "content": None, "tool_calls": planned})
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": "31"} for c in planned]
        await client.post(
            "/v1/chat/completions", json={"model": "json-fc", "messages": messages, "tools": TOOLS}
        )
        json_fc = len(upstream.received)
        # code actions: one program does the lookups, the comparison and the conversion
        upstream.reset()
        upstream.plan(Reply(json=canned_completion("scripted", TASK)))
        messages = [{"role": "user", "content": "Hottest of five cities, in F?"}]
        while True:
            response = await client.post(
                "/v1/chat/completions", json={"model": "gpt", "messages": messages, "tools": TOOLS}
            )
            body = orjson.loads(response.content)
            choice = body["choices"][0]
            if choice["finish_reason"] != "tool_calls":
                break
            call = choice["message"]["tool_calls"][0]
            args = orjson.loads(call["function"]["arguments"])
            value = TEMPS[args["city"]] if "city" in args else args["celsius"] * 9 / 5 + 32
            messages += [
                choice["message"],
                {"role": "tool", "tool_call_id": call["id"], "content": str(value)},
            ]
            if call["function"]["name"] == "to_fahrenheit":
                upstream.plan(Reply(json=canned_completion("scripted", "Cairo, 87.8F.")))
        return json_fc, len(upstream.received)


async def warm(app: Any, n: int) -> None:
    """Wait for n idle kernels. The pool lives on the server's event loop: only read its stats here."""
    deadline = time.monotonic() + 180
    while app.state.pool.stats().idle < n and time.monotonic() < deadline:  # noqa: ASYNC110 - another loop owns the pool
        await asyncio.sleep(0.2)


async def main(sessions: int) -> None:
    upstream = Responder()
    with UvicornThread(upstream, lifespan="off") as up:
        config = {
            "model_list": [
                {"model_name": "gpt", "litellm_params": {"model": "openai/gpt", "api_base": up.url + "/v1"}},
                {
                    "model_name": "json-fc",
                    "litellm_params": {"model": "openai/gpt", "api_base": up.url + "/v1"},
                    "code_actions": False,
                },
            ],
            "kernels": {"min_idle": 8, "max_total": 34, "acquire_timeout": 120},
            "server": {"log_level": "warning"},
        }
        path = Path(tempfile.mkdtemp()) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        app = create_app(load_settings(path, env={}))
        with UvicornThread(app) as proxy:
            # c=1 first, while the pool still has room: each kernel session takes a warm kernel
            await warm(app, 8)
            _, fast_c1 = await run_sessions(proxy.url, upstream, STATIC, 40, 1)
            _, kernel_c1 = await run_sessions(proxy.url, upstream, KERNEL, 20, 1)
            fast_rate, _ = await run_sessions(proxy.url, upstream, STATIC, sessions, 32)
            await warm(app, 8)
            kernel_rate, _ = await run_sessions(proxy.url, upstream, KERNEL, sessions, 32)
            json_fc, code = await round_trips(proxy.url, upstream)
    print("action loop against a scripted upstream; proxy time = total minus upstream time")
    print(
        f"  fast path step (static program -> 2 tool_calls), c=1     p50 {pct(fast_c1['first'], 0.5):7.2f} ms  p99 {pct(fast_c1['first'], 0.99):7.2f} ms  (target p50 <= 2 ms)"
    )
    print(
        f"  kernel path step (tool result -> program -> next call), c=1 p50 {pct(kernel_c1['resume'], 0.5):7.2f} ms  p99 {pct(kernel_c1['resume'], 0.99):7.2f} ms  (target p50 <= 10 ms)"
    )
    print(
        f"  kernel path first step (program starts in a kernel), c=1   p50 {pct(kernel_c1['first'], 0.5):7.2f} ms  p99 {pct(kernel_c1['first'], 0.99):7.2f} ms"
    )
    print(
        f"  sessions/s at c=32: fast path {fast_rate:.1f}, kernel path {kernel_rate:.1f} ({sessions} sessions each)"
    )
    print(
        "    (a kernel session takes a kernel no other session has used: at c=32 a full pool means a cold start each)"
    )
    print(
        f"  LLM round trips, hottest of 5 cities in F: JSON function calling {json_fc}, code actions {code} (saved {json_fc - code})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=96)
    asyncio.run(main(parser.parse_args().sessions))
