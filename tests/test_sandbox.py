"""The kernel sandbox (proxy.kernels.sandbox), probed the way an attacker's program would.

Through the real proxy (uvicorn, the openai SDK, real kernels, a real Redis with its data on
disk): session A holds a kernel (its program wrote a file and waits on a client tool); session
B's program then tries everything it must not be able to do, and reports what it found through
a tool call's arguments. The targets (A's kernel process, connection file, sockets, working
directory; the proxy's pid and config file; the session store's files) are found the way a
host-side attacker would, from ``/proc`` and A's own report. The probe runs with the proxy as
root (as CI does) and, where the machine allows, as an unprivileged user (``cablectl serve``
under setpriv). The same probe with ``kernels.sandbox: none`` shows what the sandbox takes away
(so the probe is known to find things)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from proxy.kernels import ExecLimits, Finished, KernelPool
from proxy.kernels.local import LocalKernelProvider, ResourceLimits
from proxy.kernels.sandbox import Bubblewrap
from tests.conftest import ProxyFactory, upstream_models, write_config
from tests.reliability.test_faults import PersistentRedis
from tests.servers import free_port
from tests.test_actions import WEATHER, program
from tests.test_security import report_of
from tests.upstream import ScriptedUpstream

MARKER = "987.654"  # the seconds of a `sleep` the probe leaves behind
A_SECRET = "only-for-session-a"
NOBODY = 65534
KERNEL_ENV = {  # every variable a kernel's environment may hold (tests/test_security.py)
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
    "PWD",
    "PYDEVD_USE_FRAME_EVAL",
    "COLUMNS",
    "LINES",
    "TERM",
    "CLICOLOR",
    "CLICOLOR_FORCE",
    "FORCE_COLOR",
    "PAGER",
    "GIT_PAGER",
}


def working_bwrap() -> Bubblewrap:
    bwrap = Bubblewrap.find()
    if bwrap is None or bwrap.problem() is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("bubblewrap cannot make a sandbox here, and CI needs it: apt-get install bubblewrap")
        pytest.skip("bubblewrap cannot make a sandbox here (apt-get install bubblewrap)")
    return bwrap


SESSION_A = (
    "```python\n"
    "import os, json\n"
    "from ipykernel.connect import get_connection_file\n"
    f"open('a.txt', 'w').write({A_SECRET!r})\n"
    "x = get_weather(city=json.dumps({'cwd': os.getcwd(), 'connection_file': get_connection_file()}))\n"
    "print(x)\n"
    "```"
)


def probe(targets: dict[str, Any]) -> str:
    """A program that tries what it should not; ``targets`` are paths and pids outside it."""
    return (
        "```python\n"
        "import os, sys, json, glob, socket, subprocess, ctypes, re\n"
        f"t = json.loads({json.dumps(json.dumps(targets))})\n"
        "r = {}\n"
        "def attempt(name, fn):\n"
        "    try:\n"
        "        r[name] = ['ok', str(fn())[:200]]\n"
        "    except BaseException as e:\n"
        "        r[name] = ['refused', type(e).__name__]\n"
        "def each_proc(name):\n"
        "    out = []\n"
        "    for pid in os.listdir('/proc'):\n"
        "        if pid.isdigit():\n"
        "            try:\n"
        "                out.append(open(f'/proc/{pid}/{name}', 'rb').read())\n"
        "            except OSError:\n"
        "                pass\n"
        "    return out\n"
        "from ipykernel.connect import get_connection_file\n"
        "own = get_connection_file()\n"
        "own_run = os.path.dirname(own)\n"
        "r['own_connection_file'] = own\n"
        "procs = [c.replace(b'\\0', b' ').decode() for c in each_proc('cmdline')]\n"
        "r['kernels_seen'] = len({m for c in procs for m in re.findall(r'/([0-9a-f]{32})/kernel.json', c)})\n"
        "r['others_seen'] = [c[:80] for c in procs if own_run not in c]\n"
        "r['environ_names'] = sorted({v.split(b'=', 1)[0].decode() for e in each_proc('environ') "
        "for v in e.split(b'\\0') if v})\n"
        "for name, pid in t['pids'].items():\n"
        "    attempt('signal_' + name, lambda: os.kill(pid, 0))\n"
        "    attempt('environ_' + name, lambda: open(f'/proc/{pid}/environ', 'rb').read())\n"
        "attempt('other_connection_file', lambda: open(t['other_connection_file']).read())\n"
        "others = lambda: [p for p in glob.glob(t['run_glob']) if os.path.dirname(p) != own_run]\n"
        "attempt('any_connection_file', lambda: others() or 1 / 0)\n"
        "attempt('other_workdir', lambda: os.listdir(t['other_workdir']))\n"
        "attempt('other_session_file', lambda: open(t['other_workdir'] + '/a.txt').read())\n"
        "attempt('config_file', lambda: open(t['config_file']).read())\n"
        "attempt('store_dir', lambda: os.listdir(t['store_dir']))\n"
        "attempt('store_file', lambda: open(t['store_file'], 'rb').read())\n"
        "attempt('shadow', lambda: open('/etc/shadow').read())\n"
        "attempt('root_ssh', lambda: os.listdir('/root/.ssh'))\n"
        "def connect(path):\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.connect(path)\n"
        "for i, path in enumerate(t['other_sockets']):\n"
        "    attempt(f'other_socket_{i}', lambda: connect(path))\n"
        "attempt('redis_tcp', lambda: socket.create_connection(('127.0.0.1', t['redis_port']), timeout=2))\n"
        "attempt('proxy_tcp', lambda: socket.create_connection(('127.0.0.1', t['proxy_port']), timeout=2))\n"
        "attempt('write_usr', lambda: open('/usr/cablectl-probe', 'w'))\n"
        "attempt('write_root', lambda: open('/cablectl-probe', 'w'))\n"
        "attempt('write_venv', lambda: open(os.path.join(sys.prefix, 'cablectl-probe.pth'), 'w'))\n"
        "attempt('write_passwd', lambda: open('/etc/passwd', 'a'))\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "attempt('new_user_namespace', lambda: libc.unshare(0x10000000) == 0 or 1 / 0)\n"
        "try:\n"
        "    open(t['provider_root'] + '/probe', 'w').write('x')  # its private tmpfs, if anything\n"
        "except OSError:\n"
        "    pass\n"
        "open('/tmp/cablectl-probe-tmp', 'w').write('x')\n"
        f"subprocess.Popen(['sleep', '{MARKER}'], start_new_session=True)\n"
        "get_weather(city=json.dumps(r))\n"
        "```"
    )


def processes_naming(needle: str) -> dict[int, list[str]]:
    """Live processes (as the host sees them) whose command line contains ``needle``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(needle.encode() in arg for arg in argv):
            found[int(entry.name)] = [arg.decode(errors="replace") for arg in argv]
    return found


