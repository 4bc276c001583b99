"""The runtime under pool pressure: idle sessions give their kernels back ahead of demand.

Real ipykernels (forked or spawned, per --kernel-start), an in-process session store."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

import proxy.actions.runtime as runtime_module
from proxy.actions.runtime import KernelUnavailable, Runtime
from proxy.kernels import ExecLimits, Finished, KernelPool, Pending
from proxy.kernels.local import LocalKernelProvider
from proxy.sessions import InMemorySessionStore
from translators.tools import Toolset

pytestmark = pytest.mark.anyio

TOOLS = Toolset.from_openai(
    [{"type": "function", "function": {"name": "echo", "parameters": {"type": "object", "properties": {}}}}]
)


async def test_a_full_pool_takes_back_idle_sessions_kernels_before_they_are_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime_module, "HEADROOM_IDLE_SECONDS", 3600.0)
    provider = LocalKernelProvider(network=False)
    pool = KernelPool(provider, min_idle=1, max_total=2, limits=ExecLimits(timeout=30))
    runtime = Runtime(pool, InMemorySessionStore())
    try:
        async with pool:
            await pool.wait_ready(1, timeout=60)
            await runtime.kernel("old", TOOLS)
            runtime.done("old")
            await pool.wait_ready(1, timeout=60)
            await runtime.kernel("new", TOOLS)  # the pool is full now, with nothing ready
            assert pool.stats().idle + pool.stats().starting == 0
            runtime.done("new")
            await asyncio.sleep(0.05)
            assert set(runtime.live) == {"old", "new"}  # neither idle long enough: nobody is given back
            monkeypatch.setattr(runtime_module, "HEADROOM_IDLE_SECONDS", 0.0)
            runtime.done("new")  # another request of "new" ends: "old" is the least recently used
            for _ in range(100):
                if pool.stats().idle + pool.stats().starting:
                    break
                await asyncio.sleep(0.05)
            assert set(runtime.live) == {"new"}  # the least recently used idle session went
            assert pool.stats().idle + pool.stats().starting == 1  # and a fresh kernel is on its way
    finally:
        await runtime.aclose()
        await provider.aclose()


async def test_a_waiting_request_takes_a_finished_sessions_kernel_before_a_suspended_ones() -> None:
    """A full pool and a request waiting: the kernel given back is the one of a session whose
    program has finished, not of one suspended in a tool call (though that one was used longer
    ago), since that one would have to be replayed when its result comes."""
    provider = LocalKernelProvider(network=False)
    pool = KernelPool(provider, min_idle=0, max_total=2, limits=ExecLimits(timeout=30), acquire_timeout=60)
    runtime = Runtime(pool, InMemorySessionStore())
    try:
        async with pool:
            suspended = await runtime.kernel("suspended", TOOLS)
            suspended.waiting_call_id = "call_1"  # its program waits in a call to echo()
            runtime.done("suspended")
            await asyncio.sleep(0.01)
            await runtime.kernel("finished", TOOLS)
            runtime.done("finished")
            assert pool.total == 2 and pool.stats().idle == 0
            await asyncio.wait_for(runtime.kernel("new", TOOLS), 60)
            assert set(runtime.live) == {"suspended", "new"}
    finally:
        await runtime.aclose()
        await provider.aclose()


async def test_a_fresh_kernel_that_dies_being_set_up_is_replaced_once_then_a_503() -> None:
    """A kernel killed just before its session's stubs are installed: the session gets another
    kernel. Two in a row: a 503 the client can retry, not an internal error."""
    provider = LocalKernelProvider(network=False)
    pool = KernelPool(provider, min_idle=1, max_total=2, limits=ExecLimits(timeout=30), acquire_timeout=60)
    runtime = Runtime(pool, InMemorySessionStore())
    install = runtime._install
    killed: list[int] = []

    async def kill_then_install(kernel: Any, toolset: Toolset, kills: int) -> None:
        if len(killed) < kills:
            pid = kernel.connection.pid()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        await install(kernel, toolset)

    try:
        async with pool:
            runtime._install = lambda k, t: kill_then_install(k, t, 1)  # type: ignore[method-assign]
            live = await runtime.kernel("once", TOOLS)
            assert len(killed) == 1 and live.kernel.connection.pid() != killed[0]
            runtime.done("once")

            runtime._install = lambda k, t: kill_then_install(k, t, 3)  # type: ignore[method-assign]
            with pytest.raises(KernelUnavailable) as info:
                await runtime.kernel("twice", TOOLS)
            assert len(killed) == 3 and info.value.status == 503
            assert "twice" not in runtime.live
    finally:
        await runtime.aclose()
        await provider.aclose()


async def test_the_stubs_are_installed_as_one_literal_and_tracebacks_still_show_their_lines() -> None:
    """The stubs go in as one string literal (IPython need not tokenize them), compiled under
    ``STUBS_FILE``: the program sees the same names, and a failed tool call's traceback shows the
    stub's lines, as it did when the stubs were a cell of their own."""
    tools = Toolset.from_openai(
        [
            {
                "type": "function",
                "function": {
                    "name": "echo",
                    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
                },
            }
        ]
    )
    cell = runtime_module.setup_cell("import json as _j\n\ndef f(x):\n    return _j.dumps(x)\n")
    assert len(cell.splitlines()) == 2  # two statements, whatever the source's length
    provider = LocalKernelProvider(network=False)
    pool = KernelPool(provider, min_idle=1, max_total=1, limits=ExecLimits(timeout=30))
    runtime = Runtime(pool, InMemorySessionStore())
    try:
        async with pool:
            live = await runtime.kernel("s", tools)
            kernel = live.kernel
            shown = await kernel.execute("print(callable(echo), issubclass(ToolError, Exception))")
            assert isinstance(shown, Finished) and shown.output.stdout == "True True\n", shown
            source = await kernel.execute("import inspect\nprint(inspect.getsource(echo).splitlines()[0])")
            assert isinstance(source, Finished) and source.output.stdout.startswith("def echo("), source
            state = await kernel.execute("echo(x=1)")
            assert isinstance(state, Pending) and state.request.arguments == {"x": 1}
            failed = await kernel.reply(error="no such x")
            assert isinstance(failed, Finished) and failed.output.error is not None
            trace = failed.output.error.traceback
            assert failed.output.error.ename == "ToolError" and "no such x" in trace
            assert runtime_module.STUBS_FILE in trace and "raise ToolError" in trace, trace
            runtime.done("s")
    finally:
        await runtime.aclose()
        await provider.aclose()
