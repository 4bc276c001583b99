"""A pool of pre-started kernels: acquire in O(1), never reuse a kernel across sessions.

- ``min_idle`` kernels are kept started ahead of demand (a cold start is ~1 s);
  ``max_total`` caps idle + busy + starting.
- ``acquire(session_id)`` pops a ready kernel from a deque. With none ready it waits
  up to ``acquire_timeout``; then ``PoolExhausted`` (the HTTP layer answers 503). Waiters
  are served first come, first served: a kernel that becomes ready goes to the one that
  has waited longest, never to a request that arrived after it (under load, that barging
  left some sessions waiting several times as long as the rest).
- ``release(kernel)`` retires the kernel: it is shut down in the background and a
  fresh one is started in its place. A used kernel never serves another session,
  so no variable, file or import of one session can reach the next.
- A health loop replaces idle kernels that died; ``aclose`` reaps every process,
  busy ones included, also when cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import ServiceUnavailable
from proxy.kernels.base import Finished, KernelConnection, KernelProvider, Pending
from proxy.kernels.execution import CellRun, ExecLimits, KernelDied

__all__ = ["KernelPool", "PoolExhausted", "PoolStats", "PooledKernel"]

log = logging.getLogger("cablectl.kernels")


class PoolExhausted(ServiceUnavailable):
    code = "kernel_pool_exhausted"


@dataclass(slots=True)
class PoolStats:
    idle: int
    busy: int
    starting: int
    started_total: int
    replaced_dead: int


@dataclass(eq=False)
class PooledKernel:
    """A kernel lent to one session."""

    connection: KernelConnection
    pool: KernelPool
    session_id: str | None = None
    acquired_at: float = 0.0
    run: CellRun | None = None
    tools_digest: str | None = None
    retired: bool = False
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def kernel_id(self) -> str:
        return self.connection.kernel_id

    async def execute(
        self, code: str, limits: ExecLimits | None = None, expressions: dict[str, str] | None = None
    ) -> Pending | Finished:
        """Run a cell; ``Pending`` if it stopped in a tool call (answer with ``reply``).
        ``expressions`` are evaluated after it (``CellOutput.expressions``)."""
        async with self._lock:
            if self.run is not None and self.run.waiting:
                raise RuntimeError("the previous cell is still waiting for a tool result")
            self.run = CellRun(self.connection, limits or self.pool.limits)
            return await self._guard(self.run.start(code, expressions))

    async def reply(self, result: object = None, *, error: str | None = None) -> Pending | Finished:
        async with self._lock:
            if self.run is None:
                raise RuntimeError("no cell is running")
            return await self._guard(self.run.reply(result, error=error))

    async def _guard(self, step: object) -> Pending | Finished:
        try:
            return await step  # type: ignore[misc, no-any-return]
        except KernelDied:
            self.pool._dead(self)
            raise


def _row(connection: KernelConnection, state: str, session_id: str | None) -> dict[str, Any]:
    return {
        "kernel_id": connection.kernel_id,
        "state": state,
        "session_id": session_id,
        "pid": connection.pid(),
        "started_at": connection.started_at,
    }


class KernelPool:
    def __init__(
        self,
        provider: KernelProvider,
        *,
        min_idle: int = 2,
        max_total: int = 8,
        acquire_timeout: float = 10.0,
        limits: ExecLimits | None = None,
        health_interval: float = 5.0,
    ) -> None:
        if max_total < 1 or min_idle < 0 or min_idle > max_total:
            raise ValueError("need 0 <= min_idle <= max_total and max_total >= 1")
        self.provider = provider
        self.min_idle = min_idle
        self.max_total = max_total
        self.acquire_timeout = acquire_timeout
        self.limits = limits or ExecLimits()
        self.health_interval = health_interval
        self._idle: collections.deque[KernelConnection] = collections.deque()
        self._busy: set[PooledKernel] = set()
        self._starting = 0
        self._started_total = 0
        self._replaced_dead = 0
        self._ready = asyncio.Condition()
        self._waiters: collections.deque[asyncio.Future[KernelConnection]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Future[None]] = set()
        self._health: asyncio.Task[None] | None = None
        self._closed = False

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._fill()
        self._health = asyncio.create_task(self._health_loop())

    async def __aenter__(self) -> KernelPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def wait_ready(self, n: int | None = None, timeout: float = 60.0) -> None:
        """Wait until ``n`` (default ``min_idle``) kernels are idle."""
        want = self.min_idle if n is None else n
        async with self._ready:
            await asyncio.wait_for(self._ready.wait_for(lambda: len(self._idle) >= want), timeout)

    async def aclose(self) -> None:
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(PoolExhausted("the kernel pool is shutting down"))
        self._waiters.clear()
        # stop starting kernels (a start that completes now shuts its kernel down itself),
        # but let retirements finish: their processes must be reaped
        tasks = [t for t in (self._health, *self._tasks) if t is not None and t not in self._stopping]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._stopping:
            await asyncio.shield(asyncio.gather(*self._stopping, return_exceptions=True))
        connections = [*self._idle, *(k.connection for k in self._busy)]
        self._idle.clear()
        self._busy.clear()
        await asyncio.shield(asyncio.gather(*(c.shutdown() for c in connections), return_exceptions=True))
        await self.provider.aclose()

    def stats(self) -> PoolStats:
        return PoolStats(
            len(self._idle), len(self._busy), self._starting, self._started_total, self._replaced_dead
        )

    def snapshot(self) -> list[dict[str, Any]]:
        """Every kernel with its state, for ``cablectl kernels ls`` (plain data, JSON-ready)."""
        rows: list[dict[str, Any]] = []
        for connection in self._idle:
            rows.append(_row(connection, "idle", None))
        for kernel in self._busy:
            waiting = kernel.run is not None and kernel.run.waiting
            rows.append(_row(kernel.connection, "waiting" if waiting else "busy", kernel.session_id))
        starting = {
            "kernel_id": None,
            "state": "starting",
            "session_id": None,
            "pid": None,
            "started_at": None,
        }
        rows.extend(dict(starting) for _ in range(self._starting))
        return rows

    @property
    def total(self) -> int:
        return len(self._idle) + len(self._busy) + self._starting

    @property
    def waiting(self) -> int:
        """Acquires waiting for a kernel."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    # --- lending ---------------------------------------------------------------------------

    async def acquire(self, session_id: str, timeout: float | None = None) -> PooledKernel:
        """A ready kernel for ``session_id``; waits ``timeout`` (default ``acquire_timeout``) at
        most, behind every acquire that was waiting before it."""
        if self._closed:
            raise PoolExhausted("the kernel pool is shutting down")
        wait = self.acquire_timeout if timeout is None else timeout
        if self._idle and not self.waiting:
            connection = self._idle.popleft()
        else:
            waiter: asyncio.Future[KernelConnection] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self._fill()
            try:
                connection = await asyncio.wait_for(waiter, max(0.0, wait))
            except TimeoutError:
                raise PoolExhausted(
                    f"No kernel became free within {wait:g} s "
                    f"({len(self._busy)} busy, {self._starting} starting, at most {self.max_total}); "
                    "retry later, or raise the pool's max_total"
                ) from None
            except asyncio.CancelledError:
                # handed a kernel just as this request was cancelled: it goes to the next one
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._idle.appendleft(waiter.result())
                    self._hand_off()
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        kernel = PooledKernel(connection, self, session_id=session_id, acquired_at=time.monotonic())
        self._busy.add(kernel)
        self._fill()
        return kernel

    def _hand_off(self) -> None:
        """Ready kernels to the longest waiting acquires."""
        for waiter in list(self._waiters):
            if not self._idle:
                return
            if not waiter.done():
                waiter.set_result(self._idle.popleft())

    async def release(self, kernel: PooledKernel) -> None:
        """Retire a kernel after its session: shut down in the background, replaced by a fresh one."""
        if kernel.retired:
            return
        kernel.retired = True
        self._busy.discard(kernel)
        self._spawn(self._shutdown(kernel.connection), stopping=True)
        self._fill()

    def _dead(self, kernel: PooledKernel) -> None:
        self._replaced_dead += 1
        if not kernel.retired:
            kernel.retired = True
            self._busy.discard(kernel)
            self._spawn(self._shutdown(kernel.connection), stopping=True)
            self._fill()

    # --- internals -------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], stopping: bool = False) -> None:
        task = asyncio.ensure_future(coro)
        bucket = self._stopping if stopping else self._tasks
        bucket.add(task)
        task.add_done_callback(bucket.discard)

    def _fill(self) -> None:
        if self._closed:
            return
        want = self.min_idle + self.waiting - len(self._idle) - self._starting
        room = self.max_total - self.total
        for _ in range(max(0, min(want, room))):
            self._starting += 1
            self._spawn(self._start_one())

    async def _start_one(self) -> None:
        try:
            connection = await self.provider.start_kernel()
        except asyncio.CancelledError:
            self._starting -= 1
            raise
        except Exception:
            self._starting -= 1
            log.exception("a kernel failed to start; retrying in 1 s")
            await asyncio.sleep(1.0)
            self._fill()
            return
        self._starting -= 1
        self._started_total += 1
        if self._closed:
            await asyncio.shield(connection.shutdown())
            return
        self._idle.append(connection)
        self._hand_off()
        async with self._ready:
            self._ready.notify_all()

    async def _shutdown(self, connection: KernelConnection) -> None:
        try:
            await asyncio.shield(connection.shutdown())
        except Exception:
            log.exception("shutting down kernel %s failed", connection.kernel_id)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            for connection in list(self._idle):
                if not await connection.is_alive():
                    with contextlib.suppress(ValueError):
                        self._idle.remove(connection)
                    self._replaced_dead += 1
                    log.warning("idle kernel %s died; replacing it", connection.kernel_id)
                    self._spawn(self._shutdown(connection), stopping=True)
            self._fill()
