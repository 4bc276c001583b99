"""The Responses surface without the app: requests parsed into the neutral conversation,
hand-written event sequences rendered, and the output read by the clients that use it.

The openai SDK's own types validate every event and response, its stream helper
(``responses.stream``) accumulates our SSE into the final response, and the OpenAI Agents
SDK's ``Runner`` completes a tool loop against a transport that answers with this module's
parser and renderer (so its real requests are parsed, and its real parsers read ours)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai._models import validate_type
from openai.types.responses import Response, ResponseStreamEvent

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
from proxy.errors import CablectlError, InvalidRequest, ResponseNotFound, UpstreamError, UpstreamRateLimited
from proxy.sessions import InMemorySessionStore
from proxy.surfaces.bridge import events_from_chat_body, events_from_chat_sse
from proxy.surfaces.response_store import ResponseStore
from proxy.surfaces.responses import (
    ResponsesCall,
    parse_responses_request,
    render_responses_json,
    render_responses_sse,
    response_deleted_body,
)

pytestmark = pytest.mark.anyio

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL_ID = "call_0123456789abcdef_1_0123456789abcdef"


@pytest.fixture
def store() -> ResponseStore:
    return ResponseStore(InMemorySessionStore(), ttl=60)


async def stream_of(*events: Event) -> AsyncIterator[Event]:
    for event in events:
        yield event


async def parse(body: dict[str, Any], store: ResponseStore, owner: str = "key-a") -> ResponsesCall:
    return await parse_responses_request(orjson.dumps(body), store, owner)


def frames(sse: bytes) -> list[dict[str, Any]]:
    """The SSE's events, each checked: its ``event:`` line names its type, and the SDK's type takes it."""
    out = []
    for frame in sse.decode().split("\n\n"):
        if not frame:
            continue
        name_line, data_line = frame.split("\n")
        data = orjson.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {data['type']}"
        validate_type(type_=ResponseStreamEvent, value=data)  # type: ignore[arg-type]
        out.append(data)
    return out


async def render_sse(call: ResponsesCall, *events: Event, store: ResponseStore | None = None) -> bytes:
    return b"".join([chunk async for chunk in render_responses_sse(stream_of(*events), call, store)])


def tool_call(index: int, call_id: str, arguments: list[str]) -> list[Event]:
    return [
        ToolCallStarted(index, call_id, "get_weather"),
        *(ToolCallArguments(index, piece) for piece in arguments),
        ToolCallDone(index, call_id, "get_weather", "".join(arguments)),
    ]


# ---------------------------------------------------------------------------------------- parse


@pytest.mark.parametrize(
    ("body", "messages"),
    [
        pytest.param({"input": "Hello"}, [{"role": "user", "content": "Hello"}], id="string-input"),
        pytest.param(
            {"input": "Hello", "instructions": "Be brief."},
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
            id="instructions-as-system",
        ),
        pytest.param(
            {"input": [{"role": "user", "content": "Hi"}, {"role": "developer", "content": "Be brief."}]},
            [{"role": "user", "content": "Hi"}, {"role": "developer", "content": "Be brief."}],
            id="easy-messages-without-type",
        ),
        pytest.param(
            {
                "input": [
                    {
                        "type": "message",
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "What is this?"},
                            {
                                "type": "input_image",
                                "image_url": "data:image/png;base64,AAAA",
                                "detail": "low",
                            },
                        ],
                    }
                ]
            },
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                        },
                    ],
                }
            ],
            id="text-and-image-parts",
        ),
        pytest.param(
            {
                "input": [
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
                ]
            },
            [{"role": "user", "content": "Hi"}],
            id="one-text-part-is-a-string",
        ),
        pytest.param(
            {
                "input": [
                    {"role": "user", "content": "Weather in Paris and Rome?"},
                    {
                        "type": "message",
                        "id": "msg_1",
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}],
                    },
                    {
                        "type": "function_call",
                        "id": "fc_1",
                        "call_id": "c1",
                        "name": "get_weather",
                        "arguments": '{"city":"Paris"}',
                    },
                    {
                        "type": "function_call",
                        "id": "fc_2",
                        "call_id": "c2",
                        "name": "get_weather",
                        "arguments": '{"city":"Rome"}',
                    },
                    {"type": "function_call_output", "call_id": "c1", "output": '{"t": 18}'},
                    {
                        "type": "function_call_output",
                        "call_id": "c2",
                        "output": [{"type": "input_text", "text": '{"t": 24}'}],
                    },
                    {"type": "reasoning", "id": "rs_1", "summary": []},
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
                {"role": "tool", "tool_call_id": "c2", "content": '{"t": 24}'},
            ],
            id="calls-join-the-assistant-turn-outputs-are-tool-messages",
        ),
        pytest.param(
            {
                "input": [
                    {"role": "user", "content": "Go"},
                    {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "ok"},
                    {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
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
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
            ],
            id="a-call-after-an-output-is-a-new-turn",
        ),
    ],
)
async def test_input_becomes_chat_messages(
    body: dict[str, Any], messages: list[dict[str, Any]], store: ResponseStore
) -> None:
    call = await parse({"model": "m", **body}, store)
    assert call.payload["messages"] == messages
    assert call.chat.model == "m"


async def test_the_rest_of_the_request_maps_to_chat_fields(store: ResponseStore) -> None:
    call = await parse(
        {
            "model": "m",
            "input": "Hi",
            "tools": [WEATHER, {**WEATHER, "name": "get_time", "strict": True}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
            "max_output_tokens": 64,
            "temperature": 0.5,
            "top_p": 0.9,
            "metadata": {"session_id": "s1"},
            "stream": True,
            "user": "u1",
            "text": {
                "format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}
            },
            "include": [],
            "truncation": "disabled",
            "reasoning": {"effort": "low"},
        },
        store,
    )
    assert {k: v for k, v in call.payload.items() if k != "messages"} == {
        "model": "m",
        "tools": [
            {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}},
            {
                "type": "function",
                "function": {
                    "name": "get_time",
                    "description": "Current weather.",
                    "parameters": WEATHER["parameters"],
                    "strict": True,
                },
            },
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "metadata": {"session_id": "s1"},
        "user": "u1",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
        },
    }
    assert call.chat.tools is not None and call.chat.stream


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        pytest.param(
            {"input": "x", "tools": [WEATHER, {"type": "web_search"}]},
            "tools[1].type",
            "'web_search'",
            id="hosted-tool",
        ),
        pytest.param(
            {"input": "x", "tools": [{"type": "file_search", "vector_store_ids": []}]},
            "tools[0].type",
            "'file_search'",
            id="file-search",
        ),
        pytest.param(
            {"input": "x", "tool_choice": {"type": "web_search_preview"}},
            "tool_choice.type",
            "'web_search_preview'",
            id="hosted-choice",
        ),
        pytest.param(
            {"input": [{"type": "item_reference", "id": "msg_1"}]},
            "input[0]",
            "previous_response_id",
            id="item-reference",
        ),
        pytest.param(
            {"input": [{"type": "computer_call_output", "call_id": "c"}]},
            "input[0].type",
            "'computer_call_output'",
            id="other-item",
        ),
        pytest.param(
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
            "input[0].content[0]",
            "input_file",
            id="file-part",
        ),
        pytest.param(
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
            "input[0].content[0]",
            "image_url",
            id="image-by-file-id",
        ),
        pytest.param(
            {
                "input": [
                    {"role": "system", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
                ]
            },
            "input[0].content",
            "system",
            id="image-in-system",
        ),
        pytest.param({"input": "x", "background": True}, "background", "foreground", id="background"),
        pytest.param(
            {"input": "x", "conversation": "conv_1"},
            "conversation",
            "previous_response_id",
            id="conversation",
        ),
        pytest.param({"input": []}, "input", "empty", id="empty-input"),
        pytest.param(
            {"input": "x", "temperature": 3}, "temperature", "less than or equal to 2", id="temperature"
        ),
        pytest.param(
            {"input": "x", "max_output_tokens": 0},
            "max_output_tokens",
            "greater than or equal to 1",
            id="max-output-tokens",
        ),
        pytest.param({}, "input", "Field required", id="no-input"),
        pytest.param(
            {"input": [{"role": "robot", "content": "x"}]}, "input[0].role", "'user'", id="unknown-role"
        ),
    ],
)
async def test_what_is_refused_is_a_400_that_names_it(
    body: dict[str, Any], param: str, words: str, store: ResponseStore
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await parse({"model": "m", **body}, store)
    assert caught.value.http_status == 400
    assert caught.value.param == param
    assert words in caught.value.message


@pytest.mark.parametrize(
    "raw", [pytest.param(b"{not json", id="not-json"), pytest.param(b"[1]", id="not-an-object")]
)
async def test_a_body_that_is_not_a_json_object(raw: bytes, store: ResponseStore) -> None:
    with pytest.raises(InvalidRequest, match="'model' and 'input'"):
        await parse_responses_request(raw, store, "key-a")


# ---------------------------------------------------------------------------------------- render

THOUGHT_THEN_CALLS = [
    Started("s1"),
    TextDelta("Let me "),
    TextDelta("check."),
    *tool_call(0, CALL_ID, ['{"city":', ' "Paris"}']),
    ActionStarted("x = 1"),
    ActionOutput("1"),
    *tool_call(1, CALL_ID.replace("_1_", "_2_"), ['{"city": "Rome"}']),
    Finished("tool_calls", Usage(30, 12)),
]


DELTAS = {"response.output_text.delta", "response.function_call_arguments.delta"}


def summary(response: Response) -> tuple[Any, ...]:
    calls = [(o.call_id, o.name, o.arguments) for o in response.output if o.type == "function_call"]
    return response.output_text, calls, [(o.type, o.id, o.status) for o in response.output]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("events", "types", "status"),
    [
        pytest.param(
            [Started("s1"), TextDelta("Hel"), TextDelta("lo"), Finished("stop", Usage(5, 2))],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ],
            "completed",
            id="text",
        ),
        pytest.param(
            THOUGHT_THEN_CALLS,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ],
            "completed",
            id="thought-then-two-calls",
        ),
        pytest.param(
            [ToolCallDone(0, CALL_ID, "get_weather", "{}"), Finished("tool_calls")],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ],
            "completed",
            id="a-call-done-at-once",
        ),
        pytest.param(
            [TextDelta("Once upon"), Finished("length", Usage(5, 16))],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.incomplete",
            ],
            "incomplete",
            id="out-of-tokens",
        ),
        pytest.param(
            [Started("s1"), Finished("stop")],
            ["response.created", "response.in_progress", "response.completed"],
            "completed",
            id="empty-answer",
        ),
    ],
)
async def test_the_stream_is_the_typed_sequence_and_accumulates_to_the_json_body(
    events: list[Event], types: list[str], status: str, store: ResponseStore
) -> None:
    call = await parse({"model": "m", "input": "Weather?", "tools": [WEATHER], "stream": True}, store)
    got = frames(await render_sse(call, *events))
    assert [e["type"] for e in got] == types
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    final = Response.model_validate(got[-1]["response"])
    assert final.status == status and final.id == call.response_id
    # the JSON body says the same, ids aside
    body = Response.model_validate_json(await render_responses_json(stream_of(*events), call))
    assert body.model_dump(exclude={"output", "created_at", "completed_at"}) == final.model_dump(
        exclude={"output", "created_at", "completed_at"}
    )
    assert [o.model_dump(exclude={"id"}) for o in body.output] == [
        o.model_dump(exclude={"id"}) for o in final.output
    ]
    # the SDK's stream helper accumulates the events (it fails on any out of place): the text
    # and arguments it has gathered by each item's last delta are the terminal response's
    async with openai.AsyncOpenAI(
        base_url="http://proxy/v1", api_key="x", http_client=serving(lambda _: events, store, [])
    ) as client:
        async with client.responses.stream(model="m", input="Weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
            seen = [e async for e in stream]
        assert [e.type for e in seen] == types
        terminal: Any = seen[-1]
        gathered = {e.item_id: e.snapshot for e in seen if e.type in DELTAS}  # type: ignore[union-attr]
        assert gathered == {
            o.id: o.content[0].text if o.type == "message" else o.arguments  # type: ignore[union-attr]
            for o in terminal.response.output
            if o.id in gathered
        }
        if status == "completed":
            assert summary(await stream.get_final_response()) == summary(terminal.response)


async def test_the_response_object(store: ResponseStore) -> None:
    call = await parse(
        {
            "model": "m",
            "input": "Weather?",
            "instructions": "Be brief.",
            "tools": [WEATHER],
            "tool_choice": "required",
            "max_output_tokens": 100,
            "metadata": {"app": "t"},
        },
        store,
    )
    response = Response.model_validate_json(await render_responses_json(stream_of(*THOUGHT_THEN_CALLS), call))
    assert response.output_text == "Let me check."
    calls = [o for o in response.output if o.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments, c.status) for c in calls] == [
        (CALL_ID, "get_weather", '{"city": "Paris"}', "completed"),
        (CALL_ID.replace("_1_", "_2_"), "get_weather", '{"city": "Rome"}', "completed"),
    ]
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (
        30,
        12,
        42,
    )
    assert (response.instructions, response.tool_choice, response.max_output_tokens) == (
        "Be brief.",
        "required",
        100,
    )
    assert response.metadata == {"app": "t"} and response.tools[0].type == "function"


async def test_out_of_tokens_is_incomplete_with_its_reason(store: ResponseStore) -> None:
    call = await parse({"model": "m", "input": "Tell a story"}, store)
    response = Response.model_validate_json(
        await render_responses_json(stream_of(TextDelta("Once"), Finished("length")), call)
    )
    assert response.status == "incomplete"
    assert (
        response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    )
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]


async def fail_after(events: list[Event], exc: CablectlError) -> AsyncIterator[Event]:
    for event in events:
        yield event
    raise exc


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        pytest.param(UpstreamError("The upstream broke off"), "server_error", id="upstream"),
        pytest.param(UpstreamRateLimited("Slow down"), "rate_limit_exceeded", id="rate-limited"),
        pytest.param(InvalidRequest("No such tool"), "invalid_prompt", id="invalid"),
    ],
)
async def test_a_failure_mid_stream_is_response_failed(
    exc: CablectlError, code: str, store: ResponseStore
) -> None:
    call = await parse({"model": "m", "input": "Weather?", "stream": True}, store)
    events: list[Event] = [Started("s1"), TextDelta("Let me"), ToolCallStarted(0, CALL_ID, "get_weather")]
    got = frames(b"".join([c async for c in render_responses_sse(fail_after(events, exc), call, store)]))
    assert got[-1]["type"] == "response.failed"
    failed = Response.model_validate(got[-1]["response"])
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error.code, failed.error.message) == (code, exc.message)
    # the thought was done when the call began; the call was cut off
    assert [o.status for o in failed.output] == ["completed", "incomplete"]  # type: ignore[union-attr]
    assert await store.get(call.response_id, call.owner) is None  # a failed response is not stored
    with pytest.raises(type(exc)):  # not streamed: the caller answers with the error's status
        await render_responses_json(fail_after(events, exc), call, store)


async def test_a_loop_that_stops_without_finishing_is_an_error(store: ResponseStore) -> None:
    call = await parse({"model": "m", "input": "x"}, store)
    got = frames(await render_sse(call, TextDelta("Hi")))
    assert got[-1]["type"] == "response.failed"


# ------------------------------------------------------------------------------- store and chains


async def test_previous_response_id_rebuilds_the_conversation(store: ResponseStore) -> None:
    first = await parse(
        {"model": "m", "input": "Weather in Paris?", "instructions": "Be brief.", "tools": [WEATHER]}, store
    )
    events = [
        TextDelta("Let me check."),
        *tool_call(0, CALL_ID, ['{"city": "Paris"}']),
        Finished("tool_calls"),
    ]
    await render_responses_json(stream_of(*events), first, store)

    second = await parse(
        {
            "model": "m",
            "previous_response_id": first.response_id,
            "input": [{"type": "function_call_output", "call_id": CALL_ID, "output": '{"t": 18}'}],
            "tools": [WEATHER],
        },
        store,
    )
    call = {
        "id": CALL_ID,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert second.payload["messages"] == [  # the first's instructions do not carry over
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": CALL_ID, "content": '{"t": 18}'},
    ]
    sse = await render_sse(second, TextDelta("18 degrees."), Finished("stop"), store=store)
    assert frames(sse)[-1]["type"] == "response.completed"

    third = await parse({"model": "m", "previous_response_id": second.response_id, "input": "Thanks"}, store)
    assert third.payload["messages"][-2:] == [
        {"role": "assistant", "content": "18 degrees."},
        {"role": "user", "content": "Thanks"},
    ]
    stored = await store.get(second.response_id, "key-a")
    assert stored is not None
    assert Response.model_validate(stored.response).output_text == "18 degrees."


async def test_stored_responses_belong_to_their_key_and_can_be_deleted(store: ResponseStore) -> None:
    call = await parse({"model": "m", "input": "Hi"}, store)
    await render_responses_json(stream_of(TextDelta("Hello"), Finished("stop")), call, store)
    with pytest.raises(ResponseNotFound) as caught:
        await parse(
            {"model": "m", "input": "Hi", "previous_response_id": call.response_id}, store, owner="key-b"
        )
    assert (caught.value.http_status, caught.value.param) == (404, "previous_response_id")
    assert await store.get(call.response_id, "key-b") is None
    assert not await store.delete(call.response_id, "key-b")
    assert await store.delete(call.response_id, "key-a")
    assert await store.get(call.response_id, "key-a") is None
    assert response_deleted_body(call.response_id) == {
        "id": call.response_id,
        "object": "response",
        "deleted": True,
    }


async def test_store_false_keeps_nothing(store: ResponseStore) -> None:
    call = await parse({"model": "m", "input": "Hi", "store": False}, store)
    response = orjson.loads(
        await render_responses_json(stream_of(TextDelta("Hello"), Finished("stop")), call, store)
    )
    assert response["store"] is False
    assert await store.get(call.response_id, "key-a") is None


# ------------------------------------------------------------------------------------ pass-through


CHAT_BODY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
}


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\r\n\r\n"


CHAT_SSE = b"".join(
    [
        b": keep-alive\n\n",
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me "}),
        chunk({"content": "check."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({}, "tool_calls"),
        b'data: {"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4}}\n\n',
        b"data: [DONE]\n\n",
    ]
)


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def collected(events: AsyncIterator[Event]) -> list[Event]:
    return [e async for e in events]


@pytest.mark.parametrize(
    "size",
    [pytest.param(1, id="byte-by-byte"), pytest.param(7, id="7-bytes"), pytest.param(10**6, id="whole")],
)
async def test_a_chat_stream_becomes_the_same_events_as_its_body(size: int) -> None:
    streamed = await collected(events_from_chat_sse(pieces(CHAT_SSE, size), "m"))
    whole = await collected(events_from_chat_body(orjson.dumps(CHAT_BODY), "m"))
    assert "".join(e.text for e in streamed if isinstance(e, TextDelta)) == "Let me check."
    assert [e for e in streamed if not isinstance(e, TextDelta | ToolCallArguments)] == [
        e for e in whole if not isinstance(e, TextDelta | ToolCallArguments)
    ]
    assert streamed[-1] == Finished("tool_calls", Usage(9, 4))
    assert ToolCallDone(0, "c1", "get_weather", '{"city":"Paris"}') in streamed


async def test_a_server_that_ignores_stream_and_sends_a_body_is_read_as_the_body() -> None:
    body = orjson.dumps(CHAT_BODY)
    assert await collected(events_from_chat_sse(pieces(body, 5), "m")) == await collected(
        events_from_chat_body(body, "m")
    )


@pytest.mark.parametrize(
    ("sse", "words"),
    [
        pytest.param(b'data: {"error": {"message": "overloaded"}}\n\n', "overloaded", id="error-event"),
        pytest.param(b"data: {oops\n\n", "not JSON", id="not-json"),
        pytest.param(chunk({"content": "Hal"}), "before it finished", id="cut-off"),
    ],
)
async def test_a_broken_chat_stream_is_an_upstream_error(sse: bytes, words: str) -> None:
    with pytest.raises(UpstreamError, match=words):
        await collected(events_from_chat_sse(pieces(sse, 5), "m"))


async def test_pass_through_renders_as_responses(store: ResponseStore) -> None:
    call = await parse({"model": "m", "input": "Hi", "stream": True}, store)
    got = frames(
        b"".join(
            [c async for c in render_responses_sse(events_from_chat_sse(pieces(CHAT_SSE, 64), "m"), call)]
        )
    )
    final = Response.model_validate(got[-1]["response"])
    assert final.output_text == "Let me check."
    assert final.usage is not None and final.usage.total_tokens == 13


# ------------------------------------------------------------------------------- real clients


Script = Callable[[ResponsesCall], list[Event]]


def serving(script: Script, store: ResponseStore, seen: list[ResponsesCall]) -> httpx.AsyncClient:
    """An HTTP client whose transport answers ``POST /v1/responses`` with this surface:
    the request parsed, the scripted events for it rendered (JSON or SSE)."""

    async def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/responses"
        call = await parse_responses_request(await request.aread(), store, "key-a")
        seen.append(call)
        events = stream_of(*script(call))
        if call.request.stream:
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                content=render_responses_sse(events, call, store),
            )
        return httpx.Response(
            200,
            headers={"content-type": "application/json"},
            content=await render_responses_json(events, call, store),
        )

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


def weather_script(call: ResponsesCall) -> list[Event]:
    """A call to get_weather first; once its result is back, an answer that quotes it."""
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
async def test_the_openai_sdk_reads_a_tool_loop(stream: bool, store: ResponseStore) -> None:
    seen: list[ResponsesCall] = []
    async with openai.AsyncOpenAI(
        base_url="http://proxy/v1", api_key="x", http_client=serving(weather_script, store, seen)
    ) as client:

        async def ask(**kwargs: Any) -> Response:
            if not stream:
                return await client.responses.create(model="m", tools=[WEATHER], **kwargs)  # type: ignore[list-item]
            async with client.responses.stream(model="m", tools=[WEATHER], **kwargs) as events:  # type: ignore[list-item]
                deltas = [e.delta async for e in events if e.type == "response.output_text.delta"]
                final = await events.get_final_response()
            assert "".join(deltas) == final.output_text
            return final

        first = await ask(input="Weather in Paris?")
        [call] = [o for o in first.output if o.type == "function_call"]
        assert (call.name, call.arguments, call.call_id) == ("get_weather", '{"city": "Paris"}', CALL_ID)
        second = await ask(
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        )
        assert second.output_text == "It is 18C in Paris."
        assert second.previous_response_id == first.id
        assert [m["role"] for m in seen[-1].payload["messages"]] == ["user", "assistant", "tool"]


@pytest.mark.parametrize("streamed", [pytest.param(False, id="run"), pytest.param(True, id="run-streamed")])
async def test_the_agents_sdk_runs_a_function_tool(streamed: bool, store: ResponseStore) -> None:
    import agents

    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather."""
        asked.append(city)
        return "18C"

    seen: list[ResponsesCall] = []
    async with openai.AsyncOpenAI(
        base_url="http://proxy/v1", api_key="x", http_client=serving(weather_script, store, seen)
    ) as client:
        agent = agents.Agent(
            name="weather",
            instructions="Answer about the weather.",
            tools=[get_weather],
            model=agents.OpenAIResponsesModel(model="m", openai_client=client),
        )
        config = agents.RunConfig(tracing_disabled=True)
        if streamed:
            result: Any = agents.Runner.run_streamed(agent, "Weather in Paris?", run_config=config)
            kinds = {event.type async for event in result.stream_events()}
            assert "raw_response_event" in kinds
        else:
            result = await agents.Runner.run(agent, "Weather in Paris?", run_config=config)
        assert result.final_output == "It is 18C in Paris."
        assert asked == ["Paris"]
        assert [c.request.stream for c in seen] == [streamed, streamed]
        # the SDK sends the whole conversation back (no previous_response_id): its items parsed
        assert [m["role"] for m in seen[-1].payload["messages"]] == ["system", "user", "assistant", "tool"]
        assert seen[-1].payload["messages"][2]["tool_calls"][0]["id"] == CALL_ID
