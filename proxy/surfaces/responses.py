"""The Responses API surface (``POST /v1/responses``): a request parser and an event renderer.

In: ``input`` (a string, or items: ``message`` with ``input_text``/``input_image`` parts,
``function_call``, ``function_call_output``), ``instructions``, function ``tools``,
``tool_choice``, ``parallel_tool_calls``, ``max_output_tokens``, ``temperature``, ``top_p``,
``metadata``, ``store``, ``previous_response_id`` (read back from the response store),
``stream``, ``text.format``. Out: the neutral conversation, a chat-completions payload.
Refused with a 400 that names them: tools other than ``function``, ``file_id`` images and
files, ``item_reference`` items, ``background``, ``conversation`` and ``prompt``.

The renderer turns the loop's events into the typed stream OpenAI sends, numbered from 0::

    response.created, response.in_progress
    per text run:   output_item.added (message), content_part.added,
                    output_text.delta*, output_text.done, content_part.done, output_item.done
    per tool call:  output_item.added (function_call), function_call_arguments.delta*,
                    function_call_arguments.done, output_item.done
    response.completed | response.incomplete (max_output_tokens) | response.failed

or, gathered, into the one response object. Programs run in the proxy are not shown.
"""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from proxy.actions.events import (
    Event,
    Finished,
    Started,
    TextDelta,
    ToolCallArguments,
    ToolCallDone,
    ToolCallStarted,
    Usage,
)
from proxy.errors import CablectlError, InvalidRequest
from proxy.schemas import ChatCompletionRequest
from proxy.surfaces.common import chat_request, json_object, new_id, sse, validated
from proxy.surfaces.response_store import ResponseStore

__all__ = [
    "ResponsesCall",
    "ResponsesRequest",
    "parse_responses_request",
    "render_responses_json",
    "render_responses_sse",
    "response_deleted_body",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")  # what clients add (ids, status, annotations) is ignored


class InputText(_Wire):
    type: Literal["input_text"]
    text: str


class OutputText(_Wire):
    type: Literal["output_text"]
    text: str


class Refusal(_Wire):
    type: Literal["refusal"]
    refusal: str


class InputImage(_Wire):
    type: Literal["input_image"]
    image_url: str | None = None
    detail: Literal["low", "high", "auto", "original"] | None = None


Part = Annotated[InputText | OutputText | Refusal | InputImage, Field(discriminator="type")]


class MessageItem(_Wire):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]


class FunctionCallItem(_Wire):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Wire):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Annotated[InputText | InputImage, Field(discriminator="type")]]


class ReasoningItem(_Wire):
    type: Literal["reasoning"]  # another model's reasoning, sent back: nothing a chat model takes


def _item_tag(value: Any) -> str:
    return str((value.get("type") if isinstance(value, dict) else getattr(value, "type", None)) or "message")


Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_tag),
]


class FunctionTool(_Wire):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Wire):
    type: Literal["function"]
    name: str = Field(min_length=1)


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``. Fields this proxy has no use for (``include``, ``truncation``,
    ``reasoning``, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[Item]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool = True
    previous_response_id: str | None = Field(default=None, min_length=1)
    stream: bool = False
    text: dict[str, Any] | None = None
    user: str | None = None


@dataclass(frozen=True)
class ResponsesCall:
    """One parsed request: what the loop (or the router) gets, and what the renderer echoes."""

    request: ResponsesRequest
    payload: dict[str, Any]  # the neutral conversation: a chat-completions payload
    chat: ChatCompletionRequest  # ``payload`` validated
    history: list[dict[str, Any]]  # chat messages without instructions: earlier responses', then input
    owner: str  # the API key's id: stored responses are per key
    continues: str | None = None  # the session of ``previous_response_id``: the follow-up continues it
    response_id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))


# ---------------------------------------------------------------------------------------- parse

_REFUSED_FIELDS = {
    "background": "run it in the foreground (omit 'background')",
    "conversation": "use 'previous_response_id', or send the conversation as 'input'",
    "prompt": "send the prompt's text as 'instructions' and 'input'",
}


