"""The seam every model backend implements, and the mapping of upstream failures.

A backend serves one route. ``complete`` returns the response body as JSON
bytes; ``open_stream`` does everything up to the first byte (so failures there
are still errors with a status, and can be retried or fall back), then returns
an ``SSEStream`` of already-framed ``data: ...\\n\\n`` bytes.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.config import ModelEntry
from proxy.errors import (
    CablectlError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from proxy.schemas import ChatCompletionRequest

__all__ = ["ModelBackend", "SSEStream", "error_from_upstream"]


class SSEStream(abc.ABC):
    """An open upstream stream: iterate it for SSE bytes, always ``aclose`` it."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...


class ModelBackend(abc.ABC):
    """One route's model. Real implementations: direct (aiohttp), litellm, local (llama.cpp)."""

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry

    @property
    def name(self) -> str:
        return self.entry.model_name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load or connect; called once in the app's lifespan."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what ``start`` took."""

    def ready(self) -> bool:
        return True

    @abc.abstractmethod
    async def complete(self, payload: dict[str, Any], request: ChatCompletionRequest) -> bytes:
        """Return the chat.completion JSON body."""

    @abc.abstractmethod
    async def open_stream(self, payload: dict[str, Any], request: ChatCompletionRequest) -> SSEStream:
        """Start a streamed completion; raise before returning if it cannot start."""


def _error_fields(body: bytes) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, type, param, code) from an upstream error body, if it has that shape."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None, None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = err.get("code")
        return (
            str(err.get("message") or "") or None,
            err.get("type") if isinstance(err.get("type"), str) else None,
            err.get("param") if isinstance(err.get("param"), str) else None,
            str(code) if code is not None else None,
        )
    if isinstance(err, str):
        return err, None, None, None
    return None, None, None, None


def error_from_upstream(status: int, body: bytes, model_name: str) -> CablectlError:
    """Map an upstream HTTP failure to the error the client should get."""
    message, type_, param, code = _error_fields(body)
    detail = message or body[:300].decode("utf-8", "replace").strip() or "no body"
    if status == 429:
        return UpstreamRateLimited(
            f"The upstream for model {model_name!r} is rate limiting (429): {detail}. Retry later."
        )
    if status in (408, 504):
        return UpstreamTimeout(f"The upstream for model {model_name!r} timed out ({status}): {detail}")
    if status in (401, 403):
        return UpstreamError(
            f"The upstream for model {model_name!r} refused the proxy's credentials ({status}): "
            f"{detail}. The operator should check litellm_params.api_key for this model."
        )
    if 400 <= status < 500:
        return UpstreamRejected(detail, status=status, param=param, code=code, type_=type_)
    return UpstreamError(f"The upstream for model {model_name!r} failed with HTTP {status}: {detail}")
