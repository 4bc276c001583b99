"""Reading an upstream's chat-completions stream: SSE frames -> text deltas and usage.

Used by the action loop's generations on OpenAI-compatible upstreams. Tolerant of
what real servers do: ``\\r\\n`` line ends, comments and keep-alives, several
``data:`` lines per event, a final usage chunk with no choices, a server that
ignores ``stream: true`` and answers one JSON body. An ``error`` object in the
stream, or a frame that is not JSON, is an ``UpstreamError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.errors import UpstreamError

__all__ = ["ChatStreamParser", "completion_text"]


def completion_text(body: bytes, model_name: str) -> tuple[str, dict[str, int], str | None]:
    """The message text, usage and finish reason of a whole ``chat.completion`` body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(
            f"The upstream for model {model_name!r} answered 200 with a body that is not JSON"
        ) from exc
    if not isinstance(data, dict):
        raise UpstreamError(f"The upstream for model {model_name!r} answered 200 with a non-object body")
    if "error" in data:
        raise UpstreamError(f"The upstream for model {model_name!r} failed: {_error_text(data)}")
    choices = data.get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    finish = first.get("finish_reason")
    return str(content or ""), _usage(data.get("usage")), str(finish) if finish else None


def _usage(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}


def _error_text(data: dict[str, Any]) -> str:
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


@dataclass
class ChatStreamParser:
    """Feed it bytes as they arrive; it returns the content found in the frames completed."""

    model_name: str
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str | None = None
    done: bool = False
    _buffer: bytes = b""

    def feed(self, data: bytes) -> str:
        """The content that the complete frames in ``data`` (and what came before) carry."""
        buffer = self._buffer + data
        if b"\r" in buffer:
            # a CRLF split between two pieces: keep a trailing \r until its \n arrives
            held = buffer.endswith(b"\r")
            buffer = (buffer[:-1] if held else buffer).replace(b"\r\n", b"\n") + (b"\r" if held else b"")
        out: list[str] = []
        start = 0
        while not self.done:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            self._frame(buffer[start:end], out)
            start = end + 2
        self._buffer = buffer[start:]
        return "".join(out)

    def finish(self) -> str:
        """The stream ended: whatever complete frame is left (a last one without a blank line)."""
        out: list[str] = []
        if self._buffer.strip() and not self.done:
            frame, self._buffer = self._buffer, b""
            self._frame(frame, out)
        return "".join(out)

    def _frame(self, frame: bytes, out: list[str]) -> None:
        if frame.startswith(b"data: ") and b"\n" not in frame:
            payload = frame[6:]  # the usual frame: one data line
        else:
            lines = [line[5:].lstrip(b" ") for line in frame.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                return  # a comment, an event name, a keep-alive
            payload = b"\n".join(lines)
        if payload.startswith(b"[DONE]") and payload.strip() == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(
                f"The upstream for model {self.model_name!r} sent a stream event that is not JSON"
            ) from exc
        if not isinstance(chunk, dict):
            raise UpstreamError(f"The upstream for model {self.model_name!r} sent a malformed stream event")
        if "error" in chunk:
            raise UpstreamError(
                f"The upstream for model {self.model_name!r} failed mid-stream: {_error_text(chunk)}"
            )
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content and not choice.get("index"):
                out.append(content)
            if isinstance(choice, dict) and not choice.get("index") and choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
