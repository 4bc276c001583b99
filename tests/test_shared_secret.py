"""Replicas on one Redis with no configured ``sessions.secret`` agree on one (stored once in
Redis), so a restarted proxy, or another replica, verifies the tool-call ids issued before and
the conversation goes on: no tool call is asked twice.

Real redis-server, uvicorn, the openai SDK, real kernels; the scripted upstream plays the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai

from proxy.app import create_app
from proxy.config import load_settings
from tests.conftest import upstream_models, write_config
from tests.servers import UvicornThread
from tests.test_actions import LOOP_PROGRAM, WEATHER, program
from tests.test_turn import answer_all
from tests.upstream import ScriptedUpstream

TEMPS = {"Paris": 18, "Rome": 24}


def start(tmp: Path, upstream_url: str, redis_url: str, **sessions: Any) -> UvicornThread:
    cfg = {
        "model_list": upstream_models(upstream_url),
        "kernels": {"min_idle": 1, "max_total": 2},
        "sessions": {"redis_url": redis_url, **sessions},
    }
    tmp.mkdir(parents=True, exist_ok=True)
    return UvicornThread(create_app(load_settings(write_config(tmp, cfg), env={}))).start()


def step(server: UvicornThread, messages: list[Any]) -> list[str]:
    """One request; appends the reply and answers its calls; the cities asked for."""
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    return answer_all(messages, reply, TEMPS)


def test_replicas_and_restarts_without_a_configured_secret_continue_each_other(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream, redis_url: str
) -> None:
    messages: list[Any] = [{"role": "user", "content": "Which is hotter?"}]
    upstream.plan(program(LOOP_PROGRAM))
    first = start(tmp_path / "a", upstream_url, redis_url)
    second = start(tmp_path / "b", upstream_url, redis_url)
    try:
        assert step(first, messages) == ["Paris"]
        assert step(second, messages) == ["Rome"]  # the other replica verifies the id: no Paris again
    finally:
        first.stop()
        second.stop()
    upstream.plan(program("Rome is hotter."))
    restarted = start(tmp_path / "c", upstream_url, redis_url)
    try:
        assert step(restarted, messages) == []  # a restart with no secret continues it too
        assert messages[-1]["content"] == "Rome is hotter."
        assert upstream.received[-1].json["messages"][-1]["content"].startswith("Observation:\nhottest: Rome")
    finally:
        restarted.stop()


def test_a_configured_secret_wins(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream, redis_url: str
) -> None:
    """A replica with its own secret does not verify ids signed with the shared one."""
    messages: list[Any] = [{"role": "user", "content": "Which is hotter?"}]
    upstream.plan(program(LOOP_PROGRAM), program(LOOP_PROGRAM))
    shared = start(tmp_path / "a", upstream_url, redis_url)
    own = start(tmp_path / "b", upstream_url, redis_url, secret="an-operator-chosen-secret")
    try:
        assert step(shared, messages) == ["Paris"]
        # foreign ids to this replica: translated statelessly, a new session asks Paris again
        assert step(own, messages) == ["Paris"]
    finally:
        shared.stop()
        own.stop()