def sleepers() -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"sleep {MARKER}"], capture_output=True, text=True, check=False)
    return out.stdout.split()


@dataclass
class Target:
    """The proxy under probe."""

    url: str
    pid: int
    config_file: Path


def run_probe(target: Target, upstream: ScriptedUpstream, store: PersistentRedis) -> dict[str, Any]:
    with openai.OpenAI(base_url=target.url + "/v1", api_key="x", max_retries=0) as client:
        # session A: a program that wrote a file and waits for a client tool holds its kernel
        upstream.plan(program(SESSION_A))
        a = report_of(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}], tools=WEATHER
            )
        )
        # A's kernel as the host sees it: its processes, connection file, sockets
        a_processes = processes_naming(a["connection_file"])
        [a_kernel] = [pid for pid, argv in a_processes.items() if argv[1:3] == ["-m", "ipykernel_launcher"]]
        a_sandbox = [pid for pid in a_processes if pid != a_kernel]  # bwrap and its init, if sandboxed
        connection = json.loads(Path(a["connection_file"]).read_text())
        run_dir = Path(a["connection_file"]).parent
        provider_runtime = run_dir.parent  # the kernels' runtime files (in memory where it can)
        provider_root = Path(a["cwd"]).parents[1]  # the provider's own: work/<kernel>
        sockets = [f"{connection['ip']}-{connection['shell_port']}"]
        sockets += [str(p) for p in run_dir.glob("sandbox/ipc-*")]  # where a sandboxed kernel made them
        store_files = [p for p in glob.glob(f"{store.dir}/**", recursive=True) if os.path.isfile(p)]
        assert store_files and all(os.path.exists(s) for s in sockets)
        targets = {
            "pids": {
                "proxy": target.pid,
                "other_kernel": a_kernel,
                **{f"other_sandbox_{i}": pid for i, pid in enumerate(a_sandbox)},
            },
            "other_connection_file": a["connection_file"],
            "other_sockets": sockets,
            "run_glob": str(provider_runtime / "*" / "kernel.json"),
            "other_workdir": a["cwd"],
            "config_file": str(target.config_file),
            "store_dir": str(store.dir),
            "store_file": store_files[0],
            "redis_port": store.port,
            "proxy_port": int(target.url.rsplit(":", 1)[1]),
            "provider_root": str(provider_root),
        }
        upstream.plan(program(probe(targets)))
        report = report_of(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "b"}], tools=WEATHER
            )
        )
        report["targets"] = targets
        report["host_tmp_written"] = os.path.exists("/tmp/cablectl-probe-tmp")
        report["host_root_written"] = os.path.exists(provider_root / "probe")
        # both sessions go idle, and their kernels are released (session_idle_seconds: 1)
        deadline = time.monotonic() + 30
        while (
            processes_naming(a["connection_file"]) or processes_naming(report["own_connection_file"])
        ) and (time.monotonic() < deadline):
            time.sleep(0.2)
        time.sleep(0.5)
        report["released"] = not processes_naming(a["connection_file"])
        report["sleepers_left"] = sleepers()
        for pid in report["sleepers_left"]:
            subprocess.run(["kill", "-9", pid], check=False)
        return report


