"""Anthropic's Messages API surface (``POST /v1/messages``): a request parser, an event
renderer and Anthropic's error shape.

In: ``system`` (a string or text blocks), ``messages`` whose content is a string or blocks
(``text``, ``image``, ``tool_use``, ``tool_result`` with ``is_error``), custom ``tools`` with
``input_schema``, ``tool_choice`` (``auto``, ``any``, ``tool``, ``none``;
``disable_parallel_tool_use``), ``max_tokens`` (required), ``stop_sequences``,
``temperature``, ``top_p``, ``metadata.user_id``, ``stream``. Out: the neutral conversation,
a chat-completions payload. Refused with a 400 that names them: Anthropic's own tool types
(``web_search_...``, ``bash_...``, ...) and content blocks other than those above
(``thinking`` blocks sent back are dropped: nothing a chat model takes). A ``tool_result``
with ``is_error`` reaches the model as a tool message that starts with ``Error:``.

The renderer's stream is the one Anthropic sends::

    message_start, ping
    per block:  content_block_start (text | tool_use), content_block_delta* (text_delta |
                input_json_delta), content_block_stop
    message_delta (stop_reason, usage), message_stop

with a ``ping`` while a program runs in the proxy, and a failure as an ``error`` event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from proxy.actions.events import (
    ActionStarted,
    Event,
    Finished,
    TextDelta,
    ToolCallArguments,
    ToolCallDone,
    ToolCallStarted,
)
from proxy.errors import CablectlError, InvalidRequest, ModelOutputInvalid
from proxy.schemas import ChatCompletionRequest
from proxy.surfaces.common import chat_request, json_object, new_id, sse, validated

__all__ = [
    "CountTokensRequest",
    "MessagesCall",
    "MessagesRequest",
    "messages_error",
    "messages_error_event",
    "parse_count_tokens_request",
    "parse_messages_request",
    "render_messages_json",
    "render_messages_sse",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations, ... are ignored


class TextBlock(_Wire):
    type: Literal["text"]
    text: str


class ImageSource(_Wire):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(_Wire):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(_Wire):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Wire):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] = ""
    is_error: bool = False


class ThinkingBlock(_Wire):
    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")
]


class MessageParam(_Wire):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolParam(_Wire):
    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Wire):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(_Wire):
    user_id: str | None = None


class CountTokensRequest(BaseModel):
    """``POST /v1/messages/count_tokens``: a message request without ``max_tokens``."""

    model_config = ConfigDict(extra="allow")  # thinking, service_tier, ... are accepted and ignored

    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(default=None, max_length=4)
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    metadata: Metadata | None = None
    stream: bool = False


@dataclass(frozen=True)
class MessagesCall:
    request: CountTokensRequest  # a MessagesRequest for /v1/messages
    payload: dict[str, Any]  # the neutral conversation: a chat-completions payload
    chat: ChatCompletionRequest  # ``payload`` validated
    message_id: str = field(default_factory=lambda: new_id("msg"))

    @property
    def stream(self) -> bool:
        return isinstance(self.request, MessagesRequest) and self.request.stream


# ---------------------------------------------------------------------------------------- parse

_BLOCKS = {"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []  # anything else is pydantic's to refuse


def _refuse_unsupported(data: dict[str, Any]) -> None:
    for i, tool in enumerate(_list(data.get("tools"))):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in (None, "custom"):
            raise InvalidRequest(
                f"Tool type {kind!r} is not supported by this proxy: only custom tools (a name and "
                "an input_schema; the proxy runs them as code actions). Remove it or describe it "
                "as a custom tool.",
                param=f"tools[{i}].type",
            )
    for i, message in enumerate(_list(data.get("messages"))):
        blocks = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(blocks if isinstance(blocks, list) else []):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in _BLOCKS:
                raise InvalidRequest(
                    f"Content blocks of type {kind!r} are not supported by this proxy: send "
                    "'text', 'image', 'tool_use' and 'tool_result' blocks.",
                    param=f"messages[{i}].content[{j}].type",
                )


def _image(block: ImageBlock, where: str) -> dict[str, Any]:
    source = block.source
    if source.type == "url" and source.url:
        return {"type": "image_url", "image_url": {"url": source.url}}
    if source.type == "base64" and source.data and source.media_type:
        return {"type": "image_url", "image_url": {"url": f"data:{source.media_type};base64,{source.data}"}}
    raise InvalidRequest(
        "An image source needs 'url' (type 'url') or 'media_type' and 'data' (type 'base64').",
        param=f"{where}.source",
    )


def _parts(blocks: list[Any], where: str) -> str | list[dict[str, Any]]:
    parts = [
        _image(b, f"{where}[{j}]") if isinstance(b, ImageBlock) else {"type": "text", "text": b.text}
        for j, b in enumerate(blocks)
    ]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tool_result(block: ToolResultBlock, where: str) -> dict[str, Any]:
    content = block.content
    if not isinstance(content, str):
        if any(isinstance(b, ImageBlock) for b in content):
            raise InvalidRequest("Images in a tool_result are not supported: send text.", param=where)
        content = "".join(b.text for b in content if isinstance(b, TextBlock))
    if block.is_error:
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def chat_messages(messages: list[MessageParam]) -> list[dict[str, Any]]:
    """Anthropic messages as chat messages: a user turn's tool_results become ``tool`` messages
    (first, as Anthropic orders them), an assistant turn's tool_use blocks its ``tool_calls``."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}].content"
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        blocks = [b for b in message.content if not isinstance(b, ThinkingBlock)]
        results = [b for b in blocks if isinstance(b, ToolResultBlock)]
        calls = [b for b in blocks if isinstance(b, ToolUseBlock)]
        rest = [b for b in blocks if isinstance(b, TextBlock | ImageBlock)]
        if message.role == "user":
            if calls:
                raise InvalidRequest("tool_use blocks belong in assistant messages.", param=where)
            out += [_tool_result(b, where) for b in results]
            if rest or not results:
                out.append({"role": "user", "content": _parts(rest, where)})
            continue
        if results:
            raise InvalidRequest("tool_result blocks belong in user messages.", param=where)
        if any(isinstance(b, ImageBlock) for b in rest):
            raise InvalidRequest("Images are not supported in assistant messages.", param=where)
        assistant: dict[str, Any] = {"role": "assistant", "content": _parts(rest, where) or None}
        if calls:
            assistant["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": orjson.dumps(c.input).decode()},
                }
                for c in calls
            ]
        out.append(assistant)
    return out


