"""The action loop: tools in, code actions inside, tool calls out, as one stream of events.

``ActionLoop.stream`` answers one request with tools as the neutral events of
``proxy.actions.events``; each API surface renders them. For one request:

1. resume: if the trailing tool results answer calls a kernel program is waiting on (the
   ids name their session), record them and let the program run on (``programs``);
2. prompt: the conversation in code form (kernel turns collapsed to their programs);
3. a model turn (``turn``): generate with the route's grammar, read the reply as it streams
   (prose out at once, static calls out as each statement completes), repair if need be;
4. an answer ends the response; a program of independent literal calls to client tools
   is the response's tool calls (no kernel); anything else runs in the session's kernel,
   where each client call suspends it and ends the response with that call; a program
   that runs to its end is an observation, and the loop goes back to 2 (``max_steps``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import orjson

from proxy.actions.approval import Approval
from proxy.actions.artifacts import summary
from proxy.actions.events import (
    ActionOutput,
    ActionStarted,
    Event,
    Finished,
    Started,
    TextDelta,
)
from proxy.actions.history import (
    check_tool_messages,
    collapse,
    completed_programs,
    conversation_digest,
    trailing_tool_results,
)
from proxy.actions.programs import KernelDriver, Settled, next_seq
from proxy.actions.runtime import Runtime
from proxy.actions.step import Step, ToolCallOut
from proxy.actions.turn import ModelTurn, Reply
from proxy.backends.base import Grammar
from proxy.config import ModelEntry
from proxy.errors import InvalidRequest, PermissionDenied
from proxy.metrics import Metrics
from proxy.routing import ModelRouter, UpstreamClock
from proxy.schemas import ChatCompletionRequest
from proxy.sessions import CallIds, SessionStore, new_session_id
from proxy.sessions.owners import OwnedElsewhere
from proxy.toolsets import SEARCH_TOOLS, ServerToolset, ToolSearch
from proxy.tracing import NoopTracer, Tracer
from translators import (
    MadeFunction,
    StaticCalls,
    Toolset,
    ToolsetCache,
    ToolsetError,
    build_grammar,
    build_prompt,
    lark_to_gbnf,
    made_functions,
    normalize_tool_choice,
)
from translators.affordance import ToolIndex
from translators.prompt import content_text

__all__ = ["ActionLoop", "SessionKey"]

log = logging.getLogger("cablectl.actions")

Message = dict[str, Any]
LogEvent = dict[str, Any]
OUT_OF_STEPS = "The task did not finish within this model's max_steps; ask again to continue."


def _client_answers(messages: list[Message], answers: list[Message]) -> list[dict[str, Any]]:
    """The trailing tool results with the call each answers: name, arguments, result."""
    calls = {
        str(c.get("id")): c.get("function") or {}
        for m in messages
        if m.get("role") == "assistant"
        for c in m.get("tool_calls") or []
    }
    return [
        {
            "call_id": str(m.get("tool_call_id")),
            "name": calls.get(str(m.get("tool_call_id")), {}).get("name"),
            "arguments": calls.get(str(m.get("tool_call_id")), {}).get("arguments"),
            "result": m.get("content"),
        }
        for m in answers
    ]


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A session a client names itself (``x-cablectl-session`` or ``metadata.session_id``),
    within its API key: the same name under another key is another session."""

    owner: str  # the API key's id
    name: str

    @property
    def session_id(self) -> str:
        return hashlib.sha256(f"{self.owner}\0{self.name}".encode()).hexdigest()[:16]


