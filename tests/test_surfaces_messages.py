"""The Messages surface without the app: Anthropic requests parsed into the neutral
conversation, hand-written event sequences rendered, errors in Anthropic's shape.

The anthropic SDK's own types validate every event and message; its ``messages.stream``
helper accumulates our SSE (it fails on events out of order or JSON it cannot read), and its
clients run tool loops against a transport answered by this module's parser and renderer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from anthropic._models import validate_type
from anthropic.types import Message, RawMessageStreamEvent

from proxy.actions.events import (
    ActionOutput,
    ActionStarted,
    Event,
    Finished,
    Started,
    TextDelta,
    ToolCallArguments,
    ToolCallDone,
    ToolCallStarted,
    Usage,
)
from proxy.errors import (
    AuthenticationFailed,
    CablectlError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RequestTooLarge,
    ServiceUnavailable,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from proxy.sessions.store import SessionBusy
from proxy.surfaces.bridge import events_from_chat_body
from proxy.surfaces.messages import (
    MessagesCall,
    messages_error,
    messages_error_event,
    parse_count_tokens_request,
    parse_messages_request,
    render_messages_json,
    render_messages_sse,
)

pytestmark = pytest.mark.anyio

WEATHER: Any = {
    "name": "get_weather",
    "description": "Current weather.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL_ID = "call_0123456789abcdef_1_0123456789abcdef"


async def stream_of(*events: Event) -> AsyncIterator[Event]:
    for event in events:
        yield event


def parse(body: dict[str, Any]) -> MessagesCall:
    return parse_messages_request(orjson.dumps({"model": "m", "max_tokens": 64, **body}))


def frames(sse: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The SSE's events (name, data); each names its type, and the SDK's types take them."""
    out = []
    for frame in sse.decode().split("\n\n"):
        if not frame:
            continue
        name_line, data_line = frame.split("\n")
        name, data = name_line.removeprefix("event: "), orjson.loads(data_line.removeprefix("data: "))
        assert name == data["type"]
        if name not in ("ping", "error"):
            validate_type(type_=RawMessageStreamEvent, value=data)  # type: ignore[arg-type]
        out.append((name, data))
    return out


def tool_call(index: int, call_id: str, arguments: list[str], whole: str | None = None) -> list[Event]:
    return [
        ToolCallStarted(index, call_id, "get_weather"),
        *(ToolCallArguments(index, piece) for piece in arguments),
        ToolCallDone(index, call_id, "get_weather", whole if whole is not None else "".join(arguments)),
    ]


# ---------------------------------------------------------------------------------------- parse


@pytest.mark.parametrize(
    ("body", "messages"),
    [
        pytest.param(
            {"messages": [{"role": "user", "content": "Hi"}]},
            [{"role": "user", "content": "Hi"}],
            id="string",
        ),
        pytest.param(
            {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]},
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            id="system-string",
        ),
        pytest.param(
            {
                "system": [
                    {"type": "text", "text": "Be brief."},
                    {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}},
                ],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            },
            [{"role": "system", "content": "Be brief.\nBe kind."}, {"role": "user", "content": "Hi"}],
            id="system-blocks",
        ),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What are these?"},
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                            },
                            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                        ],
                    }
                ]
            },
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What are these?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    ],
                }
            ],
            id="images",
        ),
        pytest.param(
            {
                "messages": [
                    {"role": "user", "content": "Weather in Paris and Rome?"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "hm", "signature": "s"},
                            {"type": "text", "text": "Let me check."},
                            {
                                "type": "tool_use",
                                "id": "c1",
                                "name": "get_weather",
                                "input": {"city": "Paris"},
                            },
                            {
                                "type": "tool_use",
                                "id": "c2",
                                "name": "get_weather",
                                "input": {"city": "Rome"},
                            },
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "c1", "content": '{"t": 18}'},
                            {
                                "type": "tool_result",
                                "tool_use_id": "c2",
                                "content": [{"type": "text", "text": "no such city"}],
                                "is_error": True,
                            },
                            {"type": "text", "text": "Which is warmer?"},
                        ],
                    },
                ]
            },
            [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        },
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": '{"t": 18}'},
                {"role": "tool", "tool_call_id": "c2", "content": "Error: no such city"},
                {"role": "user", "content": "Which is warmer?"},
            ],
            id="tool-use-and-results",
        ),
        pytest.param(
            {
                "messages": [
                    {"role": "user", "content": "Go"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "c1", "name": "get_weather", "input": {}}],
                    },
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1"}]},
                ]
            },
            [
                {"role": "user", "content": "Go"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": ""},
            ],
            id="call-alone-result-without-content",
        ),
    ],
)
def test_messages_become_chat_messages(body: dict[str, Any], messages: list[dict[str, Any]]) -> None:
    call = parse(body)
    assert call.payload["messages"] == messages
    assert call.chat.model == "m"


