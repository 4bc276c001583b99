"""The Responses API and Anthropic's Messages API through the real app, end to end.

Real uvicorn, the official ``openai`` SDK (``responses.create``/``stream``), the OpenAI Agents
SDK (``Runner.run``/``run_streamed``), the ``anthropic`` SDK (``messages.create``/``stream``/
``count_tokens``), real kernels, and a real redis-server for restarts; the scripted upstream
plays the model. A kernel program that suspends on a client tool is resumed by a
``function_call_output`` item or a ``tool_result`` block exactly as by a ``tool`` message."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.config import load_settings
from tests.conftest import ProxyFactory, upstream_models, write_config
from tests.servers import UvicornThread
from tests.test_actions import LOOP_PROGRAM, program
from tests.upstream import ScriptedUpstream, Stream, text_stream

KEYS = [{"id": "alice", "key": "sk-alice-123456"}, {"id": "bob", "key": "sk-bob-12345678"}]
ALICE, BOB = "sk-alice-123456", "sk-bob-12345678"
TEMPS = {"Paris": 18, "Rome": 24}

WEATHER_FN: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Current temperature in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"],
    },
}
WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Current temperature in a city.",
    "input_schema": WEATHER_FN["parameters"],
}


def config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_list": upstream_models(upstream_url),
        "kernels": {"min_idle": 1, "max_total": 4},
        "keys": KEYS,
        **extra,
    }


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy(config(upstream_url))


_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    yield
    while _OPEN:
        _OPEN.pop().close()


def oai(server: UvicornThread, key: str = ALICE) -> openai.OpenAI:
    _OPEN.append(openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0))
    return _OPEN[-1]  # type: ignore[no-any-return]


def claude(server: UvicornThread, key: str = ALICE) -> anthropic.Anthropic:
    _OPEN.append(anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0))
    return _OPEN[-1]  # type: ignore[no-any-return]


def answer_tool_use(reply: Any, tool_use_id: str, result: str) -> list[dict[str, Any]]:
    """The assistant's reply as the client echoes it, then the user's tool_result for one call."""
    return [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": result}]},
    ]


def calls_of(response: Any) -> list[Any]:
    return [item for item in response.output if item.type == "function_call"]


def model_calls(upstream: ScriptedUpstream) -> int:
    return sum(1 for r in upstream.received if r.path.endswith("/chat/completions"))


# ------------------------------------------------------------------------------------ responses


def test_responses_loop_program_resumes_through_previous_response_id(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    """The loop program asks for Paris, then Rome, each a function_call item; each
    function_call_output (sent with previous_response_id) resumes the same kernel program."""
    client = oai(proxy)
    upstream.plan(program(LOOP_PROGRAM))
    before = model_calls(upstream)
    response = client.responses.create(
        model="gpt-4o-mini", input="Which is hotter, Paris or Rome?", tools=[WEATHER_FN]
    )
    asked = []
    for _ in range(2):
        assert response.status == "completed"
        [call] = calls_of(response)
        assert call.name == "get_weather"
        asked.append(json.loads(call.arguments)["city"])
        if len(asked) == 2:
            upstream.plan(program("Rome is hotter (24 vs 18)."))
        response = client.responses.create(
            model="gpt-4o-mini",
            previous_response_id=response.id,
            input=[
                {
                    "type": "function_call_output",
                    "call_id": call.call_id,
                    "output": json.dumps({"t": TEMPS[asked[-1]]}),
                }
            ],
            tools=[WEATHER_FN],
        )
    assert asked == ["Paris", "Rome"]
    assert response.output_text == "Rome is hotter (24 vs 18)."
    assert calls_of(response) == []
    assert model_calls(upstream) - before == 2  # the program was written once and resumed twice
    observation = upstream.received[-1].json["messages"][-1]["content"]
    assert observation == "Observation:\nhottest: Rome {'Paris': 18, 'Rome': 24}"
    # input and output tokens are summed over the inner calls
    assert response.usage is not None and response.usage.input_tokens > 0

    stored = client.responses.retrieve(response.id)
    assert stored.id == response.id and stored.output_text == response.output_text


def test_responses_with_the_whole_input_each_time(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    """As the Agents SDK does by default: no previous_response_id, the items echoed back."""
    client = oai(proxy)
    upstream.plan(program(LOOP_PROGRAM))
    items: list[Any] = [{"role": "user", "content": "Which is hotter, Paris or Rome? (whole input)"}]
    response = client.responses.create(model="gpt-4o-mini", input=items, tools=[WEATHER_FN], store=False)
    asked = []
    while calls_of(response):
        [call] = calls_of(response)
        asked.append(json.loads(call.arguments)["city"])
        items += [item.model_dump(exclude_none=True) for item in response.output]
        items.append(
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": json.dumps({"t": TEMPS[asked[-1]]}),
            }
        )
        if len(asked) == 2:
            upstream.plan(program("Rome."))
        response = client.responses.create(model="gpt-4o-mini", input=items, tools=[WEATHER_FN], store=False)
    assert asked == ["Paris", "Rome"] and response.output_text == "Rome."
    with pytest.raises(openai.NotFoundError):  # store: false keeps nothing
        client.responses.retrieve(response.id)


def test_responses_stream_typed_events_and_a_final_response(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    client = oai(proxy)
    upstream.plan(program("Let me look.\n```python\nget_weather(city='Paris')\n```"))
    with client.responses.stream(
        model="gpt-4o-mini", input="Weather in Paris?", tools=[WEATHER_FN]
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "Let me look."
    [call] = calls_of(final)
    assert json.loads(call.arguments) == {"city": "Paris"}
    # the SDK's own accumulation agrees with what the proxy stored
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == final.output_text
    assert [(c.call_id, c.arguments) for c in calls_of(stored)] == [(call.call_id, call.arguments)]
    assert [item.id for item in stored.output] == [item.id for item in final.output]


def test_responses_without_tools_are_bridged_to_chat_completions(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    client = oai(proxy)
    response = client.responses.create(model="gpt-4o-mini", input="Hi", instructions="Be brief.")
    assert response.output_text == "Hello from upstream."
    sent = upstream.received[-1].json
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert "tools" not in sent
    with client.responses.stream(model="gpt-4o-mini", input="Hi", previous_response_id=response.id) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello from upstream."
    # the stored chain came back as history
    assert [m["role"] for m in upstream.received[-1].json["messages"]] == ["user", "assistant", "user"]


def test_responses_get_delete_and_other_keys(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    client = oai(proxy)
    response = client.responses.create(model="gpt-4o-mini", input="Hi")
    with pytest.raises(openai.NotFoundError):
        oai(proxy, BOB).responses.retrieve(response.id)  # another key's response does not exist for it
    with pytest.raises(openai.NotFoundError) as caught:
        oai(proxy, BOB).responses.create(model="gpt-4o-mini", input="Hi", previous_response_id=response.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4o-mini", "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"model": "gpt-4o-mini"}, 400, "input"),
        ({"model": "gpt-4o-mini", "input": []}, 400, "input"),
        ({"model": "gpt-4o-mini", "input": [{"type": "item_reference", "id": "x"}]}, 400, "input[0]"),
        ({"model": "gpt-4o-mini", "input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"model": "gpt-4o-mini", "input": "x", "background": True}, 400, "background"),
        ({"model": "no-such-model", "input": "x"}, 404, "model"),
        (
            {"model": "gpt-4o-mini", "input": "x", "previous_response_id": "resp_nope"},
            404,
            "previous_response_id",
        ),
        (
            {
                "model": "gpt-4o-mini",
                "input": [{"type": "function_call_output", "call_id": "call_unknown", "output": "1"}],
                "tools": [WEATHER_FN],
            },
            400,
            "messages",
        ),
    ],
)
def test_bad_responses_requests_are_openai_errors(
    proxy: UvicornThread, body: dict[str, Any], status: int, param: str
) -> None:
    reply = httpx.post(proxy.url + "/v1/responses", json=body, headers={"authorization": f"Bearer {ALICE}"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param != "messages":
        assert error["param"] == param
    for raw in (b"{", b"[]", b'"x"'):
        reply = httpx.post(
            proxy.url + "/v1/responses", content=raw, headers={"authorization": f"Bearer {ALICE}"}
        )
        assert reply.status_code == 400 and "error" in reply.json()


def test_responses_need_a_key(proxy: UvicornThread) -> None:
    with pytest.raises(openai.AuthenticationError):
        oai(proxy, "sk-wrong-key-000").responses.create(model="gpt-4o-mini", input="x")


def test_responses_resume_after_a_proxy_restart(
    tmp_path: Any, redis_url: str, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    """previous_response_id after the proxy that answered it is gone: the chain is read from
    Redis and the program goes on (replayed onto a fresh kernel) without asking for Paris again."""
    path = write_config(tmp_path, config(upstream_url, sessions={"redis_url": redis_url}))
    first = UvicornThread(create_app(load_settings(path, env={}))).start()
    try:
        upstream.plan(program(LOOP_PROGRAM))
        response = oai(first).responses.create(
            model="gpt-4o-mini", input="Which is hotter, Paris or Rome? (restart)", tools=[WEATHER_FN]
        )
    finally:
        first.stop()
    [call] = calls_of(response)
    assert json.loads(call.arguments)["city"] == "Paris"
    second = UvicornThread(create_app(load_settings(path, env={}))).start()
    try:
        client = oai(second)
        response = client.responses.create(
            model="gpt-4o-mini",
            previous_response_id=response.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"t": 18}'}],
            tools=[WEATHER_FN],
        )
        [call] = calls_of(response)
        assert json.loads(call.arguments)["city"] == "Rome"
        upstream.plan(program("Rome."))
        response = client.responses.create(
            model="gpt-4o-mini",
            previous_response_id=response.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"t": 24}'}],
            tools=[WEATHER_FN],
        )
        assert response.output_text == "Rome."
        assert upstream.received[-1].json["messages"][-1]["content"] == (
            "Observation:\nhottest: Rome {'Paris': 18, 'Rome': 24}"
        )
    finally:
        second.stop()


def test_previous_response_id_keeps_the_kernel_across_user_turns(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    """A helper defined in one response's program is there for the next user question."""
    client = oai(proxy)
    upstream.plan(
        program("```python\nBASE = 10\ndef scale(x):\n    return x * BASE\nprint(scale(2))\n```"),
        program("20."),
    )
    first = client.responses.create(model="gpt-4o-mini", input="Define a scaler.", tools=[WEATHER_FN])
    upstream.plan(program("```python\nprint(scale(3))\n```"), program("30."))
    client.responses.create(
        model="gpt-4o-mini", previous_response_id=first.id, input="And 3?", tools=[WEATHER_FN]
    )
    assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\n30"