def _refuse_unsupported(data: dict[str, Any]) -> None:
    """What pydantic would reject vaguely, refused with a message that names it and the fix."""
    for name, fix in _REFUSED_FIELDS.items():
        if data.get(name):
            raise InvalidRequest(f"'{name}' is not supported by this proxy: {fix}.", param=name)
    tools = data.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InvalidRequest(
                f"Tool type {kind!r} is not supported by this proxy: only tools of type 'function' "
                "(the proxy runs them as code actions); remove it or describe it as a function.",
                param=f"tools[{i}].type",
            )
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") != "function":
        raise InvalidRequest(
            f"tool_choice of type {choice.get('type')!r} is not supported: use 'auto', 'none', "
            "'required' or {'type': 'function', 'name': ...}.",
            param="tool_choice.type",
        )
    items = data.get("input")
    for i, item in enumerate(items if isinstance(items, list) else []):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "item_reference":
            raise InvalidRequest(
                "'item_reference' items are not supported: send the item itself, or continue "
                "with 'previous_response_id'.",
                param=f"input[{i}]",
            )
        if kind not in {"message", "function_call", "function_call_output", "reasoning"}:
            raise InvalidRequest(
                f"Input items of type {kind!r} are not supported: send 'message', 'function_call' "
                "and 'function_call_output' items.",
                param=f"input[{i}].type",
            )
        parts = item.get("content") if kind == "message" else item.get("output")
        for j, part in enumerate(parts if isinstance(parts, list) else []):
            where = f"input[{i}].{'content' if kind == 'message' else 'output'}[{j}]"
            if isinstance(part, dict) and part.get("type") == "input_file":
                raise InvalidRequest("'input_file' parts are not supported: send text.", param=where)
            if isinstance(part, dict) and part.get("file_id"):
                raise InvalidRequest(
                    "Images by 'file_id' are not supported: send 'image_url' (https or a data: URL).",
                    param=where,
                )


def _text(parts: list[Any], where: str, role: str) -> str:
    out = []
    for part in parts:
        if isinstance(part, InputImage):
            raise InvalidRequest(f"Images are not supported in {role} content.", param=where)
        out.append(part.refusal if isinstance(part, Refusal) else part.text)
    return "".join(out)


def _user_content(parts: list[Any], where: str) -> str | list[dict[str, Any]]:
    chat_parts: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        if isinstance(part, InputImage):
            if not part.image_url:
                raise InvalidRequest("An 'input_image' part needs 'image_url'.", param=f"{where}[{j}]")
            url: dict[str, Any] = {"url": part.image_url}
            if part.detail in ("low", "high", "auto"):
                url["detail"] = part.detail
            chat_parts.append({"type": "image_url", "image_url": url})
        else:
            chat_parts.append(
                {"type": "text", "text": part.refusal if isinstance(part, Refusal) else part.text}
            )
    if len(chat_parts) == 1 and chat_parts[0]["type"] == "text":
        return str(chat_parts[0]["text"])
    return chat_parts


def input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """``input`` as chat messages: consecutive assistant text and function calls make one
    assistant message (its ``tool_calls``), each function_call_output a ``tool`` message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            where = f"input[{i}].content"
            if isinstance(item.content, str):
                out.append({"role": item.role, "content": item.content})
            elif item.role == "user":
                out.append({"role": "user", "content": _user_content(item.content, where)})
            else:
                out.append({"role": item.role, "content": _text(item.content, where, item.role)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output
            if not isinstance(output, str):
                output = _text(output, f"input[{i}].output", "function_call_output")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return out


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return {"type": str(fmt.get("type"))}


_FUNCTION_FIELDS = {"name", "description", "parameters", "strict"}


def chat_payload(request: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The neutral conversation: a chat-completions payload (``None`` fields left out)."""
    system = [{"role": "system", "content": request.instructions}] if request.instructions else []
    tool_choice: Any = request.tool_choice
    if isinstance(tool_choice, FunctionChoice):
        tool_choice = {"type": "function", "function": {"name": tool_choice.name}}
    tools: list[dict[str, Any]] = [
        {"type": "function", "function": t.model_dump(include=_FUNCTION_FIELDS, exclude_none=True)}
        for t in request.tools or []
    ]
    payload = {
        "model": request.model,
        "messages": [*system, *history],
        "tools": tools or None,
        "tool_choice": tool_choice if tools else None,
        "parallel_tool_calls": request.parallel_tool_calls if tools else None,
        "max_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stream": request.stream,
        "stream_options": {"include_usage": True} if request.stream else None,
        "metadata": request.metadata,
        "user": request.user,
        "response_format": _response_format(request.text),
    }
    return {k: v for k, v in payload.items() if v is not None}


