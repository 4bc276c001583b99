"""Code actions end to end: uvicorn + openai SDK, a scripted upstream emitting planned programs,
real kernels, a real redis-server."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.config import load_settings
from tests.conftest import ProxyFactory, upstream_models, write_config
from tests.servers import UvicornThread
from tests.test_kernels import gone_within
from tests.upstream import Reply, ScriptedUpstream, canned_completion, load_recording

WEATHER: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current temperature in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]

LOOP_PROGRAM = (
    "Let me check both.\n```python\n"
    "temps = {}\n"
    "for c in ['Paris', 'Rome']:\n"
    "    temps[c] = get_weather(city=c)['t']\n"
    "print('hottest:', max(temps, key=temps.get), temps)\n"
    "```"
)


def program(text: str) -> Reply:
    return Reply(json=canned_completion("scripted", text))


def config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {"model_list": upstream_models(upstream_url), "kernels": {"min_idle": 1, "max_total": 4}, **extra}


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy(config(upstream_url))


@pytest.fixture
def client(proxy: UvicornThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


def ask(client: openai.OpenAI, messages: list[Any], **kwargs: Any) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER, **kwargs)


def test_static_program_becomes_parallel_tool_calls(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    upstream.plan(program('```python\nget_weather(city="Paris")\nget_weather(city="Rome", unit="f")\n```'))
    result = ask(client, [{"role": "user", "content": "Weather in Paris and Rome?"}])
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome", "unit": "f"}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    sent = upstream.received[-1].json
    assert "tools" not in sent and "tool_choice" not in sent  # the model saw Python, not JSON tools
    assert (
        "def get_weather(city: str, unit: Literal['c', 'f'] | None = None):" in sent["messages"][0]["content"]
    )
    assert result.usage is not None and result.usage.total_tokens == 13

    # the client answers; the model sees the calls as code and the results as an observation
    upstream.plan(program("Paris is 18C, Rome 70F."))
    history: list[Any] = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18C"},
        {"role": "tool", "tool_call_id": calls[1].id, "content": "70F"},
    ]
    final = ask(client, history)
    assert (
        final.choices[0].message.content == "Paris is 18C, Rome 70F."
        and final.choices[0].finish_reason == "stop"
    )
    prompt = upstream.received[-1].json["messages"]
    assert prompt[-2]["content"].endswith(
        "get_weather(city='Paris')\nget_weather(city='Rome', unit='f')\n```"
    )
    assert (
        prompt[-1]["content"]
        == "Observation:\nget_weather(city='Paris') -> 18C\nget_weather(city='Rome', unit='f') -> 70F"
    )


def answer_call(messages: list[Any], response: Any, result: Any) -> None:
    """Append the response's assistant message and the tool result for its first call."""
    call = (response.choices[0].message.tool_calls or [])[0]
    messages += [
        response.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]


def run_loop_conversation(
    client: openai.OpenAI, upstream: ScriptedUpstream, between: Any = None
) -> tuple[Any, list[Any]]:
    """The loop program: two sequential tool_calls round trips, then a final answer."""
    upstream.plan(program(LOOP_PROGRAM))
    messages: list[Any] = [{"role": "user", "content": "Which is hotter, Paris or Rome?"}]
    temps = {"Paris": 18, "Rome": 24}
    seen = []
    response = ask(client, messages)
    for _ in range(2):
        call = (response.choices[0].message.tool_calls or [])[0]
        assert response.choices[0].finish_reason == "tool_calls"
        seen.append(json.loads(call.function.arguments)["city"])
        messages += [
            response.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"t": temps[seen[-1]]})},
        ]
        if between is not None:
            between(call.id)
        if len(seen) == 2:
            upstream.plan(program("Rome is hotter (24 vs 18)."))
        response = ask(client, messages)
    assert seen == ["Paris", "Rome"]
    return response, messages


