"""One model turn of the action loop: generate, read as it streams, repair, decide.

The model's text is read while it arrives (``translators.reader``):

- prose before the code fence goes out at once as ``TextDelta``s (the thought, or the
  whole answer);
- each statement of the program, once complete, is classified with everything before
  it: while the program so far is independent literal calls to client tools, each new
  call goes out at once as a tool call (pipelined), while the model writes the next;
- the whole reply is then judged by ``parse_output`` and ``classify`` as before.

Repairs: a reply that cannot be used goes back to the model with the problem, at most
``repair_attempts`` times. The client sees one message: prose shown by an earlier attempt
is not shown again, and calls already sent stay sent (a reply whose later statements
fail after some calls went out keeps those calls as its action; the rest is dropped and
recorded). When the repairs run out, a program that still parses is used anyway with its
schema problem recorded (as a native model's calls would reach the client); only output
that cannot be parsed at all is an answer, or an error when a call was required (so is a
program that does not keep to tool_choice: under ``required``, one that calls no function).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from lark import Lark
from lark.exceptions import LarkError

from proxy.actions.events import Event, TextDelta
from proxy.actions.step import Step, ToolCallOut
from proxy.backends.base import Generation, GenerationRequest
from proxy.errors import ModelOutputInvalid
from proxy.metrics import Metrics
from proxy.routing import ModelRouter, UpstreamClock
from proxy.sessions import CallIds
from translators import (
    Action,
    CallError,
    KernelProgram,
    OutputError,
    StaticCalls,
    Toolset,
    classify,
    closing_fence,
    parse_output,
    without_answer_mark,
)
from translators.actions import Call
from translators.gbnf import parser_for
from translators.reader import BlockClosed, OutputReader, Prose, Statements

__all__ = ["ModelTurn", "Reply", "check_tool_choice"]

log = logging.getLogger("cablectl.actions")

Message = dict[str, Any]


@dataclass
class Reply:
    """What one model turn came to."""

    prompt: list[Message]
    text: str = ""
    thought: str = ""
    program: StaticCalls | KernelProgram | None = None  # None: an answer
    pipelined: list[ToolCallOut] = field(default_factory=list)  # calls sent while it was written
    attempts: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    problem: str | None = None  # let through (schema) or dropped (after pipelined calls)


def check_tool_choice(choice: str, program: StaticCalls | KernelProgram, toolset: Toolset) -> None:
    """With tool_choice ``required`` the program must call at least one function; naming a
    function, it must call that one (and, if static, only it)."""
    called = (
        [c.name for c in program.calls] if isinstance(program, StaticCalls) else list(program.tools_called)
    )
    if choice == "required" and not called:
        names = [t.py for t in toolset.tools]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise OutputError(
            f"This reply must call at least one of the functions ({shown}); this program calls none."
        )
    if not choice.startswith("function:"):
        return
    name = choice.split(":", 1)[1]
    if name not in called or (isinstance(program, StaticCalls) and set(called) != {name}):
        tool = toolset.by_name(name)
        raise OutputError(f"This reply must call {tool.py if tool else name}, and only it.")


async def _closed(generation: Generation, reader: OutputReader) -> AsyncIterator[str]:
    """The generation's deltas, and a closing fence when the model ended its reply itself
    (finish_reason ``stop``) inside its python block: it meant the block to end there. A reply
    cut off by ``max_tokens`` (``length``) is not closed: its program may be half written."""
    async for delta in generation:
        yield delta
    if generation.finish_reason == "stop":
        fence = closing_fence(reader.text)
        if fence:
            log.info("the model stopped inside its python block; closing it")
            yield fence


async def _timed(generation: AsyncIterator[str], clock: UpstreamClock) -> AsyncIterator[str]:
    """The generation's deltas; time spent waiting for them is the upstream's, not ours."""
    iterator = generation.__aiter__()
    while True:
        waited = time.perf_counter()
        try:
            delta = await iterator.__anext__()
        except StopAsyncIteration:
            return
        finally:
            clock.ms += (time.perf_counter() - waited) * 1000
        yield delta


@dataclass
class _Pipeline:
    """Sends a static program's calls while the model is still writing the rest."""

    step: Step
    ids: CallIds
    seq: int  # the sequence number of the first call it sends
    calls: list[Call] = field(default_factory=list)
    source: str = ""  # the statements the sent calls come from
    stopped: bool = False

    def offer(self, source: str) -> Iterator[Event]:
        if self.stopped:
            return
        step = self.step
        try:
            program = classify(source, step.toolset)
        except (OutputError, CallError):
            program = None
        named = step.choice.split(":", 1)[1] if step.choice.startswith("function:") else None
        if (
            not isinstance(program, StaticCalls)
            or any(c.name in step.servers or (named and c.name != named) for c in program.calls)
            or step.choice == "none"
            or (step.approval is not None and step.approval.programs)  # nothing out before it is judged
        ):
            self.stopped = True
            return
        for call in program.calls[len(self.calls) :]:
            if self.calls and not step.parallel:
                self.stopped = True
                return
            out = ToolCallOut(
                self.ids.issue(step.session_id, self.seq + len(self.calls)), call.name, call.arguments_json
            )
            self.calls.append(call)
            self.source = source
            yield from step.send(out)


