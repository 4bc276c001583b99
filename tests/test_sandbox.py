"""The kernel sandbox (proxy.kernels.sandbox), probed the way an attacker's program would.

Through the real proxy (uvicorn, the openai SDK, real kernels, real Redis): session A holds a
kernel (its program waits on a client tool); session B's program then tries everything it
must not be able to do, and reports what it found through a tool call's arguments. The same
probe with ``kernels.sandbox: none`` shows what the sandbox takes away (so the probe itself
is known to find things). Run as root here (as CI does)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import ProxyFactory, upstream_models
from tests.test_actions import WEATHER, program
from tests.test_security import report_of
from tests.upstream import ScriptedUpstream

MARKER = "987.654"  # the seconds of a `sleep` the probe leaves behind


def probe(targets: dict[str, Any]) -> str:
    """A program that tries what it should not; ``targets`` are paths and pids outside it."""
    return (
        "```python\n"
        "import os, json, glob, socket, subprocess\n"
        f"t = json.loads({json.dumps(json.dumps(targets))})\n"
        "r = {}\n"
        "def attempt(name, fn):\n"
        "    try:\n"
        "        r[name] = ['ok', str(fn())[:200]]\n"
        "    except BaseException as e:\n"
        "        r[name] = ['refused', type(e).__name__]\n"
        "def cmdlines():\n"
        "    out = []\n"
        "    for pid in os.listdir('/proc'):\n"
        "        if pid.isdigit():\n"
        "            try:\n"
        "                out.append(open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode())\n"
        "            except OSError:\n"
        "                pass\n"
        "    return out\n"
        "from ipykernel.connect import get_connection_file\n"
        "own_run = os.path.dirname(get_connection_file())\n"
        "procs = cmdlines()\n"
        "import re\n"
        "r['kernels_seen'] = len({m for c in procs for m in re.findall(r'run/([0-9a-f]{32})/kernel.json', c)})\n"
        "r['others_seen'] = [c[:80] for c in procs if own_run not in c]\n"
        "attempt('signal_proxy', lambda: os.kill(t['proxy_pid'], 0))\n"
        "attempt('signal_other_kernel', lambda: os.kill(t['other_kernel_pid'], 0))\n"
        "attempt('other_connection_file', lambda: open(t['other_connection_file']).read())\n"
        "others = lambda: [p for p in glob.glob(t['run_glob']) if os.path.dirname(p) != own_run]\n"
        "attempt('any_connection_file', lambda: others() or 1 / 0)\n"
        "attempt('other_workdir', lambda: os.listdir(t['other_workdir']))\n"
        "attempt('config_file', lambda: open(t['config_file']).read())\n"
        "attempt('proxy_environ', lambda: open(f\"/proc/{t['proxy_pid']}/environ\", 'rb').read())\n"
        "attempt('shadow', lambda: open('/etc/shadow').read())\n"
        "attempt('root_home', lambda: os.listdir('/root/.ssh'))\n"
        "attempt('redis_files', lambda: os.listdir('/var/lib/redis'))\n"
        "def connect():\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.connect(t['other_socket'])\n"
        "attempt('other_socket', connect)\n"
        "attempt('redis_tcp', lambda: socket.create_connection(('127.0.0.1', t['redis_port']), timeout=2))\n"
        "attempt('write_usr', lambda: open('/usr/cablectl-probe', 'w'))\n"
        "attempt('write_root', lambda: open('/cablectl-probe', 'w'))\n"
        "try:\n"
        "    open(t['provider_root'] + '/probe', 'w').write('x')  # its private tmpfs, if anything\n"
        "except OSError:\n"
        "    pass\n"
        "open('/tmp/cablectl-probe-tmp', 'w').write('x')\n"
        f"subprocess.Popen(['sleep', '{MARKER}'], start_new_session=True)\n"
        "get_weather(city=json.dumps(r))\n"
        "```"
    )


def sleepers() -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"sleep {MARKER}"], capture_output=True, text=True, check=False)
    return out.stdout.split()


def run_probe(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream, redis_url: str, sandbox: str
) -> dict[str, Any]:
    cfg = {
        "model_list": upstream_models(upstream_url),
        "kernels": {"min_idle": 1, "max_total": 3, "sandbox": sandbox, "session_idle_seconds": 1},
        "sessions": {"redis_url": redis_url, "secret": "s" * 32},
    }
    proxy = make_proxy(cfg)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    # session A: a program waiting for a client tool holds its kernel
    upstream.plan(program("```python\nx = get_weather(city='A')\nprint(x)\n```"))
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}], tools=WEATHER
    )
    runtime = proxy.server.config.app.state.loop.runtime
    [a] = list(runtime.live.values())
    connection = a.kernel.connection
    provider_root = Path(connection.workdir).parents[1]
    targets = {
        "proxy_pid": os.getpid(),
        "other_kernel_pid": connection.pid(),
        "other_connection_file": str(connection.manager.connection_file),
        "other_socket": f"{connection.manager.ip}-{connection.manager.shell_port}",
        "run_glob": str(provider_root / "run" / "*" / "kernel.json"),
        "other_workdir": str(connection.workdir),
        "config_file": str(Path(proxy.server.config.app.state.settings.source)),
        "redis_port": int(redis_url.rsplit(":", 1)[1].split("/")[0]),
        "provider_root": str(provider_root),
    }
    assert os.path.exists(targets["other_connection_file"]) and os.path.exists(targets["other_socket"])
    upstream.plan(program(probe(targets)))
    report = report_of(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "b"}], tools=WEATHER
        )
    )
    report["host_tmp_written"] = os.path.exists("/tmp/cablectl-probe-tmp")
    report["host_root_written"] = os.path.exists(provider_root / "probe")
    # both sessions go idle: their kernels are released (session_idle_seconds: 1)
    deadline = time.monotonic() + 20
    while runtime.live and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    report["sleepers_left"] = sleepers()
    for pid in report["sleepers_left"]:
        subprocess.run(["kill", "-9", pid], check=False)
    return report


REFUSED = [
    "signal_proxy",
    "signal_other_kernel",
    "other_connection_file",
    "any_connection_file",
    "other_workdir",
    "config_file",
    "proxy_environ",
    "shadow",
    "root_home",
    "redis_files",
    "other_socket",
    "redis_tcp",
    "write_usr",
    "write_root",
]


def test_a_sandboxed_program_reaches_nothing_outside_its_kernel(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream, redis_url: str
) -> None:
    report = run_probe(make_proxy, upstream_url, upstream, redis_url, "auto")
    reached = {name: report[name] for name in REFUSED if report[name][0] != "refused"}
    assert reached == {}
    assert report["kernels_seen"] == 1  # itself only (bwrap and its kernel): not A's, not the pool's
    assert report["others_seen"] == []  # no process but its own: no proxy, no other kernel
    assert report["host_tmp_written"] is False  # its /tmp is its own
    assert report["host_root_written"] is False
    assert report["sleepers_left"] == []  # nothing outlives its kernel


def test_without_the_sandbox_the_same_probe_finds_them(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream, redis_url: str
) -> None:
    """The probe works: unsandboxed (as root) it sees other kernels and their files."""
    if os.geteuid() != 0:
        pytest.skip("the unsandboxed comparison assumes root, as in CI")
    report = run_probe(make_proxy, upstream_url, upstream, redis_url, "none")
    assert report["kernels_seen"] > 1 and report["others_seen"]
    assert report["other_connection_file"][0] == "ok" and report["other_workdir"][0] == "ok"
    assert report["config_file"][0] == "ok"
    assert report["sleepers_left"]  # its process outlived its kernel
    os.remove("/tmp/cablectl-probe-tmp")


@pytest.mark.parametrize("mode", ["auto", "bwrap"])
def test_without_bubblewrap_the_proxy_refuses_to_start_and_names_the_fix(
    tmp_path: Path, upstream_url: str, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    import proxy.kernels.sandbox
    from proxy.app import create_app
    from proxy.config import load_settings
    from proxy.errors import ConfigError
    from tests.conftest import write_config

    monkeypatch.setattr(proxy.kernels.sandbox.shutil, "which", lambda name: None)
    cfg = {"model_list": upstream_models(upstream_url), "kernels": {"sandbox": mode}}
    with pytest.raises(ConfigError) as info:
        create_app(load_settings(write_config(tmp_path, cfg), env={}))
    assert (
        "apt-get install bubblewrap" in info.value.message and "kernels.sandbox: none" in info.value.message
    )
    # and says none is possible
    cfg["kernels"] = {"sandbox": "none", "min_idle": 0}
    create_app(load_settings(write_config(tmp_path, cfg), env={}))