def test_loop_with_data_flow_goes_through_round_trips(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    final, _ = run_loop_conversation(client, upstream)
    assert (
        final.choices[0].message.content == "Rome is hotter (24 vs 18)."
        and final.choices[0].finish_reason == "stop"
    )
    prompt = upstream.received[-1].json["messages"]
    # the model sees its program once, and the program's own output
    assert prompt[-2]["role"] == "assistant" and "for c in ['Paris', 'Rome']:" in prompt[-2]["content"]
    assert prompt[-1]["content"] == "Observation:\nhottest: Rome {'Paris': 18, 'Rome': 24}"
    assert len(upstream.received) == 2  # one model call for the program, one for the answer


def test_streamed_tool_calls_have_the_recorded_shape(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    recorded = [
        json.loads(e[6:]) for e in load_recording("parallel_two_tools.f82268f2fefd.sse") if b"[DONE]" not in e
    ]
    upstream.plan(program('```python\nget_weather(city="Paris")\nget_weather(city="Rome")\n```'))
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "x"}],
            "tools": WEATHER,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=60,
    ) as response:
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    ours = [json.loads(e[6:]) for e in events[:-1]]

    def shape(chunk: dict[str, Any]) -> tuple[Any, ...]:
        deltas = [c["delta"] for c in chunk["choices"]]
        calls = [tuple(sorted(t)) for d in deltas for t in d.get("tool_calls", [])]
        return tuple(sorted(chunk)), tuple(calls)

    header = next(
        c for c in ours if any("id" in t for d in c["choices"] for t in d["delta"].get("tool_calls", []))
    )
    recorded_header = next(
        c for c in recorded if any("id" in t for d in c["choices"] for t in d["delta"].get("tool_calls", []))
    )
    assert shape(header)[1] == shape(recorded_header)[1]
    assert ours[-2]["choices"][0]["finish_reason"] == "tool_calls" and ours[-1]["choices"] == []
    # the SDK's stream helper accumulates them into the same calls
    args: dict[int, str] = {}
    for chunk in ours:
        for delta in chunk["choices"]:
            for call in delta["delta"].get("tool_calls", []):
                args[call["index"]] = args.get(call["index"], "") + call["function"].get("arguments", "")
    assert [json.loads(a) for a in args.values()] == [{"city": "Paris"}, {"city": "Rome"}]


def test_invalid_program_is_repaired(client: openai.OpenAI, upstream: ScriptedUpstream) -> None:
    upstream.plan(
        program('```python\nget_weather(town="Paris")\n```'),
        program('```python\nget_weather(city="Paris")\n```'),
    )
    result = ask(client, [{"role": "user", "content": "Paris?"}])
    calls = result.choices[0].message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}]
    repair = upstream.received[-1].json["messages"]
    assert "unexpected keyword argument 'town'" in repair[-1]["content"]
    assert result.usage is not None and result.usage.total_tokens == 26  # both model calls counted


def ended(text: str, finish_reason: str) -> Reply:
    body = canned_completion("scripted", text)
    body["choices"][0]["finish_reason"] = finish_reason
    return Reply(json=body)


@pytest.mark.parametrize("stream", [False, True])
def test_a_block_the_model_ended_itself_is_closed_one_cut_off_is_repaired(
    client: openai.OpenAI, upstream: ScriptedUpstream, stream: bool
) -> None:
    """The model stopped (finish_reason stop) inside its python block: the block ends there. Cut
    off by max_tokens (length), the program may be half written: the model is asked again."""
    upstream.plan(ended('I will look.\n```python\nget_weather(city="Oslo")\n', "stop"))
    result = collect(client, stream, [{"role": "user", "content": "Oslo?"}])
    assert [(c["name"], json.loads(c["arguments"])) for c in result["calls"]] == [
        ("get_weather", {"city": "Oslo"})
    ]
    assert len(upstream.received) == 1

    upstream.reset()
    upstream.plan(
        ended('```python\nx = 1\nget_weather(city="Os', "length"),
        program('```python\nget_weather(city="Oslo")\n```'),
    )
    result = collect(client, stream, [{"role": "user", "content": "Oslo?"}])
    assert [c["name"] for c in result["calls"]] == ["get_weather"]
    assert len(upstream.received) == 2
    assert "not closed" in upstream.received[-1].json["messages"][-1]["content"]


