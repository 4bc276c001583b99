"""Model output -> ``Answer(text)`` or ``Action(source)``.

The agreed shape: free text, optionally followed by exactly one fenced
```python block, which is the action. Anything else is an ``OutputError`` whose
message tells the model what to change. A reply that answers in text may begin with
``ANSWER_MARK`` (``Answer:``), which the prompt asks for and the ``auto`` grammar makes
the model choose before anything else (act, or answer); the mark is not part of the answer.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

from translators.errors import OutputError

__all__ = ["ANSWER_MARK", "Action", "Answer", "closing_fence", "parse_output", "without_answer_mark"]

_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$", re.MULTILINE)
_CODE_LANGS = {"python", "py", "python3", ""}
ANSWER_MARK = "Answer:"


def without_answer_mark(text: str) -> str:
    """``text`` without the answer mark it begins with (after whitespace), if it does."""
    body = text.lstrip()
    return body[len(ANSWER_MARK) :].lstrip(" \t") if body.startswith(ANSWER_MARK) else text


@dataclass(frozen=True, slots=True)
class Answer:
    text: str


@dataclass(frozen=True, slots=True)
class Action:
    source: str
    thought: str = ""


def closing_fence(text: str) -> str:
    """What closes a python block left open at the end of ``text`` ("" if none is open): for
    a reply the model ended itself (finish_reason ``stop``) inside its code block, so that the
    block counts as what it wrote rather than as a missing line to ask for again."""
    fences = list(_FENCE.finditer(text))
    if len(fences) % 2 == 0 or fences[-1].group(1).lower() not in _CODE_LANGS:
        return ""
    return "```" if text.endswith("\n") else "\n```"


def parse_output(text: str) -> Answer | Action:
    fences = list(_FENCE.finditer(text))
    if not fences:
        return Answer(without_answer_mark(text).strip())
    if len(fences) % 2:
        raise OutputError("The code block is not closed: end the python block with a line holding only ```.")
    blocks = [(fences[i], fences[i + 1]) for i in range(0, len(fences), 2)]
    code_blocks = [(o, c) for o, c in blocks if o.group(1).lower() in _CODE_LANGS]
    if not code_blocks:
        return Answer(without_answer_mark(text).strip())  # fenced non-Python text is part of an answer
    if len(code_blocks) > 1:
        raise OutputError(
            f"The reply has {len(code_blocks)} python blocks; "
            "put all the code in exactly one ```python block."
        )
    opening, closing = code_blocks[0]
    source = text[opening.end() : closing.start()].strip("\n")
    if not source.strip():
        raise OutputError(
            "The python block is empty; write the calls to make, or answer without a code block."
        )
    thought = without_answer_mark(text[: opening.start()]).strip()
    return Action(source=textwrap.dedent(source), thought=thought)
