"""The bad-input matrix: each input gets the right OpenAI error (never a 5xx), reaches no
upstream, and leaves the proxy healthy."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import ProxyFactory, upstream_models
from tests.servers import UvicornThread
from tests.test_actions import WEATHER
from tests.upstream import ScriptedUpstream

USER = [{"role": "user", "content": "hi"}]


def tool(name: str, parameters: Any = None) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "parameters": parameters or {"type": "object", "properties": {}}},
    }


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "gpt-4o-mini", "messages": USER, **fields}).encode()  # any depth


CASES = [
    pytest.param(b'{"model": "gpt-4o-mini", "messages": [', 400, None, id="malformed-json"),
    pytest.param(json.dumps({"model": 5, "messages": "hi"}).encode(), 400, "model", id="wrong-types"),
    pytest.param(body(messages=[]), 400, "messages", id="empty-messages"),
    pytest.param(body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0]", id="unknown-role"),
    pytest.param(body(tools=[tool("f", {"type": "array"})]), 400, "tools[0]", id="tool-schema-not-object"),
    pytest.param(
        body(tools=[tool("f", {"type": "object", "properties": {"a": {"type": "strin"}}})]),
        400,
        "tools[0]",
        id="tool-schema-unknown-type",
    ),
    pytest.param(body(tools=[tool("f"), tool("f")]), 400, "tools", id="duplicate-tool-names"),
    pytest.param(body(tools=[tool(f"f{i}") for i in range(10_000)]), 400, "tools", id="10000-tools"),
    pytest.param(
        body(messages=[{"role": "user", "content": "x" * (10 * 1024 * 1024)}]), 413, None, id="10MB-message"
    ),
    pytest.param(body(tools=[tool("f", nested(300))]), 400, "tools", id="deeply-nested-schema"),
    pytest.param(
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
        b'"function": {"name": "f", "parameters": '
        + b'{"type": "object", "properties": {"x": ' * 5000
        + b'{"type": "string"}'
        + b"}}" * 5000
        + b"}}]}",
        400,
        None,
        id="nested-past-json-parsers",
    ),
    pytest.param(
        body(
            messages=[*USER, {"role": "tool", "tool_call_id": "call_nobody", "content": "1"}], tools=WEATHER
        ),
        400,
        "messages[1].tool_call_id",
        id="tool-message-for-unknown-id",
    ),
    pytest.param(
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        None,
        id="non-utf8",
    ),
    pytest.param(body(n=10**9), 400, "n", id="huge-n"),
    pytest.param(body(max_tokens=-1), 400, "max_tokens", id="negative-max-tokens"),
    pytest.param(b"", 400, None, id="empty-body"),
    pytest.param(b"[1, 2]", 400, None, id="not-an-object"),
    pytest.param(
        body(messages=[{"role": "user", "content": "\x00" * 1000}], temperature="hot"),
        400,
        "temperature",
        id="bad-temperature",
    ),
    pytest.param(body(tools="all"), 400, "tools", id="tools-not-a-list"),
    pytest.param(
        body(tool_choice={"type": "function", "function": {"name": "nope"}}, tools=WEATHER),
        400,
        "tool_choice",
        id="tool-choice-unknown",
    ),
]


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy(
        {"model_list": upstream_models(upstream_url), "kernels": {"min_idle": 0, "max_total": 1}}
    )


@pytest.mark.parametrize(("raw", "status", "param"), CASES)
def test_bad_input_gets_an_openai_error(
    proxy: UvicornThread, upstream: ScriptedUpstream, raw: bytes, status: int, param: str | None
) -> None:
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"] and len(error["message"]) < 2000
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    assert upstream.received == []  # refused before any model call
    assert httpx.get(proxy.url + "/health").status_code == 200
