"""The kernel seam: a running kernel (local or behind a gateway), what a cell produces,
and the two states a cell can be in between HTTP requests.

``KernelConnection`` speaks the Jupyter messaging protocol: send an execute request,
answer an input request, interrupt, and read messages from every channel in one
stream. ``KernelProvider`` starts them. Two real providers: local processes
(``proxy.kernels.local``) and Jupyter Kernel/Enterprise Gateway (``proxy.kernels.gateway``).
"""

from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CellError",
    "CellOutput",
    "Finished",
    "KernelConnection",
    "KernelProvider",
    "Pending",
    "ToolRequest",
]

Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """A stub in the kernel asking for a tool call; the cell waits for ``reply``."""

    id: int
    tool: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CellError:
    ename: str
    evalue: str
    traceback: str


@dataclass(slots=True)
class CellOutput:
    stdout: str = ""
    stderr: str = ""
    results: list[str] = field(default_factory=list)  # text/plain of execute_result and display_data
    images: list[dict[str, str]] = field(default_factory=list)  # {mime: base64} kept for later use
    error: CellError | None = None
    truncated: bool = False
    tool_calls: int = 0
    duration_ms: float = 0.0
    # what the execute request's user_expressions evaluated to after the cell, by name:
    # {"status": "ok", "data": {"text/plain": ...}} or an error (a cell that raised: none)
    expressions: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """Everything a model should see of the cell, as one observation."""
        parts = [p for p in (self.stdout, *self.results) if p]
        if self.stderr.strip():
            parts.append(self.stderr)
        if self.error is not None:
            parts.append(self.error.traceback or f"{self.error.ename}: {self.error.evalue}")
        if self.truncated:
            parts.append("[output truncated]")
        return "\n".join(p.rstrip("\n") for p in parts)


@dataclass(frozen=True, slots=True)
class Pending:
    """The cell is blocked in a tool call; answer it with ``CellRun.reply``."""

    request: ToolRequest


@dataclass(frozen=True, slots=True)
class Finished:
    output: CellOutput


class KernelConnection(abc.ABC):
    """One running kernel. Implementations feed ``self.inbox`` with every channel's messages."""

    kernel_id: str

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.started_at = time.time()

    async def next_message(self, timeout: float) -> Message | None:
        """The next message from any channel (``msg["channel"]`` says which), or None."""
        if not self.inbox.empty():  # no timer and no task for a message that is already here
            return self.inbox.get_nowait()
        try:
            return await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return None

    @abc.abstractmethod
    async def execute(
        self, code: str, *, allow_stdin: bool = True, user_expressions: dict[str, str] | None = None
    ) -> str:
        """Send an execute request (with expressions to evaluate after it); returns its msg_id."""

    @abc.abstractmethod
    async def input_reply(self, value: str, parent: Message) -> None:
        """Answer an input request."""

    @abc.abstractmethod
    async def interrupt(self) -> str | None:
        """Interrupt the running cell. By message: the ``interrupt_request``'s msg_id, whose
        ``interrupt_reply`` (on the control channel) says the kernel has signalled itself;
        None when the signal was sent from here (it is pending in the kernel already)."""

    @abc.abstractmethod
    async def is_alive(self) -> bool: ...

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the kernel and reap it; safe to call twice."""

    def pid(self) -> int | None:
        """The local process id, when there is one."""
        return None


class KernelProvider(abc.ABC):
    @abc.abstractmethod
    async def start_kernel(self) -> KernelConnection: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the provider holds (not the kernels: the pool shuts those down)."""
