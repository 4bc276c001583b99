"""The kernel pool with real ipykernels (and a real Kernel Gateway): execution, limits,
the tool back-channel, isolation, and no process left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from proxy.kernels import ExecLimits, Finished, KernelDied, KernelPool, Pending, PoolExhausted
from proxy.kernels.gateway import GatewayKernelProvider
from proxy.kernels.local import LocalKernelProvider, ResourceLimits, _ChannelKernel
from proxy.kernels.sandbox import Bubblewrap
from tests.servers import free_port
from translators.kernel_stubs import render_kernel_stubs
from translators.tools import Toolset

pytestmark = pytest.mark.anyio

LIMITS = ExecLimits(timeout=3.0, max_output_chars=20_000, grace=2.0)


@pytest.fixture(params=["none", "bwrap"])
def sandbox(request: pytest.FixtureRequest) -> Bubblewrap | None:
    """Every local-kernel test runs unsandboxed and in bubblewrap sandboxes."""
    if request.param == "none":
        return None
    bwrap = Bubblewrap.find()
    if bwrap is None or bwrap.problem() is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("bubblewrap cannot make a sandbox here, and CI needs it: apt-get install bubblewrap")
        pytest.skip("bubblewrap cannot make a sandbox here (apt-get install bubblewrap)")
    return bwrap


WEATHER = Toolset.from_openai(
    [
        {
            "type": "function",
            "function": {
                "name": "get.weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def processes_under(root: Path) -> list[int]:
    """Live processes whose command line names a path under ``root``: every kernel's does (its
    connection file), sandboxed or not, and so do bwrap and its init."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(root).encode() in cmdline and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def gone_within(root: Path, seconds: float, pids: list[int] | None = None) -> bool:
    """Whether every process naming a path under ``root`` (and each of ``pids``) ends within
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while (any(alive(p) for p in pids or []) or processes_under(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids or []) and processes_under(root) == []


def assert_reaped(provider: LocalKernelProvider) -> None:
    assert provider.started_pids, "no kernel was started"
    gone_within(provider.root, 10, provider.started_pids)
    assert [p for p in provider.started_pids if alive(p)] == []
    assert processes_under(provider.root) == []  # nothing inside a sandbox either


@contextlib.asynccontextmanager
async def local_pool(
    sandbox: Bubblewrap | None, **kwargs: object
) -> AsyncIterator[tuple[KernelPool, LocalKernelProvider]]:
    provider = LocalKernelProvider(limits=kwargs.pop("limits", None), sandbox=sandbox)  # type: ignore[arg-type]
    pool = KernelPool(provider, limits=LIMITS, **kwargs)  # type: ignore[arg-type]
    try:
        async with pool:
            yield pool, provider
    finally:
        assert_reaped(provider)
        assert not provider.root.exists()


async def run_to_end(kernel: object, code: str, answer: object = None) -> Finished:
    result = await kernel.execute(code)  # type: ignore[attr-defined]
    while isinstance(result, Pending):
        result = await kernel.reply(answer(result.request) if callable(answer) else answer)  # type: ignore[attr-defined]
    return result


async def test_sequential_and_concurrent_sessions(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=2, max_total=4) as (pool, _):
        kernel = await pool.acquire("one")
        first = await run_to_end(kernel, "x = 20")
        second = await run_to_end(kernel, "print(x + 1)\nx * 2")
        assert first.output.error is None
        assert second.output.stdout == "21\n" and second.output.results == ["40"]
        await pool.release(kernel)

        async def session(n: int) -> str:
            k = await pool.acquire(f"s{n}")
            try:
                await run_to_end(k, f"value = {n}")
                done = await run_to_end(k, "print(value * 10)")
                return done.output.stdout.strip()
            finally:
                await pool.release(k)

        assert await asyncio.gather(*(session(n) for n in range(4))) == ["0", "10", "20", "30"]
        assert pool.stats().busy == 0 and pool.waiting == 0


async def test_a_tool_call_right_after_start_is_not_lost(
    sandbox: Bubblewrap | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel routes each input_request to our stdin socket by identity, and drops it if
    that socket has not connected yet; a kernel is ready only once it has. Our stdin socket
    retrying late (1.5 s, where ZeroMQ's default is 0.1 s) makes the race certain."""
    monkeypatch.setattr(_ChannelKernel, "STDIN_RECONNECT_IVL_MS", 1500)
    async with local_pool(sandbox, min_idle=0, max_total=1) as (pool, _):
        kernel = await pool.acquire("s")
        assert (await run_to_end(kernel, render_kernel_stubs(WEATHER))).output.error is None
        result = await kernel.execute("print(get_weather('Paris'))")
        assert isinstance(result, Pending), result.output
        done = await kernel.reply({"t": 21})
        assert isinstance(done, Finished) and done.output.stdout == "{'t': 21}\n"
        await pool.release(kernel)


