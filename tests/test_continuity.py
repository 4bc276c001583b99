"""Conversations that keep their kernel across user turns when the client names the session
(``x-cablectl-session`` or ``metadata.session_id``), within its API key.

Real uvicorn, the openai SDK, real kernels, a real redis-server; the scripted upstream plays
the model. The first program defines a helper; a later user turn's program uses it."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.actions.loop import SessionKey
from proxy.app import create_app
from proxy.config import load_settings
from tests.conftest import ProxyFactory, upstream_models, write_config
from tests.servers import UvicornThread
from tests.test_actions import WEATHER, program
from tests.test_kernels import gone_within
from tests.upstream import ScriptedUpstream, wait_for

DEFINE = "```python\nBASE = 10\ndef scale(x):\n    return x * BASE\nprint(scale(2))\n```"
USE = "```python\nprint(scale(3))\n```"
KEYS = [{"id": "alice", "key": "sk-alice-123456"}, {"id": "bob", "key": "sk-bob-12345678"}]


def dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {"model_list": upstream_models(upstream_url), "kernels": {"min_idle": 1, "max_total": 4}, **extra}


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy(config(upstream_url, keys=KEYS))


def sdk(server: UvicornThread, key: str = "sk-alice-123456", session: str | None = None) -> openai.OpenAI:
    headers = {"x-cablectl-session": session} if session else {}
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, default_headers=headers)


def two_turns(
    client: openai.OpenAI, upstream: ScriptedUpstream, first_question: str = "", **kwargs: Any
) -> tuple[str, list[Any]]:
    """Turn 1 defines scale() and answers; turn 2 (a new user question) calls scale(3).
    ``first_question`` tells conversations apart (identical ones share a history digest)."""
    messages: list[Any] = [{"role": "user", "content": f"Define a scaler and try it on 2. {first_question}"}]
    upstream.plan(program(DEFINE), program("scale(2) is 20."))
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER, **kwargs)
    assert first.choices[0].message.content == "scale(2) is 20."
    assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\n20"
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And 3?"},
    ]
    upstream.plan(program(USE), program("Done."))
    client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER, **kwargs)
    prompt = upstream.received[-1].json["messages"]
    return prompt[-1]["content"], upstream.received[-2].json["messages"]


def test_a_named_session_keeps_its_kernel_across_user_turns(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    with sdk(proxy, session="conv-1") as client:
        observation, prompt = two_turns(client, upstream, "(named)")
    assert observation == "Observation:\n30"
    # the model sees the program it ran in the earlier turn, and what it printed
    assert any("def scale(x):" in str(m["content"]) for m in prompt if m["role"] == "assistant")
    assert {"role": "user", "content": "Observation:\n20"} in prompt


def test_metadata_session_id_works_too_and_is_not_sent_upstream(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    with sdk(proxy) as client:
        observation, _ = two_turns(
            client, upstream, "(meta)", metadata={"session_id": "conv-meta", "team": "a"}
        )
    assert observation == "Observation:\n30"
    assert upstream.received[-1].json.get("metadata") == {"team": "a"}


def test_without_a_name_the_history_continues_the_session_that_answered_it(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    with sdk(proxy) as client:
        observation, prompt = two_turns(client, upstream, "(unnamed)")
    assert observation == "Observation:\n30"
    assert any("def scale(x):" in str(m["content"]) for m in prompt if m["role"] == "assistant")


def test_identical_conversations_never_share_a_kernel(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    """Two conversations with the same history under one key: neither continues implicitly."""
    messages: list[Any] = [{"role": "user", "content": "Define a scaler (twins)."}]
    for _ in range(2):
        upstream.plan(program(DEFINE), program("Defined."))
        with sdk(proxy) as client:
            client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    messages += [{"role": "assistant", "content": "Defined."}, {"role": "user", "content": "And 3?"}]
    upstream.plan(program(USE), program("Done."))
    with sdk(proxy) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    assert "NameError" in upstream.received[-1].json["messages"][-1]["content"]


def test_another_keys_identical_history_is_its_own(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    """The same history under two keys: each continues its own session, not the other's."""
    messages: list[Any] = [{"role": "user", "content": "Define a scaler (per key)."}]
    upstream.plan(program(DEFINE), program("Defined."))
    with sdk(proxy) as alice:
        alice.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    with sdk(proxy, key="sk-bob-12345678") as bob:
        upstream.plan(program("```python\nBASE = 1000\nprint(BASE)\n```"), program("Defined."))
        bob.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
        messages += [{"role": "assistant", "content": "Defined."}, {"role": "user", "content": "BASE?"}]
        upstream.plan(program("```python\nprint(BASE)\n```"), program("Done."))
        bob.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
        assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\n1000"


