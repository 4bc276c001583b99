"""A chat-completions answer as the loop's neutral events, so that the Responses and
Messages renderers also serve requests that go to the upstream as they are (no tools).

``events_from_chat_body`` reads a whole ``chat.completion``; ``events_from_chat_sse`` reads
``chat.completion.chunk`` SSE bytes as they arrive (split anywhere), tool-call deltas
included. Both end with ``Finished`` (the finish reason mapped, the usage the upstream
reported). An ``error`` object, a body or frame that is not JSON, or a stream that ends
before ``[DONE]`` or a finish reason, is an ``UpstreamError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.actions.events import (
    Event,
    Finished,
    FinishReason,
    TextDelta,
    ToolCallArguments,
    ToolCallDone,
    ToolCallStarted,
    Usage,
)
from proxy.errors import UpstreamError

__all__ = ["events_from_chat_body", "events_from_chat_sse"]

_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "stop",
}


def _object(payload: bytes, model_name: str) -> dict[str, Any]:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"The upstream for model {model_name!r} sent a reply that is not JSON") from exc
    if not isinstance(data, dict):
        raise UpstreamError(f"The upstream for model {model_name!r} sent a reply that is not a JSON object")
    error = data.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else error
        raise UpstreamError(f"The upstream for model {model_name!r} failed: {message}")
    return data


def _usage(data: dict[str, Any]) -> Usage:
    usage = Usage()
    if isinstance(data.get("usage"), dict):
        usage.add(data["usage"])
    return usage


def _reason(raw: Any, calls: int) -> FinishReason:
    reason = _REASONS.get(raw) if isinstance(raw, str) else None
    return reason or ("tool_calls" if calls else "stop")


async def events_from_chat_body(body: bytes, model_name: str) -> AsyncIterator[Event]:
    """The events of one ``chat.completion`` body."""
    data = _object(body, model_name)
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    if message.get("content"):
        yield TextDelta(str(message["content"]))
    calls = message.get("tool_calls") or []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        name, arguments = str(function.get("name", "")), str(function.get("arguments") or "")
        yield ToolCallStarted(index, str(call.get("id", "")), name)
        if arguments:
            yield ToolCallArguments(index, arguments)
        yield ToolCallDone(index, str(call.get("id", "")), name, arguments)
    yield Finished(_reason(choice.get("finish_reason"), len(calls)), _usage(data))


@dataclass
class _Call:
    id: str = ""
    name: str = ""
    arguments: str = ""
    started: bool = False


@dataclass
class _Chunks:
    """The state of one streamed completion: tool calls by index, the finish reason, usage."""

    model_name: str
    calls: dict[int, _Call] = field(default_factory=dict)
    reason: Any = None
    usage: Usage = field(default_factory=Usage)
    done: bool = False

    def frame(self, frame: bytes) -> Iterator[Event]:
        lines = [line[5:].lstrip(b" ") for line in frame.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            return  # a comment, an event name alone, a keep-alive
        payload = b"\n".join(lines)
        if payload.strip() == b"[DONE]":
            self.done = True
            return
        chunk = _object(payload, self.model_name)
        if chunk.get("usage"):
            self.usage = _usage(chunk)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0):
                continue  # n > 1: only the first choice is rendered
            yield from self.delta(choice.get("delta") or {})
            if choice.get("finish_reason"):
                self.reason = choice["finish_reason"]

    def delta(self, delta: dict[str, Any]) -> Iterator[Event]:
        if delta.get("content"):
            yield TextDelta(str(delta["content"]))
        for part in delta.get("tool_calls") or ():
            index = int(part.get("index", 0))
            call = self.calls.setdefault(index, _Call())
            function = part.get("function") or {}
            call.id = call.id or str(part.get("id") or "")
            call.name = call.name or str(function.get("name") or "")
            fragment = str(function.get("arguments") or "")
            call.arguments += fragment
            if not call.started and call.name:
                call.started = True
                yield ToolCallStarted(index, call.id, call.name)
                fragment = call.arguments  # what came before the name, too
            if call.started and fragment:
                yield ToolCallArguments(index, fragment)

    def finish(self) -> Iterator[Event]:
        for index, call in sorted(self.calls.items()):
            if not call.started:
                yield ToolCallStarted(index, call.id, call.name)
            yield ToolCallDone(index, call.id, call.name, call.arguments)
        yield Finished(_reason(self.reason, len(self.calls)), self.usage)


async def events_from_chat_sse(chunks: AsyncIterable[bytes], model_name: str) -> AsyncIterator[Event]:
    """The events of a ``chat.completion.chunk`` stream, as its frames complete."""
    state = _Chunks(model_name)
    buffer = b""
    framed = False
    async for data in chunks:
        buffer = (buffer + data).replace(b"\r\n", b"\n")
        *frames, buffer = buffer.split(b"\n\n")
        framed = framed or bool(frames)
        for frame in frames:
            for event in state.frame(frame):
                yield event
            if state.done:
                break
        if state.done:
            break
    if not framed and buffer.lstrip().startswith(b"{"):
        # a server that ignores "stream" and answers one chat.completion body
        async for event in events_from_chat_body(buffer, model_name):
            yield event
        return
    if not state.done and buffer.strip():
        for event in state.frame(buffer):  # a last frame without its blank line
            yield event
    if not state.done and state.reason is None:
        raise UpstreamError(f"The upstream for model {model_name!r} ended its stream before it finished")
    for event in state.finish():
        yield event
