"""Streaming through the action loop: text as the model writes it, static calls pipelined while
the model is still writing, the same calls streamed or not, clients that drop mid-stream.

Real uvicorn, the official openai SDK (sync and async), real kernels; the scripted upstream
streams its chunks and stops at a gate the test opens, so "before the upstream finished"
is checked by order, never by time."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ProxyFactory
from tests.servers import UvicornThread
from tests.test_actions import LOOP_PROGRAM, WEATHER, config, program
from tests.upstream import ScriptedUpstream, Stream, text_stream, wait_for

THOUGHT = "Let me check both cities."
STATIC = [
    THOUGHT + "\n\n",
    "```python\n",
    'get_weather(city="Paris")\n',
    'get_weather(city="Rome", ',  # the test's gate opens after this chunk has been read
    'unit="f")\n',
    "```",
]


def gated(pieces: list[str], gate: threading.Event, after: int) -> Stream:
    """The pieces as a streamed completion; the upstream waits for ``gate`` after ``after`` pieces."""
    # text_stream's first chunk is the role; piece i is chunk i + 1
    return Stream(chunks=text_stream("scripted", pieces), gate=gate, gate_after=after)


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy(config(upstream_url))


@pytest.fixture
def client(proxy: UvicornThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def aclient(proxy: UvicornThread) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as aclient:
        yield aclient


def stream_ask(client: openai.OpenAI, **kwargs: Any) -> Iterator[Any]:
    return iter(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Weather in Paris and Rome?"}],
            tools=WEATHER,
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )


def test_an_answer_streams_while_the_upstream_is_still_writing(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    gate = threading.Event()
    words = ["It ", "is ", "sunny ", "in ", "Paris ", "today."]
    upstream.plan(gated(words, gate, after=3))
    chunks = stream_ask(client)
    seen = ""
    while "sunny" not in seen:  # the first three words arrive before the upstream may go on
        chunk = next(chunks)
        seen += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        assert not gate.is_set()
    gate.set()
    rest = list(chunks)
    text = seen + "".join((c.choices[0].delta.content or "") for c in rest if c.choices)
    assert text == "It is sunny in Paris today."
    # as it arrives, not as one block: some before the upstream went on, the rest after
    assert any(c.choices and c.choices[0].delta.content for c in rest)
    assert rest[-2].choices[0].finish_reason == "stop"
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == len(words)


def test_the_thought_and_the_first_call_stream_before_the_model_finishes(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    gate = threading.Event()
    upstream.plan(gated(STATIC, gate, after=4))
    chunks = stream_ask(client)
    content = ""
    first_call = None
    while first_call is None:
        chunk = next(chunks)
        delta = chunk.choices[0].delta if chunk.choices else None
        content += (delta.content or "") if delta else ""
        if delta and delta.tool_calls:
            first_call = delta.tool_calls[0]
        assert not gate.is_set()
    # the thought came first, whole; the Paris call is out while Rome is still being written
    assert content == THOUGHT
    assert first_call.index == 0 and first_call.function.name == "get_weather"
    gate.set()
    rest = list(chunks)
    assert all(not (c.choices and c.choices[0].delta.content) for c in rest)  # no code as content
    args: dict[int, str] = {0: first_call.function.arguments or ""}
    for chunk in rest:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            args[call.index] = args.get(call.index, "") + (call.function.arguments or "")
    assert [json.loads(a) for a in args.values()] == [{"city": "Paris"}, {"city": "Rome", "unit": "f"}]
    assert rest[-2].choices[0].finish_reason == "tool_calls"


def test_the_sdk_stream_helper_accumulates_the_same_calls_as_a_plain_response(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    reply = "".join(STATIC)
    upstream.plan(program(reply))
    plain = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], tools=WEATHER
    )
    upstream.plan(Stream(chunks=text_stream("scripted", STATIC)))
    with client.chat.completions.stream(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], tools=WEATHER
    ) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_completion()

    def calls(completion: Any) -> list[tuple[str, Any]]:
        return [
            (c.function.name, json.loads(c.function.arguments))
            for c in completion.choices[0].message.tool_calls or []
        ]

    assert (
        calls(streamed)
        == calls(plain)
        == [
            ("get_weather", {"city": "Paris"}),
            ("get_weather", {"city": "Rome", "unit": "f"}),
        ]
    )
    assert streamed.choices[0].message.content == plain.choices[0].message.content == THOUGHT
    assert "tool_calls.function.arguments.done" in kinds and "content.done" in kinds


@pytest.mark.anyio
async def test_async_client_streams_a_kernel_program_round_trip(
    aclient: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    """A loop program: its thought streams, its client calls go out one at a time, the
    results resume it, and the final answer streams."""
    upstream.plan(Stream(chunks=text_stream("scripted", [LOOP_PROGRAM[:12], LOOP_PROGRAM[12:]])))
    messages: list[Any] = [{"role": "user", "content": "Which is hotter?"}]
    temps = {"Paris": 18, "Rome": 24}
    for _ in range(3):
        stream = await aclient.chat.completions.create(
            model="gpt-4o-mini", messages=messages, tools=WEATHER, stream=True
        )
        content, calls = "", {}
        async for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            content += (delta.content or "") if delta else ""
            for call in (delta.tool_calls or []) if delta else []:
                entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
        if not calls:
            break
        assert "```" not in content and "for c in" not in content
        messages.append(
            {
                "role": "assistant",
                "content": content or None,
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in calls.values()
                ],
            }
        )
        for c in calls.values():
            city = json.loads(c["arguments"])["city"]
            messages.append(
                {"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"t": temps[city]})}
            )
        if city == "Rome":
            upstream.plan(Stream(chunks=text_stream("scripted", ["Rome ", "is ", "hotter."])))
    assert content == "Rome is hotter."
    assert [
        json.loads(m["tool_calls"][0]["function"]["arguments"])["city"]
        for m in messages
        if m.get("tool_calls")
    ] == [
        "Paris",
        "Rome",
    ]


def test_a_client_dropping_mid_stream_releases_the_session(
    proxy: UvicornThread, client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    """The session's lock is free again at once: the same request, sent again while the dropped
    one's upstream is still stuck, is answered instead of waiting for it (409 after 5 s)."""
    upstream.plan(program(LOOP_PROGRAM))
    first = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Which is hotter?"}], tools=WEATHER
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: list[Any] = [
        {"role": "user", "content": "Which is hotter?"},
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"t": 18}'},
    ]
    # the program asks for Rome next: answered from the kernel, no model call. Answer Rome too,
    # so the next model turn streams; that stream stalls after its first words.
    second = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    rome = (second.choices[0].message.tool_calls or [])[0]
    messages += [
        second.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": rome.id, "content": '{"t": 24}'},
    ]
    gate = threading.Event()
    upstream.plan(gated(["Rome ", "is ", "hotter."], gate, after=1))
    body = {"model": "gpt-4o-mini", "messages": messages, "tools": WEATHER, "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if '"content":"Rome' in line:
                break  # the client goes away mid-stream
    received = len(upstream.received)
    upstream.plan(program("Rome is hotter."))
    again = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER, timeout=4)
    gate.set()
    assert again.choices[0].message.content == "Rome is hotter."
    assert len(upstream.received) == received + 1