def test_the_same_name_under_another_key_is_another_session(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    with sdk(proxy, session="shared-name") as client:
        two_turns(client, upstream, "(shared name)")
    messages = [{"role": "user", "content": "And 3?"}]
    upstream.plan(program(USE), program("Done."))
    with sdk(proxy, key="sk-bob-12345678", session="shared-name") as bob:
        bob.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    assert "NameError" in upstream.received[-1].json["messages"][-1]["content"]
    # and bob's prompt shows nothing of alice's programs
    assert not any("def scale" in str(m["content"]) for m in upstream.received[-1].json["messages"])


@pytest.mark.parametrize(
    ("headers", "body_extra", "param"),
    [
        pytest.param({"x-cablectl-session": "x" * 300}, {}, "x-cablectl-session", id="header-too-long"),
        pytest.param({}, {"metadata": {"session_id": 42}}, "metadata.session_id", id="not-a-string"),
        pytest.param({}, {"metadata": {"session_id": ""}}, "metadata.session_id", id="empty"),
        pytest.param({}, {"metadata": {"session_id": "a\nb"}}, "metadata.session_id", id="control-chars"),
    ],
)
def test_bad_session_names_are_400(
    proxy: UvicornThread, headers: dict[str, str], body_extra: dict[str, Any], param: str
) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "x"}],
        "tools": WEATHER,
        **body_extra,
    }
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": "Bearer sk-alice-123456", **headers},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_a_lost_kernel_is_replayed_for_the_next_turn(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    """The session's kernel is killed between user turns: the next program finds scale() anyway."""
    with sdk(proxy, session="conv-killed") as client:
        messages: list[Any] = [{"role": "user", "content": "Define a scaler."}]
        upstream.plan(program(DEFINE), program("Defined."))
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
        runtime = proxy.server.config.app.state.loop.runtime
        session_id = SessionKey("alice", "conv-killed").session_id
        pid = runtime.live[session_id].kernel.connection.pid()
        assert pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: dead(pid))
        # and the kernel itself (a sandboxed one is the killed keeper's child), a moment later
        kernel_id = runtime.live[session_id].kernel.kernel_id
        assert gone_within(runtime.pool.provider.runtime / kernel_id, 10)
        messages += [{"role": "assistant", "content": "Defined."}, {"role": "user", "content": "And 3?"}]
        upstream.plan(program(USE), program("Done."))
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
        assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\n30"
        replays = [
            line
            for line in httpx.get(proxy.url + "/metrics").text.splitlines()
            if line.startswith('cablectl_session_replays_total{cause="lost",reason="new_program"}')
        ]
        assert replays and float(replays[0].split()[-1]) >= 1


@pytest.mark.parametrize("session", ["conv-redis", None], ids=["named", "by-history"])
def test_a_restarted_proxy_continues_the_session_from_redis(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream, redis_url: str, session: str | None
) -> None:
    cfg = config(upstream_url, sessions={"redis_url": redis_url, "secret": "s" * 32})
    settings = load_settings(write_config(tmp_path, cfg), env={})
    messages: list[Any] = [{"role": "user", "content": f"Define a scaler ({session})."}]
    with UvicornThread(create_app(settings)) as first:
        upstream.plan(program(DEFINE), program("Defined."))
        with sdk(first, session=session) as client:
            client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    messages += [{"role": "assistant", "content": "Defined."}, {"role": "user", "content": "And 3?"}]
    with UvicornThread(create_app(load_settings(write_config(tmp_path, cfg), env={}))) as second:
        upstream.plan(program(USE), program("Done."))
        with sdk(second, session=session) as client:
            client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\n30"


@pytest.mark.parametrize(
    "echoed",
    [
        pytest.param({"role": "assistant", "content": "Done."}, id="as-sent"),
        pytest.param(
            {"role": "assistant", "content": [{"type": "text", "text": "Done."}]}, id="content-parts"
        ),
        pytest.param(
            {"role": "assistant", "content": " Done. ", "refusal": None}, id="spaces-and-extra-keys"
        ),
    ],
)
def test_a_conversation_digest_does_not_care_how_the_client_echoes_the_reply(echoed: dict[str, Any]) -> None:
    from proxy.actions.history import conversation_digest

    user = {"role": "user", "content": "Hi"}
    sent = conversation_digest("alice", [user, {"role": "assistant", "content": "Done."}])
    assert conversation_digest("alice", [user, echoed]) == sent
    assert conversation_digest("bob", [user, echoed]) != sent  # scoped to the key
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1, "b": 2}'}}]
    spaced = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"b":2,"a":1}'}}]
    assert conversation_digest("k", [{"role": "assistant", "tool_calls": calls}]) == conversation_digest(
        "k", [{"role": "assistant", "content": None, "tool_calls": spaced}]
    )


MADE = (
    "```python\nBASE = 10\ndef scale(x: float) -> float:\n"
    '    """Multiply x by the conversation\'s BASE."""\n    return x * BASE\nprint(scale(2))\n```'
)


def test_a_function_the_model_defines_is_shown_in_later_turns_and_called(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    """A documented top-level function of a program that ran to its end is a tool the model
    made: the next turn's prompt shows its stub beside the tools, and calling it works. A
    function of a program that failed, or without a docstring, is not shown."""
    with sdk(proxy, session="made-tools") as client:
        messages: list[Any] = [{"role": "user", "content": "Make a scaler."}]
        upstream.plan(
            program(MADE),
            program(
                "```python\ndef broken(x):\n    '''Never defined.'''\n    return x\nraise ValueError('no')\n```"
            ),
            program("Made."),
        )
        first = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
        assert first.choices[0].message.content == "Made."
        system = upstream.received[-1].json["messages"][0]["content"]
        assert (
            'def scale(x: float) -> float:\n    """Multiply x by the conversation\'s BASE."""\n    ...'
            in system
        )
        assert "broken" not in system  # its program raised
        messages += [{"role": "assistant", "content": "Made."}, {"role": "user", "content": "Scale 4."}]
        upstream.plan(program("```python\nprint(scale(4))\n```"), program("40."))
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
        assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\n40"
        first_prompt = upstream.received[-2].json["messages"][0]["content"]
        assert "def scale(x: float) -> float:" in first_prompt  # shown when the new question came


def test_made_functions_stay_out_of_other_sessions(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    upstream.plan(program(MADE), program("Made."))
    with sdk(proxy, session="made-a") as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Make one (a)."}], tools=WEATHER
        )
    upstream.plan(program("Nothing."))
    with sdk(proxy, session="made-b") as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Anything (b)?"}], tools=WEATHER
        )
    assert "scale" not in upstream.received[-1].json["messages"][0]["content"]
