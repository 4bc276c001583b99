"""Model name -> backend, with retries and fallbacks on retryable failures.

Each ``model_list`` entry becomes one backend (direct, litellm, or local).
A request tries its model, then the models ``router_settings.fallbacks`` names
for it, each with ``num_retries`` retries on retryable errors (timeouts, 5xx,
429). litellm routes retry inside litellm's Router, so they get no second layer.
Streams are retried only before their first byte.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy.backends.base import Generation, GenerationRequest, ModelBackend, SSEStream
from proxy.backends.direct import DirectBackend, HttpPool
from proxy.backends.litellm_backend import LiteLLMBackend, LiteLLMRouter
from proxy.backends.local import LocalBackend
from proxy.config import Settings
from proxy.errors import CablectlError, ModelNotFound
from proxy.schemas import ChatCompletionRequest

__all__ = ["ModelRouter", "UpstreamClock"]

log = logging.getLogger("cablectl.routing")

T = TypeVar("T")


@dataclass(slots=True)
class UpstreamClock:
    """Milliseconds spent waiting on upstreams for one request."""

    ms: float = 0.0
    served_by: str | None = None


class ModelRouter:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        rs = settings.router_settings
        self._pool = HttpPool()
        litellm_entries = [e for e in settings.model_list if e.resolved_transport == "litellm"]
        self._litellm = LiteLLMRouter(litellm_entries, rs)
        self.backends: dict[str, ModelBackend] = {}
        for entry in settings.model_list:
            transport = entry.resolved_transport
            backend: ModelBackend
            if transport == "local":
                backend = LocalBackend(entry)
            elif transport == "litellm":
                backend = LiteLLMBackend(entry, self._litellm)
            else:
                backend = DirectBackend(entry, self._pool, rs.timeout)
            self.backends[entry.model_name] = backend

    async def start(self, progress: Callable[[str, int, int], None] | None = None) -> None:
        """Start every backend (local models load here); ``progress`` hears (what, done, total)."""
        await self._pool.start()
        for i, backend in enumerate(self.backends.values()):
            if progress is not None:
                progress("load models", i, len(self.backends))
            await backend.start()
        if progress is not None:
            progress("load models", len(self.backends), len(self.backends))

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()
        await self._pool.aclose()

    def names(self) -> list[str]:
        return list(self.backends)

    def get(self, model_name: str) -> ModelBackend:
        backend = self.backends.get(model_name)
        if backend is None:
            known = ", ".join(sorted(self.backends)) or "none"
            raise ModelNotFound(
                f"The model {model_name!r} does not exist on this proxy. Known models: {known}. "
                "Add it to model_list in config.yaml, or call GET /v1/models.",
                param="model",
            )
        return backend

    def ready(self) -> dict[str, bool]:
        return {name: backend.ready() for name, backend in self.backends.items()}

    def _candidates(self, model_name: str, fallbacks: bool = True) -> list[ModelBackend]:
        primary = self.get(model_name)
        chain = [primary]
        if not fallbacks:
            return chain
        for name in self._settings.router_settings.fallbacks_for(model_name):
            backend = self.backends.get(name)
            if backend is not None and backend not in chain:
                chain.append(backend)
        return chain

    async def _attempt(
        self,
        model_name: str,
        clock: UpstreamClock,
        call: Callable[[ModelBackend], Awaitable[T]],
        fallbacks: bool = True,
    ) -> T:
        last: CablectlError | None = None
        retries = self._settings.router_settings.num_retries
        for backend in self._candidates(model_name, fallbacks):
            tries = 1 if getattr(backend, "retries_inside", False) else retries + 1
            for attempt in range(tries):
                started = time.perf_counter()
                try:
                    result = await call(backend)
                except CablectlError as exc:
                    clock.ms += (time.perf_counter() - started) * 1000
                    if not exc.retryable:
                        raise
                    last = exc
                    log.warning("model %s attempt %d failed: %s", backend.name, attempt + 1, exc.message)
                    if attempt + 1 < tries:
                        await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
                    continue
                clock.ms += (time.perf_counter() - started) * 1000
                clock.served_by = backend.name
                return result
        assert last is not None
        raise last

    async def complete(
        self, payload: dict[str, Any], request: ChatCompletionRequest, clock: UpstreamClock
    ) -> bytes:
        return await self._attempt(request.model, clock, lambda b: b.complete(payload, request))

    async def forward(
        self, model_name: str, path: str, payload: dict[str, Any], stream: bool, clock: UpstreamClock
    ) -> bytes | SSEStream:
        """Another API of a direct route's upstream (``/responses``), retried on that route only:
        its fallbacks may not serve that API."""

        async def call(backend: ModelBackend) -> bytes | SSEStream:
            assert isinstance(backend, DirectBackend)  # config allows forwarding on direct routes only
            return await backend.forward(path, payload, stream)

        return await self._attempt(model_name, clock, call, fallbacks=False)

    async def open_stream(
        self, payload: dict[str, Any], request: ChatCompletionRequest, clock: UpstreamClock
    ) -> SSEStream:
        return await self._attempt(request.model, clock, lambda b: b.open_stream(payload, request))

    async def generate(self, job: GenerationRequest, clock: UpstreamClock) -> Generation:
        """Open one generation of the action loop (retries and fallbacks before its first byte)."""
        return await self._attempt(job.request.model, clock, lambda b: b.generate(job))