class ModelTurn:
    def __init__(self, router: ModelRouter, ids: CallIds, metrics: Metrics) -> None:
        self.router = router
        self.ids = ids
        self.metrics = metrics
        self._parsers: dict[str, Lark] = {}
        self._warned: set[str] = set()  # routes whose server was seen ignoring the grammar

    async def _check_grammar(self, step: Step, generation: Generation, text: str) -> None:
        """A server sent a grammar must keep to it; one that does not failed open (llama.cpp
        drops a grammar it cannot parse and answers 200). Logged once per route, counted; the
        reply is then judged like any unconstrained one."""
        if step.grammar_lark is None or generation.grammar_enforced:
            return
        # building and running a parser takes milliseconds: off the event loop
        parser = self._parsers.get(step.grammar_lark)
        if parser is None:
            parser = await anyio.to_thread.run_sync(parser_for, step.grammar_lark)
            self._parsers[step.grammar_lark] = parser
            if len(self._parsers) > 64:
                self._parsers.pop(next(iter(self._parsers)))
        try:
            await anyio.to_thread.run_sync(parser.parse, text)
            return
        except LarkError:
            pass
        model = step.entry.model_name
        self.metrics.grammar_ignored.labels(model).inc()
        if model not in self._warned:
            self._warned.add(model)
            log.warning(
                "model %s: the upstream (server: %s) was sent a %s grammar and answered outside it; "
                "it ignores grammars (or could not parse ours). Replies are checked and repaired; set "
                "grammar: none on this route if the server takes no grammar",
                model,
                generation.server or "unknown",
                step.grammar.mode if step.grammar else "?",
            )

    async def run(self, step: Step, reply: Reply, seq: int) -> AsyncIterator[Event]:
        """Generate until a usable reply (or the repairs run out); fills ``reply``."""
        entry = step.entry
        mode = "none" if step.grammar is None else step.grammar.mode
        prompt = reply.prompt
        problem: str | None = None
        pipeline = _Pipeline(step, self.ids, seq)
        shown = False  # prose of this turn went out
        for attempt in range(entry.repair_attempts + 1):
            reply.attempts = attempt + 1
            if not pipeline.calls:
                pipeline = _Pipeline(step, self.ids, seq)
            show_prose = not shown  # one coherent message: never a second thought
            reader = OutputReader(prose_only=step.choice == "none")
            repair = None if problem is None else step.span.child("repair", input=problem)
            try:
                with (repair or step.span).child(
                    "generation",
                    "generation",
                    input=prompt,
                    model=entry.model_name,
                    metadata={"grammar": mode, "attempt": attempt},
                ) as span:
                    job = GenerationRequest(
                        prompt, step.request, step.payload, step.grammar, step.toolset.signatures
                    )
                    generation = await self.router.generate(job, step.clock)
                    try:
                        async for delta in _timed(_closed(generation, reader), step.clock):
                            for event in reader.feed(delta):
                                if isinstance(event, Prose) and show_prose:
                                    yield self._show(step, event.text, shown)
                                    shown = True
                                elif isinstance(event, Statements):
                                    for out in pipeline.offer(event.source):
                                        yield out
                                elif isinstance(event, BlockClosed):
                                    pass  # the rest of the reply is not read (usage still comes)
                        for event in reader.close():
                            if isinstance(event, Prose) and show_prose:
                                yield self._show(step, event.text, shown)
                                shown = True
                    finally:
                        with anyio.CancelScope(shield=True):
                            await generation.aclose()
                    span.end(output=reader.text, usage=generation.usage)
            finally:
                if repair is not None:
                    repair.end()
            self.metrics.generations.labels(entry.model_name, mode).inc()
            step.usage.add(dict(generation.usage))
            for key, value in generation.usage.items():
                reply.usage[key] = reply.usage.get(key, 0) + value
            reply.text = reader.text
            log.debug("model output (attempt %d, %s): %r", attempt + 1, generation.finish_reason, reply.text)
            reply.pipelined = list(step.sent)
            await self._check_grammar(step, generation, reply.text)
            if step.choice == "none":
                return
            try:
                self._judge(step, reply)
                if problem is not None:
                    self.metrics.repairs.labels(entry.model_name, "repaired").inc()
                if reply.program is None and not show_prose:  # a repaired reply is an answer
                    yield self._show(step, without_answer_mark(reply.text).strip(), False)
                return
            except (OutputError, CallError) as exc:
                if problem is not None:
                    self.metrics.repairs.labels(entry.model_name, "failed").inc()
                problem = exc.message
                if pipeline.calls:  # those calls are out: they are the action, the rest is dropped
                    reply.program = StaticCalls(tuple(pipeline.calls), pipeline.source)
                    reply.problem = f"dropped after the calls already sent: {problem}"
                    log.info("model output failed after pipelined calls: %s", problem)
                    return
                log.info("repairing model output (attempt %d): %s", attempt + 1, problem)
                prompt = [
                    *prompt,
                    {"role": "assistant", "content": reply.text},
                    {
                        "role": "user",
                        "content": f"That reply could not be used: {problem}\nReply again, fixed.",
                    },
                ]
        for shown_event in self._exhausted(step, reply, problem or "unusable reply", shown):
            yield shown_event

    @staticmethod
    def _show(step: Step, text: str, continued: bool) -> TextDelta:
        """Text for the client; a new turn's text is a new paragraph of the same message."""
        if not continued and step.shown_text:
            text = "\n\n" + text
        step.shown_text += text
        return TextDelta(text)

    def _judge(self, step: Step, reply: Reply) -> None:
        output = parse_output(reply.text)
        if isinstance(output, Action):
            program = classify(output.source, step.toolset)
            check_tool_choice(step.choice, program, step.toolset)
            reply.program = program
            reply.thought = output.thought
        elif step.choice != "auto":
            raise OutputError("This reply must call a function in a ```python block.")
        else:
            reply.program = None

    def _exhausted(self, step: Step, reply: Reply, problem: str, shown: bool) -> Iterator[Event]:
        """Repairs ran out: use a program that parses (and keeps to tool_choice) anyway; answer
        with text otherwise."""
        try:
            output = parse_output(reply.text)
            if isinstance(output, Action):
                program = classify(output.source, step.toolset, check=False)
                check_tool_choice(step.choice, program, step.toolset)
                reply.program = program
                reply.thought = output.thought
                reply.problem = f"sent despite: {problem}"
                log.info("repairs exhausted; sending the program's calls anyway: %s", problem)
                return
        except (OutputError, CallError):
            pass
        if step.choice != "auto":
            raise ModelOutputInvalid(
                f"model {step.entry.model_name!r} did not write a usable call after "
                f"{reply.attempts} attempt(s): {problem}"
            )
        reply.program = None
        reply.problem = problem
        # what it wrote after the prose already shown (the code that could not be read)
        text = without_answer_mark(reply.text).strip()
        if shown:
            reader = OutputReader()
            prose = "".join(e.text for e in [*reader.feed(text), *reader.close()] if isinstance(e, Prose))
            text = text[len(prose) :] if text.startswith(prose) else text
        if text:
            yield self._show(step, text, shown)
