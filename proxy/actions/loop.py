"""The action loop: tools in, code actions inside, OpenAI tool_calls out.

For a request with ``tools`` on a route with ``code_actions`` on:

1. resume: if the trailing ``tool`` messages answer a call a kernel program is waiting
   on (the id names its session), feed the result to the program and let it run on;
2. prompt: the conversation in code form (kernel turns collapsed to their programs);
3. generate with the route's grammar mode (GBNF for llama.cpp, Lark for servers that
   take it, or none), then parse; a bad reply goes back to the model with the error,
   at most ``repair_attempts`` times;
4. an answer is returned as is; a program of independent literal calls becomes
   parallel tool_calls at once (no kernel); anything else runs in the session's
   kernel, and each client tool call it makes suspends it and goes out as a tool_call;
   when a program finishes, its output is an observation and the loop goes on
   (``max_steps`` rounds at most).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.actions.history import check_tool_messages, collapse, trailing_tool_results
from proxy.actions.runtime import Runtime, result_value
from proxy.backends.base import ModelBackend
from proxy.backends.local import LocalBackend
from proxy.config import ModelEntry
from proxy.errors import InvalidRequest, PermissionDenied
from proxy.kernels import CellError, CellOutput, Finished, KernelDied, Pending
from proxy.metrics import Metrics
from proxy.routing import ModelRouter, UpstreamClock
from proxy.schemas import ChatCompletionRequest
from proxy.sessions import CallIds, SessionStore, new_session_id
from proxy.toolsets import ServerToolset, ToolCallFailed
from proxy.tracing import NoopTracer, Span, Tracer
from translators import (
    Action,
    CallError,
    KernelProgram,
    OutputError,
    StaticCalls,
    Toolset,
    ToolsetCache,
    ToolsetError,
    build_grammar,
    build_prompt,
    check_call,
    classify,
    lark_to_gbnf,
    normalize_tool_choice,
    parse_output,
)

__all__ = ["ActionLoop", "LoopResult", "ToolCallOut"]

log = logging.getLogger("cablectl.actions")

Message = dict[str, Any]
Event = dict[str, Any]
# what the upstream must not see when it is asked for a code action
_NOT_FORWARDED = {
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "stream",
    "stream_options",
    "functions",
    "function_call",
    "n",
}


@dataclass(frozen=True, slots=True)
class ToolCallOut:
    id: str
    name: str
    arguments: str


@dataclass
class LoopResult:
    content: str | None
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )
    session_id: str | None = None
    trace_id: str | None = None

    def add_usage(self, usage: dict[str, Any]) -> None:
        for key in ("prompt_tokens", "completion_tokens"):
            self.usage[key] += int(usage.get(key) or 0)
        self.usage["total_tokens"] = self.usage["prompt_tokens"] + self.usage["completion_tokens"]


def _check_named_choice(choice: str, program: StaticCalls | KernelProgram, toolset: Toolset) -> None:
    """With tool_choice naming a function, the program must call it (and, if static, only it)."""
    if not choice.startswith("function:"):
        return
    name = choice.split(":", 1)[1]
    called = (
        [c.name for c in program.calls] if isinstance(program, StaticCalls) else list(program.tools_called)
    )
    if name not in called or (isinstance(program, StaticCalls) and set(called) != {name}):
        tool = toolset.by_name(name)
        raise OutputError(f"This reply must call {tool.py if tool else name}, and only it.")


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


class ActionLoop:
    def __init__(
        self,
        router: ModelRouter,
        runtime: Runtime,
        store: SessionStore,
        ids: CallIds,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.router = router
        self.runtime = runtime
        self.store = store
        self.ids = ids
        self.tracer = tracer or NoopTracer()
        self.metrics = metrics or Metrics()
        self.toolsets = ToolsetCache()
        self._grammars: dict[tuple[str, str, bool], tuple[str, str]] = {}

    # --- grammars -------------------------------------------------------------------------

    def _grammar(self, toolset: Toolset, choice: str, parallel: bool) -> tuple[str, str]:
        key = (toolset.digest, choice, parallel)
        if key not in self._grammars:
            lark = build_grammar(toolset, choice, parallel)
            self._grammars[key] = (lark, lark_to_gbnf(lark))
            if len(self._grammars) > 512:
                self._grammars.pop(next(iter(self._grammars)))
        return self._grammars[key]

    async def _generate(
        self,
        entry: ModelEntry,
        backend: ModelBackend,
        prompt: list[Message],
        request: ChatCompletionRequest,
        payload: dict[str, Any],
        grammar: tuple[str, str] | None,
        clock: UpstreamClock,
    ) -> tuple[str, dict[str, Any]]:
        mode = entry.grammar_mode
        if isinstance(backend, LocalBackend):
            return await backend.generate_text(
                prompt, request, grammar[1] if grammar and mode == "gbnf" else None
            )
        body = {k: v for k, v in payload.items() if k not in _NOT_FORWARDED}
        body["messages"] = prompt
        if grammar is not None and mode == "lark":
            body["structured_outputs"] = {"grammar": grammar[0]}
        elif grammar is not None and mode == "gbnf":
            body["grammar"] = grammar[1]  # a llama.cpp server
        raw = await self.router.complete(body, request, clock)
        data = orjson.loads(raw)
        message = (data.get("choices") or [{}])[0].get("message") or {}
        return str(message.get("content") or ""), dict(data.get("usage") or {})

    # --- the loop ---------------------------------------------------------------------------

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

    async def run(
        self,
        entry: ModelEntry,
        backend: ModelBackend,
        request: ChatCompletionRequest,
        payload: dict[str, Any],
        clock: UpstreamClock,
        server: list[ServerToolset] | None = None,
        denied: set[str] | None = None,
    ) -> LoopResult:
        messages: list[Message] = list(payload["messages"])
        check_tool_messages(messages)
        client_tools = list(payload.get("tools") or [])
        servers = {name: ts for ts in server or [] for name in ts.names()}
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
        if named is not None and named in (denied or set()):
            raise PermissionDenied(
                f"tool_choice names {named!r}, a server-side function this API key may not use",
                param="tool_choice",
            )
        try:
            toolset = self.toolsets.get(client_tools + [t for ts in server or [] for t in ts.tools])
            choice = normalize_tool_choice(request.tool_choice, toolset)
        except ToolsetError as exc:
            raise InvalidRequest(exc.message, param=exc.param) from exc
        session_id = self._session_of(messages) or new_session_id()
        result = LoopResult(content=None, session_id=session_id)
        answers = trailing_tool_results(messages)
        with self.tracer.request(
            "chat.completions",
            session_id=session_id,
            input=answers or messages[-1:],
            metadata={"model": request.model, "grammar": entry.grammar_mode, "stream": bool(request.stream)},
        ) as span:
            result.trace_id = span.trace_id
            for answer in _client_answers(messages, answers):
                with span.child("tool", "tool", input=answer, metadata={"kind": "client"}) as tool_span:
                    tool_span.end(output=answer["result"])
            try:
                await self._locked_run(
                    session_id,
                    entry,
                    backend,
                    request,
                    payload,
                    clock,
                    messages,
                    toolset,
                    choice,
                    servers,
                    result,
                    span,
                )
            finally:
                self.runtime.done(session_id)
            span.end(
                output={
                    "content": result.content,
                    "tool_calls": [
                        {"id": c.id, "name": c.name, "arguments": c.arguments} for c in result.tool_calls
                    ],
                    "finish_reason": result.finish_reason,
                },
                usage=result.usage,
            )
        return result

    async def _locked_run(
        self,
        session_id: str,
        entry: ModelEntry,
        backend: ModelBackend,
        request: ChatCompletionRequest,
        payload: dict[str, Any],
        clock: UpstreamClock,
        messages: list[Message],
        toolset: Toolset,
        choice: str,
        servers: dict[str, ServerToolset],
        result: LoopResult,
        span: Span,
    ) -> LoopResult:
        parallel = request.parallel_tool_calls is not False
        async with self.store.lock(session_id):
            events = await self.store.events(session_id)
            if not events:
                await self.store.append(session_id, {"kind": "tools", "digest": toolset.digest})
                events = await self.store.events(session_id)
            resumed = await self._resume(
                session_id, toolset, events, trailing_tool_results(messages), result, servers, span
            )
            if resumed:
                return result
            events = await self.store.events(session_id)
            await self._steps(
                entry,
                backend,
                request,
                payload,
                toolset,
                choice,
                parallel,
                messages,
                events,
                result,
                clock,
                servers,
                span,
            )
            return result

    async def _steps(
        self,
        entry: ModelEntry,
        backend: ModelBackend,
        request: ChatCompletionRequest,
        payload: dict[str, Any],
        toolset: Toolset,
        choice: str,
        parallel: bool,
        messages: list[Message],
        events: list[Event],
        result: LoopResult,
        clock: UpstreamClock,
        servers: dict[str, ServerToolset],
        span: Span,
    ) -> None:
        session_id = result.session_id or ""
        grammar = (
            None
            if entry.grammar_mode == "none" or choice == "none"
            else self._grammar(toolset, choice, parallel)
        )
        extra: list[Message] = []  # turns of this request the client does not see
        mode = "none" if grammar is None else entry.grammar_mode
        for _ in range(entry.max_steps):
            prompt = first_prompt = build_prompt(
                collapse(messages, events) + extra, toolset, choice, parallel
            )
            text = ""
            parsed: StaticCalls | KernelProgram | None = None
            thought = ""
            turn_usage: dict[str, int] = {}
            problem: str | None = None  # what the last reply got wrong
            for attempt in range(entry.repair_attempts + 1):
                repair = None if problem is None else span.child("repair", input=problem)
                try:
                    with (repair or span).child(
                        "generation",
                        "generation",
                        input=prompt,
                        model=entry.model_name,
                        metadata={"grammar": mode, "attempt": attempt},
                    ) as generation:
                        text, usage = await self._generate(
                            entry, backend, prompt, request, payload, grammar, clock
                        )
                        generation.end(output=text, usage=usage)
                finally:
                    if repair is not None:
                        repair.end()
                self.metrics.generations.labels(entry.model_name, mode).inc()
                result.add_usage(usage)
                for key, value in usage.items():
                    if isinstance(value, int):
                        turn_usage[key] = turn_usage.get(key, 0) + value
                if choice == "none":
                    break
                try:
                    output = parse_output(text)
                    if isinstance(output, Action):
                        parsed = classify(output.source, toolset)
                        thought = output.thought
                        _check_named_choice(choice, parsed, toolset)
                    elif choice != "auto":
                        raise OutputError("This reply must call a function in a ```python block.")
                    if problem is not None:
                        self.metrics.repairs.labels(entry.model_name, "repaired").inc()
                    break
                except (OutputError, CallError) as exc:
                    log.info("repairing model output (attempt %d): %s", attempt + 1, exc.message)
                    if problem is not None:
                        self.metrics.repairs.labels(entry.model_name, "failed").inc()
                    problem = exc.message
                    parsed = None
                    prompt = [
                        *prompt,
                        {"role": "assistant", "content": text},
                        {
                            "role": "user",
                            "content": f"That reply could not be used: {exc.message}\nReply again, fixed.",
                        },
                    ]
            turn = sum(1 for e in events if e.get("kind") == "turn") + 1
            record: Event = {
                "kind": "turn",
                "turn": turn,
                "model": entry.model_name,
                "prompt": first_prompt,
                "completion": text,
                "usage": turn_usage,
                "attempts": attempt + 1,
            }
            if parsed is None:
                await self.store.append(session_id, {**record, "mode": "answer"})
                result.content = text.strip()
                result.finish_reason = "stop"
                return
            static = isinstance(parsed, StaticCalls) and not any(c.name in servers for c in parsed.calls)
            if isinstance(parsed, StaticCalls) and static and (parallel or len(parsed.calls) == 1):
                seq = self._next_seq(events)
                calls = [
                    ToolCallOut(self.ids.issue(session_id, seq + i), call.name, call.arguments_json)
                    for i, call in enumerate(parsed.calls)
                ]
                await self.store.append(
                    session_id,
                    {**record, "mode": "static", "source": parsed.source, "thought": thought},
                    *(
                        {
                            "kind": "static_call",
                            "call_id": c.id,
                            "seq": seq + i,
                            "turn": turn,
                            "tool": c.name,
                            "arguments": c.arguments,
                        }
                        for i, c in enumerate(calls)
                    ),
                )
                self.metrics.actions.labels("static").inc()
                self.metrics.tool_calls.labels("client").inc(len(calls))
                for call in calls:
                    span.child("tool", "tool", input={"name": call.name, "arguments": call.arguments}).end(
                        output={"sent_to_client": call.id}, metadata={"kind": "client", "path": "static"}
                    )
                result.content = thought or None
                result.tool_calls = calls
                result.finish_reason = "tool_calls"
                return
            await self.store.append(
                session_id, {**record, "mode": "kernel", "source": parsed.source, "thought": thought}
            )
            self.metrics.actions.labels("kernel").inc()
            with span.child("action", input=parsed.source, metadata={"turn": turn}) as action:
                live = await self.runtime.kernel(session_id, toolset)
                state = await self._guarded(live.kernel.execute(parsed.source), session_id)
                if await self._settle(session_id, toolset, turn, state, result, servers, action):
                    return
            events = await self.store.events(session_id)
            observed = next((str(e["output"]) for e in reversed(events) if e.get("kind") == "cell_end"), "")
            block = f"```python\n{parsed.source}\n```"
            extra += [
                {"role": "assistant", "content": f"{thought}\n\n{block}" if thought else block},
                {"role": "user", "content": f"Observation:\n{observed or '(no output)'}"},
            ]
        result.content = "The task did not finish within this model's max_steps; ask again to continue."
        result.finish_reason = "length"

    async def _guarded(self, step: Any, session_id: str) -> Pending | Finished:
        try:
            return await step  # type: ignore[no-any-return]
        except KernelDied as exc:
            await self.runtime.release(session_id)
            return Finished(CellOutput(error=CellError("KernelDied", str(exc), f"The kernel died: {exc}")))

    def _next_seq(self, events: list[Event]) -> int:
        return 1 + max(
            (int(e.get("seq", 0)) for e in events if e.get("kind") in ("call", "static_call")), default=0
        )

    async def _settle(
        self,
        session_id: str,
        toolset: Toolset,
        turn: int,
        state: Pending | Finished,
        result: LoopResult,
        servers: dict[str, ServerToolset],
        action: Span,
    ) -> bool:
        """Drive a kernel cell until a client call (True: respond with it) or its end (False)."""
        kernel_id = (
            self.runtime.live[session_id].kernel.kernel_id if session_id in self.runtime.live else None
        )
        while isinstance(state, Pending):
            request = state.request
            tool = toolset.by_name(request.tool)
            live = self.runtime.live[session_id]
            try:
                if tool is None:
                    raise CallError(f"{request.tool} is not a tool of this request")
                check_call(tool, [], request.arguments)
            except CallError as exc:  # the program gets a ToolError, the client is not asked
                action.child(
                    "tool", "tool", input={"name": request.tool, "arguments": request.arguments}
                ).end(error=exc.message, metadata={"kind": "refused"})
                state = await self._guarded(live.kernel.reply(error=exc.message), session_id)
                continue
            events = await self.store.events(session_id)
            seq = self._next_seq(events)
            call_id = self.ids.issue(session_id, seq)
            call_event: Event = {
                "kind": "call",
                "call_id": call_id,
                "seq": seq,
                "turn": turn,
                "tool": request.tool,
                "arguments": request.arguments,
            }
            server = servers.get(request.tool)
            if server is not None:  # the proxy answers it; recorded so a replay need not call again
                recorded: Event = {"kind": "result", "call_id": call_id}
                self.metrics.tool_calls.labels("server").inc()
                with action.child(
                    "tool",
                    "tool",
                    input={"name": request.tool, "arguments": request.arguments},
                    metadata={"kind": "server", "toolset": server.name, "call_id": call_id},
                ) as tool_span:
                    try:
                        recorded["value"] = await server.call(request.tool, request.arguments)
                        tool_span.end(output=recorded["value"])
                    except ToolCallFailed as exc:
                        recorded["error"] = str(exc)
                        tool_span.end(error=str(exc))
                await self.store.append(session_id, {**call_event, "server": server.name}, recorded)
                if "error" in recorded:
                    state = await self._guarded(live.kernel.reply(error=recorded["error"]), session_id)
                else:
                    state = await self._guarded(live.kernel.reply(recorded["value"]), session_id)
                continue
            arguments = orjson.dumps(request.arguments).decode()
            await self.store.append(session_id, call_event)
            self.runtime.live[session_id].waiting_call_id = call_id
            self.metrics.tool_calls.labels("client").inc()
            action.child("tool", "tool", input={"name": request.tool, "arguments": request.arguments}).end(
                output={"sent_to_client": call_id}, metadata={"kind": "client", "path": "kernel"}
            )
            action.end(
                output=f"waiting for the client's result of {request.tool} ({call_id})",
                metadata={"kernel_id": kernel_id, "turn": turn},
            )
            result.tool_calls = [ToolCallOut(call_id, request.tool, arguments)]
            result.finish_reason = "tool_calls"
            return True
        output = state.output
        await self.store.append(
            session_id,
            {
                "kind": "cell_end",
                "turn": turn,
                "output": output.text(),
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
        return False

    async def _resume(
        self,
        session_id: str,
        toolset: Toolset,
        events: list[Event],
        answers: list[Message],
        result: LoopResult,
        servers: dict[str, ServerToolset],
        span: Span,
    ) -> bool:
        """Feed the client's answer to the waiting kernel call; True if the response is decided."""
        answered = {str(m.get("tool_call_id")): m for m in answers}
        results = {e["call_id"] for e in events if e.get("kind") == "result"}
        waiting = next(
            (e for e in reversed(events) if e.get("kind") == "call" and e["call_id"] not in results), None
        )
        if waiting is None or waiting["call_id"] not in answered:
            return False
        value = result_value(answered[waiting["call_id"]].get("content"))
        await self.store.append(session_id, {"kind": "result", "call_id": waiting["call_id"], "value": value})
        turn = int(waiting["turn"])
        live = self.runtime.live.get(session_id)
        state: Pending | Finished | None = None
        if (
            live is not None
            and live.waiting_call_id == waiting["call_id"]
            and not live.kernel.retired
            and await live.kernel.connection.is_alive()
        ):
            live.waiting_call_id = None
            try:
                state = await live.kernel.reply(value)
            except KernelDied:  # died while we waited: the log brings it back
                await self.runtime.release(session_id)
                live = None
        else:
            live = None
        if live is None:
            # this kernel is gone (crash, restart, another replica): replay the log onto a fresh one
            with span.child("replay", metadata={"turn": turn}) as replay:
                live, state = await self.runtime.replay(
                    session_id, toolset, await self.store.events(session_id)
                )
                replay.end(metadata={"kernel_id": live.kernel.kernel_id})
        if state is None:
            return False
        source = next(
            (e.get("source") for e in events if e.get("kind") == "turn" and e.get("turn") == turn), None
        )
        with span.child("action", input=source, metadata={"turn": turn, "resumed": True}) as action:
            return await self._settle(session_id, toolset, turn, state, result, servers, action)
