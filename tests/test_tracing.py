"""Langfuse tracing end to end: the real SDK exports OTLP to a receiver this test starts,
and the span tree it received is checked, request by request."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from proxy.app import create_app
from proxy.config import load_settings
from proxy.tracing import TRACE_HEADER
from tests.conftest import settings_from, upstream_models, write_config
from tests.otlp import OTLPReceiver, ReceivedSpan
from tests.servers import UvicornThread
from tests.test_actions import LOOP_PROGRAM, WEATHER, answer_call, program
from tests.upstream import ScriptedUpstream


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as started:
        yield started


def traced_config(upstream_url: str, host: str) -> dict[str, Any]:
    return {
        "model_list": upstream_models(upstream_url),
        "kernels": {"min_idle": 1, "max_total": 2},
        # a fresh public key per proxy: the SDK keeps one client per key in the process
        "tracing": {
            "langfuse": {
                "public_key": f"pk-lf-{uuid.uuid4().hex}",
                "secret_key": "sk-lf-test",
                "host": host,
                "flush_interval": 0.2,
            }
        },
    }


def create(client: openai.OpenAI, messages: list[Any], **kwargs: Any) -> tuple[Any, str | None]:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, **kwargs)
    return raw.parse(), raw.headers.get(TRACE_HEADER)


def wait_for(receiver: OTLPReceiver, count: int, timeout: float = 15.0) -> list[ReceivedSpan]:
    deadline = time.monotonic() + timeout
    while len(receiver.spans) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return receiver.roots()


def test_a_session_is_one_trace_with_generations_actions_and_tool_calls(
    tmp_path: Any, upstream: ScriptedUpstream, upstream_url: str, receiver: OTLPReceiver
) -> None:
    settings = settings_from(tmp_path, traced_config(upstream_url, receiver.url))
    headers: list[str | None] = []
    with (
        UvicornThread(create_app(settings)) as proxy,
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        # 1: a reply that needs a repair, then a loop program calling the client's tool
        upstream.plan(program('```python\nget_weather(town="Paris")\n```'), program(LOOP_PROGRAM))
        messages: list[Any] = [{"role": "user", "content": "Which is hotter, Paris or Rome?"}]
        response, trace = create(client, messages, tools=WEATHER)
        headers.append(trace)
        for temp in (18, 24):  # 2 and 3: each result resumes the program
            call = (response.choices[0].message.tool_calls or [])[0]
            answer_call(messages, response, {"t": temp})
            if temp == 24:
                upstream.plan(program("Rome is hotter."))
            response, trace = create(client, messages, tools=WEATHER)
            headers.append(trace)
        assert response.choices[0].message.content == "Rome is hotter."
    # stopping the proxy flushed the exporter
    roots = wait_for(receiver, 16)
    assert [r.shape() for r in roots] == [
        (
            "chat.completions",
            [
                ("generation", []),
                ("repair", [("generation", [])]),
                ("action", [("tool", [])]),
            ],
        ),
        ("chat.completions", [("tool", []), ("action", [("tool", [])])]),
        ("chat.completions", [("tool", []), ("action", []), ("generation", [])]),
    ]
    # one trace for the session, named in every response's header
    assert len({r.trace_id for r in roots}) == 1 and headers == [roots[0].trace_id] * 3
    session = call.id.split("_")[1]
    assert all(r.attributes["session.id"] == session for r in roots)

    first, second, third = roots
    generation, repair, action = sorted(first.children, key=lambda s: s.start_ns)
    assert generation.kind == "generation"
    assert generation.attributes["langfuse.observation.model.name"] == "gpt-4o-mini"
    prompt = generation.json_attr("input")
    assert "def get_weather(city: str" in prompt[0]["content"]  # the prompt in code form
    assert generation.json_attr("output") == '```python\nget_weather(town="Paris")\n```'
    assert generation.json_attr("usage_details") == {"input": 9, "output": 4}  # canned_completion usage
    assert generation.json_attr("metadata.grammar") == "none"
    assert "unexpected keyword argument 'town'" in repair.json_attr("input")
    assert "for c in ['Paris', 'Rome']" in action.json_attr("input")
    assert action.json_attr("metadata.kernel_id")
    [tool] = action.children
    assert tool.kind == "tool" and tool.json_attr("input") == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert tool.json_attr("metadata.kind") == "client"

    answered = next(c for c in second.children if c.name == "tool")
    assert answered.json_attr("input")["result"] == '{"t": 18}'
    finished = next(c for c in third.children if c.name == "action")
    assert finished.json_attr("output") == "hottest: Rome {'Paris': 18, 'Rome': 24}"
    path, sent = receiver.requests[0]
    auth = {k.lower(): v for k, v in sent.items()}["authorization"]
    assert path.endswith("/otel/v1/traces") and auth.startswith("Basic ")  # the SDK's own exporter


def test_pass_through_requests_get_a_trace_of_their_own(
    tmp_path: Any, upstream: ScriptedUpstream, upstream_url: str, receiver: OTLPReceiver
) -> None:
    settings = settings_from(tmp_path, traced_config(upstream_url, receiver.url))
    with (
        UvicornThread(create_app(settings)) as proxy,
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        upstream.plan(program("hello"))
        response, trace = create(client, [{"role": "user", "content": "hi"}])
        assert response.choices[0].message.content == "hello"
    [root] = wait_for(receiver, 2)
    assert root.shape() == ("chat.completions", [("generation", [])]) and root.trace_id == trace
    assert root.children[0].json_attr("output")["content"] == "hello"


def test_no_tracing_config_means_no_header_and_nothing_sent(
    tmp_path: Any, upstream: ScriptedUpstream, upstream_url: str
) -> None:
    settings = settings_from(tmp_path, {"model_list": upstream_models(upstream_url)})
    assert settings.tracing.langfuse is None
    with (
        UvicornThread(create_app(settings)) as proxy,
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        upstream.plan(program('```python\nget_weather(city="Paris")\n```'))
        response, trace = create(client, [{"role": "user", "content": "Paris?"}], tools=WEATHER)
    assert response.choices[0].finish_reason == "tool_calls" and trace is None


def test_langfuse_env_vars_turn_tracing_on(tmp_path: Any) -> None:
    path = write_config(tmp_path, {"tracing": {"langfuse": {"host": "http://127.0.0.1:9"}}})
    env = {"LANGFUSE_PUBLIC_KEY": "pk", "LANGFUSE_SECRET_KEY": "sk", "LANGFUSE_HOST": "http://other"}
    langfuse = load_settings(path, env=env).tracing.langfuse
    assert langfuse is not None and (langfuse.public_key, langfuse.host) == ("pk", "http://127.0.0.1:9")
    assert load_settings(None, env={"LANGFUSE_PUBLIC_KEY": "pk"}).tracing.langfuse is None  # no secret


def test_a_broken_tracer_never_fails_a_request(
    tmp_path: Any, upstream: ScriptedUpstream, upstream_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an unreachable Langfuse, and an SDK that raises whenever a span is opened
    config = traced_config(upstream_url, "http://127.0.0.1:9")
    app = create_app(settings_from(tmp_path, config))
    client_of_tracer = app.state.tracer._client

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracing backend exploded")

    monkeypatch.setattr(client_of_tracer, "start_observation", broken)
    with (
        UvicornThread(app) as proxy,
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        upstream.plan(program('```python\nget_weather(city="Paris")\n```'), program("plain"))
        response, trace = create(client, [{"role": "user", "content": "Paris?"}], tools=WEATHER)
        assert response.choices[0].finish_reason == "tool_calls" and trace is None
        response, _ = create(client, [{"role": "user", "content": "hi"}])
        assert response.choices[0].message.content == "plain"


def test_server_side_tool_calls_are_spans_with_their_results(
    tmp_path: Any, upstream: ScriptedUpstream, upstream_url: str, receiver: OTLPReceiver
) -> None:
    from tests.test_toolsets import PETSTORE, PetApp

    pets = PetApp()
    with UvicornThread(pets, lifespan="off") as pet_server:
        config = traced_config(upstream_url, receiver.url)
        for model in config["model_list"]:
            model["toolsets"] = ["petstore"]
        config["toolsets"] = {
            "petstore": {
                "openapi": str(PETSTORE),
                "base_url": pet_server.url + "/api/v3",
                "headers": {"api_key": "s3cret"},
            }
        }
        with (
            UvicornThread(create_app(settings_from(tmp_path, config))) as proxy,
            openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client,
        ):
            upstream.plan(
                program("```python\nfor i in (7, 8):\n    print(getPetById(petId=i)['id'])\n```"),
                program("Pets 7 and 8."),
            )
            response, _ = create(client, [{"role": "user", "content": "pets 7 and 8?"}])
            assert response.choices[0].message.content == "Pets 7 and 8."
    [root] = wait_for(receiver, 6)
    assert root.shape() == (
        "chat.completions",
        [("generation", []), ("action", [("tool", []), ("tool", [])]), ("generation", [])],
    )
    action = next(c for c in root.children if c.name == "action")
    assert action.json_attr("output") == "7\n8"
    first = sorted(action.children, key=lambda s: s.start_ns)[0]
    assert first.json_attr("input") == {"name": "getPetById", "arguments": {"petId": 7}}
    assert first.json_attr("output") == {"id": 7, "name": "rex", "status": "available"}
    assert first.json_attr("metadata.kind") == "server" and first.json_attr("metadata.toolset") == "petstore"
    assert "s3cret" not in json.dumps([s.attributes for s in receiver.spans])  # credentials stay in the proxy
