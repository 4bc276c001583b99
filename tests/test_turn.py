"""One model turn (proxy.actions.turn): calls sent while the program is written, what happens when
the rest of the program turns out to need a kernel or fails, and repairs that run out.

Real uvicorn, the openai SDK, real kernels; the scripted upstream plays the model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import ProxyFactory
from tests.servers import UvicornThread
from tests.test_actions import WEATHER, config, program
from tests.upstream import ScriptedUpstream


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy(config(upstream_url))


@pytest.fixture
def client(proxy: UvicornThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


def ask(client: openai.OpenAI, messages: list[Any], **kwargs: Any) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER, **kwargs)


def answer_all(messages: list[Any], result: Any, temps: dict[str, int]) -> list[str]:
    """Append the assistant turn and one tool message per call; the cities asked for."""
    message = result.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    cities = []
    for call in message.tool_calls or []:
        city = json.loads(call.function.arguments)["city"]
        cities.append(city)
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"t": temps[city]})})
    return cities


def test_calls_sent_early_become_the_first_calls_of_a_kernel_program(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    """Two literal calls go out while written; the third line needs a kernel. The program runs
    with the client's results for those two calls: nothing is asked twice."""
    upstream.plan(
        program(
            "Adding them up.\n```python\n"
            'a = get_weather(city="Paris")\n'
            'b = get_weather(city="Rome")\n'
            "print('sum', a['t'] + b['t'])\n```"
        )
    )
    messages: list[Any] = [{"role": "user", "content": "Sum of the temperatures?"}]
    first = ask(client, messages)
    assert first.choices[0].finish_reason == "tool_calls"
    assert answer_all(messages, first, {"Paris": 18, "Rome": 24}) == ["Paris", "Rome"]
    assert first.choices[0].message.content == "Adding them up."
    upstream.plan(program("The sum is 42."))
    final = ask(client, messages)
    assert final.choices[0].message.content == "The sum is 42."
    assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\nsum 42"
    assert len(upstream.received) == 2


def test_a_statement_that_fails_after_calls_went_out_is_dropped(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    """The Paris call is out before the bad Rome line is written: it stays the action."""
    upstream.plan(program('```python\nget_weather(city="Paris")\nget_weather(town="Rome")\n```'))
    result = ask(client, [{"role": "user", "content": "Paris and Rome?"}])
    calls = result.choices[0].message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}]
    assert len(upstream.received) == 1  # no repair: the call was already the client's


def test_exhausted_repairs_send_the_calls_anyway(client: openai.OpenAI, upstream: ScriptedUpstream) -> None:
    bad = program('```python\nget_weather(town="Paris")\n```')
    upstream.plan(bad, bad, bad)
    result = ask(client, [{"role": "user", "content": "Paris?"}])
    calls = result.choices[0].message.tool_calls or []
    assert result.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"town": "Paris"})
    ]
    assert len(upstream.received) == 3  # the first reply and two repairs
    assert "```" not in (result.choices[0].message.content or "")


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_unparseable_replies_when_a_call_is_required_are_an_error(
    client: openai.OpenAI, upstream: ScriptedUpstream, tool_choice: Any
) -> None:
    upstream.plan(*(program("I would rather not.") for _ in range(3)))
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, [{"role": "user", "content": "Paris?"}], tool_choice=tool_choice)
    assert info.value.status_code == 502
    body = info.value.response.json()["error"]
    assert body["code"] == "invalid_model_output" and "must call" in body["message"]


def test_unparseable_code_with_tool_choice_auto_comes_back_as_text(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    broken = program("Trying.\n```python\nget_weather(city=\n```")
    upstream.plan(broken, broken, broken)
    result = ask(client, [{"role": "user", "content": "Paris?"}])
    assert result.choices[0].finish_reason == "stop" and not result.choices[0].message.tool_calls
    assert result.choices[0].message.content == "Trying.\n```python\nget_weather(city=\n```"  # as written


def test_streamed_and_plain_answers_of_a_repaired_reply_agree(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    """The thought of the first (bad) reply is shown once; the repaired reply's calls follow."""
    replies = [
        'Checking.\n```python\nget_weather(town="Paris")\n```',
        'Again.\n```python\nget_weather(city="Paris")\n```',
    ]
    upstream.plan(*(program(r) for r in replies))
    plain = ask(client, [{"role": "user", "content": "Paris?"}])
    upstream.plan(*(program(r) for r in replies))
    chunks = list(ask(client, [{"role": "user", "content": "Paris?"}], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content == "Checking."
    assert [c.function.name for c in plain.choices[0].message.tool_calls or []] == ["get_weather"]


def test_required_repairs_a_program_that_calls_no_function(
    client: openai.OpenAI, upstream: ScriptedUpstream
) -> None:
    """A program that only prints does not call a tool: under ``required`` it is sent back,
    not run (which would carry the loop on without the call the client asked for)."""
    upstream.plan(
        program("```python\nprint('Paris is lovely')\n```"),
        program('```python\nget_weather(city="Paris")\n```'),
    )
    result = ask(client, [{"role": "user", "content": "Paris?"}], tool_choice="required")
    assert result.choices[0].finish_reason == "tool_calls"
    calls = result.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert len(upstream.received) == 2
    repair = upstream.received[-1].json["messages"][-1]["content"]
    assert "must call at least one of the functions (get_weather); this program calls none" in repair


@pytest.mark.parametrize(
    ("tool_choice", "message"),
    [
        pytest.param("required", "must call at least one of the functions", id="required"),
        pytest.param(
            {"type": "function", "function": {"name": "get_weather"}}, "must call get_weather", id="named"
        ),
    ],
)
def test_exhausted_repairs_of_a_program_that_calls_no_function_are_an_error(
    client: openai.OpenAI, upstream: ScriptedUpstream, tool_choice: Any, message: str
) -> None:
    """The program parses, but it is not sent as if it were the call tool_choice asks for."""
    upstream.plan(*(program("```python\nprint('Paris is lovely')\n```") for _ in range(3)))
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, [{"role": "user", "content": "Paris?"}], tool_choice=tool_choice)
    assert info.value.status_code == 502
    body = info.value.response.json()["error"]
    assert body["code"] == "invalid_model_output" and message in body["message"]
    assert len(upstream.received) == 3  # the first reply and two repairs; no program ran