def _tool_choice(choice: ToolChoice | None) -> Any:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequest("tool_choice of type 'tool' needs 'name'.", param="tool_choice.name")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def chat_payload(request: CountTokensRequest) -> dict[str, Any]:
    """The neutral conversation: a chat-completions payload (``None`` fields left out)."""
    system = request.system
    if isinstance(system, list):
        system = "\n".join(b.text for b in system)
    tools = [
        {
            "type": "function",
            "function": {"name": t.name, "parameters": t.input_schema}
            | ({"description": t.description} if t.description else {}),
        }
        for t in request.tools or []
    ]
    choice = request.tool_choice
    payload: dict[str, Any] = {
        "model": request.model,
        "messages": [
            *([{"role": "system", "content": system}] if system else []),
            *chat_messages(request.messages),
        ],
        "tools": tools or None,
        "tool_choice": _tool_choice(choice) if tools else None,
        "parallel_tool_calls": False if tools and choice and choice.disable_parallel_tool_use else None,
    }
    if isinstance(request, MessagesRequest):
        payload |= {
            "max_tokens": request.max_tokens,
            "stop": request.stop_sequences or None,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": request.stream,
            "stream_options": {"include_usage": True} if request.stream else None,
            "user": request.metadata.user_id if request.metadata else None,
        }
    return {k: v for k, v in payload.items() if v is not None}


def _call(request: CountTokensRequest) -> MessagesCall:
    payload = chat_payload(request)
    return MessagesCall(request=request, payload=payload, chat=chat_request(payload))


def parse_messages_request(raw: bytes) -> MessagesCall:
    """A ``POST /v1/messages`` body as the neutral conversation; ``InvalidRequest`` for a bad one
    (answer it with ``messages_error``)."""
    data = json_object(raw, "'model', 'max_tokens' and 'messages'")
    _refuse_unsupported(data)
    return _call(validated(MessagesRequest, data))


def parse_count_tokens_request(raw: bytes) -> MessagesCall:
    """A ``POST /v1/messages/count_tokens`` body: count the tokens of ``call.payload['messages']``
    (and its tools) and answer ``{"input_tokens": n}``."""
    data = json_object(raw, "'model' and 'messages'")
    _refuse_unsupported(data)
    return _call(validated(CountTokensRequest, data))


# --------------------------------------------------------------------------------------- errors

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def _error(exc: CablectlError) -> dict[str, Any]:
    status = exc.http_status
    kind = _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def messages_error(exc: CablectlError) -> tuple[int, bytes]:
    """Any cablectl error as Anthropic answers one: the same HTTP status, and the body
    ``{"type": "error", "error": {"type", "message"}}`` (send ``Retry-After`` as usual)."""
    return exc.http_status, orjson.dumps(_error(exc))


def messages_error_event(exc: CablectlError) -> bytes:
    """The same, as the stream's last event (``event: error``: the SDK ignores unnamed events)."""
    return sse("error", _error(exc))