@pytest.mark.parametrize(
    ("choice", "chat_choice", "parallel"),
    [
        pytest.param({"type": "auto"}, "auto", None, id="auto"),
        pytest.param({"type": "any"}, "required", None, id="any"),
        pytest.param({"type": "none"}, "none", None, id="none"),
        pytest.param(
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            {"type": "function", "function": {"name": "get_weather"}},
            False,
            id="tool-one-at-a-time",
        ),
    ],
)
def test_tool_choice(choice: dict[str, Any], chat_choice: Any, parallel: bool | None) -> None:
    call = parse({"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER], "tool_choice": choice})
    assert call.payload["tool_choice"] == chat_choice
    assert call.payload.get("parallel_tool_calls") == parallel


def test_the_rest_of_the_request_maps_to_chat_fields() -> None:
    call = parse(
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [WEATHER, {"type": "custom", "name": "get_time", "input_schema": {"type": "object"}}],
            "max_tokens": 100,
            "stop_sequences": ["\n\nHuman:"],
            "temperature": 0.2,
            "top_p": 0.9,
            "metadata": {"user_id": "u1"},
            "stream": True,
            "thinking": {"type": "disabled"},
        }
    )
    assert {k: v for k, v in call.payload.items() if k != "messages"} == {
        "model": "m",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": WEATHER["input_schema"],
                    "description": "Current weather.",
                },
            },
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
        ],
        "max_tokens": 100,
        "stop": ["\n\nHuman:"],
        "temperature": 0.2,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u1",
    }
    assert call.chat.stream and call.chat.tools is not None


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        pytest.param({"max_tokens": None}, "max_tokens", "integer", id="max-tokens-null"),
        pytest.param(
            {"tools": [WEATHER, {"type": "web_search_20250305", "name": "web_search"}]},
            "tools[1].type",
            "'web_search_20250305'",
            id="server-tool",
        ),
        pytest.param(
            {"tools": [{"type": "bash_20250124", "name": "bash"}]},
            "tools[0].type",
            "'bash_20250124'",
            id="client-tool-of-anthropic",
        ),
        pytest.param(
            {"tools": [{"name": "f"}]}, "tools[0].input_schema", "Field required", id="tool-without-schema"
        ),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "document", "source": {"type": "text", "data": "x"}}],
                    }
                ]
            },
            "messages[0].content[0].type",
            "'document'",
            id="document-block",
        ),
        pytest.param(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]}
                ]
            },
            "messages[0].content",
            "assistant",
            id="tool-use-from-user",
        ),
        pytest.param(
            {"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "c"}]}]},
            "messages[0].content",
            "user",
            id="tool-result-from-assistant",
        ),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "c",
                                "content": [
                                    {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
                                ],
                            }
                        ],
                    }
                ]
            },
            "messages[0].content",
            "Images in a tool_result",
            id="image-in-tool-result",
        ),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "base64", "data": "AAAA"}}],
                    }
                ]
            },
            "messages[0].content[0].source",
            "media_type",
            id="image-without-media-type",
        ),
        pytest.param(
            {"tool_choice": {"type": "tool"}, "tools": [WEATHER]},
            "tool_choice.name",
            "'name'",
            id="tool-choice-without-name",
        ),
        pytest.param({"temperature": 1.5}, "temperature", "less than or equal to 1", id="temperature"),
        pytest.param({"messages": []}, "messages", "at least 1", id="no-messages"),
        pytest.param({"tools": -374}, "tools", "valid list", id="tools-not-a-list"),
        pytest.param({"messages": {"role": "user"}}, "messages", "valid list", id="messages-not-a-list"),
        pytest.param(
            {"messages": [{"role": "system", "content": "x"}]},
            "messages[0].role",
            "'user' or 'assistant'",
            id="system-role",
        ),
    ],
)
def test_what_is_refused_is_a_400_that_names_it(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse({"messages": [{"role": "user", "content": "Hi"}], **body})
    assert caught.value.http_status == 400
    assert caught.value.param == param
    assert words in caught.value.message
    status, body_bytes = messages_error(caught.value)
    assert (status, orjson.loads(body_bytes)["error"]["type"]) == (400, "invalid_request_error")


def test_max_tokens_is_required_except_to_count_tokens() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER]}
    with pytest.raises(InvalidRequest) as caught:
        parse_messages_request(orjson.dumps(body))
    assert caught.value.param == "max_tokens"
    counted = parse_count_tokens_request(orjson.dumps(body))
    assert counted.payload["messages"] == [{"role": "user", "content": "Hi"}]
    assert "max_tokens" not in counted.payload and counted.payload["tools"]


