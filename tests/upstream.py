"""A scripted OpenAI-compatible upstream: replays planned responses, records requests.

Plan responses with ``plan(...)``; with nothing planned it answers a canned
completion (or a canned stream when asked to stream). Every request it gets is
kept in ``received`` as (path, headers, raw body).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "Hang",
    "Received",
    "Reply",
    "ScriptedUpstream",
    "Stream",
    "canned_completion",
    "load_recording",
    "text_stream",
]

SSE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "openai-sse"


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    body: bytes | None = None
    delay: float = 0.0

    def payload(self) -> bytes:
        return self.body if self.body is not None else orjson.dumps(self.json)


@dataclass
class Stream:
    chunks: list[bytes]
    delay: float = 0.0
    status: int = 200
    truncate: bool = False  # drop the connection instead of finishing the body
    gate: threading.Event | None = None  # after chunk ``gate_after``, wait for the test to set it
    gate_after: int = 0


@dataclass
class Hang:
    seconds: float


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


def canned_completion(model: str, content: str = "Hello from upstream.") -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 1727346171,
        "model": model,
        "system_fingerprint": "fp_scripted",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    }


def text_stream(model: str, words: list[str], include_usage: bool = True) -> list[bytes]:
    base = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": 1727346171,
        "model": model,
    }

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        obj = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    out = [chunk({"role": "assistant", "content": ""}, None)]
    out += [chunk({"content": w}, None) for w in words]
    out.append(chunk({}, "stop"))
    if include_usage:
        usage = {"prompt_tokens": 9, "completion_tokens": len(words), "total_tokens": 9 + len(words)}
        out.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def load_recording(name: str) -> list[bytes]:
    """A recorded OpenAI SSE stream from ../shared/data/openai-sse, split into its events."""
    raw = (SSE_DIR / name).read_bytes()
    return [part + b"\n\n" for part in raw.split(b"\n\n") if part.strip()]


@dataclass
class ScriptedUpstream:
    """An ASGI app. Thread-safe: tests plan from one thread, uvicorn serves from another."""

    planned: collections.deque[Reply | Stream | Hang] = field(default_factory=collections.deque)
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, *responses: Reply | Stream | Hang) -> None:
        with self._lock:
            self.planned.extend(responses)

    def reset(self) -> None:
        with self._lock:
            self.planned.clear()
            self.received.clear()

    def _next(self) -> Reply | Stream | Hang | None:
        with self._lock:
            return self.planned.popleft() if self.planned else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        with self._lock:
            self.received.append(Received(scope["path"], headers, body))
        action = self._next()
        if action is None:
            action = self._default(body)
        if isinstance(action, Hang):
            await asyncio.sleep(action.seconds)
            action = Reply(json=canned_completion("late"))
        if isinstance(action, Reply):
            if action.delay:
                await asyncio.sleep(action.delay)
            payload = action.payload()
            await send(
                {
                    "type": "http.response.start",
                    "status": action.status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        await send(
            {
                "type": "http.response.start",
                "status": action.status,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i, chunk in enumerate(action.chunks):
            if action.delay and i:
                await asyncio.sleep(action.delay)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if action.gate is not None and i == action.gate_after:
                deadline = time.monotonic() + 30
                # the gate is a threading.Event set from the test's thread: poll it
                while not action.gate.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
            if action.truncate and i == len(action.chunks) // 2:
                raise ConnectionAbortedError("scripted truncation")
        await send({"type": "http.response.body", "body": b""})

    def _default(self, body: bytes) -> Reply | Stream:
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return Reply(status=400, json={"error": {"message": "bad json", "type": "invalid_request_error"}})
        model = str(request.get("model", "scripted"))
        if request.get("stream"):
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            return Stream(text_stream(model, ["Hello", " from", " upstream."], include_usage=usage))
        return Reply(json=canned_completion(model))


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)
