"""Artifacts: files a session's programs write, recorded after each cell, mentioned to the
model, listed and served over HTTP to the owning key only, kept within
``sessions.max_artifact_bytes``, and put back after the kernel is lost.

Real uvicorn, the openai SDK, real (sandboxed) kernels; the scripted upstream plays the model."""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Any

import httpx
import openai
import pytest

from proxy.actions.artifacts import _safe_name
from proxy.actions.loop import SessionKey
from tests.conftest import ProxyFactory, upstream_models
from tests.servers import UvicornThread
from tests.test_actions import WEATHER, program
from tests.test_continuity import dead
from tests.test_kernels import gone_within
from tests.upstream import ScriptedUpstream, wait_for

KEYS = [{"id": "alice", "key": "sk-alice-123456"}, {"id": "bob", "key": "sk-bob-12345678"}]
ALICE = {"authorization": "Bearer sk-alice-123456"}
BOB = {"authorization": "Bearer sk-bob-12345678"}

WRITE = (
    "```python\nimport os\n"
    "open('report.csv', 'w').write('city,t\\nParis,18\\n')\n"
    "os.makedirs('data', exist_ok=True)\n"
    "open('data/chart.bin', 'wb').write(bytes(range(256)))\n"
    "open('.hidden', 'w').write('not an artifact')\n"
    "open('big.bin', 'wb').write(b'x' * 5000)\n"
    "open('odd name é.txt', 'w').write('odd')\n"
    "print('written')\n```"
)


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy(
        {
            "model_list": upstream_models(upstream_url),
            "kernels": {"min_idle": 1, "max_total": 4},
            "sessions": {"max_artifact_bytes": 2000},
            "keys": KEYS,
        }
    )


def sdk(server: UvicornThread, session: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1",
        api_key="sk-alice-123456",
        max_retries=0,
        default_headers={"x-cablectl-session": session},
    )


def artifacts_url(server: UvicornThread, sid: str, name: str = "") -> str:
    return f"{server.url}/v1/sessions/{sid}/artifacts" + (f"/{name}" if name else "")


def test_files_are_recorded_mentioned_listed_and_served(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    sid = SessionKey("alice", "files").session_id
    upstream.plan(program(WRITE), program("Written."))
    with sdk(proxy, "files") as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Write files."}], tools=WEATHER
        )
    assert raw.headers["x-cablectl-session-id"] == sid
    observation = upstream.received[-1].json["messages"][-1]["content"]
    assert observation.startswith("Observation:\nwritten\nFiles written: ")
    assert "report.csv (16 bytes)" in observation and "data/chart.bin (256 bytes)" in observation
    assert "big.bin (5.0 kB, not kept: too large)" in observation and ".hidden" not in observation

    listed = httpx.get(artifacts_url(proxy, sid), headers=ALICE).json()["data"]
    by_name = {a["name"]: a for a in listed}
    assert set(by_name) == {"report.csv", "data/chart.bin", "big.bin", "odd name é.txt"}
    assert by_name["data/chart.bin"]["sha256"] == hashlib.sha256(bytes(range(256))).hexdigest()
    assert by_name["big.bin"]["stored"] is False and by_name["report.csv"]["stored"] is True
    assert by_name["report.csv"]["turn"] == 1

    csv = httpx.get(artifacts_url(proxy, sid, "report.csv"), headers=ALICE)
    assert csv.status_code == 200 and csv.text == "city,t\nParis,18\n"
    assert csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv.headers["content-disposition"]
    binary = httpx.get(artifacts_url(proxy, sid, "data/chart.bin"), headers=ALICE)
    assert binary.content == bytes(range(256))
    odd = httpx.get(artifacts_url(proxy, sid, "odd%20name%20%C3%A9.txt"), headers=ALICE)
    assert odd.status_code == 200 and odd.text == "odd"
    too_large = httpx.get(artifacts_url(proxy, sid, "big.bin"), headers=ALICE)
    assert too_large.status_code == 404 and "not kept" in too_large.json()["error"]["message"]


