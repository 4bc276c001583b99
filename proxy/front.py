"""One request, whichever API it came in by, answered as the action loop's events.

Chat completions, the Responses API and the Messages API each parse their wire format into
the neutral conversation (a chat-completions payload) and render events back; ``Front`` is
what lies between. It checks the key's right to the model, then either runs the action loop
(the route does code actions, and the request has tools or the route has toolsets) or sends
the request to the route's backend as it is and reads its chat-completions answer as the
same events (``proxy.surfaces.bridge``). Either way it waits for the first event a client
would see, so a failure before it keeps its HTTP status (``Answer.events`` replays it).

Chat completions without tools do not come here: their bytes are relayed as they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from proxy.accesslog import RequestRecord
from proxy.actions.approval import Approval, approval_mode
from proxy.actions.events import Event, Finished, Started, TextDelta, ToolCallDone, ToolCallStarted
from proxy.actions.loop import ActionLoop, SessionKey
from proxy.auth import Principal
from proxy.backends.base import SSEStream
from proxy.config import ModelEntry
from proxy.errors import CablectlError, InvalidRequest
from proxy.forwarding import Forwarder
from proxy.library import Library
from proxy.routing import ModelRouter, UpstreamClock
from proxy.schemas import ChatCompletionRequest
from proxy.sessions.owners import OwnedElsewhere
from proxy.surfaces.bridge import events_from_chat_body, events_from_chat_sse
from proxy.toolsets import ServerToolset
from proxy.tracing import TRACE_HEADER, Span, Tracer
from translators import MadeFunction

__all__ = [
    "SESSION_HEADER",
    "SESSION_ID_HEADER",
    "SSE_HEADERS",
    "Answer",
    "Front",
    "close_events",
    "guarded_sse",
    "openai_error_event",
    "respond",
    "session_key",
    "timed",
]

log = logging.getLogger("cablectl.app")

SESSION_HEADER = "x-cablectl-session"
SESSION_ID_HEADER = "x-cablectl-session-id"  # on every answer of the action loop: its session


@dataclass
class Answer:
    """The events of one answer (the first ones already awaited), and headers for the response.
    ``close`` must run when the client is done or gone: it stops the model, releases the
    session and gives the upstream connection back."""

    events: AsyncIterator[Event]
    headers: dict[str, str]
    source: AsyncIterator[Event]
    session_id: str | None = None
    response: Response | None = None  # the answer of the replica holding the session, as it is
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def forwarded(cls, response: Response) -> Answer:
        nothing = _chain([], _no_events())
        return cls(nothing, {}, nothing, response=response)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await close_events(self.source)


class Front:
    def __init__(
        self,
        router: ModelRouter,
        loop: ActionLoop,
        tracer: Tracer,
        routes: dict[str, ModelEntry],
        toolsets: dict[str, ServerToolset],
        library: Library | None = None,
        promoted: frozenset[str] = frozenset(),
        forwarder: Forwarder | None = None,
    ) -> None:
        self.router = router
        self.forwarder = forwarder  # replicas: a session's requests go to the one holding it
        self.loop = loop
        self.tracer = tracer
        self.routes = routes
        self.toolsets = toolsets  # executed by the proxy
        self.library = library  # promoted toolsets (``promoted``): defined in the kernel
        self.promoted = promoted

    def _offered(
        self, entry: ModelEntry, principal: Principal
    ) -> tuple[list[ServerToolset], set[str], list[str]]:
        """The route's executed toolsets this key may use, the functions of those it may not,
        and the promoted toolsets it may use."""
        mine = [n for n in entry.toolsets if principal.may_use_toolset(n)]
        offered = [self.toolsets[n] for n in mine if n in self.toolsets]
        denied = {
            f
            for n in entry.toolsets
            if n in self.toolsets and not principal.may_use_toolset(n)
            for f in self.toolsets[n].names()
        }
        return offered, denied, [n for n in mine if n in self.promoted]

    async def _library(self, names: list[str]) -> list[MadeFunction]:
        return await self.library.functions(names) if names and self.library is not None else []

    def loop_entry(self, chat: ChatCompletionRequest) -> ModelEntry | None:
        """The route, if this request goes through the action loop."""
        entry = self.routes.get(chat.model)
        if entry is not None and entry.code_actions and (chat.tools or entry.toolsets):
            return entry
        return None

    async def answer(
        self,
        request: Request,
        principal: Principal,
        record: RequestRecord,
        payload: dict[str, Any],
        chat: ChatCompletionRequest,
        surface: str,
        continues: str | None = None,
    ) -> Answer:
        """Answer ``payload`` as events (``continues``: a session the proxy recorded for this
        conversation). Raises what fails before the first event a client sees."""
        principal.check_model(chat.model)
        record.model = chat.model
        record.stream = bool(chat.stream)
        entry = self.loop_entry(chat)
        if entry is None:
            return await self._bridged(payload, chat, record.clock, surface)
        offered, denied, promoted = self._offered(entry, principal)
        library = await self._library(promoted)
        session = session_key(request, payload, principal)
        metadata = payload.get("metadata")
        if isinstance(metadata, dict) and "session_id" in metadata:  # ours: not the upstream's
            rest = {k: v for k, v in metadata.items() if k != "session_id"}
            payload = {k: v for k, v in payload.items() if k != "metadata"} | (
                {"metadata": rest} if rest else {}
            )
        body: bytes = getattr(request.state, "raw_body", b"")
        forward = self.forwarder is not None and not self.forwarder.received(request, body)

        def run(forward: bool, unreachable: bool = False) -> AsyncIterator[Event]:
            return self.loop.stream(
                entry,
                chat,
                payload,
                record.clock,
                offered,
                denied,
                session,
                principal.key_id,
                continues=continues,
                surface=surface,
                library=library,
                approval=Approval(approval_mode(entry.approval, principal.approval), entry.approval_tool),
                forward=forward,
                unreachable=unreachable,
            )

        source = run(forward)
        try:
            head = await _head(source)
        except OwnedElsewhere as moved:
            assert self.forwarder is not None
            response = await self.forwarder.send(request, body, moved)
            if response is not None:
                return Answer.forwarded(response)
            source = run(False, unreachable=True)
            head = await _head(source)
        started = next((e for e in head if isinstance(e, Started)), None)
        headers = {TRACE_HEADER: started.trace_id} if started and started.trace_id else {}
        if started is not None:
            headers[SESSION_ID_HEADER] = started.session_id
        return Answer(
            _chain(head, source), headers, source, session_id=started.session_id if started else None
        )

    async def count_tokens(
        self, payload: dict[str, Any], chat: ChatCompletionRequest, principal: Principal
    ) -> int:
        """About how many input tokens this request costs: the prompt the model would see (for
        a code-actions route, the conversation in code form with its tools as stubs)."""
        backend = self.router.get(chat.model)
        entry = self.loop_entry(chat)
        if entry is None:
            return await backend.count_tokens(list(payload["messages"]), payload.get("tools"))
        offered, _, promoted = self._offered(entry, principal)
        prompt = self.loop.prompt_for(chat, payload, offered, await self._library(promoted))
        return await backend.count_tokens(prompt, None)

    async def _bridged(
        self, payload: dict[str, Any], chat: ChatCompletionRequest, clock: UpstreamClock, surface: str
    ) -> Answer:
        """A request without tools: the route's backend answers, read as events."""
        span = self.tracer.start(
            surface, input=payload.get("messages"), metadata={"stream": bool(chat.stream), "surface": surface}
        )
        generation = span.child("generation", "generation", input=payload.get("messages"), model=chat.model)
        stream: SSEStream | None = None
        try:
            if chat.stream:
                stream = await self.router.open_stream(payload, chat, clock)
                events = events_from_chat_sse(timed(stream, clock), chat.model)
            else:
                body = await self.router.complete(payload, chat, clock)
                events = events_from_chat_body(body, chat.model)
        except CablectlError as exc:
            for traced in (generation, span):
                traced.end(error=exc.message)
            raise
        source = _traced(events, stream, (generation, span))
        head = await _head(source)
        headers = {TRACE_HEADER: span.trace_id} if span.trace_id else {}
        return Answer(_chain(head, source), headers, source)


