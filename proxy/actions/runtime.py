"""Which session holds which kernel in this process, and how a lost kernel comes back.

A kernel is a cache of its session's log. When a request resumes a session whose
kernel is not here (this replica restarted, another replica had it, or it died),
the runtime takes a fresh kernel and replays the log: every kernel turn's program
runs again, and each tool call it makes is answered from the recorded results
instead of asking anyone, until the call that is waiting now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.actions.artifacts import Artifacts
from proxy.errors import CablectlError, ServiceUnavailable
from proxy.kernels import Finished, KernelDied, KernelPool, Pending, PooledKernel
from proxy.sessions import SessionStore
from proxy.sessions.owners import Owners
from translators import Toolset, render_kernel_stubs

__all__ = ["STUBS_FILE", "LiveSession", "Runtime", "setup_cell"]

log = logging.getLogger("cablectl.actions")
# under pool pressure, sessions idle at least this long give their kernels back early
HEADROOM_IDLE_SECONDS = 1.0
Event = dict[str, Any]
# the file name the tool stubs are compiled under: what tracebacks through them show
STUBS_FILE = "<cablectl-tools>"


def setup_cell(source: str, filename: str = STUBS_FILE) -> str:
    """A cell that runs ``source`` (the session's setup: tool stubs and helpers) in the kernel's
    namespace as one string literal, compiled under ``filename``.

    IPython tokenizes every cell in pure Python, twice, before it compiles it; for the stubs
    that was ~10 ms of a fresh kernel's CPU per session, about a tenth of a session's whole cost.
    A string literal is one token. The source is put in ``linecache`` under ``filename`` too,
    so that tracebacks through a stub (a failed tool call) still show its lines."""
    text, name = repr(source), repr(filename)
    return (
        f"__import__('linecache').cache[{name}] = ({len(source)}, None, {text}.splitlines(True), {name})\n"
        f"exec(compile({text}, {name}, 'exec'), globals())"
    )


@dataclass
class LiveSession:
    session_id: str
    kernel: PooledKernel
    digest: str
    waiting_call_id: str | None = None
    turn_calls: int = 0  # calls the running program has made so far
    last_used: float = 0.0
    in_use: bool = False  # a request is working with this kernel right now
    library: str | None = None  # digest of the promoted functions defined in this kernel


def result_value(content: Any) -> Any:
    """A tool message's content as the stub returns it: parsed JSON when it is JSON, else text."""
    if isinstance(content, list):
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    if isinstance(content, str):
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            return content
    return content


def _eviction_order(live: LiveSession) -> tuple[bool, float]:
    """Whose kernel goes first when the pool needs room: sessions whose program has finished
    before those suspended in a tool call (mid-conversation: giving its kernel back costs a
    replay of the whole log when the result comes), least recently used first within each."""
    return (live.waiting_call_id is not None, live.last_used)


class KernelUnavailable(ServiceUnavailable):
    code = "kernel_unavailable"


class Runtime:
    """``on_acquire_wait`` is told how long each session waited for a kernel (seconds);
    ``on_replay`` the reason of each replay (``waiting_call``: a result for a program whose
    kernel is gone; ``new_program``: a new program in a session whose kernel is gone) and its
    cause (``lost``: this replica's kernel died or was given back, or none holds the session;
    ``owner_gone``: the replica that held it is gone; ``owner_unreachable``: it is announced
    but could not be reached; ``owner_elsewhere``: a forwarded request for a session another
    replica claimed meanwhile, answered here all the same: one hop only).
    ``owners``: claims on sessions shared with other replicas."""

    def __init__(
        self,
        pool: KernelPool,
        store: SessionStore,
        on_acquire_wait: Callable[[float], None] | None = None,
        on_replay: Callable[[str, str], None] | None = None,
        artifacts: Artifacts | None = None,
        owners: Owners | None = None,
    ) -> None:
        self.pool = pool
        self.store = store
        self.artifacts = artifacts  # files programs write: recorded, and put back on replay
        self.live: dict[str, LiveSession] = {}
        self.on_acquire_wait = on_acquire_wait
        self.on_replay = on_replay  # told the reason and cause of every replay
        self.owners = owners
        self._headroom: asyncio.Task[None] | None = None
        self._evicting: asyncio.Task[None] | None = None

    async def kernel(self, session_id: str, toolset: Toolset) -> LiveSession:
        """This session's kernel, with the toolset's stubs installed (acquired if needed)."""
        live = self.live.get(session_id)
        if live is not None and not live.kernel.retired and await live.kernel.connection.is_alive():
            if live.digest != toolset.digest:
                await self._install(live.kernel, toolset)
                live.digest = toolset.digest
            live.last_used = time.monotonic()
            live.in_use = True
            return live
        if live is not None:
            await self.release(session_id)
        for attempt in (1, 2):  # a fresh kernel that dies setting up is replaced once
            kernel = await self._acquire(session_id)
            try:
                await self._install(kernel, toolset)
                break
            except KernelDied as exc:
                await self.pool.release(kernel)
                log.warning("a fresh kernel died installing the tool stubs (attempt %d): %s", attempt, exc)
                if attempt == 2:
                    raise KernelUnavailable(
                        "Two fresh kernels in a row failed while being set up for this session; "
                        "retry in a moment"
                    ) from exc
            except BaseException:
                await self.pool.release(kernel)
                raise
        live = LiveSession(session_id, kernel, toolset.digest, last_used=time.monotonic(), in_use=True)
        self.live[session_id] = live
        if self.owners is not None:  # other replicas send this session's requests here now
            await self.owners.claim(session_id, kernel.kernel_id)
        return live

    async def _acquire(self, session_id: str) -> PooledKernel:
        """A kernel from the pool; while it is full, evict idle sessions' kernels to make room.
        The request keeps its place in the pool's queue throughout (first come, first served)."""
        started = time.monotonic()
        acquiring = asyncio.ensure_future(self.pool.acquire(session_id))
        await asyncio.sleep(0)  # in the queue (or served) before the pool is judged
        try:
            while True:
                if self._short():
                    await self._evict_one()
                done, _ = await asyncio.wait({acquiring}, timeout=1.0)
                if done:
                    kernel = acquiring.result()
                    if self.on_acquire_wait is not None:
                        self.on_acquire_wait(time.monotonic() - started)
                    return kernel
        except BaseException:
            if not acquiring.done():
                acquiring.cancel()  # the pool hands a kernel it gave just then to the next in line
                with contextlib.suppress(BaseException):
                    await acquiring
            elif not acquiring.cancelled() and acquiring.exception() is None:
                await self.pool.release(acquiring.result())  # got, but not wanted any more
            raise

    def _short(self) -> bool:
        """The pool is full, and more requests wait for a kernel than are starting."""
        return self.pool.total >= self.pool.max_total and self.pool.waiting > self.pool.stats().starting

    def done(self, session_id: str) -> None:
        """The request working with this session's kernel has finished."""
        live = self.live.get(session_id)
        if live is not None:
            live.in_use = False
            live.last_used = time.monotonic()
        if self._short() and self._evicting is None:  # someone waits for this pool: now
            self._evicting = asyncio.get_running_loop().create_task(self._evict_for_waiters())
        if self._pressed() and self._headroom is None:
            self._headroom = asyncio.get_running_loop().create_task(self._make_headroom())

    def _pressed(self) -> bool:
        """The pool is full, and fewer kernels are ready or starting than it keeps ahead."""
        stats = self.pool.stats()
        return self.pool.total >= self.pool.max_total and stats.idle + stats.starting < self.pool.min_idle

    async def _make_headroom(self) -> None:
        """Under pressure, give back the kernels of sessions idle for a while (least recently used
        first), so that fresh kernels start before a new session needs one instead of after (a
        session given back this way is replayed from its log if it comes back)."""
        try:
            while self._pressed():
                now = time.monotonic()
                idle = [
                    live
                    for live in self.live.values()
                    if not live.in_use and now - live.last_used >= HEADROOM_IDLE_SECONDS
                ]
                if not idle:
                    return
                victim = min(idle, key=_eviction_order)
                log.info(
                    "pool full: giving back the kernel of idle session %s ahead of demand", victim.session_id
                )
                await self.release(victim.session_id)
        finally:
            self._headroom = None

    async def _evict_for_waiters(self) -> None:
        try:
            while self._short() and any(not live.in_use for live in self.live.values()):
                await self._evict_one()
        finally:
            self._evicting = None

    async def _evict_one(self) -> None:
        """The pool is full: give back a kernel no request is using (``_eviction_order``).

        Its session keeps its log; if it comes back, it is replayed onto a fresh kernel."""
        idle = [live for live in self.live.values() if not live.in_use]
        if idle:
            victim = min(idle, key=_eviction_order)
            log.info("pool full: evicting the kernel of idle session %s", victim.session_id)
            await self.release(victim.session_id)

    async def _install(self, kernel: PooledKernel, toolset: Toolset) -> None:
        source = render_kernel_stubs(toolset)
        if self.artifacts is not None:  # the file snapshot, in the same cell
            source += "\n" + self.artifacts.definition
        result = await kernel.execute(setup_cell(source))
        if not isinstance(result, Finished) or result.output.error is not None:
            raise KernelDied("installing the tool stubs failed")

    async def abandon(self, session_id: str) -> None:
        """End the program that waits for a call nobody will answer (the conversation moved on)."""
        live = self.live.get(session_id)
        if live is None or live.waiting_call_id is None:
            return
        # recorded, so neither a resume nor a replay waits for it again
        await self.store.append(
            session_id,
            {"kind": "result", "call_id": live.waiting_call_id, "error": "this call was not answered"},
        )
        live.waiting_call_id = None
        state: Pending | Finished = await live.kernel.reply(error="this call was not answered")
        for _ in range(100):
            if not isinstance(state, Pending):
                return
            state = await live.kernel.reply(error="this call was not answered")

    async def replay(
        self,
        session_id: str,
        toolset: Toolset,
        events: list[Event],
        finish: bool = False,
        reason: str = "lost_kernel",
        cause: str = "lost",
    ) -> tuple[LiveSession, Pending | Finished | None]:
        """A fresh kernel brought to where the log ends.

        Every kernel turn runs again with its recorded results fed back; returns the
        last turn's state after its recorded results: ``Pending`` for a call the log has
        not seen yet, ``Finished`` if it ran to the end, None if there was nothing to run.
        ``finish``: the last turn is ended too (a new program is about to run)."""
        await self.release(session_id)
        live = await self.kernel(session_id, toolset)
        results: dict[str, Event] = {e["call_id"]: e for e in events if e.get("kind") == "result"}
        calls_by_turn: dict[int, list[Event]] = {}
        for event in events:
            if event.get("kind") == "call" and not event.get("approval"):  # asks are not the kernel's
                calls_by_turn.setdefault(int(event["turn"]), []).append(event)
        died = {
            int(e["turn"])
            for e in events
            if e.get("kind") == "cell_end" and e.get("error") in ("KernelDied", "Cancelled", "Denied")
        }
        # a program its kernel died under is not run again (it may be what killed it), nor one
        # stopped half way because its request went away (its effects are unknown)
        # promoted functions (``library`` events) are defined again where they were defined:
        # before the program of the turn that defined them
        turns = [
            e
            for e in events
            if e.get("kind") == "turn" and e.get("mode") == "kernel" and int(e["turn"]) not in died
        ]
        replayed = {int(e["turn"]) for e in turns}
        libraries = [e for e in events if e.get("kind") == "library"]
        steps: list[Event] = []
        for e in events:
            if e.get("kind") == "library" and int(e.get("turn", -1)) not in replayed:
                steps.append(e)
            elif e.get("kind") == "turn" and int(e.get("turn", -1)) in replayed and e.get("mode") == "kernel":
                steps += [lib for lib in libraries if int(lib.get("turn", -1)) == int(e["turn"])]
                steps.append(e)
        state: Pending | Finished | None = None
        for event in steps:
            if event.get("kind") == "library":
                await live.kernel.execute(str(event["source"]))
                live.library = str(event["digest"])
                continue
            index = turns.index(event)
            state = await live.kernel.execute(str(event["source"]))
            live.turn_calls = 0
            for call in calls_by_turn.get(int(event["turn"]), []):
                if not isinstance(state, Pending):
                    break
                recorded = results.get(call["call_id"])
                if recorded is None:  # still waiting for the client
                    live.waiting_call_id = str(call["call_id"])
                    return live, state
                live.turn_calls += 1
                if "error" in recorded:
                    state = await live.kernel.reply(error=str(recorded["error"]))
                else:
                    state = await live.kernel.reply(recorded.get("value"))
            if index < len(turns) - 1 or finish:
                # an earlier turn that asks for more than was recorded went another way
                # this time: end it, so the next program can run
                for _ in range(100):
                    if not isinstance(state, Pending):
                        break
                    state = await live.kernel.reply(error="no recorded result while replaying this session")
        if self.artifacts is not None and not isinstance(state, Pending):
            await self.artifacts.restore(session_id, events, live.kernel)
        log.info(
            "session %s replayed onto kernel %s (%s, %s: %d programs run again)",
            session_id,
            live.kernel.kernel_id,
            reason,
            cause,
            len(turns),
        )
        if self.on_replay is not None:
            self.on_replay(reason, cause)
        return live, state

    async def release(self, session_id: str) -> None:
        live = self.live.pop(session_id, None)
        if live is not None:
            await self.pool.release(live.kernel)
            if self.owners is not None:
                with contextlib.suppress(CablectlError):  # the claim expires by itself otherwise
                    await self.owners.release(session_id, live.kernel.kernel_id)

    async def sweep(self, idle_seconds: float) -> None:
        """Give back kernels of sessions idle longer than ``idle_seconds`` (their logs stay)."""
        now = time.monotonic()
        for session_id, live in list(self.live.items()):
            if not live.in_use and now - live.last_used > idle_seconds:
                await self.release(session_id)

    async def aclose(self) -> None:
        for task in (self._headroom, self._evicting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for session_id in list(self.live):
            await self.release(session_id)
