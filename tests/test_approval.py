"""Approval before actions run: kernel programs and server-side (MCP) calls wait for the
client's answer to an ``approve_action`` tool call; denied, nothing runs and the model is
told; approved, it runs once; across a proxy restart too; on the Messages API as on chat.

Real uvicorn, the openai and anthropic SDKs, real kernels, a real MCP server (streamable
HTTP, in-process) whose tool records what it was asked, a real redis-server for restarts; the
scripted upstream plays the model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from proxy.app import create_app
from proxy.config import load_settings
from tests.conftest import ProxyFactory, upstream_models, write_config
from tests.servers import UvicornThread
from tests.test_actions import WEATHER, program
from tests.upstream import ScriptedUpstream

APPROVE: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "approve_action",
        "description": "Ask the user.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": True},
    },
}
RUNS = "Let me note it.\n```python\nopen('ran.txt', 'a').write('x')\nprint('ran', len(open('ran.txt').read()))\n```"
MAILS: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def mail_server() -> Iterator[str]:
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("mail")

    @server.tool()
    def send_email(to: str, body: str) -> str:
        """Send an email."""
        MAILS.append({"to": to, "body": body})
        return f"sent to {to}"

    with UvicornThread(server.streamable_http_app()) as http:
        yield http.url + "/mcp"


def config(upstream_url: str, mail_url: str, **extra: Any) -> dict[str, Any]:
    models = upstream_models(upstream_url)
    base = {"model": "openai/gpt-4o-mini", "api_base": upstream_url}
    models += [
        {"model_name": "guarded", "litellm_params": base, "approval": "kernel"},
        {"model_name": "mailer", "litellm_params": base, "approval": "server", "toolsets": ["mail"]},
    ]
    return {
        "model_list": models,
        "toolsets": {"mail": {"mcp": {"url": mail_url}}},
        "kernels": {"min_idle": 1, "max_total": 4},
        "keys": [
            {"id": "alice", "key": "sk-alice-123456"},
            {"id": "careful", "key": "sk-careful-1234", "approval": "kernel"},
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def proxy(mail_server: str, make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    # mail_server first: it is stopped after the proxies (whose MCP sessions it would wait for)
    return make_proxy(config(upstream_url, mail_server))


_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def sdk(server: UvicornThread, key: str = "sk-alice-123456") -> openai.OpenAI:
    _OPEN.append(openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0))
    return _OPEN[-1]  # type: ignore[no-any-return]


def cell_ends(server: UvicornThread, session_id: str) -> list[dict[str, Any]]:
    store = server.server.config.app.state.store
    return [e for e in asyncio.run(store.events(session_id)) if e.get("kind") == "cell_end"]


def ask_and_answer(
    client: openai.OpenAI, upstream: ScriptedUpstream, model: str, first: str, answer: str, then: str
) -> tuple[Any, Any, list[Any]]:
    """The model writes ``first``; the response is the approval call; the client answers it."""
    messages: list[Any] = [{"role": "user", "content": f"Do it ({model}, {answer})."}]
    upstream.plan(program(first))
    asked = client.chat.completions.create(model=model, messages=messages, tools=[*WEATHER, APPROVE])
    [call] = asked.choices[0].message.tool_calls or []
    messages += [
        asked.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": answer},
    ]
    upstream.plan(program(then))
    final = client.chat.completions.create(model=model, messages=messages, tools=[*WEATHER, APPROVE])
    return asked, final, messages


def test_a_program_waits_for_approval_and_runs_once(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    client = sdk(proxy)
    asked, final, messages = ask_and_answer(client, upstream, "guarded", RUNS, "yes", "It ran.")
    [call] = asked.choices[0].message.tool_calls or []
    assert asked.choices[0].finish_reason == "tool_calls" and call.function.name == "approve_action"
    arguments = json.loads(call.function.arguments)
    assert arguments["kind"] == "program" and "open('ran.txt', 'a')" in arguments["source"]
    assert arguments["reason"] == "Let me note it." and arguments["calls"] == []
    system = upstream.received[-2].json["messages"][0]["content"]
    assert "approve_action" not in system  # the model never sees it
    assert final.choices[0].message.content == "It ran."
    assert (
        upstream.received[-1].json["messages"][-1]["content"]
        == "Observation:\nran 1\nFiles written: ran.txt (1 bytes)."
    )
    session = call.id.split("_")[1]
    assert [e["turn"] for e in cell_ends(proxy, session)] == [1]
    # the same answer sent again (a client retry): the program does not run a second time
    upstream.plan(program("Still ran once."))
    client.chat.completions.create(model="guarded", messages=messages, tools=[*WEATHER, APPROVE])
    assert [e["turn"] for e in cell_ends(proxy, session)] == [1]


@pytest.mark.parametrize(
    "answer", ["no, not on a Friday", '{"approved": false, "reason": "not on a Friday"}']
)
def test_a_denied_program_does_not_run_and_the_model_is_told(
    proxy: UvicornThread, upstream: ScriptedUpstream, answer: str
) -> None:
    asked, final, _ = ask_and_answer(sdk(proxy), upstream, "guarded", RUNS, answer, "Okay, I won't.")
    assert final.choices[0].message.content == "Okay, I won't."
    observation = upstream.received[-1].json["messages"][-1]["content"]
    assert (
        observation.startswith("Observation:\nNot run: the user denied this program (")
        and "Friday" in observation
    )
    session = (asked.choices[0].message.tool_calls or [])[0].id.split("_")[1]
    assert [e["error"] for e in cell_ends(proxy, session)] == ["Denied"]


def test_client_tools_alone_need_no_approval(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    upstream.plan(program("```python\nget_weather(city='Paris')\n```"))
    result = sdk(proxy).chat.completions.create(
        model="guarded", messages=[{"role": "user", "content": "Weather?"}], tools=[*WEATHER, APPROVE]
    )
    assert [c.function.name for c in result.choices[0].message.tool_calls or []] == ["get_weather"]


def test_without_the_approval_function_it_is_a_400(proxy: UvicornThread) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(proxy).chat.completions.create(
            model="guarded", messages=[{"role": "user", "content": "x"}], tools=WEATHER
        )
    error = caught.value.body
    assert error["code"] == "approval_function_missing" and error["param"] == "tools"  # type: ignore[index]
    assert "'approve_action'" in error["message"] and '"kind"' in error["message"]  # type: ignore[index]
    # a key that asks for approval makes any code-actions route ask
    with pytest.raises(openai.BadRequestError):
        sdk(proxy, "sk-careful-1234").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], tools=WEATHER
        )
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(proxy).chat.completions.create(
            model="guarded",
            messages=[{"role": "user", "content": "x"}],
            tools=[*WEATHER, APPROVE],
            tool_choice={"type": "function", "function": {"name": "approve_action"}},
        )
    assert caught.value.body["param"] == "tool_choice"  # type: ignore[index]


SEND = "```python\nprint(send_email(to='bob@example.com', body='hi'))\n```"


@pytest.mark.parametrize(("answer", "sent"), [('{"approved": true}', True), ("No.", False)])
def test_a_server_call_waits_for_approval(
    proxy: UvicornThread, upstream: ScriptedUpstream, answer: str, sent: bool
) -> None:
    before = len(MAILS)
    asked, _, _ = ask_and_answer(sdk(proxy), upstream, "mailer", SEND, answer, "Done.")
    [call] = asked.choices[0].message.tool_calls or []
    arguments = json.loads(call.function.arguments)
    assert arguments["kind"] == "call"
    assert arguments["calls"] == [
        {"name": "send_email", "arguments": {"to": "bob@example.com", "body": "hi"}}
    ]
    assert len(MAILS) == before + (1 if sent else 0)
    observation = upstream.received[-1].json["messages"][-1]["content"]
    if sent:
        assert observation == "Observation:\n{'result': 'sent to bob@example.com'}"
    else:
        assert "The user denied this call: No." in observation


def test_an_approval_survives_a_proxy_restart(
    mail_server: str, tmp_path: Path, redis_url: str, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    """Asked by one proxy, answered to the next: the program is replayed up to the call, the
    call is made once, the program finishes."""
    path = write_config(tmp_path, config(upstream_url, mail_server, sessions={"redis_url": redis_url}))
    before = len(MAILS)
    messages: list[Any] = [{"role": "user", "content": "Mail bob (restart)."}]
    first = UvicornThread(create_app(load_settings(path, env={}))).start()
    try:
        upstream.plan(program(SEND))
        with sdk(first) as client:
            asked = client.chat.completions.create(
                model="mailer", messages=messages, tools=[*WEATHER, APPROVE]
            )
    finally:
        first.stop()
    [call] = asked.choices[0].message.tool_calls or []
    messages += [
        asked.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "yes"},
    ]
    second = UvicornThread(create_app(load_settings(path, env={}))).start()
    try:
        upstream.plan(program("Mailed."))
        with sdk(second) as client:
            final = client.chat.completions.create(
                model="mailer", messages=messages, tools=[*WEATHER, APPROVE]
            )
        assert final.choices[0].message.content == "Mailed."
        assert len(MAILS) == before + 1
        upstream.plan(program("Mailed, once."))
        with sdk(second) as client:  # the same answer again: nothing is sent twice
            client.chat.completions.create(model="mailer", messages=messages, tools=[*WEATHER, APPROVE])
        assert len(MAILS) == before + 1
    finally:
        second.stop()


def test_approval_on_the_messages_api(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    with anthropic.Anthropic(base_url=proxy.url, api_key="sk-alice-123456", max_retries=0) as client:
        tools: list[Any] = [{"name": "approve_action", "input_schema": {"type": "object"}}]
        messages: list[Any] = [{"role": "user", "content": "Note it (messages)."}]
        upstream.plan(program(RUNS))
        asked = client.messages.create(model="guarded", max_tokens=256, messages=messages, tools=tools)
        [use] = [b for b in asked.content if b.type == "tool_use"]
        assert asked.stop_reason == "tool_use" and use.name == "approve_action"
        messages += [
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in asked.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "approved"}],
            },
        ]
        upstream.plan(program("Noted."))
        final = client.messages.create(model="guarded", max_tokens=256, messages=messages, tools=tools)
        assert final.content[0].text == "Noted."  # type: ignore[union-attr]
        assert upstream.received[-1].json["messages"][-1]["content"].startswith("Observation:\nran 1")


def test_approval_through_the_agents_sdk(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    """The Agents SDK's Runner answers approve_action like any function tool (here, a policy
    that approves programs that do not import os), on the Responses API."""
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    decisions: list[str] = []

    @function_tool
    def approve_action(kind: str, source: str, calls: list[str], reason: str) -> str:
        """Ask the user to approve an action."""
        decisions.append("yes" if "import os" not in source else "no: no os access")
        return decisions[-1]

    async def run(first: str) -> str:
        async with openai.AsyncOpenAI(
            base_url=proxy.url + "/v1", api_key="sk-alice-123456", max_retries=0
        ) as c:
            agent = Agent(
                name="careful",
                tools=[approve_action],
                model=OpenAIResponsesModel(model="guarded", openai_client=c),
            )
            upstream.plan(program(first), program("Finished."))
            return str((await Runner.run(agent, "Do it (agents).")).final_output)

    assert asyncio.run(run(RUNS)) == "Finished."
    assert upstream.received[-1].json["messages"][-1]["content"].startswith("Observation:\nran ")
    assert asyncio.run(run("```python\nimport os\nprint(os.getcwd())\n```")) == "Finished."
    assert (
        "Not run: the user denied this program (no: no os access)"
        in upstream.received[-1].json["messages"][-1]["content"]
    )
    assert decisions == ["yes", "no: no os access"]
