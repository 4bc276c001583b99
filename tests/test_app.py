"""The proxy end to end: real uvicorn, the official openai SDK, a scripted upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import ProxyFactory, upstream_models
from tests.servers import UvicornThread, free_port
from tests.upstream import (
    Hang,
    Reply,
    ScriptedUpstream,
    Stream,
    canned_completion,
    load_recording,
    text_stream,
)

RECORDINGS = [
    "single_tool.c6aa7e397b71.sse",
    "parallel_two_tools.f82268f2fefd.sse",
    "strict_tool.a247c49c5fcd.sse",
    "nonstrict_tool.2018feb66ae1.sse",
    "no_tool_calls/e2aad469b71d1d4894ff833ea147020a9d875eb7ce644a0ff355581690a4cbfd.bin",
    "no_tool_calls/a491adda08c3d4fde95f5b2ee3f60f7f745f1a56d82e62f58031cc2add502380.bin",
]


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy({"model_list": upstream_models(upstream_url)})


@pytest.fixture
def client(proxy: UvicornThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="anything", max_retries=0) as client:
        yield client


def async_client(proxy: UvicornThread) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="anything", max_retries=0)


def post(proxy: UvicornThread, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(
        proxy.url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **kwargs.pop("headers", {})},
        timeout=30,
        **kwargs,
    )


def assert_openai_error(
    response: httpx.Response, status: int, type_: str, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param
    return dict(body["error"])


# --- passthrough -----------------------------------------------------------------------


def test_sync_completion_passes_through(client: openai.OpenAI, upstream: ScriptedUpstream) -> None:
    planned = canned_completion("gpt-4o-mini", "Paris is the capital of France.")
    planned["usage"] = {"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28}
    planned["choices"][0]["finish_reason"] = "length"
    upstream.plan(Reply(json=planned))
    result = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
        ],
        temperature=0.2,
        top_p=0.9,
        max_tokens=50,
        stop=["\n\n"],
        seed=7,
        user="u-1",
    )
    assert result.choices[0].message.content == "Paris is the capital of France."
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.total_tokens == 28
    sent = upstream.received[-1].json
    assert sent == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
        ],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 50,
        "stop": ["\n\n"],
        "seed": 7,
        "user": "u-1",
    }


def test_body_reaches_upstream_untouched_but_model(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    body = {
        "model": "renamed",
        "messages": [{"role": "user", "content": "hi", "name": "ann"}],
        "n": 2,
        "response_format": {"type": "json_object"},
        "max_completion_tokens": 9,
        "logit_bias": {"50256": -100},
        "vendor_extension": {"nested": [1, 2.5, None, "x"]},
        "parallel_tool_calls": False,
    }
    response = post(proxy, body)
    assert response.status_code == 200
    received = upstream.received[-1]
    assert received.json == {**body, "model": "upstream-name"}
    assert received.headers["authorization"] == "Bearer sk-up"
    assert received.path == "/v1/chat/completions"
    # the upstream's bytes come back as they were
    assert response.content == orjson.dumps(canned_completion("upstream-name"))


def test_client_authorization_is_not_forwarded(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    post(
        proxy,
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": "Bearer client-secret"},
    )
    assert "authorization" not in upstream.received[-1].headers


def test_tools_request_passes_through(client: openai.OpenAI, upstream: ScriptedUpstream) -> None:
    upstream.plan(Stream(load_recording("parallel_two_tools.f82268f2fefd.sse")))
    tools: list[Any] = [
        {
            "type": "function",
            "function": {
                "name": "GetWeatherArgs",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    stream = client.chat.completions.create(
        model="plain-tools",
        messages=[{"role": "user", "content": "weather in Edinburgh and NYC?"}],
        tools=tools,
        tool_choice="auto",
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, str]] = {}
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                if call.function and call.function.name:
                    entry["name"] = call.function.name
                if call.function and call.function.arguments:
                    entry["arguments"] += call.function.arguments
    assert sorted(calls) == [0, 1]
    assert [calls[0]["name"], calls[1]["name"]] == ["GetWeatherArgs", "get_stock_price"]
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in calls.values())
    assert usage is not None and usage.total_tokens > 0
    assert upstream.received[-1].json["tools"] == tools


@pytest.mark.parametrize("recording", [pytest.param(r, id=r.split("/")[-1][:20]) for r in RECORDINGS])
def test_stream_bytes_match_recordings(
    proxy: UvicornThread, upstream: ScriptedUpstream, recording: str
) -> None:
    chunks = load_recording(recording)
    upstream.plan(Stream(chunks))
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = b"".join(response.iter_raw())
    assert received == b"".join(chunks)


def test_stream_is_not_buffered(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    gate = threading.Event()
    upstream.plan(Stream(text_stream("gpt-4o-mini", ["one", "two"]), gate=gate))
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": True},
        timeout=30,
    ) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        # the upstream is still holding the rest back: this chunk was forwarded on its own
        assert not gate.is_set()
        assert json.loads(first[len("data: ") :])["choices"][0]["delta"]["role"] == "assistant"
        gate.set()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"


@pytest.mark.anyio
async def test_async_client_stream_and_usage(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    text = ""
    usage = None
    finish = None
    async with async_client(proxy) as aclient:
        stream = await aclient.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    assert text == "Hello from upstream."
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 3
    assert upstream.received[-1].json["stream_options"] == {"include_usage": True}


@pytest.mark.anyio
async def test_async_concurrent_requests(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    async with async_client(proxy) as aclient:

        async def one(i: int) -> str:
            result = await aclient.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}]
            )
            return result.choices[0].message.content or ""

        results = await asyncio.gather(*(one(i) for i in range(32)))
    assert results == ["Hello from upstream."] * 32
    assert sorted(r.json["messages"][0]["content"] for r in upstream.received) == sorted(
        f"q{i}" for i in range(32)
    )


def test_litellm_transport(client: openai.OpenAI, upstream: ScriptedUpstream) -> None:
    upstream.plan(Reply(json=canned_completion("gpt-4o-mini", "via litellm")))
    result = client.chat.completions.create(model="via-litellm", messages=[{"role": "user", "content": "x"}])
    assert result.choices[0].message.content == "via litellm"
    assert upstream.received[-1].json["messages"] == [{"role": "user", "content": "x"}]
    stream = client.chat.completions.create(
        model="via-litellm", messages=[{"role": "user", "content": "x"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Hello from upstream."


def test_litellm_transport_rate_limit(client: openai.OpenAI, upstream: ScriptedUpstream) -> None:
    upstream.plan(*[Reply(status=429, json={"error": {"message": "slow down", "type": "rate_limit"}})] * 5)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="via-litellm", messages=[{"role": "user", "content": "x"}])


# --- errors ----------------------------------------------------------------------------

BAD_BODIES = [
    pytest.param(b"{not json", None, id="malformed-json"),
    pytest.param(b"\xff\xfe\x00garbage", None, id="non-utf8"),
    pytest.param(b"", None, id="empty-body"),
    pytest.param(b"[1, 2]", None, id="not-an-object"),
    pytest.param({"model": "gpt-4o-mini"}, "messages", id="missing-messages"),
    pytest.param({"model": "gpt-4o-mini", "messages": []}, "messages", id="empty-messages"),
    pytest.param({"messages": [{"role": "user", "content": "x"}]}, "model", id="missing-model"),
    pytest.param(
        {"model": "gpt-4o-mini", "messages": [{"role": "wizard", "content": "x"}]},
        "messages[0].role",
        id="unknown-role",
    ),
    pytest.param(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        "temperature",
        id="wrong-type",
    ),
    pytest.param(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
        "max_tokens",
        id="negative-max-tokens",
    ),
    pytest.param(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "n": 100000},
        "n",
        id="huge-n",
    ),
    pytest.param(
        {"model": "gpt-4o-mini", "messages": [{"role": "tool", "content": "x"}]},
        "messages[0]",
        id="tool-without-id",
    ),
    pytest.param(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": True},
        },
        "stream_options",
        id="stream-options-without-stream",
    ),
    pytest.param(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function"}],
        },
        "tools[0].function",
        id="tool-without-function",
    ),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_requests_get_400(
    proxy: UvicornThread, upstream: ScriptedUpstream, body: Any, param: str | None
) -> None:
    response = post(proxy, body)
    error = assert_openai_error(response, 400, "invalid_request_error", param)
    assert error["param"] == param
    assert upstream.received == []


def test_unknown_model_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    assert "gpt-4o-mini" in info.value.message  # names what does exist


def test_unknown_url_and_method(proxy: UvicornThread) -> None:
    assert_openai_error(httpx.post(proxy.url + "/v1/nope", json={}), 404, "invalid_request_error")
    assert_openai_error(httpx.get(proxy.url + "/v1/chat/completions"), 405, "invalid_request_error")


UPSTREAM_FAILURES = [
    pytest.param(Reply(status=500, body=b"<html>boom</html>"), 502, "upstream_error", id="500-html"),
    pytest.param(
        Reply(status=503, json={"error": {"message": "overloaded"}}), 502, "upstream_error", id="503"
    ),
    pytest.param(
        Reply(status=429, json={"error": {"message": "slow down"}}), 429, "rate_limit_error", id="429"
    ),
    pytest.param(
        Reply(
            status=400,
            json={
                "error": {
                    "message": "context too long",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
        ),
        400,
        "invalid_request_error",
        id="400-passthrough",
    ),
    pytest.param(
        Reply(status=401, json={"error": {"message": "bad key"}}),
        502,
        "upstream_error",
        id="401-upstream-credentials",
    ),
]


@pytest.mark.parametrize(("reply", "status", "type_"), UPSTREAM_FAILURES)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_failures_map(
    proxy: UvicornThread,
    upstream: ScriptedUpstream,
    reply: Reply,
    status: int,
    type_: str | None,
    stream: bool,
) -> None:
    upstream.plan(reply)
    response = post(
        proxy, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    )
    error = assert_openai_error(response, status, type_)
    if reply.status == 400:
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"


def test_upstream_invalid_json_is_a_retryable_502(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    upstream.plan(Reply(status=200, body=b"not json at all"), Reply(status=200, body=b"[1]"))
    for _ in range(2):
        error = assert_openai_error(
            post(proxy, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}),
            502,
            "upstream_error",
        )
        assert "not a JSON object" in error["message"]


def test_upstream_timeout_504(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    upstream.plan(Hang(3))
    response = post(proxy, {"model": "slow", "messages": [{"role": "user", "content": "x"}]})
    error = assert_openai_error(response, 504, "upstream_error")
    assert error["code"] == "upstream_timeout"


def test_upstream_unreachable_502(make_proxy: ProxyFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    server = make_proxy(
        {"model_list": [{"model_name": "m", "litellm_params": {"model": "openai/m", "api_base": dead}}]}
    )
    response = post(server, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    error = assert_openai_error(response, 502, "upstream_error")
    assert dead in error["message"]


def test_stream_cut_mid_way_becomes_error_event(client: openai.OpenAI, upstream: ScriptedUpstream) -> None:
    upstream.plan(Stream(text_stream("gpt-4o-mini", ["a", "b", "c", "d"]), truncate=True))
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_request_too_large_413(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    server = make_proxy(
        {"model_list": upstream_models(upstream_url), "server": {"max_request_body_bytes": 2048}}
    )
    big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 4096}]}
    error = assert_openai_error(post(server, big), 413, "invalid_request_error")
    assert error["code"] == "request_too_large"

    def chunked() -> Any:
        data = orjson.dumps(big)
        for i in range(0, len(data), 512):
            yield data[i : i + 512]

    response = httpx.post(server.url + "/v1/chat/completions", content=chunked(), timeout=30)
    assert_openai_error(response, 413, "invalid_request_error")
    assert upstream.received == []


# --- retries and fallbacks ---------------------------------------------------------------


def test_retry_then_fallback(make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    server = make_proxy(
        {
            "model_list": [
                {
                    "model_name": "flaky",
                    "litellm_params": {"model": "openai/flaky", "api_base": upstream_url},
                },
                {"model_name": "down", "litellm_params": {"model": "openai/down", "api_base": dead}},
                {
                    "model_name": "backup",
                    "litellm_params": {"model": "openai/backup", "api_base": upstream_url},
                },
            ],
            "router_settings": {"num_retries": 1, "fallbacks": [{"down": ["backup"]}]},
        }
    )
    upstream.plan(Reply(status=500, json={"error": {"message": "blip"}}))
    ok = post(server, {"model": "flaky", "messages": [{"role": "user", "content": "x"}]})
    assert ok.status_code == 200
    assert [r.json["model"] for r in upstream.received] == ["flaky", "flaky"]

    upstream.reset()
    fell_back = post(
        server, {"model": "down", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    assert fell_back.status_code == 200
    assert [r.json["model"] for r in upstream.received] == ["backup"]

    upstream.reset()
    upstream.plan(Reply(status=400, json={"error": {"message": "no"}}))
    rejected = post(server, {"model": "flaky", "messages": [{"role": "user", "content": "x"}]})
    assert rejected.status_code == 400
    assert len(upstream.received) == 1  # a client error is not retried


# --- keys ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy(
        {
            "model_list": upstream_models(upstream_url),
            "keys": [
                {"id": "alice", "key": "os.environ/ALICE_KEY", "models": ["gpt-4o-mini"]},
                {"id": "bob", "key": "sk-bob-0123456789"},
            ],
        },
        env={"ALICE_KEY": "sk-alice-0123456789"},
    )


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="missing"),
        pytest.param({"authorization": "Bearer sk-wrong-0123456789"}, 401, id="wrong"),
        pytest.param({"authorization": "Basic c2stYWxpY2U="}, 401, id="wrong-scheme"),
        pytest.param({"authorization": "Bearer sk-alice-0123456789"}, 200, id="alice"),
        pytest.param({"x-api-key": "sk-bob-0123456789"}, 200, id="bob-x-api-key"),
    ],
)
def test_keys_authenticate(keyed_proxy: UvicornThread, headers: dict[str, str], status: int) -> None:
    response = post(
        keyed_proxy, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}, headers=headers
    )
    if status == 401:
        error = assert_openai_error(response, 401, "authentication_error")
        assert error["code"] == "invalid_api_key"
    else:
        assert response.status_code == 200


def test_keys_limit_models(keyed_proxy: UvicornThread) -> None:
    url = keyed_proxy.url + "/v1"
    with (
        openai.OpenAI(base_url=url, api_key="sk-alice-0123456789", max_retries=0) as alice,
        openai.OpenAI(base_url=url, api_key="sk-bob-0123456789", max_retries=0) as bob,
        openai.OpenAI(base_url=url, api_key="nope", max_retries=0) as stranger,
    ):
        with pytest.raises(openai.PermissionDeniedError):
            alice.chat.completions.create(model="renamed", messages=[{"role": "user", "content": "x"}])
        # a model that does not exist is 403 too for a restricted key: no enumeration
        with pytest.raises(openai.PermissionDeniedError):
            alice.chat.completions.create(model="secret-model", messages=[{"role": "user", "content": "x"}])
        assert [m.id for m in alice.models.list()] == ["gpt-4o-mini"]
        assert {m.id for m in bob.models.list()} == {
            "gpt-4o-mini",
            "renamed",
            "via-litellm",
            "slow",
            "plain-tools",
        }
        assert bob.chat.completions.create(
            model="renamed", messages=[{"role": "user", "content": "x"}]
        ).choices
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()


# --- operations --------------------------------------------------------------------------


def test_health_ready_models_docs(proxy: UvicornThread, client: openai.OpenAI) -> None:
    assert httpx.get(proxy.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(proxy.url + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert {m.id for m in client.models.list()} == {
        "gpt-4o-mini",
        "renamed",
        "via-litellm",
        "slow",
        "plain-tools",
    }
    assert client.models.retrieve("renamed").id == "renamed"
    schema = httpx.get(proxy.url + "/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert httpx.get(proxy.url + "/docs").status_code == 200


def test_overhead_header_and_access_log(
    proxy: UvicornThread, upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cablectl.access")
    upstream.plan(Reply(json=canned_completion("gpt-4o-mini"), delay=0.05))
    response = post(proxy, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    overhead = float(response.headers["x-cablectl-overhead-ms"])
    assert overhead >= 0
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "cablectl.access"]
    line = next(item for item in lines if item["model"] == "gpt-4o-mini")
    assert line["status"] == 200 and line["served_by"] == "gpt-4o-mini"
    assert line["upstream_ms"] >= 50  # the upstream's planned delay is counted as upstream time
    assert line["total_ms"] == pytest.approx(line["upstream_ms"] + line["overhead_ms"], abs=0.01)
    # errors carry the header too
    assert "x-cablectl-overhead-ms" in post(proxy, b"{").headers