async def parse_responses_request(raw: bytes, store: ResponseStore, owner: str) -> ResponsesCall:
    """A ``POST /v1/responses`` body as the neutral conversation; ``InvalidRequest`` (400) for a
    bad one, ``ResponseNotFound`` (404) for a ``previous_response_id`` this key cannot read."""
    data = json_object(raw, "'model' and 'input'")
    _refuse_unsupported(data)
    request = validated(ResponsesRequest, data)
    history: list[dict[str, Any]] = []
    continues = None
    if request.previous_response_id is not None:
        stored = await store.require(request.previous_response_id, owner, param="previous_response_id")
        history = list(stored.messages)
        continues = stored.session_id
    history += input_messages(request.input)
    if not history:
        raise InvalidRequest("'input' is empty: send a string or at least one item.", param="input")
    payload = chat_payload(request, history)
    return ResponsesCall(
        request=request,
        payload=payload,
        chat=chat_request(payload),
        history=history,
        owner=owner,
        continues=continues,
    )


def response_deleted_body(response_id: str) -> dict[str, Any]:
    """What ``DELETE /v1/responses/{id}`` answers when it deleted one."""
    return {"id": response_id, "object": "response", "deleted": True}


# --------------------------------------------------------------------------------------- render


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _error_code(exc: CablectlError) -> str:
    """The closest of the codes a Response's ``error`` may carry."""
    if exc.http_status == 429:
        return "rate_limit_exceeded"
    return "invalid_prompt" if 400 <= exc.http_status < 500 else "server_error"