# --------------------------------------------------------------------------------------- render

_STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}


def _tool_input(done: ToolCallDone) -> dict[str, Any]:
    try:
        value = orjson.loads(done.arguments or "{}")
    except orjson.JSONDecodeError as exc:
        raise ModelOutputInvalid(f"The arguments of the call to {done.name!r} are not JSON") from exc
    if not isinstance(value, dict):
        raise ModelOutputInvalid(f"The arguments of the call to {done.name!r} are not a JSON object")
    return value


class _Builder:
    """Content blocks as they grow (one open at a time), and the events that tell a client so."""

    def __init__(self, call: MessagesCall) -> None:
        self.call = call
        self.content: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.sent: dict[int, str] = {}  # the arguments sent so far, per tool call (event index)
        self.calls: dict[int, dict[str, Any]] = {}

    def message(self, **more: Any) -> dict[str, Any]:
        return {
            "id": self.call.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.call.request.model,
            "content": self.content,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
            **more,
        }

    def close(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.open is not None:
            yield "content_block_stop", {"type": "content_block_stop", "index": self.content.index(self.open)}
            self.open = None

    def start(self, block: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        yield from self.close()
        self.content.append(block)
        self.open = block
        start = {**block, "input": {}} if block["type"] == "tool_use" else {**block, "text": ""}
        index = len(self.content) - 1
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}

    def delta(self, block: dict[str, Any], delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        index = self.content.index(block)
        return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}

    def feed(self, event: Event) -> Iterator[tuple[str, dict[str, Any]]]:
        if isinstance(event, TextDelta) and event.text:
            if self.open is None or self.open["type"] != "text":
                yield from self.start({"type": "text", "text": ""})
            assert self.open is not None
            self.open["text"] += event.text
            yield self.delta(self.open, {"type": "text_delta", "text": event.text})
        elif isinstance(event, ToolCallStarted):
            self.calls[event.index] = {
                "type": "tool_use",
                "id": event.call_id,
                "name": event.name,
                "input": {},
            }
            self.sent[event.index] = ""
            yield from self.start(self.calls[event.index])
        elif isinstance(event, ToolCallArguments) and event.fragment:
            self.sent[event.index] += event.fragment
            yield self.delta(
                self.calls[event.index], {"type": "input_json_delta", "partial_json": event.fragment}
            )
        elif isinstance(event, ToolCallDone):
            if event.index not in self.calls:
                yield from self.feed(ToolCallStarted(event.index, event.call_id, event.name))
            block = self.calls.pop(event.index)
            block["input"] = _tool_input(event)
            sent = self.sent.pop(event.index)
            if event.arguments.startswith(sent) and len(event.arguments) > len(sent):  # not all streamed
                rest = event.arguments[len(sent) :]
                yield self.delta(block, {"type": "input_json_delta", "partial_json": rest})
            yield from self.close()
        elif isinstance(event, ActionStarted):
            yield "ping", {"type": "ping"}  # a program runs in the proxy: the stream is alive


async def _run(builder: _Builder, events: AsyncIterator[Event]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    yield "message_start", {"type": "message_start", "message": builder.message(content=[])}
    yield "ping", {"type": "ping"}
    async for event in events:
        if isinstance(event, Finished):
            for out in builder.close():
                yield out
            usage = {
                "input_tokens": event.usage.prompt_tokens,
                "output_tokens": event.usage.completion_tokens,
            }
            delta = {"stop_reason": _STOP_REASONS[event.reason], "stop_sequence": None}
            yield "message_delta", {"type": "message_delta", "delta": delta, "usage": usage}
            yield "message_stop", {"type": "message_stop"}
            return
        for out in builder.feed(event):
            yield out
    raise CablectlError("The action loop ended without finishing the message; it has been logged.")


async def render_messages_sse(events: AsyncIterator[Event], call: MessagesCall) -> AsyncIterator[bytes]:
    """SSE as the events arrive; a ``CablectlError`` from ``events`` ends the stream with
    Anthropic's ``error`` event."""
    try:
        async for name, data in _run(_Builder(call), events):
            yield sse(name, data)
    except CablectlError as exc:
        yield messages_error_event(exc)


async def render_messages_json(events: AsyncIterator[Event], call: MessagesCall) -> bytes:
    """The whole message; a failure is raised as it came (answer it with ``messages_error``)."""
    builder = _Builder(call)
    last: dict[str, Any] = {}
    async for _, data in _run(builder, events):
        last = data if data["type"] == "message_delta" else last
    return orjson.dumps(builder.message(stop_reason=last["delta"]["stop_reason"], usage=last["usage"]))