# --------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        pytest.param(InvalidRequest("bad"), 400, "invalid_request_error", id="invalid"),
        pytest.param(AuthenticationFailed("who?"), 401, "authentication_error", id="auth"),
        pytest.param(PermissionDenied("no"), 403, "permission_error", id="permission"),
        pytest.param(ModelNotFound("no such model"), 404, "not_found_error", id="model"),
        pytest.param(SessionBusy("busy"), 409, "invalid_request_error", id="session-busy"),
        pytest.param(RequestTooLarge("big"), 413, "request_too_large", id="too-large"),
        pytest.param(UpstreamRateLimited("slow"), 429, "rate_limit_error", id="rate-limited"),
        pytest.param(CablectlError("oops"), 500, "api_error", id="internal"),
        pytest.param(UpstreamError("broke"), 502, "api_error", id="upstream"),
        pytest.param(ServiceUnavailable("loading"), 503, "overloaded_error", id="unavailable"),
        pytest.param(UpstreamTimeout("slow"), 504, "timeout_error", id="timeout"),
    ],
)
def test_errors_in_anthropic_shape(exc: CablectlError, status: int, kind: str) -> None:
    got_status, body = messages_error(exc)
    assert got_status == status
    assert orjson.loads(body) == {"type": "error", "error": {"type": kind, "message": exc.message}}
    assert frames(messages_error_event(exc)) == [("error", orjson.loads(body))]


# --------------------------------------------------------------------------------------- render

THOUGHT_THEN_CALLS: list[Event] = [
    Started("s1"),
    TextDelta("Let me "),
    TextDelta("check."),
    *tool_call(0, CALL_ID, ['{"city":', ' "Paris"}']),
    ActionStarted("x = 1"),
    ActionOutput("1"),
    *tool_call(1, CALL_ID.replace("_1_", "_2_"), [], whole='{"city": "Rome"}'),
    Finished("tool_calls", Usage(30, 12)),
]


