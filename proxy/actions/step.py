"""What every step of one request shares, and the outgoing tool call.

``Step`` is built once per request by the loop and handed to the model turn and to the
kernel driver, instead of a dozen parameters each.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy.actions.approval import Approval
from proxy.actions.events import Event, ToolCallArguments, ToolCallDone, ToolCallStarted, Usage
from proxy.backends.base import Grammar
from proxy.config import ModelEntry
from proxy.routing import UpstreamClock
from proxy.schemas import ChatCompletionRequest
from proxy.toolsets import ServerToolset
from proxy.tracing import Span
from translators import MadeFunction, Toolset
from translators.affordance import ToolIndex

__all__ = ["Step", "ToolCallOut"]

Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCallOut:
    id: str
    name: str
    arguments: str  # JSON


@dataclass
class Step:
    owner: str  # the API key's id: what sessions and conversation digests are scoped to
    session_id: str
    entry: ModelEntry
    request: ChatCompletionRequest
    payload: dict[str, Any]
    clock: UpstreamClock
    messages: list[Message]
    toolset: Toolset
    choice: str  # normalized tool_choice: none | auto | required | function:NAME
    parallel: bool
    servers: dict[str, ServerToolset]
    span: Span
    grammar: Grammar | None
    grammar_lark: str | None = None  # the same grammar as Lark: what a reply is checked against
    library: list[MadeFunction] = field(default_factory=list)  # promoted functions of the route
    approval: Approval | None = None  # what the client must approve first (None: nothing)
    index: ToolIndex | None = None  # too many tools to show: ranks them for the prompt
    replay_cause: str = "lost"  # why, if the session's kernel must be rebuilt: see Runtime
    usage: Usage = field(default_factory=Usage)
    sent: list[ToolCallOut] = field(default_factory=list)  # tool calls of this response so far
    shown_text: str = ""  # text of this response so far

    def send(self, call: ToolCallOut) -> Iterator[Event]:
        """The events of one outgoing tool call (the next index of this response)."""
        index = len(self.sent)
        self.sent.append(call)
        yield ToolCallStarted(index, call.id, call.name)
        yield ToolCallArguments(index, call.arguments)
        yield ToolCallDone(index, call.id, call.name, call.arguments)
