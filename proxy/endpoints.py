"""The Responses API and Anthropic's Messages API as HTTP endpoints, beside chat completions.

    POST   /v1/responses                 parse -> Front.answer -> render (JSON or SSE), stored
    GET    /v1/responses/{id}            a stored response (this API key's)
    DELETE /v1/responses/{id}
    POST   /v1/messages                  parse -> Front.answer -> render (JSON or SSE)
    POST   /v1/messages/count_tokens     the prompt the model would see, counted
    GET    /v1/sessions/{id}/artifacts[/{name}]   files a session's programs wrote (its key only)

Every error on a ``/v1/messages`` path is answered in Anthropic's shape (``messages_error``;
``proxy.app`` routes its exception handlers here through ``is_messages_path``); the Responses
API uses OpenAI's, as chat completions do. A stored response keeps the session that answered
it, so ``previous_response_id`` continues that session (same kernel, or a replay of its log)
on any replica that shares the session store.
"""

from __future__ import annotations

import mimetypes
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from proxy.accesslog import RequestRecord
from proxy.actions.artifacts import Artifacts, latest_artifacts
from proxy.auth import Principal
from proxy.config import ModelEntry
from proxy.errors import ArtifactNotFound, CablectlError, ResponseNotFound, SessionNotFound
from proxy.front import SSE_HEADERS, Front, guarded_sse, respond, timed
from proxy.sessions import SessionStore
from proxy.surfaces import (
    ResponseStore,
    messages_error,
    messages_error_event,
    parse_count_tokens_request,
    parse_messages_request,
    parse_responses_request,
    render_messages_json,
    render_messages_sse,
    render_responses_json,
    render_responses_sse,
    response_deleted_body,
)
from proxy.surfaces.messages import CountTokensRequest, MessagesRequest
from proxy.surfaces.responses import ResponsesRequest

__all__ = [
    "add_session_routes",
    "add_surface_routes",
    "is_messages_path",
    "messages_error_response",
    "request_body_openapi",
]

ReadBody = Callable[[Request], Awaitable[bytes]]
Authenticate = Callable[[Request], Principal]