def collect(client: openai.OpenAI, stream: bool, messages: list[Any]) -> dict[str, Any]:
    """The tool calls of one reply, streamed or not."""
    if not stream:
        message = ask(client, messages).choices[0].message
        return {
            "calls": [
                {"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []
            ]
        }
    calls: dict[int, dict[str, str]] = {}
    for chunk in ask(client, messages, stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    return {"calls": [calls[i] for i in sorted(calls)]}


def test_tool_choice_none_answers_without_tools(client: openai.OpenAI, upstream: ScriptedUpstream) -> None:
    upstream.plan(program("Just an answer."))
    result = ask(client, [{"role": "user", "content": "hi"}], tool_choice="none")
    assert result.choices[0].message.content == "Just an answer." and not result.choices[0].message.tool_calls
    assert "def get_weather" not in upstream.received[-1].json["messages"][0]["content"]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        pytest.param(
            [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_nope", "content": "1"}],
            "messages[1].tool_call_id",
            id="unknown-id",
        ),
        pytest.param(
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "user", "content": "where is my answer"},
            ],
            "messages[2]",
            id="missing-result",
        ),
        pytest.param(
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "a", "content": []},
            ],
            "messages[2].content",
            id="empty-result",
        ),
    ],
)
def test_bad_tool_messages_are_400(proxy: UvicornThread, messages: list[Any], param: str) -> None:
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": messages, "tools": WEATHER},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_foreign_tool_call_ids_are_translated_statelessly(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    upstream.plan(program("It is 12C."))
    history: list[Any] = [
        {"role": "user", "content": "Oslo?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_JMW1whyEaYG438VE1OIflxA2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_JMW1whyEaYG438VE1OIflxA2", "content": "12C"},
    ]
    assert ask(client, history).choices[0].message.content == "It is 12C."
    assert (
        upstream.received[-1].json["messages"][-1]["content"]
        == "Observation:\nget_weather(city='Oslo') -> 12C"
    )


