"""Security: what a program in a kernel can reach, sessions isolated across kernel reuse, key
guessing rate limited, keys compared in constant time, secrets kept out of logs."""

from __future__ import annotations

import ctypes
import json
import logging
import os
from typing import Any

import httpx
import openai
import pytest

import proxy.auth
from proxy.auth import KeyRing
from proxy.config import KeyEntry
from proxy.errors import AuthRateLimited
from proxy.kernels.local import can_isolate_network
from tests.conftest import ProxyFactory, upstream_models
from tests.test_actions import WEATHER, program
from tests.upstream import Reply, ScriptedUpstream

ROOT = os.geteuid() == 0
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def probe_program(redis_port: int, proxy_port: int) -> str:
    """A program that tries what it should not, and reports through a tool call's arguments."""
    return (
        "```python\n"
        "import os, socket, json\n"
        "report = {'env': sorted(os.environ), 'cwd': os.getcwd()}\n"
        "def reach(port):\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', port), timeout=2).close()\n"
        "        return 'connected'\n"
        "    except OSError as e:\n"
        "        return type(e).__name__\n"
        f"report['redis'] = reach({redis_port})\n"
        f"report['proxy'] = reach({proxy_port})\n"
        "try:\n"
        "    report['proxy_environ'] = open(f'/proc/{os.getppid()}/environ', 'rb').read().decode('latin-1')\n"
        "except OSError as e:\n"
        "    report['proxy_environ'] = type(e).__name__\n"
        "try:\n"
        "    report['work'] = os.listdir(os.path.dirname(os.getcwd()))\n"
        "except OSError as e:\n"
        "    report['work'] = type(e).__name__\n"
        "get_weather(city=json.dumps(report))\n"
        "```"
    )


def report_of(response: Any) -> dict[str, Any]:
    call = (response.choices[0].message.tool_calls or [])[0]
    return dict(json.loads(json.loads(call.function.arguments)["city"]))