class _Builder:
    """The response as it grows, and the stream events (numbered) that tell a client so."""

    def __init__(self, call: ResponsesCall) -> None:
        self.call = call
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.text: dict[str, Any] | None = None  # the message item being written
        self.calls: dict[int, dict[str, Any]] = {}  # open function_call items by event index

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        out = {"type": type_, **fields, "sequence_number": self.seq}
        self.seq += 1
        return out

    def response(self, status: str, **more: Any) -> dict[str, Any]:
        request, tools = self.call.request, self.call.request.tools or []
        choice = request.tool_choice or "auto"
        return {
            "id": self.call.response_id,
            "object": "response",
            "created_at": self.call.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": request.model,
            "output": self.output,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": request.store,
            "temperature": request.temperature,
            "text": request.text or {"format": {"type": "text"}},
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
            "tools": [t.model_dump(exclude_none=True) for t in tools],
            "top_p": request.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": request.user,
            "metadata": request.metadata or {},
            **more,
        }

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _add(self, item: dict[str, Any]) -> dict[str, Any]:
        self.output.append(item)
        return self.event(
            "response.output_item.added", output_index=len(self.output) - 1, item=copy.deepcopy(item)
        )

    def close_text(self, status: str = "completed") -> Iterator[dict[str, Any]]:
        item, self.text = self.text, None
        if item is None:
            return
        part = item["content"][0]
        where = {**self._where(item), "content_index": 0}
        yield self.event("response.output_text.done", **where, text=part["text"], logprobs=[])
        yield self.event("response.content_part.done", **where, part=copy.deepcopy(part))
        item["status"] = status
        yield self.event("response.output_item.done", output_index=where["output_index"], item=item)

    def feed(self, event: Event) -> Iterator[dict[str, Any]]:
        if isinstance(event, TextDelta) and event.text:
            if self.text is None:
                self.text = {"id": new_id("msg"), "type": "message", "status": "in_progress"}
                self.text |= {"role": "assistant", "content": []}
                yield self._add(self.text)
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                self.text["content"].append(part)
                yield self.event(
                    "response.content_part.added",
                    **self._where(self.text),
                    content_index=0,
                    part=copy.deepcopy(part),
                )
            self.text["content"][0]["text"] += event.text
            where = self._where(self.text)
            yield self.event(
                "response.output_text.delta", **where, content_index=0, delta=event.text, logprobs=[]
            )
        elif isinstance(event, ToolCallStarted):
            yield from self.open_call(event.index, event.call_id, event.name)
        elif isinstance(event, ToolCallArguments) and event.fragment:
            item = self.calls[event.index]
            item["arguments"] += event.fragment
            yield self.event(
                "response.function_call_arguments.delta", **self._where(item), delta=event.fragment
            )
        elif isinstance(event, ToolCallDone):
            if event.index not in self.calls:
                yield from self.open_call(event.index, event.call_id, event.name)
            item = self.calls.pop(event.index)
            item |= {"arguments": event.arguments, "status": "completed"}
            where = self._where(item)
            yield self.event(
                "response.function_call_arguments.done", **where, name=event.name, arguments=event.arguments
            )
            yield self.event("response.output_item.done", output_index=where["output_index"], item=item)

    def open_call(self, index: int, call_id: str, name: str) -> Iterator[dict[str, Any]]:
        yield from self.close_text()
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress"}
        self.calls[index] = item | {"arguments": "", "call_id": call_id, "name": name}
        yield self._add(self.calls[index])

    def finish(self, finished: Finished) -> dict[str, Any]:
        """The final response (open items are closed by the caller first)."""
        if finished.reason == "length":
            return self.response(
                "incomplete", incomplete_details={"reason": "max_output_tokens"}, usage=_usage(finished.usage)
            )
        return self.response("completed", completed_at=int(time.time()), usage=_usage(finished.usage))

    def fail(self, exc: CablectlError) -> Iterator[dict[str, Any]]:
        yield from self.close_text("incomplete")
        for item in self.calls.values():
            item["status"] = "incomplete"
        error = {"code": _error_code(exc), "message": exc.message}
        yield self.event("response.failed", response=self.response("failed", error=error))


async def _run(
    builder: _Builder, events: AsyncIterator[Event], store: ResponseStore | None
) -> AsyncIterator[dict[str, Any]]:
    """Stream events; the last is ``response.completed`` or ``response.incomplete``."""
    call = builder.call
    session_id: str | None = None
    yield builder.event("response.created", response=builder.response("in_progress"))
    yield builder.event("response.in_progress", response=builder.response("in_progress"))
    async for event in events:
        if isinstance(event, Started):
            session_id = event.session_id
        if isinstance(event, Finished):
            for out in builder.close_text("incomplete" if event.reason == "length" else "completed"):
                yield out
            final = builder.finish(event)
            if store is not None and call.request.store:
                await store.save(call.owner, call.history, final, session_id)
            kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
            yield builder.event(kind, response=final)
            return
        for out in builder.feed(event):
            yield out
    raise CablectlError("The action loop ended without finishing the response; it has been logged.")


async def render_responses_sse(
    events: AsyncIterator[Event], call: ResponsesCall, store: ResponseStore | None = None
) -> AsyncIterator[bytes]:
    """SSE as the events arrive. A ``CablectlError`` from ``events`` (or from saving) ends the
    stream with ``response.failed``; the response is saved (when ``store``) before it completes."""
    builder = _Builder(call)
    try:
        async for out in _run(builder, events, store):
            yield sse(out["type"], out)
    except CablectlError as exc:
        for out in builder.fail(exc):
            yield sse(out["type"], out)


async def render_responses_json(
    events: AsyncIterator[Event], call: ResponsesCall, store: ResponseStore | None = None
) -> bytes:
    """The final response object (saved when ``store``). A failure is raised as it came, for
    the caller to answer with its HTTP status."""
    last: dict[str, Any] = {}
    async for out in _run(_Builder(call), events, store):
        last = out
    return orjson.dumps(last["response"])