def proxy_config(upstream_url: str, store: PersistentRedis, sandbox: str) -> dict[str, Any]:
    return {
        "model_list": upstream_models(upstream_url),
        "kernels": {"min_idle": 1, "max_total": 3, "sandbox": sandbox, "session_idle_seconds": 1},
        "sessions": {"redis_url": store.url, "secret": "s" * 32},
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PersistentRedis]:
    """The session store, its data on disk (append-only file) as in production."""
    if shutil.which("redis-server") is None and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("redis-server is not installed")
    (tmp_path / "redis").mkdir()
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


REFUSED = [
    "signal_proxy",
    "environ_proxy",
    "signal_other_kernel",
    "environ_other_kernel",
    "other_connection_file",
    "any_connection_file",
    "other_workdir",
    "other_session_file",
    "config_file",
    "store_dir",
    "store_file",
    "shadow",
    "root_ssh",
    "redis_tcp",
    "proxy_tcp",
    "write_usr",
    "write_root",
    "write_venv",
    "write_passwd",
]


def assert_nothing_reached(report: dict[str, Any]) -> None:
    sandbox_pids = [k for k in report["targets"]["pids"] if k.startswith("other_sandbox_")]
    assert sandbox_pids  # the sandboxed kernel's bwrap is a target too
    names = REFUSED + [f"{kind}_{k}" for k in sandbox_pids for kind in ("signal", "environ")]
    names += [f"other_socket_{i}" for i in range(len(report["targets"]["other_sockets"]))]
    reached = {name: report[name] for name in names if report[name][0] != "refused"}
    assert reached == {}
    assert report["kernels_seen"] == 1  # itself only (bwrap and its kernel): not A's, not the pool's
    assert report["others_seen"] == []  # no process but its own: no proxy, no other kernel
    assert set(report["environ_names"]) <= KERNEL_ENV  # every environ it can read is a kernel's own
    if Bubblewrap.find() is not None and Bubblewrap.find().disable_userns:  # type: ignore[union-attr]
        assert report["new_user_namespace"][0] == "refused"
    assert report["host_tmp_written"] is False  # its /tmp is its own
    assert report["host_root_written"] is False
    assert report["released"] and report["sleepers_left"] == []  # nothing outlives its kernel


