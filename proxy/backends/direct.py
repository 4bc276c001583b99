"""OpenAI-compatible upstreams (OpenAI, vLLM, a llama.cpp server, ...) over httpx.

The client's JSON goes out with only ``model`` mapped to the upstream's name;
the upstream's bytes come back untouched, streamed chunks as they arrive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from proxy.backends.base import ModelBackend, SSEStream, error_from_upstream
from proxy.config import ModelEntry
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.schemas import ChatCompletionRequest

__all__ = ["DirectBackend"]

DEFAULT_API_BASE = "https://api.openai.com/v1"


class _HttpxStream(SSEStream):
    def __init__(self, response: httpx.Response, model_name: str) -> None:
        self._response = response
        self._model_name = model_name

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"The upstream for model {self._model_name!r} stalled mid-stream") from exc
        except httpx.TransportError as exc:
            raise UpstreamError(
                f"The upstream for model {self._model_name!r} broke off the stream: {exc!r}"
            ) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class DirectBackend(ModelBackend):
    def __init__(self, entry: ModelEntry, client: httpx.AsyncClient, timeout: float) -> None:
        super().__init__(entry)
        params = entry.litellm_params
        self._client = client
        self._url = (params.api_base or DEFAULT_API_BASE).rstrip("/") + "/chat/completions"
        self._upstream_model = params.upstream_model
        headers = {"content-type": "application/json", "accept": "application/json"}
        if params.api_key:
            headers["authorization"] = f"Bearer {params.api_key}"
        headers.update(params.extra_headers or {})
        self._headers = headers
        self._timeout = httpx.Timeout(params.timeout or timeout, connect=min(10.0, params.timeout or timeout))
        self._stream_timeout = httpx.Timeout(
            params.stream_timeout or params.timeout or timeout,
            connect=min(10.0, params.timeout or timeout),
        )

    def _body(self, payload: dict[str, Any]) -> bytes:
        if payload.get("model") != self._upstream_model:
            payload = {**payload, "model": self._upstream_model}
        return orjson.dumps(payload)

    async def complete(self, payload: dict[str, Any], request: ChatCompletionRequest) -> bytes:
        try:
            response = await self._client.post(
                self._url, content=self._body(payload), headers=self._headers, timeout=self._timeout
            )
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(
                f"The upstream for model {self.name!r} did not answer in time; "
                "raise router_settings.timeout or litellm_params.timeout if it is just slow"
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(
                f"Cannot reach the upstream for model {self.name!r} at {self._url}: {exc!r}"
            ) from exc
        if response.status_code != 200:
            raise error_from_upstream(response.status_code, response.content, self.name)
        return response.content

    async def open_stream(self, payload: dict[str, Any], request: ChatCompletionRequest) -> SSEStream:
        req = self._client.build_request(
            "POST",
            self._url,
            content=self._body(payload),
            headers=self._headers,
            timeout=self._stream_timeout,
        )
        try:
            response = await self._client.send(req, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(
                f"The upstream for model {self.name!r} did not start streaming in time"
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(
                f"Cannot reach the upstream for model {self.name!r} at {self._url}: {exc!r}"
            ) from exc
        if response.status_code != 200:
            try:
                body = await response.aread()
            except httpx.HTTPError:
                body = b""
            finally:
                await response.aclose()
            raise error_from_upstream(response.status_code, body, self.name)
        return _HttpxStream(response, self.name)
