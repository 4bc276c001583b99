"""What streaming through the action loop adds, against pass-through, side by side in one run.

A paced upstream streams one chunk every ``--pace`` ms; it, ``cablectl serve`` and the client
(this process) each run as their own process, and the upstream writes when it sent each
chunk (``time.monotonic``, one clock for every process on Linux) to a file the client reads. The same replies go two ways:
with ``tools`` (the action loop reads the model's output as it streams) and without (pass-through:
the upstream's bytes forwarded). Two replies:

- ``answer``: a text answer of 24 words. Measured: time to the first content byte at the client.
- ``action``: a thought, then a ```python block of two independent calls. Measured: time to the
  first content byte (the thought), and for each call statement, the time from the upstream
  sending its last byte to the client receiving its ``tool_calls`` delta (pass-through: to the
  client receiving that same text as content).

Added = loop percentile minus pass-through percentile, at concurrency 1 and 32. Asserts nothing.

    .venv/bin/python bench/stream.py [--requests 64] [--rounds 3] [--pace 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import process  # noqa: E402
from bench.stats import pct  # noqa: E402
from tests.servers import free_port  # noqa: E402

WORDS = [f"word{i} " for i in range(24)]
ACTION = [
    "Let ",
    "me ",
    "check ",
    "both ",
    "cities.\n\n",
    "```python\n",
    'get_weather(city="Paris")\n',
    'get_weather(city="Rome")\n',
    "```",
]
STATEMENT_CHUNKS = (6, 7)  # indexes in ACTION of the chunks that complete a call statement
TOOLS = [
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
    }
]


class PacedUpstream:
    """Streams ``answer`` or ``action`` (named in the last user message with a request id),
    one chunk per ``pace`` seconds, and records when it sent each chunk (time.monotonic)."""

    def __init__(self, pace: float, stamps: Path) -> None:
        self.pace = pace
        self._stamps = stamps.open("a", buffering=1)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] != "POST":  # a readiness probe
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        request = orjson.loads(body)
        last = next(m for m in reversed(request["messages"]) if m["role"] == "user")["content"]
        kind, request_id = str(last).split()[-2:]
        pieces = WORDS if kind == "answer" else ACTION
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench"}
        stamps: list[float] = []
        role = {
            **base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        }
        await send(
            {
                "type": "http.response.body",
                "body": b"data: " + orjson.dumps(role) + b"\n\n",
                "more_body": True,
            }
        )
        for piece in pieces:
            await asyncio.sleep(self.pace)
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                    "more_body": True,
                }
            )
            stamps.append(time.monotonic())
        end = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        usage = {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": len(pieces), "total_tokens": 9 + len(pieces)},
        }
        tail = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in (end, usage)) + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        self._stamps.write(json.dumps([request_id, stamps]) + "\n")


def read_stamps(path: Path) -> dict[str, list[float]]:
    return {
        rid: stamps for rid, stamps in (json.loads(line) for line in path.read_text().splitlines() if line)
    }


async def _one(
    session: aiohttp.ClientSession, url: str, kind: str, request_id: str, loop: bool
) -> dict[str, float]:
    body: dict[str, Any] = {
        "model": "bench",
        "messages": [{"role": "user", "content": f"Please {kind} {request_id}"}],
        "stream": True,
    }
    if loop:
        body["tools"] = TOOLS
    marks: dict[str, float] = {}
    started = time.monotonic()
    content = ""
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        buffer = b""
        async for data in response.content.iter_any():
            now = time.monotonic()
            buffer += data
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                if not frame.startswith(b"data: ") or frame == b"data: [DONE]":
                    continue
                chunk = json.loads(frame[6:])
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        marks.setdefault("first", now - started)
                        content += delta["content"]
                        for i, needle in enumerate(('"Paris")\n', '"Rome")\n')):
                            if needle in content:
                                marks.setdefault(f"call{i}", now)
                    for call in delta.get("tool_calls") or []:
                        if call.get("id"):
                            marks.setdefault(f"call{call['index']}", now)
    return marks


async def _batch(
    url: str, kind: str, loop: bool, n: int, concurrency: int, stamps_file: Path, tag: str
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"first": [], "call0": [], "call1": []}
    ids = [f"{tag}-{i}" for i in range(n)]
    marks_of: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            while ids:
                request_id = ids.pop()
                marks_of[request_id] = await _one(session, url, kind, request_id, loop)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    await asyncio.sleep(0.05)  # the upstream's last stamps are written after its last chunk
    sent = read_stamps(stamps_file)
    for request_id, marks in marks_of.items():
        out["first"].append(marks["first"] * 1000)
        for i, chunk_index in enumerate(STATEMENT_CHUNKS if kind == "action" else ()):
            out[f"call{i}"].append((marks[f"call{i}"] - sent[request_id][chunk_index]) * 1000)
    return out


def serve_upstream(port: int, pace: float, stamps: Path) -> None:
    import uvicorn

    uvicorn.run(
        PacedUpstream(pace, stamps),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64, help="requests per path, per round, per case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pace", type=float, default=5.0, help="ms between upstream chunks")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)  # PORT: be the upstream
    parser.add_argument("--stamps", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.pace / 1000, args.stamps)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="cablectl-stream-bench-"))
    stamps = tmp / "stamps.jsonl"
    up_port, port = free_port(), free_port()
    up_url = f"http://127.0.0.1:{up_port}"
    config = {
        "model_list": [
            {"model_name": "bench", "litellm_params": {"model": "openai/bench", "api_base": up_url + "/v1"}}
        ],
        "kernels": {"min_idle": 1, "max_total": 4},
        "server": {"log_level": "warning"},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    cablectl = str(Path(sys.executable).with_name("cablectl"))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results: dict[tuple[str, int, bool], dict[str, list[float]]] = {}
    upstream_cmd = [
        sys.executable,
        __file__,
        "--serve-upstream",
        str(up_port),
        "--pace",
        str(args.pace),
        "--stamps",
        str(stamps),
    ]
    serve_cmd = [cablectl, "serve", "--config", str(tmp / "config.yaml"), "--port", str(port)]
    cases = [(kind, c) for kind in ("answer", "action") for c in (1, 32)]
    with process(upstream_cmd, up_url + "/"), process(serve_cmd, f"http://127.0.0.1:{port}/ready"):
        for kind, concurrency in cases:  # warm up
            for loop in (False, True):
                asyncio.run(
                    _batch(url, kind, loop, 8, concurrency, stamps, f"warm-{kind}-{concurrency}-{loop}")
                )
        for r in range(args.rounds):
            for kind, concurrency in cases:
                for loop in (False, True):
                    tag = f"{r}-{kind}-{concurrency}-{loop}"
                    got = asyncio.run(_batch(url, kind, loop, args.requests, concurrency, stamps, tag))
                    cell = results.setdefault(
                        (kind, concurrency, loop), {"first": [], "call0": [], "call1": []}
                    )
                    for key, values in got.items():
                        cell[key].extend(values)
    print(
        f"pace {args.pace} ms/chunk; {args.requests * args.rounds} requests per cell; ms; added = loop - pass-through"
    )
    print(
        f"{'case':<16}{'metric':<22}{'pass p50':>10}{'p99':>8}{'loop p50':>10}{'p99':>8}{'added p50':>11}{'p99':>8}"
    )
    for kind, concurrency in cases:
        metrics = [("first", "first content byte")] + (
            [("call0", "call 1: byte -> delta"), ("call1", "call 2: byte -> delta")]
            if kind == "action"
            else []
        )
        for key, label in metrics:
            p = results[(kind, concurrency, False)][key]
            lo = results[(kind, concurrency, True)][key]
            p50, p99, l50, l99 = pct(p, 0.5), pct(p, 0.99), pct(lo, 0.5), pct(lo, 0.99)
            print(
                f"{kind + f' c={concurrency}':<16}{label:<22}{p50:>10.2f}{p99:>8.2f}{l50:>10.2f}{l99:>8.2f}{l50 - p50:>11.2f}{l99 - p99:>8.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