@pytest.mark.parametrize("stream", [False, True])
def test_litellm_routes_stream_through_the_loop_too(
    client: openai.OpenAI, upstream: ScriptedUpstream, stream: bool
) -> None:
    """The litellm backend's generation: its streaming call, read as text deltas."""
    upstream.plan(Stream(chunks=text_stream("scripted", STATIC)))
    kwargs: dict[str, Any] = {"stream": True} if stream else {}
    result = client.chat.completions.create(
        model="via-litellm", messages=[{"role": "user", "content": "x"}], tools=WEATHER, **kwargs
    )
    if stream:
        chunks = list(result)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        names = [
            t.function.name for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or [] if t.id
        ]
    else:
        content = result.choices[0].message.content
        names = [t.function.name for t in result.choices[0].message.tool_calls or []]
    assert content == THOUGHT and names == ["get_weather", "get_weather"]
    sent = upstream.received[-1].json
    assert sent["stream"] is True and "tools" not in sent


def test_an_upstream_that_breaks_off_mid_stream_ends_the_stream_with_an_error_event(
    proxy: UvicornThread, client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    """Text already sent stays sent; the failure is the stream's last event, in OpenAI's shape;
    the session is free for the retry."""
    upstream.plan(
        Stream(chunks=text_stream("scripted", ["One ", "two ", "three ", "four ", "five."]), truncate=True)
    )
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Count."}],
        "tools": WEATHER,
        "stream": True,
    }
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert '"content":"One' in "".join(events)
    error = json.loads(events[-1][6:])["error"]
    assert error["type"] == "upstream_error" and "broke off" in error["message"]
    upstream.plan(program("Done."))
    again = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Count."}], tools=WEATHER
    )
    assert again.choices[0].message.content == "Done."