async def test_back_channel_three_calls_in_a_loop(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=1, max_total=2) as (pool, _):
        kernel = await pool.acquire("s")
        assert (await run_to_end(kernel, render_kernel_stubs(WEATHER))).output.error is None
        seen = []
        result = await kernel.execute(
            "temps = []\nfor c in ['Paris', 'Rome', 'Oslo']:\n    temps.append(get_weather(c)['t'])\nprint(sum(temps))"
        )
        while isinstance(result, Pending):
            seen.append(result.request)
            result = await kernel.reply({"t": len(result.request.arguments["city"])})
        assert [(r.id, r.tool, r.arguments) for r in seen] == [
            (1, "get.weather", {"city": "Paris"}),
            (2, "get.weather", {"city": "Rome"}),
            (3, "get.weather", {"city": "Oslo"}),
        ], result.output
        assert result.output.stdout == "13\n" and result.output.tool_calls == 3
        # a failed call raises ToolError in the program, which can handle it
        failed = await kernel.execute(
            "try:\n    get_weather('X', unit='k')\nexcept ToolError as e:\n    print('no:', e)"
        )
        assert isinstance(failed, Pending) and failed.request.arguments == {"city": "X", "unit": "k"}
        done = await kernel.reply(error="unknown unit 'k'")
        assert isinstance(done, Finished) and done.output.stdout == "no: unknown unit 'k'\n"
        # a bare input() is answered empty: nobody is there to type
        bare = await run_to_end(kernel, "print(repr(input('name? ')))")
        assert bare.output.stdout == "''\n"
        await pool.release(kernel)


async def test_errors_and_rich_output(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=1, max_total=2) as (pool, _):
        kernel = await pool.acquire("s")
        failed = await run_to_end(kernel, "import sys\nprint('before')\nprint('oops', file=sys.stderr)\n1/0")
        assert failed.output.stdout == "before\n" and failed.output.stderr == "oops\n"
        assert failed.output.error is not None and failed.output.error.ename == "ZeroDivisionError"
        assert "\x1b[" not in failed.output.error.traceback and "1/0" in failed.output.error.traceback
        shown = await run_to_end(
            kernel,
            "from IPython.display import display, Image\n"
            "display(Image(data=b'\\x89PNG\\r\\n\\x1a\\n' + bytes(20), format='png'))\n'done'",
        )
        assert shown.output.results[-1] == "'done'" and "image/png" in shown.output.images[0]
        await pool.release(kernel)


async def test_infinite_loop_is_interrupted(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=1, max_total=2) as (pool, _):
        kernel = await pool.acquire("s")
        result = await run_to_end(kernel, "while True:\n    pass")
        assert result.output.error is not None and result.output.error.ename == "TimeoutError"
        assert result.output.duration_ms >= 3000
        assert (await run_to_end(kernel, "print('still here')")).output.stdout == "still here\n"
        await pool.release(kernel)


async def test_time_waiting_for_tools_does_not_count(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=1, max_total=2) as (pool, _):
        kernel = await pool.acquire("s")
        await run_to_end(kernel, render_kernel_stubs(WEATHER))
        pending = await kernel.execute("print(get_weather('a'))")
        assert isinstance(pending, Pending)
        await asyncio.sleep(LIMITS.timeout + 0.5)  # the client takes its time
        done = await kernel.reply({"t": 1})
        assert isinstance(done, Finished) and done.output.error is None
        await pool.release(kernel)


async def test_uninterruptible_cell_kills_the_kernel(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=1, max_total=2) as (pool, _):
        kernel = await pool.acquire("s")
        with pytest.raises(KernelDied, match="did not stop"):
            await run_to_end(
                kernel, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
            )
        assert kernel.retired and pool.stats().replaced_dead == 1
        await pool.wait_ready(1)  # replaced