def test_kernel_killed_mid_conversation_is_replayed(
    proxy: UvicornThread, client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    runtime = proxy.server.config.app.state.loop.runtime

    def kill_kernel(call_id: str) -> None:
        session = call_id.split("_")[1]
        connection = runtime.live[session].kernel.connection
        os.kill(connection.pid(), signal.SIGKILL)
        # the kernel itself (a sandboxed one is the killed keeper's child) ends a moment later:
        # the next request must find it gone, not race its end (and get a call out of it)
        rundir = runtime.pool.provider.runtime / connection.kernel_id
        assert gone_within(rundir, 10)

    final, _ = run_loop_conversation(client, upstream, between=kill_kernel)
    assert final.choices[0].message.content == "Rome is hotter (24 vs 18)."
    assert (
        upstream.received[-1].json["messages"][-1]["content"]
        == "Observation:\nhottest: Rome {'Paris': 18, 'Rome': 24}"
    )
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'cablectl_session_replays_total{cause="lost",reason="waiting_call"}' in metrics


def test_proxy_restart_between_turns_continues_from_redis(
    tmp_path: Any, redis_url: str, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    cfg = config(upstream_url, sessions={"redis_url": redis_url, "secret": "a-shared-secret-of-replicas"})
    path = write_config(tmp_path, cfg)
    servers = [UvicornThread(create_app(load_settings(path, env={}))).start()]

    def restart(_: str) -> None:
        servers[-1].stop()  # the proxy goes away with the session's kernel
        servers.append(UvicornThread(create_app(load_settings(path, env={}))).start())
        holder["client"].close()
        holder["client"] = openai.OpenAI(base_url=servers[-1].url + "/v1", api_key="x", max_retries=0)

    holder: dict[str, openai.OpenAI] = {
        "client": openai.OpenAI(base_url=servers[0].url + "/v1", api_key="x", max_retries=0)
    }

    class Switching:
        @property
        def chat(self) -> Any:
            return holder["client"].chat

    try:
        final, _ = run_loop_conversation(Switching(), upstream, between=restart)  # type: ignore[arg-type]
        assert final.choices[0].message.content == "Rome is hotter (24 vs 18)."
        assert (
            upstream.received[-1].json["messages"][-1]["content"]
            == "Observation:\nhottest: Rome {'Paris': 18, 'Rome': 24}"
        )
        assert len(servers) == 3
    finally:
        holder["client"].close()
        for server in servers[-1:]:
            server.stop()


def test_a_full_pool_evicts_idle_sessions(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    """One kernel, many conversations: a finished session's kernel goes to the next one."""
    server = make_proxy(config(upstream_url, kernels={"min_idle": 1, "max_total": 1, "acquire_timeout": 20}))
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as sdk:
        for n in range(3):
            upstream.plan(program(f"```python\nprint({n} * 7)\n```"), program(f"It is {n * 7}."))
            result = ask(sdk, [{"role": "user", "content": f"{n} times 7?"}])
            assert result.choices[0].message.content == f"It is {n * 7}."
            assert upstream.received[-1].json["messages"][-1]["content"] == f"Observation:\n{n * 7}"
        assert server.server.config.app.state.pool.stats().busy <= 1


def test_lark_mode_sends_the_grammar(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    models = upstream_models(upstream_url)
    models[0]["grammar"] = "lark"
    server = make_proxy({"model_list": models})
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as sdk:
        upstream.plan(program('```python\nget_weather(city="Oslo")\n```'))
        result = ask(sdk, [{"role": "user", "content": "Oslo?"}], tool_choice="required")
        assert (result.choices[0].message.tool_calls or [])[0].function.name == "get_weather"
        grammar = upstream.received[-1].json["structured_outputs"]["grammar"]
        assert grammar.startswith("start: action") and '"get_weather("' in grammar
        assert (
            'cablectl_grammar_ignored_total{model="gpt-4o-mini"}'
            not in httpx.get(server.url + "/metrics").text
        )
        # a server that ignores the grammar (fails open): detected, counted, and repaired
        upstream.plan(
            program('```python\nget_weather(town="Oslo")\n```'),
            program('```python\nget_weather(city="Oslo")\n```'),
        )
        result = ask(sdk, [{"role": "user", "content": "Oslo?"}], tool_choice="required")
        assert json.loads((result.choices[0].message.tool_calls or [])[0].function.arguments) == {
            "city": "Oslo"
        }
        metrics = httpx.get(server.url + "/metrics").text
        assert 'cablectl_grammar_ignored_total{model="gpt-4o-mini"} 1.0' in metrics


def test_named_tool_choice_is_enforced_without_a_grammar(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    tools = [
        *WEATHER,
        {
            "type": "function",
            "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    upstream.plan(program("```python\nget_time()\n```"), program('```python\nget_weather(city="Oslo")\n```'))
    result = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Oslo?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert [c.function.name for c in result.choices[0].message.tool_calls or []] == ["get_weather"]
    assert "must call get_weather" in upstream.received[-1].json["messages"][-1]["content"]


def test_parallel_tool_calls_false_gives_one_call_per_response(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    upstream.plan(program('```python\nget_weather(city="Paris")\nget_weather(city="Rome")\n```'))
    messages: list[Any] = [{"role": "user", "content": "Paris and Rome?"}]
    first = ask(client, messages, parallel_tool_calls=False)
    calls = first.choices[0].message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18"},
    ]
    second = ask(client, messages, parallel_tool_calls=False)
    assert [json.loads(c.function.arguments) for c in second.choices[0].message.tool_calls or []] == [
        {"city": "Rome"}
    ]


def test_max_steps_bounds_the_loop(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    models = upstream_models(upstream_url)
    models[0]["max_steps"] = 2
    server = make_proxy({"model_list": models})
    upstream.plan(*[program("```python\nprint('again')\n```")] * 3)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as sdk:
        result = ask(sdk, [{"role": "user", "content": "loop"}])
    assert result.choices[0].finish_reason == "length" and "max_steps" in (
        result.choices[0].message.content or ""
    )
    assert len(upstream.received) == 2
