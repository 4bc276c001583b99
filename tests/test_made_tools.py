"""Tools the model makes, reviewed and promoted: ``cablectl tools ls/show/promote`` against a
real Redis, then a route that lists the promoted toolset defines the function in every new
session's kernel (keys limit it), through restarts. Real uvicorn, openai SDK, real kernels;
the scripted upstream plays the model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from proxy.actions.loop import SessionKey
from proxy.app import create_app
from proxy.cli import main
from proxy.config import load_settings
from tests.conftest import upstream_models, write_config
from tests.servers import UvicornThread
from tests.test_actions import WEATHER, program
from tests.upstream import ScriptedUpstream

DOUBLE = (
    "```python\ndef double(x: int) -> int:\n"
    '    """Twice x, the reviewed way."""\n    return 2 * x\nprint(double(21))\n```'
)
KEYS = [
    {"id": "alice", "key": "sk-alice-123456"},
    {"id": "bob", "key": "sk-bob-12345678", "toolsets": []},
]


@pytest.fixture(scope="module")
def store_url(redis_url: str) -> Iterator[str]:
    url = redis_url.rsplit("/", 1)[0] + "/8"  # a database of its own
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def config(upstream_url: str, store_url: str) -> dict[str, Any]:
    helpers = {
        "model_name": "with-helpers",
        "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream_url},
        "toolsets": ["helpers"],
    }
    return {
        "model_list": [*upstream_models(upstream_url), helpers],
        "kernels": {"min_idle": 1, "max_total": 4},
        "sessions": {"redis_url": store_url},
        "toolsets": {"helpers": {"promoted": True}},
        "keys": KEYS,
    }


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out + err


def client(server: UvicornThread, key: str = "sk-alice-123456", session: str | None = None) -> openai.OpenAI:
    headers = {"x-cablectl-session": session} if session else {}
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, default_headers=headers)


def test_a_promoted_function_is_defined_for_later_sessions(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    store_url: str,
    upstream_url: str,
    upstream: ScriptedUpstream,
) -> None:
    path = write_config(tmp_path, config(upstream_url, store_url))
    server = UvicornThread(create_app(load_settings(path, env={}))).start()
    try:
        upstream.plan(program(DOUBLE), program("42."))
        with client(server, session="author") as author:
            author.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Double 21."}], tools=WEATHER
            )
        sid = SessionKey("alice", "author").session_id

        code, out = cli(capsys, "tools", "ls", "--redis-url", store_url, "--json")
        assert code == 0
        rows = [json.loads(line) for line in out.splitlines()]
        assert {"session_id": sid, "name": "double", "signature": "double(x: int) -> int"} in [
            {k: r[k] for k in ("session_id", "name", "signature")} for r in rows
        ]
        code, out = cli(capsys, "tools", "show", sid, "double", "--redis-url", store_url)
        assert code == 0 and "return 2 * x" in out
        for bad in (["show", sid, "nope"], ["show", "no-such-session", "double"], ["promote", sid, "nope"]):
            code, out = (
                cli(capsys, "tools", *bad, "--toolset", "helpers", "--redis-url", store_url)
                if bad[0] == "promote"
                else cli(capsys, "tools", *bad, "--redis-url", store_url)
            )
            assert code == 1 and "no documented function" in out
        code, out = cli(
            capsys, "tools", "promote", sid, "double", "--toolset", "../x", "--redis-url", store_url
        )
        assert code == 2 and "toolset name" in out
        code, out = cli(
            capsys, "tools", "promote", sid, "double", "--toolset", "helpers", "--redis-url", store_url
        )
        assert code == 0 and "double kept in toolset 'helpers'" in out

        # a new session of alice on the route that lists the toolset: shown and defined
        upstream.plan(program("```python\nprint(double(4))\n```"), program("8."))
        with client(server) as alice:
            alice.chat.completions.create(
                model="with-helpers",
                messages=[{"role": "user", "content": "Double 4 (alice)."}],
                tools=WEATHER,
            )
        assert '"""Twice x, the reviewed way."""' in upstream.received[-2].json["messages"][0]["content"]
        assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\n8"

        # bob may not use the toolset: neither shown nor defined
        upstream.plan(program("```python\nprint(double(4))\n```"), program("No."))
        with client(server, key="sk-bob-12345678") as bob:
            bob.chat.completions.create(
                model="with-helpers", messages=[{"role": "user", "content": "Double 4 (bob)."}], tools=WEATHER
            )
        assert "double" not in upstream.received[-2].json["messages"][0]["content"]
        assert "NameError" in upstream.received[-1].json["messages"][-1]["content"]

        # a route that does not list it: not shown
        upstream.plan(program("Plain."))
        with client(server) as alice:
            alice.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Plain (alice)."}], tools=WEATHER
            )
        assert "double" not in upstream.received[-1].json["messages"][0]["content"]

        # a session that used it goes on after a restart: the replay defines it again first
        upstream.plan(program("```python\nN = double(5)\nprint(N)\n```"), program("10."))
        with client(server, session="user") as user:
            user.chat.completions.create(
                model="with-helpers", messages=[{"role": "user", "content": "Double 5."}], tools=WEATHER
            )
    finally:
        server.stop()
    server = UvicornThread(create_app(load_settings(path, env={}))).start()
    try:
        upstream.plan(program("```python\nprint(N + double(1))\n```"), program("12."))
        with client(server, session="user") as user:
            user.chat.completions.create(
                model="with-helpers",
                messages=[
                    {"role": "user", "content": "Double 5."},
                    {"role": "assistant", "content": "10."},
                    {"role": "user", "content": "Plus double 1."},
                ],
                tools=WEATHER,
            )
        assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\n12"
    finally:
        server.stop()


def test_a_promoted_toolset_is_declared_in_config(tmp_path: Path) -> None:
    from proxy.errors import ConfigError

    bad = {"model_list": [], "toolsets": {"x": {"promoted": True, "openapi": "spec.json"}}}
    with pytest.raises(ConfigError, match="one of 'openapi', 'mcp' or 'promoted: true'"):
        load_settings(write_config(tmp_path, bad), env={})
