"""Model output as it streams: prose to show at once, the program's statements as they complete.

``OutputReader`` is fed the model's text in whatever pieces it arrives and returns
what can be acted on already:

- ``Prose``: text before the ```` ```python ```` fence (the thought, or the whole answer).
  A line that may still turn out to be a fence (three backticks, a language) is held
  back only while it is ambiguous; whitespace at either end is dropped, and so is the
  answer mark (``Answer:``) the prose begins with (held back while the first line may
  still be it), so the prose shown is what ``parse_output`` calls the thought (or the
  answer). Code never is prose.
- ``Statements``: every time a top-level statement of the code block is complete, the
  source of all complete statements so far (dedented). A simple statement is complete at
  its newline; a compound one (``for``, ``def``, ...) when the next top-level line starts.
- ``BlockClosed``: the closing fence. What follows it is not read (``parse_output``
  ignores it too).

``parse_output`` over the whole text stays the judge of what the reply is; the reader
only says what may be shown or started early. Pure and synchronous, like every translator.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass, field

from translators.output import ANSWER_MARK, without_answer_mark

__all__ = ["BlockClosed", "OutputReader", "Prose", "Statements"]

_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$")
# an unfinished line that may still become a fence line
_FENCE_PREFIX = re.compile(r"^[ \t]*(`{0,2}|```[ \t]*[A-Za-z0-9_+-]*[ \t]*)$")
_CODE_LANGS = {"python", "py", "python3", ""}
_COMPOUND = (
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.If,
    ast.With,
    ast.AsyncWith,
    ast.Try,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Match,
    ast.TryStar,
)
# a line at column 0 that continues the compound statement before it
_CONTINUES = re.compile(r"^(else|elif|except|finally|case)\b|^[)\]}]")


@dataclass(frozen=True, slots=True)
class Prose:
    text: str


@dataclass(frozen=True, slots=True)
class Statements:
    source: str  # every complete top-level statement so far


@dataclass(frozen=True, slots=True)
class BlockClosed:
    pass


ReaderEvent = Prose | Statements | BlockClosed


def _parses(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):
        return None


@dataclass
class OutputReader:
    """``prose_only``: the reply cannot hold an action (``tool_choice: none``): all of it is prose."""

    prose_only: bool = False
    text: str = ""  # everything fed so far
    _state: str = "prose"  # prose | code | after
    _line: str = ""  # the current, unfinished line
    _line_shown: bool = False  # part of the current line went out already: it is no fence
    _in_other_fence: bool = False  # inside a fenced non-Python block of the prose
    _started: bool = False  # some prose went out
    _space: str = ""  # whitespace held back until more prose follows it
    _indent: str | None = None
    _code: list[str] = field(default_factory=list)
    _done: int = 0  # lines of _code that form complete statements
    _events: list[ReaderEvent] = field(default_factory=list)

    def feed(self, piece: str) -> list[ReaderEvent]:
        self.text += piece
        if self._state == "after":
            return []
        if self.prose_only:
            self._prose(piece)
            return self._take()
        self._line += piece
        while "\n" in self._line and self._state != "after":
            line, self._line = self._line.split("\n", 1)
            self._complete_line(line)
        if self._state == "prose" and self._line and not self._held_back(self._line):
            self._prose(self._line)
            self._line, self._line_shown = "", True
        elif self._state == "code" and self._line.lstrip(" \t").startswith("```"):
            self._close_block()  # no Python line starts with backticks: this is the closing fence
        return self._take()

    def close(self) -> list[ReaderEvent]:
        """The output ended."""
        fence = _FENCE.match(self._line)
        opens_code = fence is not None and not self._in_other_fence and fence.group(1).lower() in _CODE_LANGS
        if self._state == "prose" and self._line and not opens_code:
            self._prose(self._line)
        self._line = ""
        return self._take()

    def _close_block(self) -> None:
        self._statements()
        self._state = "after"
        self._events.append(BlockClosed())

    @property
    def prose_started(self) -> bool:
        return self._started

    # --- lines ---------------------------------------------------------------------------

    def _held_back(self, line: str) -> bool:
        if self._line_shown:
            return False
        if not self._started and ANSWER_MARK.startswith(line.lstrip()):
            return True  # it may still be the answer mark, which is not shown
        return bool(_FENCE_PREFIX.match(line))

    def _complete_line(self, line: str) -> None:
        shown, self._line_shown = self._line_shown, False
        fence = None if shown else _FENCE.match(line)
        if self._state == "code":
            if fence is not None:
                self._close_block()
            else:
                self._code_line(line)
            return
        if fence is not None and not self._in_other_fence and fence.group(1).lower() in _CODE_LANGS:
            self._state = "code"
            self._space = ""
            return
        if fence is not None:
            self._in_other_fence = not self._in_other_fence
        self._prose(line + "\n")

    def _prose(self, text: str) -> None:
        if not self._started:
            text = without_answer_mark(text).lstrip()
        if not text:
            return
        body = text.rstrip()
        if body:
            self._events.append(Prose(self._space + body))
            self._started = True
            self._space = text[len(body) :]
        else:
            self._space += text

    # --- code ----------------------------------------------------------------------------

    def _code_line(self, line: str) -> None:
        if self._indent is None and line.strip():
            self._indent = line[: len(line) - len(line.lstrip())]
        if self._indent:  # an indented block is dedented as a whole at its end (as parse_output does)
            self._code.append(line)
            return
        starts_statement = bool(line.strip()) and not line[0].isspace() and not line.startswith("#")
        if starts_statement and not _CONTINUES.match(line):
            self._statements()  # a compound statement before this line is complete now
        self._code.append(line)
        pending = "\n".join(self._code[self._done :])
        module = _parses(pending) if pending.strip() else None
        if module is not None and module.body and not any(isinstance(s, _COMPOUND) for s in module.body):
            self._done = len(self._code)
            self._events.append(Statements(textwrap.dedent("\n".join(self._code)).strip("\n")))

    def _statements(self) -> None:
        """The statements written since the last ones, if they are complete."""
        pending = "\n".join(self._code[self._done :])
        whole = textwrap.dedent("\n".join(self._code))  # exactly what parse_output makes of it
        if self._indent:
            pending = textwrap.dedent(pending)
        if not pending.strip():
            return
        module = _parses(pending)
        if module is not None and module.body:
            self._done = len(self._code)
            self._events.append(Statements(whole.strip("\n")))

    def _take(self) -> list[ReaderEvent]:
        events, self._events = self._events, []
        return events