async def test_huge_output_is_capped(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=1, max_total=2) as (pool, _):
        kernel = await pool.acquire("s")
        result = await run_to_end(kernel, "for _ in range(100):\n    print('x' * 1_000_000)")  # 100 MB
        assert result.output.truncated
        assert len(result.output.stdout) <= LIMITS.max_output_chars
        assert result.output.error is not None and result.output.error.ename == "OutputLimitExceeded"
        assert (await run_to_end(kernel, "print(1)")).output.stdout == "1\n"
        await pool.release(kernel)


SLOW_INTERRUPTS = """
import time
_kernel = get_ipython().kernel
_signal_itself = _kernel._send_interrupt_children
def _late():  # on the control thread, as ipykernel handles an interrupt_request
    time.sleep(1.0)
    _signal_itself()
_kernel._send_interrupt_children = _late
"""


async def test_late_interrupt_does_not_reach_the_next_cell(sandbox: Bubblewrap | None) -> None:
    """A cell that ended by itself as its limit tripped: the interrupt, sent by message, lands
    in the kernel a second later; the next cell must not get it (it once lost its reply)."""
    async with local_pool(sandbox, min_idle=1, max_total=2) as (pool, _):
        kernel = await pool.acquire("s")
        assert (await run_to_end(kernel, SLOW_INTERRUPTS)).output.error is None
        burst = await run_to_end(kernel, "print('x' * 300_000)")  # past 10x the limit, then done
        assert burst.output.error is not None and burst.output.error.ename == "OutputLimitExceeded"
        after = await run_to_end(kernel, "import time\ntime.sleep(1.5)\nprint(1)")
        assert after.output.error is None and after.output.stdout == "1\n"
        await pool.release(kernel)


async def test_a_cell_the_kernel_aborts_is_an_error(sandbox: Bubblewrap | None) -> None:
    """ipykernel does not run a request queued behind one that failed (stop_on_error); its
    reply says ``aborted``, which must not read as a cell that ran and printed nothing."""
    async with local_pool(sandbox, min_idle=1, max_total=2) as (pool, _):
        kernel = await pool.acquire("s")
        await kernel.connection.execute("import time\ntime.sleep(0.5)\n1/0")  # not waited for
        aborted = await run_to_end(kernel, "print(1)")
        assert aborted.output.stdout == ""
        assert aborted.output.error is not None and aborted.output.error.ename == "CellAborted"
        assert (await run_to_end(kernel, "print(2)")).output.stdout == "2\n"  # the kernel goes on
        await pool.release(kernel)


async def test_cell_that_kills_its_kernel(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=1, max_total=2) as (pool, _):
        kernel = await pool.acquire("s")
        with pytest.raises(KernelDied, match="died"):
            await run_to_end(kernel, "import os\nos._exit(3)")
        assert pool.stats().replaced_dead == 1
        other = await pool.acquire("t")
        assert (await run_to_end(other, "print(2)")).output.stdout == "2\n"
        await pool.release(other)


async def test_sessions_are_isolated_even_after_reuse(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=1, max_total=1) as (pool, _):
        a = await pool.acquire("A")
        done = await run_to_end(
            a, "secret = 42\nopen('a.txt', 'w').write('A')\nimport os\nprint(os.getcwd())"
        )
        a_dir = done.output.stdout.strip()
        await pool.release(a)
        for _ in range(2):  # the one kernel slot is used again, by another session
            b = await pool.acquire("B")
            seen = await run_to_end(
                b, "import os\nprint('secret' in globals(), os.path.exists('a.txt'), os.getcwd())"
            )
            in_globals, has_file, cwd = seen.output.stdout.split()
            assert (in_globals, has_file) == ("False", "False") and cwd != a_dir
            await pool.release(b)
        assert not await asyncio.to_thread(Path(a_dir).exists)  # A's working directory went with its kernel


async def test_a_start_cancelled_at_any_moment_leaves_nothing(sandbox: Bubblewrap | None) -> None:
    """A kernel start cancelled at any moment (a pool closing, a client gone) leaves no process
    behind: a fork server's keeper killed while bwrap was still making the sandbox once left
    bwrap's sandbox side waiting forever for its other half (bwrap arms its death signal after)."""
    provider = LocalKernelProvider(sandbox=sandbox)
    try:
        await (await provider.start_kernel()).shutdown()  # the fork server is up from here on
        for delay in [i * 0.0005 for i in range(60)]:
            start = asyncio.create_task(provider.start_kernel())
            await asyncio.sleep(delay)
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await (await start).shutdown()  # it was ready before the cancel
            assert await asyncio.to_thread(gone_within, provider.root, 10.0)
    finally:
        await provider.aclose()
    assert_reaped(provider)