# ------------------------------------------------------------------------------------ Agents SDK


def test_agents_sdk_runner_runs_a_tool_through_the_proxy(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current temperature in a city."""
        asked.append(city)
        return json.dumps({"t": TEMPS[city]})

    async def run(streamed: bool) -> str:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0) as client:
            agent = Agent(
                name="weather",
                instructions="Answer with the hotter city.",
                tools=[get_weather],
                model=OpenAIResponsesModel(model="gpt-4o-mini", openai_client=client),
            )
            if not streamed:
                result = await Runner.run(agent, "Which is hotter, Paris or Rome?")
                return str(result.final_output)
            streaming = Runner.run_streamed(agent, "Which is hotter, Paris or Rome?")
            async for _ in streaming.stream_events():
                pass
            return str(streaming.final_output)

    for streamed in (False, True):
        asked.clear()
        upstream.plan(program(LOOP_PROGRAM), program("Rome is hotter."))
        assert asyncio.run(run(streamed)) == "Rome is hotter."
        assert asked == ["Paris", "Rome"]
        assert upstream.received[-1].json["messages"][0] == {
            "role": "system",
            "content": upstream.received[-1].json["messages"][0]["content"],
        }


# -------------------------------------------------------------------------------------- messages


def test_messages_tool_use_and_tool_result_resume_a_program(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    client = claude(proxy)
    upstream.plan(program(LOOP_PROGRAM))
    before = model_calls(upstream)
    messages: list[Any] = [{"role": "user", "content": "Which is hotter, Paris or Rome?"}]
    reply = client.messages.create(
        model="gpt-4o-mini", max_tokens=512, messages=messages, tools=[WEATHER_TOOL]
    )
    asked = []
    while reply.stop_reason == "tool_use":
        [use] = [b for b in reply.content if b.type == "tool_use"]
        asked.append(use.input["city"])  # type: ignore[index]
        messages += answer_tool_use(reply, use.id, json.dumps({"t": TEMPS[asked[-1]]}))
        if len(asked) == 2:
            upstream.plan(program("Rome is hotter."))
        reply = client.messages.create(
            model="gpt-4o-mini", max_tokens=512, messages=messages, tools=[WEATHER_TOOL]
        )
    assert asked == ["Paris", "Rome"]
    assert reply.stop_reason == "end_turn"
    assert [b.type for b in reply.content] == ["text"] and reply.content[0].text == "Rome is hotter."  # type: ignore[union-attr]
    assert model_calls(upstream) - before == 2
    assert reply.usage.input_tokens > 0


def test_messages_stream_and_an_error_result(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    client = claude(proxy)
    upstream.plan(program("Checking.\n```python\nget_weather(city='Paris')\n```"))
    question = {"role": "user", "content": "Weather in Paris?"}
    with client.messages.stream(
        model="gpt-4o-mini", max_tokens=256, messages=[question], tools=[WEATHER_TOOL]
    ) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert kinds[0] == "message_start" and "content_block_delta" in kinds
    assert message.stop_reason == "tool_use"
    assert message.content[0].type == "text" and message.content[0].text == "Checking."
    use = message.content[1]
    assert use.type == "tool_use" and use.input == {"city": "Paris"}
    upstream.plan(program("The weather service failed."))
    reply = client.messages.create(
        model="gpt-4o-mini",
        max_tokens=256,
        tools=[WEATHER_TOOL],
        messages=[
            question,
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "timeout", "is_error": True}
                ],
            },
        ],
    )
    assert reply.content[0].text == "The weather service failed."  # type: ignore[union-attr]
    seen = json.dumps(upstream.received[-1].json["messages"])
    assert "Error: timeout" in seen


def test_messages_without_tools_and_count_tokens(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    client = claude(proxy)
    reply = client.messages.create(
        model="gpt-4o-mini", max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "Hi"}]
    )
    assert reply.content[0].text == "Hello from upstream." and reply.stop_reason == "end_turn"  # type: ignore[union-attr]
    upstream.plan(Stream(text_stream("gpt-4o-mini", ["Hel", "lo"])))
    with client.messages.stream(
        model="gpt-4o-mini", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
    ) as s:
        assert "".join(s.text_stream) == "Hello"
    plain = client.messages.count_tokens(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    with_tools = client.messages.count_tokens(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER_TOOL]
    )
    assert 0 < plain.input_tokens < with_tools.input_tokens  # the stubs cost tokens


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
            400,
            "invalid_request_error",
        ),
        ({"model": "gpt-4o-mini", "max_tokens": 5, "messages": []}, 400, "invalid_request_error"),
        (
            {
                "model": "gpt-4o-mini",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "bash_20250124", "name": "bash"}],
            },
            400,
            "invalid_request_error",
        ),
        (
            {"model": "no-such", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
            404,
            "not_found_error",
        ),
    ],
)
def test_bad_messages_requests_are_anthropic_errors(
    proxy: UvicornThread, body: dict[str, Any], status: int, kind: str
) -> None:
    reply = httpx.post(proxy.url + "/v1/messages", json=body, headers={"x-api-key": ALICE})
    assert reply.status_code == status, reply.text
    assert reply.json()["type"] == "error" and reply.json()["error"]["type"] == kind
    assert reply.json()["error"]["message"]


def test_messages_errors_through_the_sdk(proxy: UvicornThread) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        claude(proxy, "sk-wrong-key-000").messages.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    for method in ("GET", "POST"):
        reply = httpx.request(method, proxy.url + "/v1/messages/nope", headers={"x-api-key": ALICE})
        assert reply.status_code == 404 and reply.json()["type"] == "error", reply.text
    reply = httpx.get(proxy.url + "/v1/messages", headers={"x-api-key": ALICE})
    assert reply.status_code == 405 and reply.json()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------ forwarded responses

NATIVE_RESPONSE = {
    "id": "resp_upstream_1",
    "object": "response",
    "created_at": 1,
    "status": "completed",
    "model": "upstream-name",
    "output": [
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "From the upstream's own API.", "annotations": []}],
        }
    ],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
}


def test_a_route_can_forward_responses_to_its_upstream(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    """responses_api: upstream: without code actions the request goes to the upstream's own
    /responses untouched (model mapped), JSON or stream; with tools, code actions as usual."""
    from tests.upstream import Reply

    native = {
        "model_name": "native",
        "litellm_params": {"model": "openai/upstream-name", "api_base": upstream_url},
        "responses_api": "upstream",
    }
    server = make_proxy(config(upstream_url) | {"model_list": [*upstream_models(upstream_url), native]})
    client = oai(server)
    upstream.plan(Reply(json=NATIVE_RESPONSE))
    response = client.responses.create(model="native", input="Hi", previous_response_id="resp_upstream_0")
    assert response.output_text == "From the upstream's own API."
    sent = upstream.received[-1]
    assert sent.path.endswith("/responses")
    assert sent.json == {"model": "upstream-name", "input": "Hi", "previous_response_id": "resp_upstream_0"}

    created = {
        "type": "response.created",
        "sequence_number": 0,
        "response": {**NATIVE_RESPONSE, "output": []},
    }
    done = {"type": "response.completed", "sequence_number": 1, "response": NATIVE_RESPONSE}
    frames = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in (created, done)]
    upstream.plan(Stream(frames))
    with client.responses.stream(model="native", input="Hi") as stream:
        assert [e.type for e in stream] == ["response.created", "response.completed"]
        assert stream.get_final_response().output_text == "From the upstream's own API."

    upstream.plan(Reply(status=429, json={"error": {"message": "slow down", "type": "rate_limit_error"}}))
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="native", input="Hi")

    upstream.plan(program("```python\nget_weather(city='Paris')\n```"))
    response = client.responses.create(model="native", input="Weather?", tools=[WEATHER_FN])
    assert upstream.received[-1].path.endswith("/chat/completions")  # code actions: the loop
    assert [json.loads(c.arguments) for c in calls_of(response)] == [{"city": "Paris"}]


def test_forwarding_responses_needs_a_direct_route(tmp_path: Any, upstream_url: str) -> None:
    from proxy.errors import ConfigError

    entry = {
        "model_name": "x",
        "litellm_params": {"model": "anthropic/claude", "api_key": "k"},
        "responses_api": "upstream",
    }
    with pytest.raises(ConfigError, match="responses_api: bridge"):
        load_settings(write_config(tmp_path, {"model_list": [entry]}), env={})


# ---------------------------------------------------------------------------------------- faults


def test_an_upstream_breaking_off_mid_stream_ends_each_surface_in_its_own_way(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    """After the status line went out, a failure is the surface's last event: response.failed
    on the Responses API, Anthropic's error event on the Messages API."""
    words = ["Let ", "me ", "think ", "about ", "it ", "a ", "bit ", "more."]
    upstream.plan(Stream(text_stream("gpt-4o-mini", words), truncate=True))
    with oai(proxy).responses.stream(model="gpt-4o-mini", input="x", tools=[WEATHER_FN]) as stream:
        kinds = [e.type for e in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.failed"
    assert "response.output_text.delta" in kinds

    upstream.plan(Stream(text_stream("gpt-4o-mini", words), truncate=True))
    body = {"model": "gpt-4o-mini", "max_tokens": 64, "stream": True, "tools": [WEATHER_TOOL]}
    body["messages"] = [{"role": "user", "content": "x"}]
    with httpx.stream("POST", proxy.url + "/v1/messages", json=body, headers={"x-api-key": ALICE}) as r:
        assert r.status_code == 200
        frames = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert frames[0] == "event: message_start" and frames[-1] == "event: error"
    upstream.plan(Stream(text_stream("gpt-4o-mini", words), truncate=True))
    stream = claude(proxy).messages.stream(
        model="gpt-4o-mini", max_tokens=64, messages=body["messages"], tools=[WEATHER_TOOL]
    )
    with pytest.raises(anthropic.APIStatusError), stream as events:  # the SDK raises on that event
        list(events)


def test_messages_resume_after_a_proxy_restart(
    tmp_path: Any, redis_url: str, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    """A tool_result sent to a new proxy (the one that issued the tool_use is gone) resumes the
    program from Redis: Rome is asked next, Paris never twice."""
    path = write_config(tmp_path, config(upstream_url, sessions={"redis_url": redis_url}))
    messages: list[Any] = [{"role": "user", "content": "Which is hotter, Paris or Rome? (messages restart)"}]
    asked = []
    upstream.plan(program(LOOP_PROGRAM))
    for round_ in range(3):
        server = UvicornThread(create_app(load_settings(path, env={}))).start()
        try:
            if round_ == 2:
                upstream.plan(program("Rome."))
            reply = claude(server).messages.create(
                model="gpt-4o-mini", max_tokens=256, messages=messages, tools=[WEATHER_TOOL]
            )
        finally:
            server.stop()
        if reply.stop_reason != "tool_use":
            break
        [use] = [b for b in reply.content if b.type == "tool_use"]
        asked.append(use.input["city"])  # type: ignore[index]
        messages += answer_tool_use(reply, use.id, json.dumps({"t": TEMPS[asked[-1]]}))
    assert asked == ["Paris", "Rome"]
    assert reply.content[0].text == "Rome."  # type: ignore[union-attr]