@pytest.mark.parametrize("sandbox", ["auto", "none"])
def test_a_program_cannot_reach_secrets_redis_or_the_proxy(
    make_proxy: ProxyFactory,
    upstream_url: str,
    upstream: ScriptedUpstream,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    sandbox: str,
) -> None:
    """In its sandbox (the default; tests/test_sandbox.py probes it all) and without one."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-secret-in-the-proxy-env")
    proxy = make_proxy(
        {
            "model_list": upstream_models(upstream_url),
            "kernels": {"min_idle": 1, "max_total": 2, "sandbox": sandbox},
            "sessions": {"redis_url": redis_url, "secret": "a-session-secret-of-replicas"},
        }
    )
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        upstream.plan(program(probe_program(redis_port, proxy.port)))
        report = report_of(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "probe"}], tools=WEATHER
            )
        )
    # no secret, no Redis URL, nothing of the proxy's environment
    assert not [n for n in report["env"] if n.startswith(("OPENAI", "CABLECTL", "REDIS", "LANGFUSE"))]
    assert set(report["env"]) <= {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "MPLBACKEND",
        "PYDEVD_DISABLE_FILE_VALIDATION",
        "JPY_PARENT_PID",
        "JPY_SESSION_NAME",
        "PWD",  # set by bwrap: the working directory
        "PYDEVD_USE_FRAME_EVAL",
        "COLUMNS",
        "LINES",
        # set by ipykernel itself for its display
        "TERM",
        "CLICOLOR",
        "CLICOLOR_FORCE",
        "FORCE_COLOR",
        "PAGER",
        "GIT_PAGER",
    }, report["env"]
    # no network: its own namespace, where even loopback is down
    if sandbox == "auto" or can_isolate_network():
        assert report["redis"] != "connected" and report["proxy"] != "connected"
    else:
        assert not IN_CI, "CI runs as root: kernels must get their own network namespace"
    if sandbox == "auto":
        # its parent is the sandbox's init (its environment is the kernel's), and the only
        # working directory that exists in its view of work/ is its own
        assert "sk-live-secret" not in report["proxy_environ"]
        assert report["work"] == [os.path.basename(report["cwd"])]
        return
    # unsandboxed: the proxy is non-dumpable, so its /proc environ is closed to its user's
    # processes (not to root), and work/ cannot be listed (except by root)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE of this (the proxy's) process
    if ROOT:
        assert isinstance(report["work"], list)  # root reads and lists anything: see the README
    else:
        assert report["proxy_environ"] == "PermissionError" and report["work"] == "PermissionError"


def test_sessions_stay_isolated_when_the_kernel_slot_is_reused(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    proxy = make_proxy(
        {"model_list": upstream_models(upstream_url), "kernels": {"min_idle": 1, "max_total": 1}}
    )
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        leave = (
            "```python\n"
            "import os, json\n"
            "SECRET_A = 'only-for-session-a'\n"
            "open('a.txt', 'w').write(SECRET_A)\n"
            "get_weather(city=json.dumps({'path': os.path.abspath('a.txt'), 'cwd': os.getcwd()}))\n"
            "```"
        )
        upstream.plan(program(leave))
        first = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}], tools=WEATHER
        )
        left = report_of(first)
        look = (
            "```python\n"
            "import os, json\n"
            f"get_weather(city=json.dumps({{'global': 'SECRET_A' in globals(), 'file': os.path.exists({left['path']!r}), "
            "'cwd': os.getcwd()}))\n"
            "```"
        )
        upstream.plan(program(look))
        # the only kernel slot is session A's; B gets a fresh kernel after A's is retired
        second = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "b"}], tools=WEATHER
        )
        seen = report_of(second)
        # another kernel (its own directory; in a sandbox every kernel is pid 2 of its own namespace)
        assert seen == {"global": False, "file": False, "cwd": seen["cwd"]} and seen["cwd"] != left["cwd"]


def test_key_guessing_is_rate_limited_per_client(make_proxy: ProxyFactory, upstream_url: str) -> None:
    proxy = make_proxy(
        {
            "model_list": upstream_models(upstream_url),
            "keys": [{"id": "team", "key": "sk-team-0123456789"}],
            "server": {"auth_failures_per_minute": 5},
        }
    )

    def models(key: str, source: str = "127.0.0.1") -> httpx.Response:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport) as http:
            return http.get(proxy.url + "/v1/models", headers={"authorization": f"Bearer {key}"})

    for i in range(5):
        assert models(f"sk-guess-{i:010d}").status_code == 401
    blocked = models("sk-team-0123456789")  # even the right key waits: the guesser may have found it
    assert blocked.status_code == 429 and 1 <= int(blocked.headers["retry-after"]) <= 60
    assert blocked.json()["error"]["code"] == "too_many_auth_failures"
    # another client address is not affected
    assert models("sk-team-0123456789", source="127.0.0.2").status_code == 200


def test_failure_window_expires_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(proxy.auth.time, "monotonic", lambda: now[0])
    ring = KeyRing([KeyEntry(id="k", key="sk-right-key-1")], failures_per_minute=2)
    for _ in range(2):
        with pytest.raises(proxy.auth.AuthenticationFailed):
            ring.authenticate({"authorization": "Bearer nope"}, "1.2.3.4")
    with pytest.raises(AuthRateLimited):
        ring.authenticate({"authorization": "Bearer sk-right-key-1"}, "1.2.3.4")
    now[0] += 61
    assert ring.authenticate({"authorization": "Bearer sk-right-key-1"}, "1.2.3.4").key_id == "k"
    for i in range(proxy.auth.MAX_TRACKED_CLIENTS + 50):  # a spoofing flood cannot grow memory without bound
        ring.failures.record(f"10.0.{i // 256}.{i % 256}")
    assert len(ring.failures._failures) == proxy.auth.MAX_TRACKED_CLIENTS


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = proxy.auth.hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(proxy.auth.hmac, "compare_digest", recording)
    ring = KeyRing([KeyEntry(id=f"k{i}", key=f"sk-key-number-{i}") for i in range(5)])
    assert ring.authenticate({"authorization": "Bearer sk-key-number-0"}).key_id == "k0"
    # every key is compared, whichever matched, and only with the constant-time comparison
    assert [a for a, _ in calls] == [f"sk-key-number-{i}".encode() for i in range(5)]


SECRETS = {
    "client key": "sk-client-key-7f3a9c21",
    "upstream key": "sk-upstream-key-b81d44e0",
    "session secret": "session-secret-5c1e8f7a9b",
    "langfuse secret": "sk-lf-secret-99a0c3d2",
    "guessed key": "sk-guessed-key-0d9e2a61",
}


def test_secrets_never_appear_in_logs(
    make_proxy: ProxyFactory,
    upstream_url: str,
    upstream: ScriptedUpstream,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    models = upstream_models(upstream_url)
    for model in models:
        model["litellm_params"]["api_key"] = SECRETS["upstream key"]
    proxy = make_proxy(
        {
            "model_list": models,
            "keys": [{"id": "team", "key": SECRETS["client key"]}],
            "sessions": {"secret": SECRETS["session secret"]},
            "tracing": {
                "langfuse": {
                    "public_key": "pk-lf-logs",
                    "secret_key": SECRETS["langfuse secret"],
                    "host": "http://127.0.0.1:9",
                }
            },
            "server": {"log_level": "debug"},
        }
    )
    bodies = []
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=SECRETS["client key"], max_retries=0) as good:
        upstream.plan(
            program("hello"), program("hello"), program('```python\nget_weather(city="Paris")\n```')
        )
        for model in ("gpt-4o-mini", "via-litellm"):  # direct and through litellm
            good.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        good.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], tools=WEATHER
        )
        bad = httpx.post(
            proxy.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {SECRETS['guessed key']}"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        )
        bodies.append(bad.text)
        upstream.plan(Reply(status=500, body=b"<html>upstream broke</html>"))  # an error path too
        failed = httpx.post(
            proxy.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {SECRETS['client key']}"},
            json={"model": "renamed", "messages": [{"role": "user", "content": "hi"}]},
        )
        bodies.append(failed.text)
        out, err = capfd.readouterr()
        logged = caplog.text + out + err + "".join(bodies)
        assert "cablectl.access" in caplog.text  # the logs were captured at all
        leaked = [name for name, secret in SECRETS.items() if secret in logged]
        assert not leaked, f"secrets in logs or bodies: {leaked}"
        # the upstream did get its key: the secret was used, not just absent
        assert any(SECRETS["upstream key"] in str(r.headers) for r in upstream.received)
