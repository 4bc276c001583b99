"""One structured log line per request, and the ``x-cablectl-overhead-ms`` header.

A pure ASGI middleware (no ``BaseHTTPMiddleware``: it would buffer streams).
The endpoint fills ``request.state.record``; the middleware stamps the header
when the response starts, and logs when the last body byte has gone out, or
when the client went away.

Overhead is the proxy's own time: total latency less the time spent waiting on
the upstream. In the header it is measured up to the response start; in the log
line, over the whole response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.routing import UpstreamClock

__all__ = ["OVERHEAD_HEADER", "AccessLogMiddleware", "RequestRecord"]

log = logging.getLogger("cablectl.access")

OVERHEAD_HEADER = b"x-cablectl-overhead-ms"


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    key_id: str | None = None
    stream: bool = False
    surface: str | None = None  # chat.completions, responses, messages (None: not a model API)
    status: int | None = None
    error: str | None = None
    clock: UpstreamClock = field(default_factory=UpstreamClock)

    def line(self, finished: float, disconnected: bool) -> dict[str, Any]:
        total = (finished - self.started) * 1000
        return {
            "event": "request",
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "served_by": self.clock.served_by,
            "key_id": self.key_id,
            "surface": self.surface,
            "stream": self.stream,
            "status": self.status,
            "total_ms": round(total, 3),
            "upstream_ms": round(self.clock.ms, 3),
            "overhead_ms": round(total - self.clock.ms, 3),
            "error": self.error,
            "client_disconnected": disconnected,
        }


class AccessLogMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        quiet_paths: frozenset[str] = frozenset({"/health", "/metrics"}),
        on_finish: Callable[[RequestRecord, float], None] | None = None,
    ) -> None:
        self.app = app
        self.quiet_paths = quiet_paths
        self.on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(method=scope["method"], path=scope["path"])
        scope.setdefault("state", {})["record"] = record
        done = False

        async def send_wrapper(message: Message) -> None:
            nonlocal done
            if message["type"] == "http.response.start":
                record.status = message["status"]
                overhead = (time.perf_counter() - record.started) * 1000 - record.clock.ms
                headers = list(message.get("headers", []))
                headers.append((OVERHEAD_HEADER, f"{overhead:.3f}".encode()))
                message = {**message, "headers": headers}
                await send(message)
                return
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
                self._emit(record, disconnected=False)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not done:
                self._emit(record, disconnected=True)

    def _emit(self, record: RequestRecord, disconnected: bool) -> None:
        if record.path in self.quiet_paths:
            return
        finished = time.perf_counter()
        if self.on_finish is not None:
            self.on_finish(record, finished)
        if log.isEnabledFor(logging.INFO):
            log.info(orjson.dumps(record.line(finished, disconnected)).decode())
