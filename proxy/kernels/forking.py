"""Kernels forked from a fork server (``kernels.start: fork``) instead of started from nothing.

An ipykernel cold start is mostly Python importing IPython, ipykernel, ZeroMQ and tornado
(~0.5 s of CPU on this kind of machine); the fork server (``proxy.kernels.forkserver``, one per
provider) has imported them once, and each kernel is a fork of it: copy-on-write pages, a fresh
ZeroMQ context and event loop of its own. Everything else is as for spawned kernels: the same
scrubbed environment, working directory, rlimits and network namespace, the same bubblewrap
sandbox (the fork joins the namespaces bwrap made), IPC sockets reached through hard links, one
session per kernel. Kill and reap go through the server, the only parent of the kernels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from proxy.kernels.execution import KernelDied

__all__ = ["ForkServer"]

log = logging.getLogger("cablectl.kernels")

SERVER = Path(__file__).with_name("forkserver.py")
TITLE_ROOM = 4096


class ForkServer:
    """The proxy's end of one fork server: start it (from the event loop's thread: it dies
    with that thread), ask it for kernels, kill them, learn when they have exited."""

    def __init__(self, cwd: Path, env: dict[str, str], startup_timeout: float = 60.0) -> None:
        self.cwd = cwd
        self.env = env  # the server's own environment: as scrubbed as a kernel's
        self.startup_timeout = startup_timeout
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._starting: asyncio.Lock | None = None
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._exits: dict[str, asyncio.Future[int]] = {}
        self._ready: asyncio.Future[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._process is not None and self._process.returncode is None:
                return self._process
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",  # no PYTHON* variables, no user site, not the working directory on sys.path
                str(SERVER),
                str(os.getpid()),
                " " * TITLE_ROOM,  # room for each child's own command line (forkserver._set_title)
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=self.env,
                cwd=str(self.cwd),
            )
            self._reader = asyncio.create_task(self._read(self._process))
            try:
                await asyncio.wait_for(asyncio.shield(self._ready), self.startup_timeout)
            except (TimeoutError, KernelDied):
                await self.aclose()
                raise KernelDied("the kernel fork server did not start") from None
            log.info("kernel fork server %d ready", self._process.pid)
            return self._process

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            msg = json.loads(line)
            if "ready" in msg and self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            elif "exited" in msg:
                exit_ = self._exits.setdefault(str(msg["exited"]), asyncio.get_running_loop().create_future())
                if not exit_.done():
                    exit_.set_result(int(msg["status"]))
            elif "id" in msg:
                reply = self._replies.pop(str(msg["id"]), None)
                if reply is not None and not reply.done():
                    reply.set_result(msg)
        # the server is gone: so is every kernel it forked
        gone = KernelDied("the kernel fork server exited")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(gone)
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(gone)
        for exit_ in self._exits.values():
            if not exit_.done():
                exit_.set_result(-9)

    async def _send(self, process: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
        assert process.stdin is not None
        process.stdin.write(json.dumps(message).encode() + b"\n")
        try:
            await process.stdin.drain()
        except (ConnectionError, BrokenPipeError) as exc:
            raise KernelDied("the kernel fork server exited") from exc

    async def start(self, request: dict[str, Any]) -> int:
        """Fork a kernel (``request``: see ``proxy.kernels.forkserver``); its PID (the sandbox's
        keeper for a sandboxed kernel)."""
        process = await self._ensure()
        kernel_id = str(request["id"])
        loop = asyncio.get_running_loop()
        reply = self._replies[kernel_id] = loop.create_future()
        self._exits.setdefault(kernel_id, loop.create_future())
        await self._send(process, {"op": "start", **request})
        msg = await reply
        if "error" in msg:
            raise KernelDied(f"the fork server could not fork a kernel: {msg['error']}")
        return int(msg["pid"])

    def alive(self, kernel_id: str) -> bool:
        exit_ = self._exits.get(kernel_id)
        return exit_ is not None and not exit_.done()

    async def kill(self, kernel_id: str, timeout: float = 10.0) -> None:
        """SIGKILL the kernel (its whole sandbox) and wait until the server has reaped it."""
        exit_ = self._exits.get(kernel_id)
        if exit_ is None:
            return
        process = self._process
        if not exit_.done() and process is not None and process.returncode is None:
            with contextlib.suppress(KernelDied):
                await self._send(process, {"op": "kill", "id": kernel_id})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exit_), timeout)
        self._exits.pop(kernel_id, None)

    async def aclose(self) -> None:
        """Close its requests pipe: the server kills every kernel it forked and exits."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
