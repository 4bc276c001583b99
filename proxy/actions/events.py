"""The neutral events the action loop yields, which every API surface renders.

The loop knows no wire format: it yields these, in this order per request::

    Started                                   once, first
    (TextDelta | ToolCallStarted | ToolCallArguments | ToolCallDone
     | ActionStarted | ActionOutput)*         as the model writes and programs run
    Finished                                  once, last (with the summed usage)

``TextDelta`` is what the client reads as the assistant's text (an answer, or the
thought before an action); code never appears in it. A tool call is
``ToolCallStarted`` (its id and name), then ``ToolCallArguments`` fragments whose
concatenation is the arguments' JSON, then ``ToolCallDone`` with the whole call.
``ActionStarted``/``ActionOutput`` say that a program ran inside the proxy's kernel
(the client is not asked for anything); renderers may show or ignore them.

A failure is raised from the event stream as a ``CablectlError``: before any event
other than ``Started``, a surface answers it with an HTTP error; after, with the
surface's in-stream error event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ActionOutput",
    "ActionStarted",
    "Event",
    "Finished",
    "Started",
    "TextDelta",
    "ToolCallArguments",
    "ToolCallDone",
    "ToolCallStarted",
    "Usage",
]

FinishReason = Literal["stop", "tool_calls", "length"]


@dataclass
class Usage:
    """Tokens summed over every inner model call of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, usage: dict[str, object]) -> None:
        for key in ("prompt_tokens", "completion_tokens"):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class Started:
    """The request is accepted: the session it belongs to and its trace id (if traced)."""

    session_id: str
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStarted:
    index: int  # 0, 1, ... within this response
    call_id: str
    name: str  # the tool's original name


@dataclass(frozen=True, slots=True)
class ToolCallArguments:
    index: int
    fragment: str


@dataclass(frozen=True, slots=True)
class ToolCallDone:
    index: int
    call_id: str
    name: str
    arguments: str  # JSON


@dataclass(frozen=True, slots=True)
class ActionStarted:
    source: str


@dataclass(frozen=True, slots=True)
class ActionOutput:
    text: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    usage: Usage = field(default_factory=Usage)


Event = (
    Started
    | TextDelta
    | ToolCallStarted
    | ToolCallArguments
    | ToolCallDone
    | ActionStarted
    | ActionOutput
    | Finished
)