def request_body_openapi(model: type[BaseModel], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenAPI for an endpoint that parses its body itself: the request body (a reference to
    ``model``'s schema) and the component schemas it needs, named with ``prefix`` so that two
    surfaces' ``ToolChoice`` do not clash."""
    schema = model.model_json_schema(ref_template=f"#/components/schemas/{prefix}{{model}}")
    defs: dict[str, Any] = {f"{prefix}{k}": v for k, v in schema.pop("$defs", {}).items()}
    name = f"{prefix}{model.__name__}"
    defs[name] = schema
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
    return {"requestBody": {"required": True, "content": content}}, defs


def _forwarded(raw: bytes, front: Front) -> tuple[dict[str, Any], ModelEntry] | None:
    """The request and its route, if the route forwards ``/v1/responses`` to its upstream
    (``responses_api: upstream``) and no code actions apply (no tools, or code actions off)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        return None
    entry = front.routes.get(data["model"])
    if entry is None or entry.responses_api != "upstream":
        return None
    if entry.code_actions and (data.get("tools") or entry.toolsets):
        return None
    return data, entry


def is_messages_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def messages_error_response(exc: CablectlError) -> Response:
    """A cablectl error as Anthropic answers one (with ``Retry-After`` when it has one)."""
    status, body = messages_error(exc)
    retry_after = getattr(exc, "retry_after", None)
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def add_surface_routes(
    app: FastAPI,
    front: Front,
    responses: ResponseStore,
    read_body: ReadBody,
    authenticate: Authenticate,
) -> dict[str, Any]:
    """Add the routes; returns the component schemas their OpenAPI entries refer to."""

    async def forward_response(
        request: Request, principal: Principal, data: dict[str, Any], entry: ModelEntry
    ) -> Response:
        """A route whose upstream serves ``/responses`` itself: the request goes there as it is."""
        record: RequestRecord = request.state.record
        principal.check_model(entry.model_name)
        record.model, record.stream = entry.model_name, data.get("stream") is True
        result = await front.router.forward(entry.model_name, "/responses", data, record.stream, record.clock)
        if isinstance(result, bytes):
            return Response(result, media_type="application/json")
        stream = result

        async def relay() -> AsyncIterator[bytes]:
            async for chunk in timed(stream, record.clock):
                yield chunk

        return StreamingResponse(
            guarded_sse(relay(), record, stream.aclose), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def create_response(request: Request) -> Response:
        """OpenAI's Responses API: ``input`` items in, ``output`` items out, streamed or not."""
        record: RequestRecord = request.state.record
        record.surface = "responses"
        principal = authenticate(request)
        raw = await read_body(request)
        native = _forwarded(raw, front)
        if native is not None:
            return await forward_response(request, principal, *native)
        call = await parse_responses_request(raw, responses, principal.key_id)
        answer = await front.answer(
            request, principal, record, call.payload, call.chat, "responses", continues=call.continues
        )
        store = responses if call.request.store else None
        return await respond(
            answer,
            record,
            call.request.stream,
            lambda events: render_responses_json(events, call, store),
            lambda events: render_responses_sse(events, call, store),
        )

    async def get_response(response_id: str, request: Request) -> Response:
        """A stored response, as it was sent."""
        request.state.record.surface = "responses"
        principal = authenticate(request)
        stored = await responses.require(response_id, principal.key_id)
        return JSONResponse(stored.response)

    async def delete_response(response_id: str, request: Request) -> Response:
        """Forget a stored response (a later ``previous_response_id`` naming it is a 404)."""
        request.state.record.surface = "responses"
        principal = authenticate(request)
        if not await responses.delete(response_id, principal.key_id):
            raise ResponseNotFound(f"No response with id {response_id!r} is stored for this API key.")
        return JSONResponse(response_deleted_body(response_id))

    async def create_message(request: Request) -> Response:
        """Anthropic's Messages API: content blocks in and out, streamed or not."""
        record: RequestRecord = request.state.record
        record.surface = "messages"
        principal = authenticate(request)
        raw = await read_body(request)
        call = parse_messages_request(raw)
        answer = await front.answer(request, principal, record, call.payload, call.chat, "messages")
        return await respond(
            answer,
            record,
            call.stream,
            lambda events: render_messages_json(events, call),
            lambda events: render_messages_sse(events, call),
            messages_error_event,
        )

    async def count_message_tokens(request: Request) -> Response:
        """The input tokens a Messages request would cost: the prompt the model would see."""
        record: RequestRecord = request.state.record
        record.surface = "messages"
        principal = authenticate(request)
        raw = await read_body(request)
        call = parse_count_tokens_request(raw)
        principal.check_model(call.chat.model)
        record.model = call.chat.model
        return JSONResponse({"input_tokens": await front.count_tokens(call.payload, call.chat, principal)})

    responses_body, defs = request_body_openapi(ResponsesRequest, "Responses")
    messages_body, messages_defs = request_body_openapi(MessagesRequest, "Messages")
    count_body, count_defs = request_body_openapi(CountTokensRequest, "Messages")
    for path, endpoint, methods, tag, extra in (
        ("/v1/responses", create_response, ["POST"], "responses", responses_body),
        ("/v1/responses/{response_id}", get_response, ["GET"], "responses", None),
        ("/v1/responses/{response_id}", delete_response, ["DELETE"], "responses", None),
        ("/v1/messages", create_message, ["POST"], "anthropic", messages_body),
        ("/v1/messages/count_tokens", count_message_tokens, ["POST"], "anthropic", count_body),
    ):
        app.add_api_route(
            path, endpoint, methods=methods, tags=[tag], openapi_extra=extra, response_model=None
        )
    return defs | messages_defs | count_defs


def add_session_routes(
    app: FastAPI, store: SessionStore, artifacts: Artifacts, authenticate: Authenticate
) -> None:
    """``GET /v1/sessions/{id}/artifacts[/{name}]``: the files a session's programs wrote, for
    the API key that owns the session only (anyone else gets the same 404 as for no session)."""

    async def owned(request: Request, session_id: str) -> list[dict[str, Any]]:
        principal = authenticate(request)
        events = await store.events(session_id) if len(session_id) <= 64 else []
        owner = next((e.get("owner") for e in events if e.get("kind") == "tools"), None)
        if not events or owner != principal.key_id:
            raise SessionNotFound(
                f"No session {session_id!r} for this API key: it never existed, has expired, or "
                "belongs to another key."
            )
        return events

    async def list_artifacts(session_id: str, request: Request) -> Response:
        """The latest version of each file the session's programs wrote."""
        events = await owned(request, session_id)
        data = [
            {
                "name": name,
                "size": e["size"],
                "sha256": e["sha256"],
                "turn": e.get("turn"),
                "created_at": e.get("at"),
                "stored": bool(e.get("stored")),
            }
            for name, e in sorted(latest_artifacts(events).items())
        ]
        return JSONResponse({"object": "list", "session_id": session_id, "data": data})

    async def get_artifact(session_id: str, name: str, request: Request) -> Response:
        """One file's bytes (its latest version)."""
        events = await owned(request, session_id)
        event = latest_artifacts(events).get(name)
        if event is None:
            raise ArtifactNotFound(
                f"Session {session_id!r} has no file {name!r}; list them at .../artifacts."
            )
        data = await artifacts.read(session_id, event)
        if data is None:
            raise ArtifactNotFound(
                f"{name!r} ({event['size']} bytes) was recorded but not kept: it did not fit in "
                "sessions.max_artifact_bytes, or has expired."
            )
        media = mimetypes.guess_type(name)[0] or "application/octet-stream"
        filename = urllib.parse.quote(name.rsplit("/", 1)[-1])
        return Response(
            data,
            media_type=media,
            headers={
                "content-disposition": f"attachment; filename*=UTF-8''{filename}",
                "x-content-type-options": "nosniff",
                "etag": f'"{event["sha256"]}"',
            },
        )

    app.add_api_route(
        "/v1/sessions/{session_id}/artifacts", list_artifacts, methods=["GET"], tags=["sessions"]
    )
    app.add_api_route(
        "/v1/sessions/{session_id}/artifacts/{name:path}", get_artifact, methods=["GET"], tags=["sessions"]
    )