@pytest.mark.parametrize(
    ("who", "path"),
    [
        pytest.param(BOB, "report.csv", id="another-key"),
        pytest.param(ALICE, "../../etc/passwd", id="traversal"),
        pytest.param(ALICE, "%2e%2e/%2e%2e/etc/passwd", id="encoded-traversal"),
        pytest.param(ALICE, ".hidden", id="hidden"),
        pytest.param(ALICE, "data", id="a-directory"),
    ],
)
def test_what_is_not_yours_or_not_a_file_is_404(
    proxy: UvicornThread, upstream: ScriptedUpstream, who: dict[str, str], path: str
) -> None:
    sid = SessionKey("alice", "files-404").session_id
    upstream.plan(program(WRITE), program("Written."))
    with sdk(proxy, "files-404") as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Write files (404)."}], tools=WEATHER
        )
    reply = httpx.get(artifacts_url(proxy, sid, path), headers=who)
    assert reply.status_code == 404 and set(reply.json()["error"]) == {"message", "type", "param", "code"}
    if who is BOB:
        assert httpx.get(artifacts_url(proxy, sid), headers=BOB).status_code == 404
    assert httpx.get(artifacts_url(proxy, "0" * 16), headers=ALICE).status_code == 404
    assert httpx.get(artifacts_url(proxy, "x" * 500), headers=ALICE).status_code == 404
    assert httpx.get(artifacts_url(proxy, sid)).status_code == 401


def test_files_come_back_after_the_kernel_is_lost(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    """Random bytes a program wrote: a replay alone would write other ones; the kept file is
    put back, so the next program reads what was recorded. A deleted file is recorded too."""
    sid = SessionKey("alice", "files-kill").session_id
    messages: list[Any] = [{"role": "user", "content": "Write a key."}]
    write = "```python\nimport os\nopen('key.bin', 'wb').write(os.urandom(64))\nopen('tmp.txt', 'w').write('x')\n```"
    upstream.plan(
        program(write), program("```python\nimport os\nos.remove('tmp.txt')\n```"), program("Done.")
    )
    with sdk(proxy, "files-kill") as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
        assert "Files deleted: tmp.txt." in upstream.received[-1].json["messages"][-1]["content"]
        listed = {a["name"]: a for a in httpx.get(artifacts_url(proxy, sid), headers=ALICE).json()["data"]}
        assert set(listed) == {"key.bin"}
        runtime = proxy.server.config.app.state.loop.runtime
        pid = runtime.live[sid].kernel.connection.pid()
        assert pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: dead(pid))
        # and the kernel itself (a sandboxed one is the killed keeper's child), a moment later
        assert gone_within(runtime.pool.provider.runtime / runtime.live[sid].kernel.kernel_id, 10)
        messages += [{"role": "assistant", "content": "Done."}, {"role": "user", "content": "Its hash?"}]
        read = "```python\nimport hashlib, os\nprint(hashlib.sha256(open('key.bin', 'rb').read()).hexdigest(), os.path.exists('tmp.txt'))\n```"
        upstream.plan(program(read), program("There."))
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    assert (
        upstream.received[-1].json["messages"][-1]["content"]
        == f"Observation:\n{listed['key.bin']['sha256']} False"
    )


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("report.csv", True),
        ("data/chart.bin", True),
        ("odd name é.txt", True),
        ("../etc/passwd", False),
        ("/etc/passwd", False),
        ("a/../../b", False),
        ("a//b", False),
        (".hidden", False),
        ("a/.git/config", False),
        ("a\\b", False),
        ("line\nbreak", False),
        ("", False),
        ("x" * 2000, False),
    ],
)
def test_only_plain_relative_names_are_recorded(name: str, safe: bool) -> None:
    assert _safe_name(name) is safe