def test_a_sandboxed_program_reaches_nothing_outside_its_kernel(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream, store: PersistentRedis
) -> None:
    working_bwrap()
    make = ProxyLauncher(tmp_path)
    with make.in_process(proxy_config(upstream_url, store, "auto")) as target:
        report = run_probe(target, upstream, store)
    assert_nothing_reached(report)


def test_as_an_unprivileged_user_too(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream, store: PersistentRedis
) -> None:
    """``cablectl serve`` as uid 65534 (bwrap then runs without privilege, as in the Docker image)."""
    working_bwrap()
    make = ProxyLauncher(tmp_path)
    with make.as_user(NOBODY, proxy_config(upstream_url, store, "auto")) as target:
        report = run_probe(target, upstream, store)
    assert_nothing_reached(report)


def test_without_the_sandbox_the_same_probe_finds_them(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream, store: PersistentRedis
) -> None:
    """The probe works: unsandboxed (as root) it sees other kernels and their files."""
    if os.geteuid() != 0:
        pytest.skip("the unsandboxed comparison assumes root, as in CI")
    make = ProxyLauncher(tmp_path)
    with make.in_process(proxy_config(upstream_url, store, "none")) as target:
        report = run_probe(target, upstream, store)
    os.remove("/tmp/cablectl-probe-tmp")
    assert report["kernels_seen"] > 1 and report["others_seen"]
    for name in ("other_connection_file", "other_workdir", "other_session_file", "config_file", "store_file"):
        assert report[name][0] == "ok", name
    assert report["signal_other_kernel"][0] == "ok" and report["other_socket_0"][0] == "ok"
    assert report["released"] and report["sleepers_left"]  # its process outlived its kernel


