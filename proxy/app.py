"""The FastAPI app factory: endpoints, the one error handler, the lifespan.

``create_app(settings)`` builds everything from the one ``Settings`` object;
nothing here reads the environment or keeps module-level state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxy import __version__
from proxy.accesslog import AccessLogMiddleware, RequestRecord
from proxy.actions.artifacts import Artifacts
from proxy.actions.events import Event
from proxy.actions.loop import ActionLoop
from proxy.actions.respond import chat_body, chat_chunks, collect
from proxy.actions.runtime import Runtime
from proxy.auth import KeyRing, Principal
from proxy.backends.base import SSEStream
from proxy.config import Settings
from proxy.endpoints import (
    add_session_routes,
    add_surface_routes,
    is_messages_path,
    messages_error_response,
    request_body_openapi,
)
from proxy.errors import (
    CablectlError,
    ConfigError,
    InvalidRequest,
    MethodNotAllowed,
    PermissionDenied,
    RequestTooLarge,
    UnknownURL,
)
from proxy.forwarding import Forwarder
from proxy.front import SSE_HEADERS, Front, guarded_sse, respond, timed
from proxy.kernels import ExecLimits, KernelPool, KernelProvider
from proxy.kernels.gateway import GatewayKernelProvider
from proxy.kernels.local import LocalKernelProvider, ResourceLimits, can_isolate_network
from proxy.kernels.sandbox import require_sandbox
from proxy.library import Library
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.routing import ModelRouter
from proxy.schemas import ChatCompletionRequest
from proxy.sessions import CallIds, InMemorySessionStore, RedisSessionStore, SessionStore
from proxy.sessions.owners import Owners
from proxy.surfaces import ResponseStore
from proxy.toolsets import build_toolsets
from proxy.tracing import TRACE_HEADER, Span, build_tracer

__all__ = ["create_app", "error_response"]

log = logging.getLogger("cablectl.app")


def error_response(exc: CablectlError) -> JSONResponse:
    retry_after = getattr(exc, "retry_after", None)
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return JSONResponse(exc.to_body(), status_code=exc.http_status, headers=headers)


def _openai_error(
    status: int, message: str, type_: str, code: str | None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
    )


def _param_of(loc: tuple[Any, ...]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _invalid_from_validation(exc: ValidationError | RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = tuple(p for p in first.get("loc", ()) if p != "body")
    # drop pydantic's union-branch names ("str", "list[...]") from the location
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str", "list"})))
    param = _param_of(loc)
    msg = str(first.get("msg", "invalid value"))
    where = f"'{param}'" if param else "the request body"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return InvalidRequest(f"Invalid value for {where}: {msg}{more}", param=param)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(
            f"Request body is {declared} bytes; this proxy accepts at most {limit} "
            "(server.max_request_body_bytes in config.yaml)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(
                f"Request body is over {limit} bytes, the most this proxy accepts "
                "(server.max_request_body_bytes in config.yaml)"
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    request.state.raw_body = body  # as it came: what a forward to another replica sends on
    return body


def _parse_request(raw: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc.msg}). "
            "Send a JSON object with 'model' and 'messages'."
        ) from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object with 'model' and 'messages'.")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _invalid_from_validation(exc) from exc
    return data, request


def _session_store(settings: Settings) -> SessionStore:
    cfg = settings.sessions
    if cfg.redis_url:
        return RedisSessionStore(cfg.redis_url, ttl=cfg.ttl_seconds)
    return InMemorySessionStore(ttl=cfg.ttl_seconds)


def _isolate_network(mode: str) -> bool:
    if mode == "host":
        return False
    if can_isolate_network():
        return True
    if mode == "isolated":
        raise ConfigError(
            "kernels.network is 'isolated', but this host cannot give kernels a network namespace "
            "(run cablectl as root, or enable unprivileged user namespaces); or set kernels.network: auto"
        )
    log.warning(
        "kernels share the host's network: this host allows no network namespaces (run as root or "
        "enable unprivileged user namespaces); programs can reach anything the proxy can"
    )
    return False


def _kernel_pool(settings: Settings) -> KernelPool:
    cfg = settings.kernels
    provider: KernelProvider
    if cfg.gateway_url:
        provider = GatewayKernelProvider(cfg.gateway_url, auth_token=cfg.gateway_token)
    else:
        limits = ResourceLimits(memory_bytes=cfg.memory_mb * 1024 * 1024, cpu_seconds=cfg.cpu_seconds)
        sandbox = require_sandbox(cfg.sandbox)  # refuses to start where it cannot work
        # a sandbox has no network unless the host's is asked for; unsandboxed, a namespace if possible
        network = cfg.network == "host" if sandbox else not _isolate_network(cfg.network)
        provider = LocalKernelProvider(limits=limits, network=network, sandbox=sandbox, start=cfg.start)
    return KernelPool(
        provider,
        min_idle=min(cfg.min_idle, cfg.max_total),
        max_total=cfg.max_total,
        acquire_timeout=cfg.acquire_timeout,
        limits=ExecLimits(timeout=cfg.cell_timeout, max_output_chars=cfg.max_output_chars),
    )


PUBLISH_INTERVAL = 2.0  # seconds between a replica's announcements of its kernels


async def _publish(store: SessionStore, replica_id: str, snapshot: Callable[[], dict[str, Any]]) -> None:
    """Announce this replica's kernels in the session store, for ``cablectl kernels ls``."""
    while True:
        try:
            await store.publish_replica(replica_id, snapshot(), ttl=3 * PUBLISH_INTERVAL)
        except CablectlError as exc:  # the store is down: /ready says so; try again later
            log.debug("could not announce this replica: %s", exc.message)
        await asyncio.sleep(PUBLISH_INTERVAL)


