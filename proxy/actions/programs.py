"""Kernel programs: run one, drive it through its tool calls, resume it with the client's results.

A cell runs until it ends or calls a tool. A server-side tool is answered by the proxy
at once; a client tool suspends the program: the call goes out as a tool call and the
response ends. The client's ``tool`` message resumes it (``resume``), in this kernel or,
when the kernel is gone, in a fresh one the log is replayed onto.

A program's first calls may have gone out before it ran (pipelined while the model wrote
them): they are the turn's first ``call`` events. The kernel's n-th call of a turn is
matched to the turn's n-th recorded call: a recorded result is fed back at once, a call
already out is waited for, and only a call nobody has seen yet goes out as a new one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from proxy.actions.approval import verdict
from proxy.actions.artifacts import summary
from proxy.actions.events import Event
from proxy.actions.runtime import LiveSession, Runtime, result_value
from proxy.actions.step import Step, ToolCallOut
from proxy.kernels import CellError, CellOutput, Finished, KernelDied, Pending
from proxy.library import library_source
from proxy.metrics import Metrics
from proxy.sessions import CallIds, SessionStore
from proxy.toolsets import ServerToolset, ToolCallFailed
from proxy.tracing import Span
from translators import CallError, check_call

log = logging.getLogger("cablectl.actions")

__all__ = ["CANCELLED", "DENIED", "KernelDriver", "Settled", "next_seq"]

CANCELLED = "Cancelled"  # a cell_end's error: the request went away while the program ran
DENIED = "Denied"  # a cell_end's error: the user did not approve the program

Message = dict[str, Any]
LogEvent = dict[str, Any]


def next_seq(events: list[LogEvent]) -> int:
    """The sequence number of the session's next tool call."""
    return 1 + max(
        (int(e.get("seq", 0)) for e in events if e.get("kind") in ("call", "static_call", "void_call")),
        default=0,
    )


@dataclass
class Settled:
    """How a program's run ended in this request."""

    suspended: bool = False  # waiting for a client's result: the response ends with tool calls
    output: CellOutput | None = None  # it ran to its end
    files: list[LogEvent] = field(default_factory=list)  # the artifact events it left