class ProxyLauncher:
    """The proxy under probe: in this process (as the tests' make_proxy), or ``cablectl serve``
    as another user."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    @contextlib.contextmanager
    def in_process(self, config: dict[str, Any]) -> Iterator[Target]:
        from proxy.app import create_app
        from proxy.config import load_settings
        from tests.servers import UvicornThread

        path = write_config(self.tmp_path, config)
        with UvicornThread(create_app(load_settings(path, env={}))) as server:
            yield Target(server.url, os.getpid(), path)

    @contextlib.contextmanager
    def as_user(self, uid: int, config: dict[str, Any]) -> Iterator[Target]:
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("running the proxy as another user needs root and setpriv")
        home = Path(tempfile.mkdtemp(prefix="cablectl-unprivileged-"))
        try:
            os.chown(home, uid, uid)
            path = write_config(home, config)
            os.chmod(path, 0o600)
            os.chown(path, uid, uid)
            drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(home),
                "OPENAI_API_KEY": "sk-unprivileged-proxy-secret",
                "CABLECTL_LOG_LEVEL": "warning",
            }
            python = Path(sys.base_prefix)
            readable = subprocess.run([*drop, "test", "-x", str(python / "bin")], env=env, check=False)
            if readable.returncode != 0:
                pytest.skip(
                    f"uid {uid} cannot reach this Python ({python}), so no sandbox it makes can hold it"
                )
            check = (
                "from proxy.kernels.sandbox import Bubblewrap as B; b = B.find(); print(b and b.problem())"
            )
            can = subprocess.run(
                [*drop, sys.executable, "-c", check], env=env, capture_output=True, text=True
            )
            if can.stdout.strip() != "None":
                pytest.skip(f"bubblewrap cannot make a sandbox as uid {uid} here: {can.stdout}{can.stderr}")
            port = free_port()
            cablectl = str(Path(sys.executable).parent / "cablectl")
            log = open(home / "serve.log", "wb")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(
                [*drop, cablectl, "serve", "--config", str(path), "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 60
                while True:
                    assert proc.poll() is None, (home / "serve.log").read_text()
                    with contextlib.suppress(httpx.TransportError):
                        if httpx.get(url + "/ready", timeout=1).status_code == 200:
                            break
                    assert time.monotonic() < deadline, "cablectl serve did not become ready"
                    time.sleep(0.2)
                yield Target(url, proc.pid, path)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                log.close()
        finally:
            shutil.rmtree(home, ignore_errors=True)


# --- inside one sandbox ------------------------------------------------------------------------


def test_the_sandbox_mounts_nothing_it_shows_already(tmp_path: Path) -> None:
    """No directory is bound inside another that is bound (its files are there already), the
    Python installation and the venv are all there, and /etc/localtime, a link into /usr on the
    host, is the same link inside (no mount for it either)."""
    argv = Bubblewrap("bwrap").argv(str(tmp_path / "w"), str(tmp_path / "r"), network=False)
    binds = [Path(argv[i + 2]) for i, arg in enumerate(argv) if arg in ("--ro-bind", "--ro-bind-try")]
    dirs = [b for b in binds if b.is_dir()]
    for path in binds:
        assert not any(path != d and path.is_relative_to(d) for d in dirs), path
    for needed in (sys.base_prefix, sys.prefix, Path(sys.executable).resolve().parent):
        assert any(Path(needed).is_relative_to(b) for b in binds), needed
    localtime = Path("/etc/localtime")
    if localtime.is_symlink() and localtime.resolve().is_relative_to("/usr"):
        assert argv[argv.index("/etc/localtime") - 2] == "--symlink"
        assert argv[argv.index("/etc/localtime") - 1] == str(localtime.resolve())


@pytest.mark.anyio
async def test_inside_a_sandbox() -> None:
    """Its own user, host name, capped memory filesystems, no capabilities, and the usual tools."""
    bwrap = working_bwrap()
    provider = LocalKernelProvider(sandbox=bwrap, limits=ResourceLimits(memory_bytes=768 << 20))
    async with KernelPool(provider, min_idle=1, max_total=1, limits=ExecLimits(timeout=30)) as pool:
        kernel = await pool.acquire("s")
        done = await kernel.execute(
            "import os, getpass, socket, json, multiprocessing, hashlib\n"
            "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
            "fs = lambda p: os.statvfs(p).f_blocks * os.statvfs(p).f_frsize\n"
            "with multiprocessing.Pool(2) as p:\n"
            "    squares = p.starmap(pow, [(2, 2), (3, 2)])\n"
            "print(json.dumps({'uid': os.getuid(), 'user': getpass.getuser(), 'host': socket.gethostname(),\n"
            "    'home': os.path.expanduser('~') == os.getcwd(), 'tmp': fs('/tmp'), 'shm': fs('/dev/shm'),\n"
            "    'caps': status['CapEff'].strip(), 'bounding': status['CapBnd'].strip(),\n"
            "    'no_new_privs': status['NoNewPrivs'].strip(), 'squares': squares,\n"
            "    'localhost': socket.gethostbyname('localhost'),\n"
            "    'localtime': hashlib.sha256(open('/etc/localtime', 'rb').read()).hexdigest()\n"
            "        if os.path.exists('/etc/localtime') else None}))"
        )
        assert isinstance(done, Finished) and done.output.error is None, done
        seen = json.loads(done.output.stdout)
        await pool.release(kernel)
    await provider.aclose()
    assert seen == {
        "uid": 1000,
        "user": "sandbox",
        "host": "sandbox",
        "home": True,
        "tmp": 768 << 20,  # tmpfs is memory: capped at the memory limit
        "shm": 768 << 20,
        "caps": "0000000000000000",
        "bounding": "0000000000000000",
        "no_new_privs": "1",
        "squares": [4, 9],
        "localhost": "127.0.0.1",
        "localtime": host_localtime(),
    }


def host_localtime() -> str | None:
    """What a kernel should find at /etc/localtime: the host's time zone file, or none."""
    path = Path("/etc/localtime")
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.mark.anyio
async def test_a_program_cannot_point_the_proxy_at_another_socket(tmp_path: Path) -> None:
    """A program replaces its socket files with symlinks to a unix socket on the host and ends its
    kernel: the proxy's reconnections go to the sockets it linked, never to that one."""
    bwrap = working_bwrap()
    os.chmod(tmp_path, 0o755)
    host_socket = tmp_path / "elsewhere.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(host_socket))
    listener.listen(8)
    listener.settimeout(3)
    provider = LocalKernelProvider(sandbox=bwrap)
    kernel = await provider.start_kernel()
    try:
        await kernel.execute(
            "import os, json\n"
            "from ipykernel.connect import get_connection_file\n"
            "info = json.load(open(get_connection_file()))\n"
            "for name in ('shell_port', 'iopub_port', 'stdin_port', 'control_port', 'hb_port'):\n"
            "    path = f\"{info['ip']}-{info[name]}\"\n"
            "    os.unlink(path)\n"
            f"    os.symlink({str(host_socket)!r}, path)\n"
            "os._exit(0)\n"
        )
        with pytest.raises(TimeoutError):
            connection, _ = await asyncio.to_thread(listener.accept)
            connection.close()
    finally:
        listener.close()
        await kernel.shutdown()
        await provider.aclose()