class ActionLoop:
    def __init__(
        self,
        router: ModelRouter,
        runtime: Runtime,
        store: SessionStore,
        ids: CallIds,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
        max_stubs: int = 24,
    ) -> None:
        self.router = router
        self.runtime = runtime
        self.store = store
        self.ids = ids
        self.tracer = tracer or NoopTracer()
        self.metrics = metrics or Metrics()
        self.toolsets = ToolsetCache()
        self.turns = ModelTurn(router, ids, self.metrics)
        self.programs = KernelDriver(runtime, store, ids, self.metrics)
        self._grammars: dict[tuple[str, str, bool], tuple[str, str]] = {}
        self.max_stubs = max_stubs  # more tools than this: the prompt shows the relevant ones
        self._indexes: dict[str, ToolIndex] = {}

    def _index(self, toolset: Toolset) -> ToolIndex:
        index = self._indexes.get(toolset.digest)
        if index is None:
            index = self._indexes[toolset.digest] = ToolIndex(toolset)
            if len(self._indexes) > 64:
                self._indexes.pop(next(iter(self._indexes)))
        return index

    def _grammar(self, entry: ModelEntry, toolset: Toolset, choice: str, parallel: bool) -> Grammar | None:
        mode = entry.grammar_mode
        if mode == "none" or choice == "none":
            return None
        key = (toolset.digest, choice, parallel)
        if key not in self._grammars:
            lark = build_grammar(toolset, choice, parallel)
            self._grammars[key] = (lark, lark_to_gbnf(lark))
            if len(self._grammars) > 512:
                self._grammars.pop(next(iter(self._grammars)))
        lark, gbnf = self._grammars[key]
        # gbnf and ebnf (xgrammar's EBNF reads GBNF) send the conversion, the others Lark
        return Grammar(mode, gbnf if mode in ("gbnf", "ebnf") else lark)

    def _session_of(self, messages: list[Message]) -> str | None:
        for message in reversed(messages):
            ids = (
                [str(c.get("id")) for c in message.get("tool_calls") or []]
                if message.get("role") == "assistant"
                else []
            )
            ids += [str(message["tool_call_id"])] if message.get("role") == "tool" else []
            for call_id in ids:
                parsed = self.ids.parse(call_id)
                if parsed is not None:
                    return parsed[0]
        return None

    async def _session_by_history(self, owner: str, messages: list[Message]) -> str | None:
        """The session that answered this conversation up to its last assistant message."""
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            return None
        return await self.store.session_of_digest(conversation_digest(owner, messages[: last + 1]))

    def _toolset(
        self,
        payload: dict[str, Any],
        request: ChatCompletionRequest,
        server: list[ServerToolset],
        denied: set[str],
        hidden: str | None = None,
    ) -> tuple[Toolset, str, dict[str, ServerToolset]]:
        """The request's tools with the route's server-side ones; a bad request raises here.
        ``hidden``: a client function the model must not see (the approval function)."""
        client_tools = [
            t
            for t in payload.get("tools") or []
            if not (hidden and isinstance(t, dict) and (t.get("function") or {}).get("name") == hidden)
        ]
        servers = {name: ts for ts in server for name in ts.names()}
        clash = sorted(
            {str(t.get("function", {}).get("name")) for t in client_tools if isinstance(t, dict)}
            & set(servers)
        )
        if clash:
            raise InvalidRequest(
                f"tool name(s) {clash} clash with server-side functions of this model; "
                "rename the client's tools",
                param="tools",
            )
        named = (
            (request.tool_choice or {}).get("function", {}).get("name")
            if isinstance(request.tool_choice, dict)
            else None
        )
        if named is not None and named == hidden:
            raise InvalidRequest(
                f"tool_choice names {named!r}, the approval function: the proxy calls it, the model does not",
                param="tool_choice",
            )
        if named is not None and named in denied:
            raise PermissionDenied(
                f"tool_choice names {named!r}, a server-side function this API key may not use",
                param="tool_choice",
            )
        try:
            toolset = self.toolsets.get(client_tools + [t for ts in server for t in ts.tools])
            choice = normalize_tool_choice(request.tool_choice, toolset)
        except ToolsetError as exc:
            raise InvalidRequest(exc.message, param=exc.param) from exc
        return toolset, choice, servers

    def prompt_for(
        self,
        request: ChatCompletionRequest,
        payload: dict[str, Any],
        server: list[ServerToolset] | None = None,
        library: list[MadeFunction] | None = None,
    ) -> list[Message]:
        """The messages the model would see for this request's first turn (tools as stubs);
        a bad request raises as ``stream`` would."""
        messages: list[Message] = list(payload["messages"])
        check_tool_messages(messages)
        toolset, choice, _ = self._toolset(payload, request, server or [], set())
        shown = [f for f in library or [] if toolset.by_py(f.name) is None]
        return build_prompt(messages, toolset, choice, request.parallel_tool_calls is not False, shown)

    async def _placed(self, session_id: str, forward: bool, unreachable: bool) -> str:
        """Whether this replica answers for the session: raises ``OwnedElsewhere`` if another
        live replica holds its kernel (and ``forward``); else returns the cause a replay here
        would have. A kernel of this replica's that is not the claimed one is stale (the session
        went on elsewhere) and is given back first."""
        owners = self.runtime.owners
        assert owners is not None
        owner = await owners.find(session_id)
        live = self.runtime.live.get(session_id)
        if owner is None or owner.mine:
            if live is None:
                return "lost"
            if owner is None:  # the claim lapsed while the kernel stayed: claim it again
                await owners.claim(session_id, live.kernel.kernel_id)
            elif live.kernel.kernel_id == owner.kernel:
                await owners.keep(session_id)
            else:
                await self.runtime.release(session_id)
            return "lost"
        if live is not None:
            await self.runtime.release(session_id)
        if owner.address is None:
            return "owner_gone"
        if unreachable:
            return "owner_unreachable"
        if forward:
            raise OwnedElsewhere(session_id, owner)
        return "owner_elsewhere"  # a forwarded request, sent here on a stale claim: one hop only

    async def stream(
        self,
        entry: ModelEntry,
        request: ChatCompletionRequest,
        payload: dict[str, Any],
        clock: UpstreamClock,
        server: list[ServerToolset] | None = None,
        denied: set[str] | None = None,
        session: SessionKey | None = None,
        owner: str = "anonymous",
        continues: str | None = None,
        surface: str = "chat.completions",
        library: list[MadeFunction] | None = None,
        approval: Approval | None = None,
        forward: bool = False,
        unreachable: bool = False,
    ) -> AsyncIterator[Event]:
        """Answer one request as events. Anything wrong with the request raises before the first.

        The session: the one the conversation's tool-call ids name, else the one the client
        names (``session``, scoped to its API key), else ``continues`` (a session the proxy
        itself recorded for this conversation, e.g. a stored response's), else the one whose
        answered conversation this request's history extends (``owner``'s, and only if exactly
        one), else a new one. ``surface`` names the API in the trace; ``library``: the
        route's promoted functions, defined in the session's kernel and shown as stubs;
        ``approval``: what the client approves first (``proxy.actions.approval``).

        With replicas (``Runtime.owners``): ``forward``: a session another live replica holds
        raises ``OwnedElsewhere`` before anything is done (the caller sends the request there);
        ``unreachable``: that replica could not be reached, so its log is replayed here."""
        messages: list[Message] = list(payload["messages"])
        check_tool_messages(messages)
        if approval is not None and approval.mode == "none":
            approval = None
        if approval is not None:
            approval.check_declared(list(payload.get("tools") or []), has_server_tools=bool(server))
        hidden = approval.tool if approval else None
        toolset, choice, servers = self._toolset(payload, request, server or [], denied or set(), hidden)
        index: ToolIndex | None = None
        if self.max_stubs and len(toolset.tools) > self.max_stubs:
            # too many to show: the prompt shows the relevant ones, search_tools finds the rest
            index = self._index(toolset)
            toolset, choice, servers = self._toolset(
                payload, request, [*(server or []), ToolSearch(index)], denied or set(), hidden
            )
        session_id = (
            self._session_of(messages)
            or (session.session_id if session else None)
            or continues
            or await self._session_by_history(owner, messages)
            or new_session_id()
        )
        cause = "lost"
        if self.runtime.owners is not None:
            cause = await self._placed(session_id, forward, unreachable)
        answers = trailing_tool_results(messages)
        parallel = request.parallel_tool_calls is not False
        with self.tracer.request(
            surface,
            session_id=session_id,
            input=answers or messages[-1:],
            metadata={
                "model": request.model,
                "grammar": entry.grammar_mode,
                "stream": bool(request.stream),
                "surface": surface,
            },
        ) as span:
            for answer in _client_answers(messages, answers):
                with span.child("tool", "tool", input=answer, metadata={"kind": "client"}) as tool_span:
                    tool_span.end(output=answer["result"])
            step = Step(
                owner=owner,
                session_id=session_id,
                entry=entry,
                request=request,
                payload=payload,
                clock=clock,
                messages=messages,
                toolset=toolset,
                choice=choice,
                parallel=parallel,
                servers=servers,
                span=span,
                grammar=self._grammar(entry, toolset, choice, parallel),
                library=[f for f in library or [] if toolset.by_py(f.name) is None],
                approval=approval,
                index=index,
                replay_cause=cause,
            )
            if step.grammar is not None:  # built (and cached) by _grammar just now
                step.grammar_lark = self._grammars[(toolset.digest, choice, parallel)][0]
            yield Started(session_id, span.trace_id)
            finish: Finished | None = None
            try:
                async with self.store.lock(session_id):
                    async for event in self._locked(step, answers):
                        if isinstance(event, Finished):
                            finish = event
                        yield event
            finally:
                self.runtime.done(session_id)
            span.end(
                output={
                    "content": step.shown_text or None,
                    "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in step.sent],
                    "finish_reason": finish.reason if finish else None,
                },
                usage=step.usage.as_dict(),
            )

    async def _locked(self, step: Step, answers: list[Message]) -> AsyncIterator[Event]:
        sid = step.session_id
        events = await self.store.events(sid)
        if not events:
            await self.store.append(
                sid, {"kind": "tools", "digest": step.toolset.digest, "owner": step.owner}
            )
            events = await self.store.events(sid)
        resumed = Settled()
        async for event in self.programs.resume(step, events, answers, resumed):
            yield event
        if resumed.suspended:
            yield Finished("tool_calls", step.usage)
            return
        async for event in self._steps(step):
            yield event

    async def _steps(self, step: Step) -> AsyncIterator[Event]:
        sid = step.session_id
        extra: list[Message] = []  # turns of this request the client does not see
        for _ in range(step.entry.max_steps):
            events = await self.store.events(sid)
            stubs = self._shown(step, events)
            made = {f.name: f for f in step.library} | made_functions(
                completed_programs(events), reserved=[t.py for t in step.toolset.tools]
            )
            prompt = build_prompt(
                collapse(step.messages, events) + extra,
                step.toolset,
                step.choice,
                step.parallel,
                list(made.values()),
                stubs,
            )
            reply = Reply(prompt=prompt)
            seq = next_seq(events)
            sent_before = len(step.sent)
            try:
                async for event in self.turns.run(step, reply, seq):
                    yield event
            except BaseException:
                # calls that went out before the turn failed keep their numbers: a retry of this
                # request gets new ids, never one a client already saw for another call
                void = step.sent[sent_before:]
                if void:
                    with anyio.CancelScope(shield=True):
                        await self.store.append(
                            sid,
                            *(
                                {"kind": "void_call", "call_id": c.id, "seq": seq + i}
                                for i, c in enumerate(void)
                            ),
                        )
                raise
            turn = sum(1 for e in events if e.get("kind") == "turn") + 1
            record: LogEvent = {
                "kind": "turn",
                "turn": turn,
                "after_messages": len(step.messages),  # where it stands in the client's history
                "model": step.entry.model_name,
                "prompt": prompt,
                "completion": reply.text,
                "usage": reply.usage,
                "attempts": reply.attempts,
                **({"problem": reply.problem} if reply.problem else {}),
            }
            program = reply.program
            if program is None:
                await self.store.append(sid, {**record, "mode": "answer"})
                # the conversation as the client will send it back continues this session
                answered = [*step.messages, {"role": "assistant", "content": step.shown_text}]
                await self.store.claim_digest(conversation_digest(step.owner, answered), sid)
                yield Finished("stop", step.usage)
                return
            static = isinstance(program, StaticCalls) and not any(
                c.name in step.servers for c in program.calls
            )
            if isinstance(program, StaticCalls) and static and (step.parallel or len(program.calls) == 1):
                for event in self._static_rest(step, program, seq):
                    yield event
                await self.store.append(
                    sid,
                    {**record, "mode": "static", "source": program.source, "thought": reply.thought},
                    *(
                        {
                            "kind": "static_call",
                            "call_id": c.id,
                            "seq": seq + i,
                            "turn": turn,
                            "tool": c.name,
                            "arguments": c.arguments,
                        }
                        for i, c in enumerate(step.sent)
                    ),
                )
                self.metrics.actions.labels("static").inc()
                self.metrics.tool_calls.labels("client").inc(len(step.sent))
                for call in step.sent:
                    step.span.child(
                        "tool", "tool", input={"name": call.name, "arguments": call.arguments}
                    ).end(output={"sent_to_client": call.id}, metadata={"kind": "client", "path": "static"})
                yield Finished("tool_calls", step.usage)
                return
            if step.approval is not None and step.approval.programs:
                async for event in self._ask_for_program(step, record, program, reply, seq, turn):
                    yield event
                return
            # a kernel program; calls sent while it was written are its first calls
            await self.store.append(
                sid,
                {**record, "mode": "kernel", "source": program.source, "thought": reply.thought},
                *(
                    {
                        "kind": "call",
                        "call_id": c.id,
                        "seq": seq + i,
                        "turn": turn,
                        "tool": c.name,
                        "arguments": orjson.loads(c.arguments),
                    }
                    for i, c in enumerate(reply.pipelined)
                ),
            )
            self.metrics.actions.labels("kernel").inc()
            if reply.pipelined:
                self.metrics.tool_calls.labels("client").inc(len(reply.pipelined))
            yield ActionStarted(program.source)
            settled = Settled()
            with step.span.child("action", input=program.source, metadata={"turn": turn}) as action:
                async for event in self.programs.run(step, turn, program.source, settled, action, events):
                    yield event
            if settled.suspended:
                yield Finished("tool_calls", step.usage)
                return
            if step.sent:  # calls went out, but the program ended without waiting for them
                yield Finished("tool_calls", step.usage)
                return
            output = settled.output
            observed = output.text() if output is not None else ""
            files = summary(settled.files)
            if files:
                observed = f"{observed}\n{files}" if observed else files
            yield ActionOutput(observed, output.error.ename if output is not None and output.error else None)
            block = f"```python\n{program.source}\n```"
            extra += [
                {"role": "assistant", "content": f"{reply.thought}\n\n{block}" if reply.thought else block},
                {"role": "user", "content": f"Observation:\n{observed or '(no output)'}"},
            ]
        yield TextDelta(("\n\n" if step.shown_text else "") + OUT_OF_STEPS)
        yield Finished("length", step.usage)

    def _shown(self, step: Step, events: list[LogEvent]) -> Toolset | None:
        """The stubs the prompt shows when the toolset is too large (None: all of them): the
        ones most relevant to the conversation's latest words, with search_tools, the tool
        tool_choice names, and every tool used earlier in the conversation or the session."""
        if step.index is None:
            return None
        used = {str(e.get("tool")) for e in events if e.get("kind") in ("call", "static_call")}
        used |= {
            str((c.get("function") or {}).get("name"))
            for m in step.messages
            if m.get("role") == "assistant"
            for c in m.get("tool_calls") or []
        }
        if step.choice.startswith("function:"):
            used.add(step.choice.split(":", 1)[1])
        latest = [m for m in step.messages if m.get("role") in ("user", "tool")][-3:]
        query = " ".join(content_text(m.get("content")) for m in latest)
        chosen = {t.name for t in step.index.shown(query, self.max_stubs - 1, used).tools} | {SEARCH_TOOLS}
        return Toolset(
            tools=tuple(t for t in step.toolset.tools if t.name in chosen), digest=step.toolset.digest
        )

    async def _ask_for_program(
        self, step: Step, record: LogEvent, program: Any, reply: Reply, seq: int, turn: int
    ) -> AsyncIterator[Event]:
        """The client approves a kernel program before it runs: the program is recorded, and
        the response is one call to the approval function (``programs.resume`` acts on it)."""
        assert step.approval is not None
        call_id = self.ids.issue(step.session_id, seq)
        arguments = {
            "kind": "program",
            "source": program.source,
            "calls": list(getattr(program, "tools_called", ()) or ()),
            "reason": reply.thought,
        }
        await self.store.append(
            step.session_id,
            {**record, "mode": "kernel", "source": program.source, "thought": reply.thought},
            {
                "kind": "call",
                "call_id": call_id,
                "seq": seq,
                "turn": turn,
                "tool": step.approval.tool,
                "arguments": arguments,
                "approval": "program",
            },
        )
        step.span.child("approval", input=arguments).end(output={"asked": call_id})
        for event in step.send(ToolCallOut(call_id, step.approval.tool, orjson.dumps(arguments).decode())):
            yield event
        yield Finished("tool_calls", step.usage)

    def _static_rest(self, step: Step, program: StaticCalls, seq: int) -> list[Event]:
        """The calls of a static program that did not go out while it was written."""
        out: list[Event] = []
        for i, call in enumerate(program.calls[len(step.sent) :], start=len(step.sent)):
            out += step.send(
                ToolCallOut(self.ids.issue(step.session_id, seq + i), call.name, call.arguments_json)
            )
        return out