class KernelDriver:
    def __init__(self, runtime: Runtime, store: SessionStore, ids: CallIds, metrics: Metrics) -> None:
        self.runtime = runtime
        self.store = store
        self.ids = ids
        self.metrics = metrics

    async def _guarded(self, step: Awaitable[Pending | Finished], session_id: str) -> Pending | Finished:
        try:
            return await step
        except KernelDied as exc:
            await self.runtime.release(session_id)
            return Finished(CellOutput(error=CellError("KernelDied", str(exc), f"The kernel died: {exc}")))

    async def run(
        self,
        step: Step,
        turn: int,
        source: str,
        out: Settled,
        action: Span,
        events: list[LogEvent] | None = None,
    ) -> AsyncIterator[Event]:
        """Run a turn's program in the session's kernel: the one that ran its earlier programs,
        or a fresh one the log is replayed onto first, so their variables and functions are there.
        ``events``: the session's log as the caller just read it (else it is read here)."""
        sid = step.session_id
        live = self.runtime.live.get(sid)
        if live is None or live.kernel.retired or not await live.kernel.connection.is_alive():
            live = await self._restored(step, turn)
        elif live.waiting_call_id is not None:  # an earlier program still waits for a call nobody answered
            await self.runtime.abandon(sid)
        await self._define_library(step, live, turn)
        live.turn_calls = 0
        artifacts = self.runtime.artifacts
        expressions = None
        if artifacts is not None:
            expressions = artifacts.expressions(
                artifacts.budget(events if events is not None else await self.store.events(sid))
            )
        try:
            state = await self._guarded(live.kernel.execute(source, None, expressions), sid)
            async for event in self.settle(step, turn, state, out, action):
                yield event
        except BaseException:
            await self._cancelled(sid, turn, out)
            raise

    async def _define_library(self, step: Step, live: LiveSession, turn: int) -> None:
        """The route's promoted functions, defined in this kernel before the program runs (and
        recorded where they were defined, so a replay defines them at the same point)."""
        if not step.library:
            return
        source = library_source(step.library)
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        if live.library == digest:
            return
        events = await self.store.events(step.session_id)
        recorded = [e for e in events if e.get("kind") == "library"]
        if not recorded or recorded[-1].get("digest") != digest:
            await self.store.append(
                step.session_id, {"kind": "library", "turn": turn, "digest": digest, "source": source}
            )
        state = await self._guarded(live.kernel.execute(source), step.session_id)
        if isinstance(state, Finished) and state.output.error is not None:
            log.warning("promoted functions failed to define in %s: %s", step.session_id, state.output.error)
        live.library = digest

    async def _cancelled(self, session_id: str, turn: int, out: Settled) -> None:
        """The request went away (a client that disconnected, a failure) while its program ran
        in the kernel: the kernel is given up (stopping the cell) and the program recorded as
        cancelled, so the session's next request starts from its log instead of waiting behind
        a cell nobody will read. A program suspended on a client's call is left waiting."""
        live = self.runtime.live.get(session_id)
        if out.suspended or out.output is not None or (live is not None and live.waiting_call_id):
            return
        with anyio.CancelScope(shield=True):
            await self.runtime.release(session_id)
            await self.store.append(
                session_id, {"kind": "cell_end", "turn": turn, "output": "", "error": CANCELLED}
            )

    async def _restored(self, step: Step, turn: int) -> LiveSession:
        """A fresh kernel with the session's earlier programs replayed onto it (their results
        from the log), so their variables and functions are there again."""
        sid = step.session_id
        earlier = [
            e
            for e in await self.store.events(sid)
            if not (e.get("kind") == "turn" and int(e.get("turn", 0)) == turn)
        ]
        if any(e.get("kind") == "turn" and e.get("mode") == "kernel" for e in earlier):
            with step.span.child("replay", metadata={"turn": turn, "reason": "new program"}) as replay:
                try:
                    live, _ = await self.runtime.replay(
                        sid, step.toolset, earlier, finish=True, reason="new_program", cause=step.replay_cause
                    )
                    replay.end(metadata={"kernel_id": live.kernel.kernel_id})
                    return live
                except KernelDied as exc:  # the program runs on a fresh kernel without that state
                    await self.runtime.release(sid)
                    replay.end(error=f"the kernel died while replaying: {exc}")
        return await self.runtime.kernel(sid, step.toolset)

    async def settle(
        self, step: Step, turn: int, state: Pending | Finished, out: Settled, action: Span
    ) -> AsyncIterator[Event]:
        """Drive a cell until a client call is out (``out.suspended``) or it ends (``out.output``)."""
        sid = step.session_id
        live = self.runtime.live.get(sid)
        kernel_id = live.kernel.kernel_id if live is not None else None
        while isinstance(state, Pending):
            request = state.request
            tool = step.toolset.by_name(request.tool)
            live = self.runtime.live[sid]
            try:
                if tool is None:
                    raise CallError(f"{request.tool} is not a tool of this request")
                arguments = check_call(tool, [], request.arguments).arguments
            except CallError as exc:  # the program gets a ToolError, the client is not asked
                action.child(
                    "tool", "tool", input={"name": request.tool, "arguments": request.arguments}
                ).end(error=exc.message, metadata={"kind": "refused"})
                state = await self._guarded(live.kernel.reply(error=exc.message), sid)
                continue
            events = await self.store.events(sid)
            index, live.turn_calls = live.turn_calls, live.turn_calls + 1
            known = [
                e
                for e in events
                if e.get("kind") == "call" and int(e.get("turn", 0)) == turn and not e.get("approval")
            ]
            if (
                index < len(known)
                and known[index]["tool"] == request.tool
                and known[index]["arguments"] == arguments
            ):
                recorded = next(
                    (
                        e
                        for e in events
                        if e.get("kind") == "result" and e["call_id"] == known[index]["call_id"]
                    ),
                    None,
                )
                if recorded is None:  # sent before the program ran: wait for the client's result
                    live.waiting_call_id = str(known[index]["call_id"])
                    action.end(
                        output=f"waiting for {known[index]['call_id']}", metadata={"kernel_id": kernel_id}
                    )
                    out.suspended = True
                    return
                state = await self._reply(sid, recorded)
                continue
            call_id = self.ids.issue(sid, next_seq(events))
            call_event: LogEvent = {
                "kind": "call",
                "call_id": call_id,
                "seq": next_seq(events),
                "turn": turn,
                "tool": request.tool,
                "arguments": arguments,
            }
            server = step.servers.get(request.tool)
            if server is not None and step.approval is not None and step.approval.server_calls:
                for event in await self._ask_for_call(step, turn, events, request.tool, arguments):
                    yield event
                live.waiting_call_id = step.sent[-1].id
                out.suspended = True
                return
            if server is not None:  # the proxy answers it; recorded so a replay need not call again
                recorded = await self._call_server(step, server, call_event, action)
                state = await self._reply(sid, recorded)
                continue
            await self.store.append(sid, call_event)
            live.waiting_call_id = call_id
            self.metrics.tool_calls.labels("client").inc()
            action.child("tool", "tool", input={"name": request.tool, "arguments": arguments}).end(
                output={"sent_to_client": call_id}, metadata={"kind": "client", "path": "kernel"}
            )
            action.end(
                output=f"waiting for the client's result of {request.tool} ({call_id})",
                metadata={"kernel_id": kernel_id, "turn": turn},
            )
            for event in step.send(ToolCallOut(call_id, request.tool, orjson.dumps(arguments).decode())):
                yield event
            out.suspended = True
            return
        output = state.output
        live = self.runtime.live.get(sid)
        if self.runtime.artifacts is not None and live is not None:
            out.files = await self.runtime.artifacts.record(sid, turn, live.kernel, output.expressions)
        files = summary(out.files)
        await self.store.append(
            sid,
            {
                "kind": "cell_end",
                "turn": turn,
                # what the model is shown of it: the output, and the files it wrote
                "output": f"{output.text()}\n{files}" if output.text() and files else output.text() or files,
                "error": output.error.ename if output.error else None,
                "duration_ms": round(output.duration_ms, 3),
                "kernel_id": kernel_id,
            },
        )
        action.end(
            output=output.text(),
            metadata={"kernel_id": kernel_id, "turn": turn, "duration_ms": output.duration_ms},
            error=f"{output.error.ename}: {output.error.evalue}" if output.error else None,
        )
        out.output = output

    async def _call_server(
        self, step: Step, server: ServerToolset, call_event: LogEvent, action: Span, denied: str | None = None
    ) -> LogEvent:
        """Make a server-side call (or record it as denied by the user) and log it with its
        result, so a replay feeds the result back instead of calling again."""
        tool, arguments, call_id = call_event["tool"], call_event["arguments"], call_event["call_id"]
        recorded: LogEvent = {"kind": "result", "call_id": call_id}
        with action.child(
            "tool",
            "tool",
            input={"name": tool, "arguments": arguments},
            metadata={"kind": "server", "toolset": server.name, "call_id": call_id},
        ) as tool_span:
            if denied is not None:
                recorded["error"] = f"The user denied this call: {denied}"
                tool_span.end(error=recorded["error"])
            else:
                self.metrics.tool_calls.labels("server").inc()
                try:
                    recorded["value"] = await server.call(tool, arguments)
                    tool_span.end(output=recorded["value"])
                except ToolCallFailed as exc:
                    recorded["error"] = str(exc)
                    tool_span.end(error=str(exc))
        extra = {"denied": True} if denied is not None else {}
        await self.store.append(step.session_id, {**call_event, "server": server.name, **extra}, recorded)
        return recorded

    async def _ask_for_call(
        self, step: Step, turn: int, events: list[LogEvent], tool: str, arguments: dict[str, Any]
    ) -> list[Event]:
        """The client approves a server-side call before it is made: one call to the approval
        function; the program waits on it (``_decided`` acts on the answer)."""
        assert step.approval is not None
        program = next((e for e in events if e.get("kind") == "turn" and int(e.get("turn", 0)) == turn), {})
        seq = next_seq(events)
        call_id = self.ids.issue(step.session_id, seq)
        asked = {
            "kind": "call",
            "source": str(program.get("source", "")),
            "calls": [{"name": tool, "arguments": arguments}],
            "reason": str(program.get("thought") or ""),
        }
        await self.store.append(
            step.session_id,
            {
                "kind": "call",
                "call_id": call_id,
                "seq": seq,
                "turn": turn,
                "tool": step.approval.tool,
                "arguments": asked,
                "approval": "call",
                "for": {"tool": tool, "arguments": arguments},
            },
        )
        step.span.child("approval", input=asked).end(output={"asked": call_id})
        return list(step.send(ToolCallOut(call_id, step.approval.tool, orjson.dumps(asked).decode())))

    async def _decided(
        self, step: Step, waiting: LogEvent, answer: Message, out: Settled
    ) -> AsyncIterator[Event]:
        """The client answered an approval: record who decided what, then run the program (or
        make the call), or tell the model it was denied."""
        sid, turn = step.session_id, int(waiting["turn"])
        approved, reason = verdict(answer.get("content"))
        await self.store.append(
            sid,
            {
                "kind": "approval",
                "call_id": waiting["call_id"],
                "turn": turn,
                "what": waiting["approval"],
                "approved": approved,
                "reason": reason,
                "by": step.owner,
            },
        )
        step.span.child("approval", input=waiting.get("arguments")).end(
            output={"approved": approved, "reason": reason, "by": step.owner}
        )
        events = await self.store.events(sid)
        program = next((e for e in events if e.get("kind") == "turn" and int(e.get("turn", 0)) == turn), {})
        source = str(program.get("source", ""))
        with step.span.child("action", input=source, metadata={"turn": turn, "approved": approved}) as action:
            if waiting["approval"] == "program":
                if approved:
                    async for event in self.run(step, turn, source, out, action, events):
                        yield event
                    return
                text = f"Not run: the user denied this program ({reason})."
                await self.store.append(
                    sid, {"kind": "cell_end", "turn": turn, "output": text, "error": DENIED}
                )
                action.end(output=text)
                out.output = CellOutput(stdout=text)
                return
            # a server-side call the program waits on, in its kernel or in a replay of the log
            target = waiting["for"]
            live = self.runtime.live.get(sid)
            if (
                live is not None
                and live.waiting_call_id == waiting["call_id"]
                and not live.kernel.retired
                and await live.kernel.connection.is_alive()
            ):  # the kernel waits on the call itself (already counted among the turn's calls)
                live.waiting_call_id = None
                live.in_use = True
                waits = True
            else:
                live, state = await self.runtime.replay(
                    sid, step.toolset, events, reason="waiting_call", cause=step.replay_cause
                )
                waits = isinstance(state, Pending)
                live.turn_calls += 1
            server = step.servers.get(str(target["tool"]))
            if not waits or server is None:
                return  # the program went another way, or the toolset is no longer offered
            seq = next_seq(await self.store.events(sid))
            call_event = {
                "kind": "call",
                "call_id": self.ids.issue(sid, seq),
                "seq": seq,
                "turn": turn,
                "tool": target["tool"],
                "arguments": target["arguments"],
            }
            recorded = await self._call_server(step, server, call_event, action, None if approved else reason)
            state = await self._reply(sid, recorded)
            async for event in self.settle(step, turn, state, out, action):
                yield event

    async def _reply(self, session_id: str, recorded: LogEvent) -> Pending | Finished:
        kernel = self.runtime.live[session_id].kernel
        if "error" in recorded:
            return await self._guarded(kernel.reply(error=str(recorded["error"])), session_id)
        return await self._guarded(kernel.reply(recorded.get("value")), session_id)

    async def resume(
        self, step: Step, events: list[LogEvent], answers: list[Message], out: Settled
    ) -> AsyncIterator[Event]:
        """Record the client's results for calls a program made; drive the waiting program on.

        Leaves ``out`` untouched when nothing was waiting on these answers."""
        sid = step.session_id
        answered = {str(m.get("tool_call_id")): m for m in answers}
        results = {e["call_id"] for e in events if e.get("kind") == "result"}
        open_calls = [e for e in events if e.get("kind") == "call" and e["call_id"] not in results]
        new = [e for e in open_calls if e["call_id"] in answered]
        if not new:
            return
        await self.store.append(
            sid,
            *(
                {
                    "kind": "result",
                    "call_id": e["call_id"],
                    "value": result_value(answered[e["call_id"]].get("content")),
                }
                for e in new
            ),
        )
        # the call the latest program waits on: the first open one of the latest turn with any
        latest = max(int(e["turn"]) for e in open_calls)
        waiting = next(e for e in open_calls if int(e["turn"]) == latest)
        if waiting["call_id"] not in answered:
            return
        if waiting.get("approval"):
            async for event in self._decided(step, waiting, answered[waiting["call_id"]], out):
                yield event
            return
        turn = int(waiting["turn"])
        value = result_value(answered[waiting["call_id"]].get("content"))
        live = self.runtime.live.get(sid)
        state: Pending | Finished | None = None
        if (
            live is not None
            and live.waiting_call_id == waiting["call_id"]
            and not live.kernel.retired
            and await live.kernel.connection.is_alive()
        ):
            live.waiting_call_id = None
            live.in_use = True
            try:
                state = await live.kernel.reply(value)
            except KernelDied:  # died while we waited: the log brings it back
                await self.runtime.release(sid)
                live = None
        else:
            live = None
        if live is None:
            # this kernel is gone (crash, restart, another replica): replay the log onto a fresh one
            with step.span.child("replay", metadata={"turn": turn}) as replay:
                live, state = await self.runtime.replay(
                    sid,
                    step.toolset,
                    await self.store.events(sid),
                    reason="waiting_call",
                    cause=step.replay_cause,
                )
                replay.end(metadata={"kernel_id": live.kernel.kernel_id})
        if state is None:
            return
        source = next(
            (e.get("source") for e in events if e.get("kind") == "turn" and e.get("turn") == turn), None
        )
        with step.span.child("action", input=source, metadata={"turn": turn, "resumed": True}) as action:
            try:
                async for event in self.settle(step, turn, state, out, action):
                    yield event
            except BaseException:
                await self._cancelled(sid, turn, out)
                raise