# --- refusing to start -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fake_bwrap", "expected"),
    [
        pytest.param("auto", None, "bwrap is not installed", id="auto-not-installed"),
        pytest.param("bwrap", None, "bwrap is not installed", id="bwrap-not-installed"),
        pytest.param(
            "auto",
            'echo "bwrap: Can\'t mount proc on /newroot/proc: Operation not permitted" >&2; exit 1',
            "Can't mount proc on /newroot/proc",
            id="auto-docker-masked-proc",
        ),
        pytest.param(
            "bwrap",
            'echo "bwrap: No permissions to create new namespace" >&2; exit 1',
            "No permissions to create new namespace",
            id="bwrap-no-user-namespaces",
        ),
    ],
)
def test_where_bubblewrap_cannot_work_the_proxy_refuses_to_start_and_names_the_fix(
    tmp_path: Path,
    upstream_url: str,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    fake_bwrap: str | None,
    expected: str,
) -> None:
    from proxy.app import create_app
    from proxy.config import load_settings
    from proxy.errors import ConfigError

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if fake_bwrap is not None:  # a bwrap that fails the way it does where namespaces are refused
        fake = bin_dir / "bwrap"
        fake.write_text(f"#!/bin/sh\n{fake_bwrap}\n")
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir))
    cfg: dict[str, Any] = {"model_list": upstream_models(upstream_url), "kernels": {"sandbox": mode}}
    with pytest.raises(ConfigError) as info:
        create_app(load_settings(write_config(tmp_path, cfg), env={}))
    message = info.value.message
    assert f"kernels.sandbox is {mode!r}" in message and expected in message
    for fix in (
        "apt-get install bubblewrap",
        "systempaths=unconfined",
        "kernels.gateway_url",
        "kernels.sandbox: none",
    ):
        assert fix in message
    # none is possible, and says what it gives up
    cfg["kernels"] = {"sandbox": "none", "min_idle": 0}
    create_app(load_settings(write_config(tmp_path, cfg), env={}))


def test_the_sandbox_is_on_by_default(make_proxy: ProxyFactory, upstream_url: str) -> None:
    working_bwrap()
    server = make_proxy({"model_list": upstream_models(upstream_url), "kernels": {"min_idle": 0}})
    provider = server.server.config.app.state.pool.provider
    assert isinstance(provider, LocalKernelProvider) and provider.sandbox is not None


def test_config_yaml_keeps_the_sandbox_on() -> None:
    config = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    assert config.get("kernels", {}).get("sandbox", "auto") == "auto"