async def test_environment_is_scrubbed(sandbox: Bubblewrap | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    monkeypatch.setenv("CABLECTL_SECRET_TEST", "hunter2")
    async with local_pool(sandbox, min_idle=1, max_total=1) as (pool, _):
        kernel = await pool.acquire("s")
        result = await run_to_end(
            kernel, "import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())"
        )
        names, home_is_cwd = result.output.stdout.splitlines()
        assert "OPENAI_API_KEY" not in names and "CABLECTL_SECRET_TEST" not in names
        assert "sk-must-not-leak" not in result.output.stdout
        assert home_is_cwd == "True"
        await pool.release(kernel)


async def test_resource_limits(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=1, max_total=1, limits=ResourceLimits(memory_bytes=1 << 30)) as (
        pool,
        _,
    ):
        kernel = await pool.acquire("s")
        result = await run_to_end(
            kernel,
            "import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0])\nb = bytearray(2 << 30)",
        )
        assert result.output.stdout == f"{1 << 30}\n"
        assert result.output.error is not None and result.output.error.ename == "MemoryError"
        await pool.release(kernel)


async def test_exhaustion_is_a_503(sandbox: Bubblewrap | None) -> None:
    async with local_pool(sandbox, min_idle=1, max_total=1, acquire_timeout=0.5) as (pool, _):
        await pool.wait_ready()
        kernel = await pool.acquire("s")
        with pytest.raises(PoolExhausted) as info:
            await pool.acquire("t")
        assert info.value.http_status == 503 and "max_total" in info.value.message
        await pool.release(kernel)
        await pool.wait_ready(1)  # the retired kernel's slot is refilled with a fresh kernel
        other = await pool.acquire("t")
        await pool.release(other)


async def test_waiters_are_served_first_come_first_served(sandbox: Bubblewrap | None) -> None:
    """A kernel that becomes ready goes to the acquire that has waited longest, even when a later
    one runs first (here: woken by the same start finishing), and a cancelled waiter's turn
    passes on without losing a kernel."""
    async with local_pool(sandbox, min_idle=0, max_total=1, acquire_timeout=60) as (pool, provider):
        finished = asyncio.Event()
        real_start = provider.start_kernel

        async def start_kernel() -> object:
            connection = await real_start()
            finished.set()  # wakes the late acquire below before the pool has the kernel
            return connection

        provider.start_kernel = start_kernel  # type: ignore[method-assign]
        first = await pool.acquire("first")
        order: list[str] = []

        async def take(name: str, after: asyncio.Event | None = None) -> None:
            if after is not None:
                await after.wait()
            kernel = await pool.acquire(name)
            order.append(name)
            await pool.release(kernel)

        early = asyncio.create_task(take("early"))
        gone = asyncio.create_task(take("gone"))
        await asyncio.sleep(0.05)
        assert pool.waiting == 2
        finished.clear()
        late = asyncio.create_task(take("late", after=finished))
        gone.cancel()
        await pool.release(first)
        await asyncio.wait_for(asyncio.gather(early, late), 60)
        assert order == ["early", "late"] and gone.cancelled()
        assert pool.stats().busy == 0 and pool.waiting == 0


async def test_no_orphans_after_cancellation(sandbox: Bubblewrap | None) -> None:
    provider = LocalKernelProvider(sandbox=sandbox)
    pool = KernelPool(provider, min_idle=2, max_total=3, limits=ExecLimits(timeout=60))
    await pool.start()
    await pool.wait_ready(1)
    kernel = await pool.acquire("s")
    task = asyncio.create_task(kernel.execute("import time\ntime.sleep(60)"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    starting = asyncio.create_task(pool.acquire("t"))  # may be waiting on a start
    await asyncio.sleep(0.05)
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError, PoolExhausted):
        await starting
    await pool.aclose()  # busy, idle and starting kernels all go
    assert_reaped(provider)


# --- remote kernels ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_gateway() -> Iterator[str]:
    """A real Jupyter Kernel Gateway on loopback, started with a scrubbed environment."""
    port = free_port()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kernel_gateway",
            "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={port}",
            "--KernelGatewayApp.list_kernels=True",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the kernel gateway exited"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/api", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the kernel gateway did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_gateway_kernels_back_channel_and_limits(
    kernel_gateway: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    provider = GatewayKernelProvider(
        kernel_gateway, env={"KERNEL_USERNAME": "cablectl", "OPENAI_API_KEY": "sk-must-not-leak"}
    )
    async with KernelPool(provider, min_idle=1, max_total=2, limits=LIMITS) as pool:
        kernel = await pool.acquire("s")
        assert (await run_to_end(kernel, render_kernel_stubs(WEATHER))).output.error is None
        calls = []
        done = await run_to_end(
            kernel,
            "import os\nprint([get_weather(c)['t'] for c in 'ab'], 'OPENAI_API_KEY' in os.environ)",
            lambda request: calls.append(request) or {"t": request.arguments["city"].upper()},
        )
        assert [c.arguments for c in calls] == [{"city": "a"}, {"city": "b"}]
        assert done.output.stdout == "['A', 'B'] False\n"
        looped = await run_to_end(kernel, "while True:\n    pass")  # interrupted on the control channel
        assert looped.output.error is not None and looped.output.error.ename == "TimeoutError"
        await pool.release(kernel)
    assert len(provider.started_ids) >= 2
    async with httpx.AsyncClient() as client:  # every kernel the pool created is gone from the gateway
        for kernel_id in provider.started_ids:
            assert (await client.get(f"{kernel_gateway}/api/kernels/{kernel_id}")).status_code == 404


HOLDER = """
import asyncio, sys
from proxy.kernels.local import LocalKernelProvider
from proxy.kernels.sandbox import Bubblewrap

async def main():
    sandbox = Bubblewrap.find() if sys.argv[1] == "bwrap" else None
    provider = LocalKernelProvider(sandbox=sandbox, start=sys.argv[2], network=False)
    kernels = [await provider.start_kernel() for _ in range(2)]
    print("ready", provider.root, provider.runtime, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (by parent links in /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_no_kernel_outlives_a_killed_proxy(sandbox: Bubblewrap | None, start: str) -> None:
    """SIGKILL to the process holding kernels (no cleanup runs): its fork server, kernels and
    sandboxes all go with it, and the next provider removes the directories it left."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, "bwrap" if sandbox else "none", start],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        start_new_session=False,
    )
    try:
        assert proc.stdout is not None
        ready, root, runtime = proc.stdout.readline().decode().split()
        assert ready == "ready" and Path(root, "work").is_dir() and Path(runtime).is_dir()
        below = descendants(proc.pid)
        # two kernels: processes (a fork server, keepers, kernels, sandboxes) well beyond one
        assert len(below) >= 2
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(running(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in below if running(pid)] == []
        provider = LocalKernelProvider(start="spawn")
        asyncio.run(provider.aclose())
        assert not Path(root).exists() and not Path(runtime).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_kernel_messages_are_checked_as_jupyter_client_checks_them_but_no_date_is_parsed() -> None:
    """The channels read messages with ``_deserialize``: a signed message reads as
    ``Session.deserialize`` reads it, except that its dates stay strings; an unsigned, forged or
    replayed one is refused (the channel skips it)."""
    from jupyter_client.session import Session

    from proxy.kernels.local import _deserialize

    sender, reader = Session(key=b"k" * 32), Session(key=b"k" * 32)
    frames = sender.serialize(sender.msg("stream", {"name": "stdout", "text": "hi"}))
    msg = _deserialize(reader, frames)
    theirs = Session(key=b"k" * 32).deserialize(sender.feed_identities(frames)[1])
    assert msg["content"] == theirs["content"] == {"name": "stdout", "text": "hi"}
    assert msg["msg_type"] == "stream" and msg["msg_id"] == theirs["msg_id"]
    assert isinstance(msg["header"]["date"], str)  # jupyter_client's is a datetime
    assert {k for k in msg["header"] if k != "date"} == {k for k in theirs["header"] if k != "date"}
    with pytest.raises(ValueError, match="duplicate"):
        _deserialize(reader, frames)  # the same message again: a replay
    forged = sender.serialize(sender.msg("stream", {"name": "stdout", "text": "x"}))
    forged[-1] = b'{"name": "stdout", "text": "forged"}'
    with pytest.raises(ValueError, match="invalid signature"):
        _deserialize(reader, forged)
    with pytest.raises(ValueError, match="unsigned"):
        _deserialize(reader, [b"<IDS|MSG>", b"", *forged[2:]])
    stranger = Session(key=b"s" * 32)
    with pytest.raises(ValueError, match="invalid signature"):
        _deserialize(reader, stranger.serialize(stranger.msg("stream", {})))
