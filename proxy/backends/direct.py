"""OpenAI-compatible upstreams (OpenAI, vLLM, a llama.cpp server, ...) called directly.

The client's JSON goes out with only ``model`` mapped to the upstream's name; the
upstream's body comes back as it was (decompressed if it was sent compressed),
streamed chunks as they arrive. aiohttp, not httpx, on this hot path: under
concurrency its connection pool costs a fraction of httpx's (see bench/overhead.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from proxy.backends.base import Generation, GenerationRequest, ModelBackend, SSEStream, error_from_upstream
from proxy.backends.sse import ChatStreamParser, completion_text
from proxy.config import ModelEntry
from proxy.errors import (
    ServiceUnavailable,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.schemas import ChatCompletionRequest

__all__ = ["DirectBackend", "HttpPool"]

log = logging.getLogger("cablectl.backends")

DEFAULT_API_BASE = "https://api.openai.com/v1"
CONNECT_TIMEOUT = 10.0


def _stale_connection(exc: aiohttp.ClientError) -> bool:
    """A pooled keep-alive connection the upstream had closed: the request never got through.

    Servers close idle connections on their own schedule (uvicorn, so vLLM, after 5 s); a
    request sent on one just then fails to write or sees the close at once. Sent again on a
    new connection it is fine. A refused connect is not this (the upstream is down)."""
    return isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError) and not isinstance(
        exc, aiohttp.ClientConnectorError
    )


class HttpPool:
    """The one upstream connection pool of an app; opened in the lifespan's event loop."""

    def __init__(self, max_connections: int = 2000) -> None:
        self._max = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max, keepalive_timeout=60, enable_cleanup_closed=True
            )
            self._session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))
            # for a request sent again after a kept-alive connection turned out closed: every
            # other pooled connection to that upstream may have been closed with it (a server
            # that closes idle ones after 5 s closes them all after a lull), so not from the pool
            fresh = aiohttp.TCPConnector(limit=self._max, force_close=True, enable_cleanup_closed=True)
            self._fresh = aiohttp.ClientSession(connector=fresh, skip_auto_headers=("User-Agent",))

    async def aclose(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ServiceUnavailable("the proxy is starting or stopping; retry in a moment")
        return self._session

    def for_attempt(self, attempt: int) -> aiohttp.ClientSession:
        """The pool for a first attempt; a new connection for a retry of a stale one."""
        session = self.session
        return session if attempt == 1 or self._fresh is None else self._fresh


class _AiohttpStream(SSEStream):
    def __init__(self, response: aiohttp.ClientResponse, model_name: str) -> None:
        self._response = response
        self._model_name = model_name
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout(f"The upstream for model {self._model_name!r} stalled mid-stream") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"The upstream for model {self._model_name!r} broke off the stream: {exc!r}"
            ) from exc
        self._finished = True

    async def aclose(self) -> None:
        if self._finished:
            self._response.release()  # connection back to the pool
        else:
            self._response.close()  # half-read: drop the connection


class _DirectGeneration(Generation):
    """A streamed chat completion read as text deltas (or one JSON body, if the server
    ignored ``stream``)."""

    def __init__(self, response: aiohttp.ClientResponse, model_name: str) -> None:
        super().__init__()
        self._stream = _AiohttpStream(response, model_name)
        self._whole = "json" in response.headers.get("content-type", "")
        self._model_name = model_name
        self.server = response.headers.get("server")

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._whole:
            body = b"".join([chunk async for chunk in self._stream])
            text, self.usage, self.finish_reason = completion_text(body, self._model_name)
            if text:
                yield text
            return
        parser = ChatStreamParser(self._model_name)
        async for data in self._stream:
            text = parser.feed(data)  # what arrived together goes on together
            if text:
                yield text
        text = parser.finish()
        if text:
            yield text
        self.usage = parser.usage
        self.finish_reason = parser.finish_reason

    async def aclose(self) -> None:
        await self._stream.aclose()  # read to the end: back to the pool; else dropped (the upstream stops)