@pytest.mark.parametrize(
    ("events", "names", "stop_reason"),
    [
        pytest.param(
            [Started("s1"), TextDelta("Hel"), TextDelta("lo"), Finished("stop", Usage(5, 2))],
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
            "end_turn",
            id="text",
        ),
        pytest.param(
            THOUGHT_THEN_CALLS,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
            "tool_use",
            id="thought-then-calls-one-done-at-once",
        ),
        pytest.param(
            [TextDelta("Once upon"), Finished("length", Usage(5, 16))],
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
            "max_tokens",
            id="out-of-tokens",
        ),
        pytest.param(
            [Started("s1"), Finished("stop")],
            ["message_start", "ping", "message_delta", "message_stop"],
            "end_turn",
            id="empty-answer",
        ),
    ],
)
async def test_the_stream_is_anthropics_sequence_and_accumulates_to_the_json_body(
    events: list[Event], names: list[str], stop_reason: str
) -> None:
    call = parse({"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "stream": True})
    sse = b"".join([c async for c in render_messages_sse(stream_of(*events), call)])
    got = frames(sse)
    assert [name for name, _ in got] == names
    body = Message.model_validate_json(await render_messages_json(stream_of(*events), call))
    assert body.stop_reason == stop_reason and body.id == call.message_id
    # the SDK's stream helper gathers the same message from the events
    async with anthropic.AsyncAnthropic(
        base_url="http://proxy", api_key="x", http_client=serving(lambda _: events, [])
    ) as client:
        async with client.messages.stream(
            model="m", max_tokens=64, messages=[{"role": "user", "content": "Weather?"}]
        ) as stream:
            final = await stream.get_final_message()
        assert final.model_dump(exclude={"id"}) == body.model_dump(exclude={"id"})


async def test_the_message_object() -> None:
    call = parse({"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER]})
    message = Message.model_validate_json(await render_messages_json(stream_of(*THOUGHT_THEN_CALLS), call))
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[0].text == "Let me check."  # type: ignore[union-attr]
    assert [(b.id, b.name, b.input) for b in message.content[1:]] == [  # type: ignore[union-attr]
        (CALL_ID, "get_weather", {"city": "Paris"}),
        (CALL_ID.replace("_1_", "_2_"), "get_weather", {"city": "Rome"}),
    ]
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == (
        "tool_use",
        30,
        12,
    )
    assert message.model == "m" and message.role == "assistant"


async def fail_after(events: list[Event], exc: CablectlError) -> AsyncIterator[Event]:
    for event in events:
        yield event
    raise exc


async def test_a_failure_mid_stream_is_an_error_event() -> None:
    call = parse({"messages": [{"role": "user", "content": "Weather?"}], "stream": True})
    events: list[Event] = [TextDelta("Let me")]
    exc = UpstreamRateLimited("The upstream is rate-limiting; retry later")
    got = frames(b"".join([c async for c in render_messages_sse(fail_after(events, exc), call)]))
    assert got[-1] == (
        "error",
        {"type": "error", "error": {"type": "rate_limit_error", "message": exc.message}},
    )
    with pytest.raises(UpstreamRateLimited):
        await render_messages_json(fail_after(events, exc), call)
    # the SDK raises it from the stream
    async with anthropic.AsyncAnthropic(
        base_url="http://proxy", api_key="x", http_client=serving(lambda _: [], [], fail=exc)
    ) as client:
        with pytest.raises(anthropic.APIStatusError, match="rate-limiting"):
            async with client.messages.stream(
                model="m", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
            ) as stream:
                await stream.get_final_message()


async def test_arguments_that_are_not_an_object_fail_the_message() -> None:
    call = parse({"messages": [{"role": "user", "content": "Weather?"}]})
    with pytest.raises(UpstreamError, match="not a JSON object"):
        await render_messages_json(stream_of(*tool_call(0, CALL_ID, ["[1]"]), Finished("tool_calls")), call)


async def test_pass_through_renders_as_a_message() -> None:
    chat = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there."},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    call = parse({"messages": [{"role": "user", "content": "Hi"}]})
    message = Message.model_validate_json(
        await render_messages_json(events_from_chat_body(orjson.dumps(chat), "m"), call)
    )
    assert (message.content[0].text, message.stop_reason, message.usage.output_tokens) == (  # type: ignore[union-attr]
        "Hello there.",
        "max_tokens",
        2,
    )  # type: ignore[union-attr]


# ------------------------------------------------------------------------------- real clients

Script = Callable[[MessagesCall], list[Event]]


def serving(
    script: Script, seen: list[MessagesCall], fail: CablectlError | None = None
) -> httpx2.AsyncClient:
    """An HTTP client whose transport answers ``POST /v1/messages`` with this surface."""

    async def handle(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/messages"
        try:
            call = parse_messages_request(await request.aread())
        except CablectlError as exc:
            status, body = messages_error(exc)
            return httpx2.Response(status, headers={"content-type": "application/json"}, content=body)
        seen.append(call)
        events: AsyncIterator[Event] = stream_of(*script(call)) if fail is None else fail_after([], fail)
        if call.stream:
            return httpx2.Response(
                200, headers={"content-type": "text/event-stream"}, content=render_messages_sse(events, call)
            )
        return httpx2.Response(
            200,
            headers={"content-type": "application/json"},
            content=await render_messages_json(events, call),
        )

    return httpx2.AsyncClient(transport=httpx2.MockTransport(handle))


def weather_script(call: MessagesCall) -> list[Event]:
    results = [m["content"] for m in call.payload["messages"] if m["role"] == "tool"]
    if not results:
        return [
            Started("s1"),
            TextDelta("Let me check."),
            *tool_call(0, CALL_ID, ['{"city": ', '"Paris"}']),
            Finished("tool_calls", Usage(20, 8)),
        ]
    return [
        Started("s1"),
        TextDelta("It is "),
        TextDelta(f"{results[-1]} in Paris."),
        Finished("stop", Usage(30, 6)),
    ]


@pytest.mark.parametrize("stream", [pytest.param(False, id="create"), pytest.param(True, id="stream-helper")])
async def test_the_anthropic_sdk_runs_a_tool_loop(stream: bool) -> None:
    seen: list[MessagesCall] = []
    async with anthropic.AsyncAnthropic(
        base_url="http://proxy", api_key="x", http_client=serving(weather_script, seen)
    ) as client:
        messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]

        async def ask() -> Message:
            if not stream:
                return await client.messages.create(
                    model="m", max_tokens=64, tools=[WEATHER], messages=messages
                )
            async with client.messages.stream(
                model="m", max_tokens=64, tools=[WEATHER], messages=messages
            ) as events:
                text = "".join([e.text async for e in events if e.type == "text"])
                final = await events.get_final_message()
            assert text == "".join(b.text for b in final.content if b.type == "text")
            return final

        first = await ask()
        assert first.stop_reason == "tool_use"
        [use] = [b for b in first.content if b.type == "tool_use"]
        assert (use.id, use.name, use.input) == (CALL_ID, "get_weather", {"city": "Paris"})
        messages += [
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C"}]},
        ]
        second = await ask()
        assert (second.stop_reason, second.content[0].text) == ("end_turn", "It is 18C in Paris.")  # type: ignore[union-attr]
        assert [m["role"] for m in seen[-1].payload["messages"]] == ["user", "assistant", "tool"]
        assert [c.stream for c in seen] == [stream, stream]


async def test_the_sdk_reads_a_refusal_as_its_bad_request_error() -> None:
    async with anthropic.AsyncAnthropic(
        base_url="http://proxy", api_key="x", max_retries=0, http_client=serving(weather_script, [])
    ) as client:
        with pytest.raises(anthropic.BadRequestError, match="web_search_20250305") as caught:
            await client.messages.create(
                model="m",
                max_tokens=64,
                tools=[{"type": "web_search_20250305", "name": "web_search"}],
                messages=[{"role": "user", "content": "Hi"}],
            )
        assert (
            isinstance(caught.value.body, dict)
            and caught.value.body["error"]["type"] == "invalid_request_error"
        )
