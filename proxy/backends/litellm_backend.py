"""Providers that need translation (Anthropic, Gemini, Bedrock, ...) through litellm's Router.

litellm is imported only when a route uses it: the import costs seconds.
The Router gets every litellm route and ``router_settings`` (retries, timeouts,
...); fallbacks across routes of any kind are done by ``proxy.routing``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from proxy.backends.base import (
    Generation,
    GenerationRequest,
    ModelBackend,
    SSEStream,
    error_from_upstream,
    import_litellm,
)
from proxy.config import ModelEntry, RouterSettings
from proxy.errors import CablectlError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.schemas import ChatCompletionRequest

__all__ = ["LiteLLMBackend", "LiteLLMRouter"]

# Settings of ours that litellm must not see.
_LOCAL_ONLY = {"model_path", "n_ctx", "n_threads", "n_batch", "n_contexts", "copy_bias"}
# cablectl applies these itself on every route
_ROUTER_OWN = {"fallbacks"}


class LiteLLMRouter:
    """One litellm Router shared by every litellm route of the app."""

    def __init__(self, entries: Sequence[ModelEntry], router_settings: RouterSettings) -> None:
        self._entries = list(entries)
        self._settings = router_settings
        self.router: Any = None
        self.litellm: Any = None

    def start(self) -> None:
        if self.router is not None or not self._entries:
            return
        self.litellm = import_litellm()
        model_list = [
            {
                "model_name": entry.model_name,
                "litellm_params": {
                    k: v
                    for k, v in entry.litellm_params.model_dump(exclude_unset=True).items()
                    if k not in _LOCAL_ONLY and v is not None
                },
            }
            for entry in self._entries
        ]
        settings = {k: v for k, v in self._settings.model_dump().items() if k not in _ROUTER_OWN}
        self.router = self.litellm.Router(model_list=model_list, **settings)

    async def aclose(self) -> None:
        """Close the HTTP clients litellm caches (they belong to this event loop)."""
        if self.litellm is None:
            return
        await self.litellm.close_litellm_async_clients()
        cache = getattr(self.litellm, "in_memory_llm_clients_cache", None)
        if cache is not None and hasattr(cache, "flush_cache"):
            cache.flush_cache()
        self.router = None

    def map_error(self, exc: Exception, model_name: str) -> CablectlError | None:
        """A litellm exception as a cablectl error, or None if it is not litellm's."""
        exceptions = self.litellm.exceptions
        message = _clean(getattr(exc, "message", None) or str(exc))
        if isinstance(exc, exceptions.Timeout):
            return UpstreamTimeout(f"The upstream for model {model_name!r} timed out: {message}")
        if isinstance(exc, exceptions.APIConnectionError):
            return UpstreamUnavailable(f"Cannot reach the upstream for model {model_name!r}: {message}")
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and 400 <= status < 600:
            return error_from_upstream(status, orjson.dumps({"error": {"message": message}}), model_name)
        return None


def _clean(message: str, limit: int = 600) -> str:
    """litellm's messages can embed a traceback: a client never sees one."""
    message = message.split("Traceback (most recent call last)", 1)[0].strip()
    return message if len(message) <= limit else message[:limit] + "..."


class _LiteLLMStream(SSEStream):
    def __init__(self, wrapper: Any, backend: LiteLLMBackend) -> None:
        self._wrapper = wrapper
        self._backend = backend

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._wrapper:
                yield b"data: " + chunk.model_dump_json(exclude_none=False).encode() + b"\n\n"
        except CablectlError:
            raise
        except Exception as exc:  # litellm raises its own tree; map it, keep the cause
            mapped = self._backend.router_holder.map_error(exc, self._backend.name)
            raise (mapped or UpstreamError(f"stream from {self._backend.name!r} failed: {exc}")) from exc
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        close = getattr(self._wrapper, "aclose", None)
        if close is not None:
            await close()


class _LiteLLMGeneration(Generation):
    def __init__(self, wrapper: Any, backend: LiteLLMBackend) -> None:
        super().__init__()
        self._wrapper = wrapper
        self._backend = backend

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for chunk in self._wrapper:
                usage = getattr(chunk, "usage", None)
                if usage is not None:
                    self.usage = {
                        k: v
                        for k, v in (
                            usage.model_dump() if hasattr(usage, "model_dump") else dict(usage)
                        ).items()
                        if isinstance(v, int) and not isinstance(v, bool)
                    }
                for choice in chunk.choices or []:
                    if getattr(choice, "index", 0):
                        continue  # the first choice only
                    if getattr(choice, "finish_reason", None):
                        self.finish_reason = str(choice.finish_reason)
                    content = getattr(choice.delta, "content", None)
                    if content:
                        yield content
        except CablectlError:
            raise
        except Exception as exc:  # litellm raises its own tree; map it, keep the cause
            mapped = self._backend.router_holder.map_error(exc, self._backend.name)
            raise (mapped or UpstreamError(f"stream from {self._backend.name!r} failed: {exc}")) from exc

    async def aclose(self) -> None:
        close = getattr(self._wrapper, "aclose", None)
        if close is not None:
            await close()


class LiteLLMBackend(ModelBackend):
    retries_inside = True

    def __init__(self, entry: ModelEntry, router_holder: LiteLLMRouter) -> None:
        super().__init__(entry)
        self.router_holder = router_holder

    async def start(self) -> None:
        self.router_holder.start()

    async def aclose(self) -> None:
        await self.router_holder.aclose()

    def _kwargs(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in payload.items() if k not in ("model", "stream")}

    async def complete(self, payload: dict[str, Any], request: ChatCompletionRequest) -> bytes:
        try:
            response = await self.router_holder.router.acompletion(model=self.name, **self._kwargs(payload))
        except Exception as exc:  # litellm's exception tree, mapped to ours
            mapped = self.router_holder.map_error(exc, self.name)
            if mapped is None:
                raise
            raise mapped from exc
        return response.model_dump_json().encode()  # type: ignore[no-any-return]

    async def _stream(self, kwargs: dict[str, Any]) -> Any:
        try:
            return await self.router_holder.router.acompletion(model=self.name, stream=True, **kwargs)
        except Exception as exc:  # litellm's exception tree, mapped to ours
            mapped = self.router_holder.map_error(exc, self.name)
            if mapped is None:
                raise
            raise mapped from exc

    async def open_stream(self, payload: dict[str, Any], request: ChatCompletionRequest) -> SSEStream:
        return _LiteLLMStream(await self._stream(self._kwargs(payload)), self)

    async def generate(self, job: GenerationRequest) -> Generation:
        kwargs = self._kwargs(job.chat_body())
        kwargs["stream_options"] = {"include_usage": True}
        return _LiteLLMGeneration(await self._stream(kwargs), self)
