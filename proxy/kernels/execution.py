"""One cell as a resumable state machine: ``start`` and ``reply`` return ``Pending`` or ``Finished``.

A stub calling a tool blocks its cell in ``input()``; the kernel sends an
``input_request`` on stdin and the run returns ``Pending(request)``. The cell stays
blocked in its kernel (across HTTP requests, as long as needed) until ``reply``
sends the ``input_reply``; then it runs on to the next call or to the end.

Limits: the time limit counts only time the cell is running, not time spent
waiting for a tool result; past it the cell is interrupted, and if the kernel does
not stop within ``grace`` seconds it is declared dead (the pool replaces it).
Output beyond ``max_output_chars`` is dropped and marked truncated; a cell that
keeps printing past ``10x`` that is interrupted too.

An interrupt sent by message is over only when the kernel has answered it: ipykernel
signals itself from its control thread, and a signal sent late (after this cell had ended
by itself) would land in the next cell's request, outside the program, where ipykernel
drops that request's reply, and the next cell would wait for it until its own limit. An
interrupt that lands outside the program of its own cell leaves no reply either: the cell
is over when the kernel is idle again.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.kernels.base import (
    CellError,
    CellOutput,
    Finished,
    KernelConnection,
    Message,
    Pending,
    ToolRequest,
)
from translators.kernel_stubs import PROMPT_PREFIX

__all__ = ["CellRun", "ExecLimits", "KernelDied"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
POLL = 0.25  # seconds between liveness checks while a cell is silent


class KernelDied(Exception):
    """The kernel is gone (crashed, killed, or would not stop); it must be replaced."""


@dataclass(frozen=True, slots=True)
class ExecLimits:
    timeout: float = 30.0  # seconds of running time per cell
    max_output_chars: int = 100_000
    grace: float = 3.0  # seconds an interrupted cell gets to stop


class CellRun:
    def __init__(self, kernel: KernelConnection, limits: ExecLimits | None = None) -> None:
        self.kernel = kernel
        self.limits = limits or ExecLimits()
        self.output = CellOutput()
        self.msg_id: str | None = None
        self._pending: Message | None = None
        self._idle = False
        self._replied = False
        self._used = 0.0  # running time so far
        self._produced = 0  # output chars seen, kept or not
        self._interrupted: str | None = None
        self._interrupted_at = 0.0
        self._interrupt_id: str | None = None  # an interrupt request not answered yet
        self._by_message = False  # the interrupt was a request (answered on the control channel)
        self.dead = False

    @property
    def waiting(self) -> bool:
        return self._pending is not None

    async def start(self, code: str, expressions: dict[str, str] | None = None) -> Pending | Finished:
        if self.msg_id is not None:
            raise RuntimeError("a CellRun runs one cell")
        self.msg_id = await self.kernel.execute(code, allow_stdin=True, user_expressions=expressions)
        return await self._advance()

    async def reply(self, result: Any = None, *, error: str | None = None) -> Pending | Finished:
        """Answer the pending tool call with a JSON-able result, or an error raised as ToolError."""
        if self._pending is None:
            raise RuntimeError("no tool call is waiting for a reply")
        parent, self._pending = self._pending, None
        payload = {"error": error} if error is not None else {"result": result}
        await self.kernel.input_reply(
            orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY).decode(), parent
        )
        return await self._advance()

    def _append(self, name: str, text: str) -> None:
        self._produced += len(text)
        kept = len(self.output.stdout) + len(self.output.stderr)
        room = self.limits.max_output_chars - kept
        if room <= 0:
            self.output.truncated = True
            return
        if len(text) > room:
            text = text[:room]
            self.output.truncated = True
        if name == "stderr":
            self.output.stderr += text
        else:
            self.output.stdout += text

    def _on_iopub(self, msg: Message) -> None:
        kind = msg["header"]["msg_type"]
        content = msg["content"]
        if kind == "stream":
            self._append(content.get("name", "stdout"), content.get("text", ""))
        elif kind in ("execute_result", "display_data"):
            data = content.get("data", {})
            if "text/plain" in data and len(self.output.results) < 100:
                text = str(data["text/plain"])
                self._produced += len(text)
                if sum(map(len, self.output.results)) + len(text) <= self.limits.max_output_chars:
                    self.output.results.append(text)
                else:
                    self.output.truncated = True
            images = {k: v for k, v in data.items() if k.startswith("image/")}
            if images and len(self.output.images) < 20:
                self.output.images.append(images)
        elif kind == "error":
            traceback = _ANSI.sub("", "\n".join(content.get("traceback", [])))
            self.output.error = CellError(content.get("ename", ""), content.get("evalue", ""), traceback)
        elif kind == "status" and content.get("execution_state") == "idle":
            self._idle = True

    def _on_stdin(self, msg: Message) -> Pending | None:
        if msg["header"]["msg_type"] != "input_request":
            return None
        prompt = str(msg["content"].get("prompt", ""))
        self._pending = msg
        if not prompt.startswith(PROMPT_PREFIX):
            # plain input() in user code: there is nobody to type; answer empty at once
            return None
        data = orjson.loads(prompt[len(PROMPT_PREFIX) :])
        self.output.tool_calls += 1
        return Pending(ToolRequest(int(data["id"]), str(data["tool"]), dict(data.get("arguments") or {})))

    async def _advance(self) -> Pending | Finished:
        started = time.perf_counter()
        try:
            while True:
                if self._replied and self._idle and self._interrupt_id is None:
                    break
                elapsed = self._used + (time.perf_counter() - started)
                if self._interrupted is None:
                    if elapsed > self.limits.timeout:
                        await self._interrupt(f"the cell ran longer than {self.limits.timeout:g} s", elapsed)
                    elif self._produced > 10 * self.limits.max_output_chars:
                        limit = 10 * self.limits.max_output_chars
                        await self._interrupt(f"the cell printed more than {limit} characters", elapsed)
                elif elapsed > self._interrupted_at + self.limits.grace:
                    if self._idle and (self._replied or self._interrupt_id is None):
                        # the interrupt landed outside the program, where ipykernel drops the
                        # request's reply; or the kernel never answers interrupt requests (not
                        # an ipykernel, or a gateway that does not pass them) and the cell
                        # ended by itself: either way the kernel is idle and well
                        break
                    self.dead = True
                    flags = [("reply", self._replied), ("idle", self._idle)]
                    if self._by_message:
                        flags.append(("interrupt reply", self._interrupt_id is None))
                    seen = ", ".join(f"{what} {'seen' if flag else 'not seen'}" for what, flag in flags)
                    raise KernelDied(
                        f"{self._interrupted}, and the kernel did not stop when interrupted ({seen})"
                    )
                msg = await self.kernel.next_message(POLL)
                if msg is None:
                    if not await self.kernel.is_alive():
                        self.dead = True
                        raise KernelDied("the kernel died while running the cell")
                    continue
                parent_id = msg.get("parent_header", {}).get("msg_id")
                channel = msg.get("channel")
                if channel == "control" and parent_id is not None and parent_id == self._interrupt_id:
                    self._interrupt_id = None  # the kernel has signalled itself
                    continue
                if parent_id != self.msg_id:
                    continue  # a message of an earlier cell
                if channel == "iopub":
                    self._on_iopub(msg)
                elif channel == "shell" and msg["header"]["msg_type"] == "execute_reply":
                    self._replied = True
                    content = msg.get("content") or {}
                    if content.get("status") == "aborted":
                        # queued behind a cell that failed (stop_on_error): it never ran
                        why = "the kernel did not run the cell: a cell before it failed"
                        self.output.error = CellError("CellAborted", why, f"CellAborted: {why}")
                    evaluated = content.get("user_expressions")
                    if isinstance(evaluated, dict):
                        self.output.expressions = evaluated
                elif channel == "stdin":
                    pending = self._on_stdin(msg)
                    if pending is not None:
                        return pending
                    if self._pending is not None:  # a bare input(): answer it empty
                        parent, self._pending = self._pending, None
                        await self.kernel.input_reply("", parent)
        finally:
            self._used += time.perf_counter() - started
        return Finished(self._finish())

    async def _interrupt(self, why: str, at: float) -> None:
        self._interrupted = why
        self._interrupted_at = at
        self._interrupt_id = await self.kernel.interrupt()
        self._by_message = self._interrupt_id is not None

    def _finish(self) -> CellOutput:
        self.output.duration_ms = self._used * 1000
        if self._interrupted is not None:
            ename = "TimeoutError" if "longer" in self._interrupted else "OutputLimitExceeded"
            self.output.error = CellError(ename, self._interrupted, f"Interrupted: {self._interrupted}.")
        return self.output