def test_a_client_dropping_while_its_program_runs_stops_the_program(
    proxy: UvicornThread, client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    """The kernel cell of a dropped request does not run on with nobody to read it: the kernel
    is given up, the program recorded as cancelled, and the session's next program runs at once
    on a fresh kernel (the cancelled program is not replayed)."""
    from proxy.actions.loop import SessionKey

    name = "drop-while-running"
    sid = SessionKey("anonymous", name).session_id
    app = proxy.server.config.app
    runtime = app.state.loop.runtime
    upstream.plan(program("Working.\n```python\nimport time\nBASE = 7\ntime.sleep(120)\n```"))
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Sleep."}],
        "tools": WEATHER,
        "stream": True,
    }
    headers = {"x-cablectl-session": name}
    with httpx.stream(
        "POST", proxy.url + "/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as r:
        lines = r.iter_lines()  # held: a generator dropped here would close the connection
        for line in lines:
            if "Working." in line:
                break
        wait_for(lambda: sid in runtime.live and runtime.live[sid].in_use, timeout=20)  # the cell runs
    # the client has gone
    wait_for(lambda: sid not in runtime.live, timeout=20)  # given up, not left running

    async def log() -> list[Any]:
        return await app.state.store.events(sid)

    import asyncio

    events = asyncio.run(log())
    assert {"kind": "cell_end", "turn": 1, "output": "", "error": "Cancelled"} in [
        {k: v for k, v in e.items() if k != "at"} for e in events
    ]
    upstream.plan(program("```python\nprint('after', 'BASE' in globals())\n```"), program("Done."))
    done = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Go on."}],
        tools=WEATHER,
        extra_headers=headers,
        timeout=60,
    )
    assert done.choices[0].message.content == "Done."
    assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\nafter False"


def test_an_upstream_that_refuses_stream_options_is_streamed_without_them(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    """Some OpenAI-compatible servers reject stream_options: the generation is sent again
    without them (once per route: the next ones go without), and the answer comes through."""
    from tests.upstream import Reply

    server = make_proxy(config(upstream_url))
    refusal = {
        "error": {
            "message": "Unrecognized request argument supplied: stream_options",
            "type": "invalid_request_error",
        }
    }
    upstream.plan(Reply(status=400, json=refusal), program("Hello."), program("Again."))
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        for expected in ("Hello.", "Again."):
            result = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], tools=WEATHER
            )
            assert result.choices[0].message.content == expected
    sent = [r.json for r in upstream.received[-3:]]
    assert "stream_options" in sent[0] and "stream_options" not in sent[1] and "stream_options" not in sent[2]


def test_a_retry_after_a_broken_stream_never_reuses_a_call_id(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    """A call streamed out before the upstream broke off keeps its number: the retried request's
    calls get new ids, so a client never sees one id for two different calls."""
    pieces = ["```python\n", "get_weather(city='Paris')\n", "get_weather(", "city=", "'Rome'", ")\n"]
    pieces += ["# " + "x" * 20 + "\n"] * 12 + ["```"]
    upstream.plan(Stream(text_stream("scripted", pieces), truncate=True))
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Weather twice (retry)?"}],
        "tools": WEATHER,
        "extra_headers": {"x-cablectl-session": "retry-ids"},  # the retry continues the session
    }
    first_ids = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(model="gpt-4o-mini", stream=True, **body):
            for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                if call.id:
                    first_ids.append(call.id)
    assert first_ids  # Paris went out before the break
    upstream.plan(program("```python\nget_weather(city='Oslo')\nget_weather(city='Lima')\n```"))
    again = client.chat.completions.create(model="gpt-4o-mini", **body)
    second_ids = [c.id for c in again.choices[0].message.tool_calls or []]
    assert len(second_ids) == 2 and not set(first_ids) & set(second_ids)