async def _sweep(runtime: Runtime, idle_seconds: float) -> None:
    """Give back the kernels of sessions idle longer than ``idle_seconds`` (their logs stay),
    and drop expired sessions from an in-process store."""
    while True:
        await asyncio.sleep(min(30.0, idle_seconds / 2))
        await runtime.sweep(idle_seconds)
        with contextlib.suppress(CablectlError):
            await runtime.store.purge_expired()


Progress = Callable[[str, int, int], None]  # (what, done, total): startup steps, for the CLI


async def _warm_up(pool: KernelPool, progress: Progress, timeout: float = 120.0) -> None:
    """Report the pool filling to ``min_idle`` (at most ``timeout`` seconds)."""
    want = pool.min_idle
    deadline = time.monotonic() + timeout
    while (ready := min(want, pool.stats().idle)) < want and time.monotonic() < deadline:
        progress("warm kernel pool", ready, want)
        await asyncio.sleep(0.1)
    progress("warm kernel pool", min(want, pool.stats().idle), want)


def create_app(settings: Settings, progress: Progress | None = None) -> FastAPI:
    """The app. ``progress``, if given, is told of model loads and the kernel pool's warm-up,
    and startup waits for the pool to reach ``min_idle``."""
    router = ModelRouter(settings)
    keyring = KeyRing(settings.keys, settings.server.auth_failures_per_minute)
    body_limit = settings.server.max_request_body_bytes
    store = _session_store(settings)
    # a configured secret wins; else replicas on one Redis agree on one at startup (lifespan)
    ids = CallIds(settings.sessions.secret.encode() if settings.sessions.secret else secrets.token_bytes(32))
    pool = _kernel_pool(settings)
    toolsets = build_toolsets(settings.toolsets)
    metrics = Metrics(known_models=router.names())
    tracer = build_tracer(settings.tracing.langfuse)
    artifacts = Artifacts(store, settings.sessions.max_artifact_bytes)
    replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    address = settings.server.own_url()
    # replicas on one Redis send a session's requests to the one holding its kernel
    owners = Owners(store, replica_id, address) if settings.sessions.redis_url else None
    forwarder = Forwarder(ids.mac, lambda outcome: metrics.forwards.labels(outcome).inc()) if owners else None
    runtime = Runtime(
        pool,
        store,
        on_acquire_wait=metrics.acquire_wait.observe,
        on_replay=lambda reason, cause: metrics.replays.labels(reason, cause).inc(),
        artifacts=artifacts,
        owners=owners,
    )
    metrics.watch(pool.stats, lambda: len(runtime.live))
    loop = ActionLoop(
        router, runtime, store, ids, tracer=tracer, metrics=metrics, max_stubs=settings.affordance.max_stubs
    )
    routes = {entry.model_name: entry for entry in settings.model_list}
    promoted = frozenset(n for n, c in settings.toolsets.items() if c.promoted)
    front = Front(router, loop, tracer, routes, toolsets, Library(store), promoted, forwarder)
    responses = ResponseStore(store, ttl=settings.sessions.ttl_seconds)
    started_at = time.time()

    def replica_snapshot() -> dict[str, Any]:
        return {
            "replica": replica_id,
            "address": address,
            "started_at": started_at,
            "kernels": pool.snapshot(),
            "sessions": {
                sid: {"kernel_id": live.kernel.kernel_id, "waiting_call_id": live.waiting_call_id}
                for sid, live in runtime.live.items()
            },
        }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.sessions.secret is None and settings.sessions.redis_url:
            # restarts and replicas must verify each other's tool-call ids: one secret, stored once
            try:
                ids.rekey(await store.shared_secret(secrets.token_bytes(32)))
            except CablectlError as exc:
                raise ConfigError(
                    f"sessions.redis_url is set but Redis cannot be reached to agree on the session "
                    f"secret ({exc.message}); start Redis, or set sessions.secret"
                ) from exc
        await router.start(progress)
        for toolset in toolsets.values():
            await toolset.start()
            log.info("toolset %s: %d functions", toolset.name, len(toolset.tools))
        await pool.start()
        if progress is not None:
            await _warm_up(pool, progress)
            progress("ready", 1, 1)
        sweeper = asyncio.create_task(_sweep(runtime, settings.kernels.session_idle_seconds))
        publisher = asyncio.create_task(_publish(store, replica_id, replica_snapshot))
        log.info("cablectl %s ready: models %s (config: %s)", __version__, router.names(), settings.source)
        try:
            yield
        finally:
            for task in (sweeper, publisher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await runtime.aclose()
            await pool.aclose()
            for toolset in toolsets.values():
                await toolset.aclose()
            with contextlib.suppress(CablectlError):  # gone at once from `cablectl kernels ls`
                await store.publish_replica(replica_id, {**replica_snapshot(), "stopping": True}, ttl=0.5)
            if forwarder is not None:
                await forwarder.aclose()
            await store.aclose()
            await router.aclose()
            await tracer.aclose()

    app = FastAPI(
        title="cablectl",
        version=__version__,
        summary="OpenAI-compatible proxy that gives any model code actions",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.router = router
    app.state.loop = loop
    app.state.pool = pool
    app.state.store = store
    app.state.metrics = metrics
    app.state.tracer = tracer

    def observe(record: RequestRecord, finished: float) -> None:
        metrics.observe_request(
            record.model,
            record.status or 499,
            finished - record.started,
            record.clock.ms / 1000,
            record.surface,
        )

    app.add_middleware(AccessLogMiddleware, on_finish=observe)

    @app.exception_handler(CablectlError)
    async def _cablectl_error(request: Request, exc: CablectlError) -> Response:
        record: RequestRecord | None = getattr(request.state, "record", None)
        if record is not None:
            record.error = exc.error_code or exc.type
        if is_messages_path(request.url.path):  # Anthropic's clients read Anthropic's error shape
            return messages_error_response(exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return await _cablectl_error(request, _invalid_from_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            return await _cablectl_error(request, UnknownURL(f"Unknown request URL: {where}."))
        if exc.status_code == 405:
            return await _cablectl_error(
                request, MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
            )
        return _openai_error(exc.status_code, str(exc.detail), "invalid_request_error", None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # the one boundary where anything is caught: log it whole, answer without a traceback
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        error = CablectlError("The proxy hit an internal error; it has been logged.", code="internal_error")
        return messages_error_response(error) if is_messages_path(request.url.path) else error_response(error)

    def principal_for(request: Request) -> Principal:
        principal = keyring.authenticate(request.headers, request.client.host if request.client else "-")
        record: RequestRecord = request.state.record
        record.key_id = principal.key_id
        return principal

    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"])
    async def ready() -> JSONResponse:
        """Readiness: every model is loaded (local) or configured (remote)."""
        models = router.ready()
        sessions = await store.ping()
        ok = all(models.values()) and sessions
        return JSONResponse(
            {"status": "ready" if ok else "loading", "models": models, "sessions": sessions},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics (text exposition format); the names are listed in the README."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "cablectl"}

    @app.get("/v1/models", tags=["openai"])
    @app.get("/models", include_in_schema=False)
    async def list_models(request: Request) -> dict[str, Any]:
        """The models this key may use."""
        principal = principal_for(request)
        return {"object": "list", "data": [model_card(n) for n in router.names() if principal.may_use(n)]}

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        principal = principal_for(request)
        principal.check_model(model_id)
        router.get(model_id)
        return model_card(model_id)

    chat_openapi, component_defs = request_body_openapi(ChatCompletionRequest)

    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions, streamed (SSE) or not."""
        record: RequestRecord = request.state.record
        record.surface = "chat.completions"
        principal = principal_for(request)
        raw = await _read_body(request, body_limit)
        payload, chat = _parse_request(raw)
        record.model = chat.model
        record.stream = bool(chat.stream)
        if not principal.may_use(chat.model):
            raise PermissionDenied(
                f"API key {principal.key_id!r} may not use model {chat.model!r}; "
                "add it to that key's 'models' in config.yaml or use another key",
                param="model",
            )
        if front.loop_entry(chat) is not None:
            answer = await front.answer(request, principal, record, payload, chat, "chat.completions")
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)

            async def whole(events: AsyncIterator[Event]) -> bytes:
                return chat_body(await collect(events), chat.model)

            return await respond(
                answer,
                record,
                bool(chat.stream),
                whole,
                lambda events: chat_chunks(events, chat.model, include_usage),
            )
        span = tracer.start(
            "chat.completions", input=payload.get("messages"), metadata={"stream": bool(chat.stream)}
        )
        traced = {TRACE_HEADER: span.trace_id} if span.trace_id else {}
        generation = span.child("generation", "generation", input=payload.get("messages"), model=chat.model)
        try:
            if not chat.stream:
                body = await router.complete(payload, chat, record.clock)
            else:
                stream = await router.open_stream(payload, chat, record.clock)
        except CablectlError as exc:
            for traced_span in (generation, span):
                traced_span.end(error=exc.message)
            raise
        if not chat.stream:
            if tracer.enabled:
                _end_traced(body, generation, span)
            return Response(body, media_type="application/json", headers=traced)
        return StreamingResponse(
            _relay(stream, record, (generation, span)),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **traced},
        )

    async def read_body(request: Request) -> bytes:
        return await _read_body(request, body_limit)

    component_defs |= add_surface_routes(app, front, responses, read_body, principal_for)
    add_session_routes(app, store, artifacts, principal_for)

    for path, in_schema in (("/v1/chat/completions", True), ("/chat/completions", False)):
        app.add_api_route(
            path,
            chat_completions,
            methods=["POST"],
            tags=["openai"],
            include_in_schema=in_schema,
            openapi_extra=chat_openapi,
            response_model=None,
        )

    original_openapi = app.openapi

    def openapi_with_defs() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(component_defs)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_with_defs  # type: ignore[method-assign]
    return app


def _end_traced(body: bytes, generation: Span, span: Span) -> None:
    """End a pass-through request's spans with the model's message and usage."""
    try:
        data = orjson.loads(body)
        message = (data.get("choices") or [{}])[0].get("message")
        usage = data.get("usage") or None
    except (orjson.JSONDecodeError, AttributeError, IndexError, TypeError):
        message, usage = None, None
    generation.end(output=message, usage=usage)
    span.end(output=message)


async def _relay(
    stream: SSEStream, record: RequestRecord, spans: tuple[Span, ...] = ()
) -> AsyncIterator[bytes]:
    """Forward upstream SSE bytes as they arrive; a failure mid-stream becomes an error event."""

    async def cleanup() -> None:
        # the upstream connection or the local model context must be given back
        try:
            await chunks.aclose()
        finally:
            await stream.aclose()
            for span in spans:
                span.end(error=record.error, metadata={"stream": True})

    chunks = timed(stream, record.clock)
    async for chunk in guarded_sse(chunks, record, cleanup):
        yield chunk
