"""The chat-completions surface's renderers: the loop's events as a ``chat.completion`` body
or as ``chat.completion.chunk`` SSE, sent as the events arrive.

Chunks follow the recorded OpenAI streams: a first chunk with the role, content deltas
for text, and for each tool call a header chunk (index, id, type, name, empty arguments)
followed by its argument fragments; then a chunk with the finish_reason, a usage chunk
when asked for, and ``[DONE]``. A failure after the stream started is a final
``data: {"error": ...}`` event. Programs the proxy runs itself are not shown on this surface.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.actions.events import (
    Event,
    Finished,
    TextDelta,
    ToolCallArguments,
    ToolCallDone,
    ToolCallStarted,
    Usage,
)

__all__ = ["ChatResult", "chat_body", "chat_chunks", "collect"]


@dataclass
class ChatResult:
    """The events of one response, gathered (a non-streamed answer)."""

    content: str = ""
    tool_calls: list[ToolCallDone] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)


async def collect(events: AsyncIterator[Event]) -> ChatResult:
    result = ChatResult()
    async for event in events:
        if isinstance(event, TextDelta):
            result.content += event.text
        elif isinstance(event, ToolCallDone):
            result.tool_calls.append(event)
        elif isinstance(event, Finished):
            result.finish_reason, result.usage = event.reason, event.usage
    return result


def chat_body(result: ChatResult, model: str) -> bytes:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": result.content or (None if result.tool_calls else ""),
        "refusal": None,
    }
    if result.tool_calls:
        message["tool_calls"] = [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.tool_calls
        ]
    return orjson.dumps(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}
            ],
            "usage": result.usage.as_dict(),
        }
    )


async def chat_chunks(events: AsyncIterator[Event], model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks as the events arrive (errors are the caller's: see ``proxy.app``)."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
    }

    # every chunk is this prefix, the delta, and this suffix: only the delta is serialized
    prefix = b"data: " + orjson.dumps({**base, "choices": [{"index": 0}]})[:-3] + b',"delta":'
    suffix = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        if finish is None:
            return prefix + orjson.dumps(delta) + suffix
        body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    started = False
    async for event in events:
        if not started and isinstance(event, TextDelta | ToolCallStarted | Finished):
            started = True
            text_first = isinstance(event, TextDelta) or (
                isinstance(event, Finished) and event.reason != "tool_calls"
            )
            yield chunk({"role": "assistant", "content": "" if text_first else None})
        if isinstance(event, TextDelta):
            yield chunk({"content": event.text})
        elif isinstance(event, ToolCallStarted):
            header = {"index": event.index, "id": event.call_id, "type": "function"}
            yield chunk({"tool_calls": [{**header, "function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, ToolCallArguments):
            yield chunk({"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]})
        elif isinstance(event, Finished):
            yield chunk({}, event.reason)
            if include_usage:
                yield (
                    b"data: "
                    + orjson.dumps({**base, "choices": [], "usage": event.usage.as_dict()})
                    + b"\n\n"
                )
            yield b"data: [DONE]\n\n"
