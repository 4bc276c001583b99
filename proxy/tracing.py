"""Traces of inference and actions: a small ``Tracer`` ABC, a no-op one, and Langfuse.

The shape of a trace (one per session; the trace id is derived from the session id,
so every replica adds to the same trace)::

    chat.completions          one span per request (session.id set)
    ├── generation            model, prompt in code form, completion, usage, grammar mode
    ├── repair                the error the model is asked to fix
    │   └── generation        the repaired reply
    ├── action                cell source, output, duration, kernel id
    │   └── tool              a call the program made: client or server, arguments, result
    └── tool                  a client's answer to an earlier call, arriving with this request

Tracing never fails a request: every call into the tracing SDK is guarded here, the
one place that catches anything it raises (and logs it). With no Langfuse settings,
``build_tracer`` gives a ``NoopTracer`` and nothing is imported or sent.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from proxy.config import LangfuseSettings

__all__ = ["TRACE_HEADER", "LangfuseTracer", "NoopTracer", "Span", "Tracer", "build_tracer"]

log = logging.getLogger("cablectl.tracing")

TRACE_HEADER = "x-cablectl-trace-id"

SpanKind = Literal["span", "generation", "tool"]


class Span(abc.ABC):
    """One observation; ``child`` opens a nested one, ``end`` closes it (once)."""

    trace_id: str | None = None

    @abc.abstractmethod
    def child(
        self,
        name: str,
        kind: SpanKind = "span",
        *,
        input: Any = None,
        metadata: dict[str, Any] | None = None,
        model: str | None = None,
    ) -> Span: ...

    @abc.abstractmethod
    def end(
        self,
        *,
        output: Any = None,
        metadata: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None: ...

    def __enter__(self) -> Span:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """Ends the span if the block did not; an exception marks it as an error."""
        if exc is not None:
            self.end(error=getattr(exc, "message", None) or type(exc).__name__)
        else:
            self.end()


class Tracer(abc.ABC):
    enabled = False

    @abc.abstractmethod
    def request(
        self, name: str, *, session_id: str | None, input: Any = None, metadata: dict[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[Span]:
        """The root span of one request, in its session's trace (a new trace without one)."""

    @abc.abstractmethod
    def start(self, name: str, *, input: Any = None, metadata: dict[str, Any] | None = None) -> Span:
        """A root span in a new trace, ended by the caller (a stream ends it when it is done)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Send what is buffered and stop."""


class _NoopSpan(Span):
    def child(
        self,
        name: str,
        kind: SpanKind = "span",
        *,
        input: Any = None,
        metadata: dict[str, Any] | None = None,
        model: str | None = None,
    ) -> Span:
        return self

    def end(
        self,
        *,
        output: Any = None,
        metadata: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        return None


NOOP_SPAN: Span = _NoopSpan()


class NoopTracer(Tracer):
    """Tracing off: no spans, no header, no cost beyond a call."""

    @contextlib.contextmanager
    def request(
        self, name: str, *, session_id: str | None, input: Any = None, metadata: dict[str, Any] | None = None
    ) -> Iterator[Span]:
        yield NOOP_SPAN

    def start(self, name: str, *, input: Any = None, metadata: dict[str, Any] | None = None) -> Span:
        return NOOP_SPAN


class _LangfuseSpan(Span):
    def __init__(self, observation: Any, trace_id: str) -> None:
        self._obs = observation
        self.trace_id = trace_id
        self._ended = False

    def child(
        self,
        name: str,
        kind: SpanKind = "span",
        *,
        input: Any = None,
        metadata: dict[str, Any] | None = None,
        model: str | None = None,
    ) -> Span:
        try:
            extra = {"model": model} if kind == "generation" and model else {}
            obs = self._obs.start_observation(
                name=name, as_type=kind, input=input, metadata=metadata, **extra
            )
        except Exception:  # the tracing boundary: a broken tracer must not break the request
            log.warning("tracing: could not open span %s", name, exc_info=True)
            return NOOP_SPAN
        return _LangfuseSpan(obs, self.trace_id or "")

    def end(
        self,
        *,
        output: Any = None,
        metadata: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            fields: dict[str, Any] = {}
            if output is not None:
                fields["output"] = output
            if metadata:
                fields["metadata"] = metadata
            if usage:
                fields["usage_details"] = {
                    "input": int(usage.get("prompt_tokens") or 0),
                    "output": int(usage.get("completion_tokens") or 0),
                }
            if error is not None:
                fields["level"] = "ERROR"
                fields["status_message"] = error
            if fields:
                self._obs.update(**fields)
            self._obs.end()
        except Exception:  # the tracing boundary
            log.warning("tracing: could not end a span", exc_info=True)


class LangfuseTracer(Tracer):
    """Langfuse over OpenTelemetry (the SDK exports OTLP to ``{host}/api/public/otel/v1/traces``).

    It gets a TracerProvider of its own, so it neither takes over nor joins the
    process-wide OpenTelemetry provider.
    """

    enabled = True

    def __init__(self, settings: LangfuseSettings) -> None:
        from langfuse import Langfuse, propagate_attributes
        from opentelemetry.sdk.trace import TracerProvider

        self._propagate = propagate_attributes
        self._provider = TracerProvider()
        self._client = Langfuse(
            public_key=settings.public_key,
            secret_key=settings.secret_key,
            base_url=settings.host,
            environment=settings.environment,
            release=settings.release,
            sample_rate=settings.sample_rate,
            flush_interval=settings.flush_interval,
            tracer_provider=self._provider,
        )

    def trace_id_for(self, session_id: str | None) -> str:
        if session_id is None:
            return uuid.uuid4().hex
        return str(self._client.create_trace_id(seed=session_id))

    def start(self, name: str, *, input: Any = None, metadata: dict[str, Any] | None = None) -> Span:
        return self._root(name, None, input, metadata)

    def _root(self, name: str, session_id: str | None, input: Any, metadata: dict[str, Any] | None) -> Span:
        try:
            trace_id = self.trace_id_for(session_id)
            root = self._client.start_observation(
                trace_context={"trace_id": trace_id}, name=name, input=input, metadata=metadata
            )
        except Exception:  # the tracing boundary
            log.warning("tracing: could not open the request span", exc_info=True)
            return NOOP_SPAN
        return _LangfuseSpan(root, trace_id)

    @contextlib.contextmanager
    def request(
        self, name: str, *, session_id: str | None, input: Any = None, metadata: dict[str, Any] | None = None
    ) -> Iterator[Span]:
        with contextlib.ExitStack() as stack:
            if session_id is not None:
                try:
                    stack.enter_context(self._propagate(session_id=session_id, trace_name="session"))
                except Exception:  # the tracing boundary
                    log.warning("tracing: could not set the session id", exc_info=True)
            span = self._root(name, session_id, input, metadata)
            try:
                yield span
            except BaseException as exc:
                span.end(error=getattr(exc, "message", None) or type(exc).__name__)
                raise
            finally:
                span.end()

    async def aclose(self) -> None:
        import asyncio

        def close() -> None:
            try:
                self._client.shutdown()
                self._provider.shutdown()
            except Exception:  # the tracing boundary
                log.warning("tracing: shutdown failed", exc_info=True)

        await asyncio.to_thread(close)


def build_tracer(settings: LangfuseSettings | None) -> Tracer:
    if settings is None:
        return NoopTracer()
    return LangfuseTracer(settings)