def session_key(request: Request, payload: dict[str, Any], principal: Principal) -> SessionKey | None:
    """The session the client names (header, or ``metadata.session_id``), within its API key."""
    metadata = payload.get("metadata")
    name = request.headers.get(SESSION_HEADER)
    param = SESSION_HEADER
    if name is None and isinstance(metadata, dict) and metadata.get("session_id") is not None:
        name, param = metadata["session_id"], "metadata.session_id"
    if name is None:
        return None
    if not isinstance(name, str) or not 1 <= len(name) <= 256 or not name.isprintable():
        raise InvalidRequest(
            f"{param} must be a string of 1 to 256 printable characters naming your conversation",
            param=param,
        )
    return SessionKey(principal.key_id, name)


async def timed(stream: SSEStream, clock: UpstreamClock) -> AsyncGenerator[bytes, None]:
    """The upstream's bytes; time spent waiting for them is upstream time."""
    iterator = stream.__aiter__()
    while True:
        waited = time.perf_counter()
        try:
            chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        finally:
            clock.ms += (time.perf_counter() - waited) * 1000
        yield chunk


async def _traced(
    events: AsyncIterator[Event], stream: SSEStream | None, spans: tuple[Span, Span]
) -> AsyncIterator[Event]:
    """Bridged events; the upstream stream is closed and the spans ended whatever happens."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    usage: dict[str, int] | None = None
    error: str | None = None
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, ToolCallDone):
                calls.append({"id": event.call_id, "name": event.name, "arguments": event.arguments})
            elif isinstance(event, Finished):
                usage = event.usage.as_dict()
            yield event
    except CablectlError as exc:
        error = exc.message
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await close_events(events)
            if stream is not None:
                await stream.aclose()
        output = {"content": "".join(text) or None, "tool_calls": calls or None}
        generation, span = spans
        generation.end(output=output, usage=usage, error=error)
        span.end(output=output, error=error)


async def close_events(events: AsyncIterator[Event]) -> None:
    """Close an event stream (shielded: it runs when a client went away too), so the model
    stops, the session lock is released and the kernel is back in its place."""
    with anyio.CancelScope(shield=True):
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def _head(events: AsyncIterator[Event]) -> list[Event]:
    """The events up to the first one a client sees. What fails before that raises (an HTTP
    error with its status); nothing has been sent yet."""
    head: list[Event] = []
    try:
        async for event in events:
            head.append(event)
            if isinstance(event, TextDelta | ToolCallStarted | ToolCallDone | Finished):
                break
    except BaseException:
        await close_events(events)
        raise
    return head


async def _no_events() -> AsyncIterator[Event]:
    return
    yield  # an async generator that yields nothing


async def _chain(head: list[Event], events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    for event in head:
        yield event
    async for event in events:
        yield event


def openai_error_event(exc: CablectlError) -> bytes:
    """A failure after the status line went out, as chat completions streams tell it."""
    return b"data: " + orjson.dumps(exc.to_body()) + b"\n\n"


_INTERNAL = CablectlError("The stream failed inside the proxy; it has been logged.", code="internal_error")


async def guarded_sse(
    chunks: AsyncIterator[bytes],
    record: RequestRecord,
    cleanup: Callable[[], Awaitable[None]],
    error_event: Callable[[CablectlError], bytes] = openai_error_event,
) -> AsyncIterator[bytes]:
    """SSE bytes as they are produced; a failure mid-stream becomes the surface's error event
    (``error_event``), and ``cleanup`` runs whatever happens (shielded: a client that went
    away cancels this task)."""
    try:
        async for chunk in chunks:
            yield chunk
    except CablectlError as exc:
        record.error = exc.error_code or exc.type
        log.warning("stream for %s failed: %s", record.model, exc.message)
        yield error_event(exc)
    except Exception:  # the stream's own boundary: the status line has already gone out
        record.error = "internal_error"
        log.exception("stream for %s failed", record.model)
        yield error_event(_INTERNAL)
    finally:
        with anyio.CancelScope(shield=True):
            await cleanup()


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def respond(
    answer: Answer,
    record: RequestRecord,
    stream: bool,
    whole: Callable[[AsyncIterator[Event]], Awaitable[bytes]],
    chunks: Callable[[AsyncIterator[Event]], AsyncIterator[bytes]],
    error_event: Callable[[CablectlError], bytes] = openai_error_event,
) -> Response:
    """An answer in a surface's wire format: ``whole`` renders the JSON body (a failure is
    raised, for its HTTP status), ``chunks`` the SSE stream (a failure is ``error_event``).
    The answer is closed either way. An answer another replica gave is sent as it came."""
    if answer.response is not None:
        return answer.response
    if not stream:
        try:
            body = await whole(answer.events)
        finally:
            await answer.close()
        return Response(body, media_type="application/json", headers=answer.headers)
    return StreamingResponse(
        guarded_sse(chunks(answer.events), record, answer.close, error_event),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **answer.headers},
    )