class DirectBackend(ModelBackend):
    def __init__(self, entry: ModelEntry, pool: HttpPool, timeout: float) -> None:
        super().__init__(entry)
        params = entry.litellm_params
        self._pool = pool
        self._base = (params.api_base or DEFAULT_API_BASE).rstrip("/")
        self._url = self._base + "/chat/completions"
        self._upstream_model = params.upstream_model
        headers = {"content-type": "application/json", "accept": "application/json"}
        if params.api_key:
            headers["authorization"] = f"Bearer {params.api_key}"
        headers.update(params.extra_headers or {})
        self._headers = headers
        self._usage_option = True  # stream_options.include_usage, until the upstream refuses it
        total = params.timeout or timeout
        connect = min(CONNECT_TIMEOUT, total)
        self._timeout = aiohttp.ClientTimeout(total=total, sock_connect=connect)
        # a stream may run long; what must not happen is a long silence
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect, sock_read=params.stream_timeout or total
        )

    def _body(self, payload: dict[str, Any]) -> bytes:
        if payload.get("model") != self._upstream_model:
            payload = {**payload, "model": self._upstream_model}
        return orjson.dumps(payload)

    def _unreachable(self, exc: BaseException) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            f"Cannot reach the upstream for model {self.name!r} at {self._url}: {exc!r}"
        )

    async def _post(self, data: bytes, url: str | None = None) -> tuple[int, bytes]:
        for attempt in (1, 2):
            session = self._pool.for_attempt(attempt)
            try:
                async with session.post(
                    url or self._url, data=data, headers=self._headers, timeout=self._timeout
                ) as response:
                    return response.status, await response.read()
            except aiohttp.ClientError as exc:
                if attempt == 2 or not _stale_connection(exc):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def complete(self, payload: dict[str, Any], request: ChatCompletionRequest) -> bytes:
        return await self._complete(self._body(payload), self._url)

    async def forward(self, path: str, payload: dict[str, Any], stream: bool) -> bytes | SSEStream:
        """POST ``payload`` to another path of the upstream's API as it is (``model`` mapped):
        its JSON body, or its stream. For APIs the upstream serves itself (``/responses``)."""
        url = self._base + path
        if stream:
            return _AiohttpStream(await self._start(self._body(payload), url), self.name)
        return await self._complete(self._body(payload), url)

    async def _complete(self, data: bytes, url: str) -> bytes:
        try:
            status, body = await self._post(data, url)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The upstream for model {self.name!r} did not answer in time; "
                "raise router_settings.timeout or litellm_params.timeout if it is just slow"
            ) from exc
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc
        if status != 200:
            raise error_from_upstream(status, body, self.name)
        # forwarded as they are, but never a body the client's SDK cannot parse
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise UpstreamError(
                f"The upstream for model {self.name!r} answered 200 with a body that is not a JSON object"
            )
        return body

    async def _open(self, data: bytes, url: str) -> aiohttp.ClientResponse:
        for attempt in (1, 2):
            session = self._pool.for_attempt(attempt)
            try:
                return await session.post(url, data=data, headers=self._headers, timeout=self._stream_timeout)
            except aiohttp.ClientError as exc:
                if attempt == 2 or not _stale_connection(exc):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def open_stream(self, payload: dict[str, Any], request: ChatCompletionRequest) -> SSEStream:
        return _AiohttpStream(await self._start(self._body(payload)), self.name)

    async def generate(self, job: GenerationRequest) -> Generation:
        body = job.chat_body()
        body["stream"] = True
        if self._usage_option:
            body["stream_options"] = {"include_usage": True}
            try:
                return _DirectGeneration(await self._start(self._body(body)), self.name)
            except UpstreamRejected as exc:
                if "stream_options" not in exc.message:
                    raise
                # a server that does not take stream_options: stream without it (no usage)
                log.warning(
                    "upstream of %s refuses stream_options (%s); not sending it again", self.name, exc
                )
                self._usage_option = False
                del body["stream_options"]
        return _DirectGeneration(await self._start(self._body(body)), self.name)

    async def _start(self, data: bytes, url: str | None = None) -> aiohttp.ClientResponse:
        """POST a streamed request; the response once its status says it streams."""
        try:
            response = await self._open(data, url or self._url)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The upstream for model {self.name!r} did not start streaming in time"
            ) from exc
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc
        if response.status != 200:
            try:
                body = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                body = b""
            finally:
                response.release()
            raise error_from_upstream(response.status, body, self.name)
        return response
