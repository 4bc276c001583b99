"""A loop result as an OpenAI response: a ``chat.completion`` body or SSE chunks.

Chunks follow the recorded OpenAI streams: a first chunk with the role, content
deltas for text, and for each tool call a header chunk (index, id, type, name,
empty arguments) followed by argument fragments; then a chunk with the
finish_reason, a usage chunk when asked for, and ``[DONE]``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from proxy.actions.loop import LoopResult

__all__ = ["completion_body", "completion_chunks"]

ARGUMENT_FRAGMENT = 24  # characters of arguments per delta, as OpenAI's streams split them


def _message(result: LoopResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.content, "refusal": None}
    if result.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.tool_calls
        ]
    return message


def completion_body(result: LoopResult, model: str) -> bytes:
    return orjson.dumps(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": _message(result),
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": result.usage,
        }
    )


def completion_chunks(result: LoopResult, model: str, include_usage: bool) -> Iterator[bytes]:
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    yield chunk(
        {"role": "assistant", "content": "" if result.content is not None or not result.tool_calls else None}
    )
    if result.content:
        yield chunk({"content": result.content})
    for index, call in enumerate(result.tool_calls):
        yield chunk(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
        )
        for start in range(0, len(call.arguments), ARGUMENT_FRAGMENT):
            fragment = call.arguments[start : start + ARGUMENT_FRAGMENT]
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
    yield chunk({}, result.finish_reason)
    if include_usage:
        yield b"data: " + orjson.dumps({**base, "choices": [], "usage": result.usage}) + b"\n\n"
    yield b"data: [DONE]\n\n"
