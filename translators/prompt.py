"""OpenAI messages -> the code-form prompt the model sees.

- One system message first: how to act (the same for every request, so first: servers
  that cache the prompt's prefix read it once), the client's system/developer messages
  that come before its first turn, then the tools as stubs. Then one worked example (a
  user turn and the reply), then the conversation.
- Earlier assistant ``tool_calls`` become that assistant turn's ```python block; an
  earlier answer (text only) begins with the answer mark, as the instructions ask.
- ``tool`` results become one user turn of observations, each labelled with the
  call that produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from translators.actions import render_call
from translators.made import MadeFunction, render_made
from translators.names import to_identifier
from translators.output import ANSWER_MARK
from translators.stubs import render_stubs, render_value
from translators.tools import Toolset

__all__ = ["EXAMPLE", "action_instructions", "action_preamble", "build_prompt", "content_text"]


def content_text(content: Any) -> str:
    """Text of a message's content: the string, or its text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return str(content)


def action_preamble(tool_choice: Any = "auto") -> str:
    """How to act, the same for every request (so it comes first: a server that keeps the
    prompt's prefix cached, as llama.cpp does, reads it once)."""
    if tool_choice == "none":
        return "Answer in plain text. Do not write code in this reply."
    return (
        "You can act by writing Python that calls the functions listed below. When one of them can "
        "do what the user asks, call it: do not work the answer out yourself. Reply with exactly one "
        "```python block that calls them with keyword arguments, one call per line, once for each "
        "thing asked. Print what you need to see; results come back to you as an observation. When "
        f"you can answer without them, reply with {ANSWER_MARK} and then your answer in plain text, "
        "with no code block."
    )


# one worked example, as a turn of the conversation before the client's (a small model follows
# a turn it has seen far better than a description of one: it makes one call per thing asked)
EXAMPLE = [
    {
        "role": "user",
        "content": "Translate 'good night' into French and into German. "
        "(example: translate(text: str, language: str))",
    },
    {
        "role": "assistant",
        "content": "```python\n"
        'print(translate(text="good night", language="French"))\n'
        'print(translate(text="good night", language="German"))\n'
        "```",
    },
]


def action_instructions(
    toolset: Toolset,
    tool_choice: Any = "auto",
    parallel: bool = True,
    made: Sequence[MadeFunction] = (),
    stubs_of: Toolset | None = None,
) -> str:
    """The functions this request offers, as stubs, and what its tool_choice asks;
    ``stubs_of``: the tools to show as stubs when not all of ``toolset`` (the others are
    defined too, and ``search_tools`` finds them)."""
    if tool_choice == "none":
        return ""
    shown = stubs_of if stubs_of is not None else toolset
    stubs = render_stubs(shown, header=False).rstrip("\n")
    lines = [
        "The functions, already defined (do not define or import them):",
        "",
        "```python",
        stubs,
        "```",
    ]
    hidden = len(toolset.tools) - len(shown.tools)
    if hidden > 0:
        lines += [
            "",
            f"{hidden} more functions are defined but not shown; call search_tools(query) and print "
            "what it returns to see the stubs of the ones you need.",
        ]
    if made:
        lines += [
            "",
            "Functions you defined earlier in this conversation are still defined in your Python "
            "session; call them instead of writing them again:",
            "",
            "```python",
            render_made(made),
            "```",
        ]
    if not parallel:
        lines.append("Call one function per reply.")
    if tool_choice == "required":
        lines.append("This reply must be a ```python block that calls at least one function.")
    elif isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        tool = toolset.by_name(name) if isinstance(name, str) else None
        if tool is not None:
            lines.append(f"This reply must be a ```python block that calls {tool.py}.")
    return "\n".join(lines)


def _call_code(toolset: Toolset, call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    name = str(fn.get("name", ""))
    raw = fn.get("arguments") or "{}"
    try:
        arguments = orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        arguments = None
    tool = toolset.by_name(name)
    if not isinstance(arguments, dict):
        return f"{to_identifier(name)}()  # arguments were not valid JSON: {str(raw)[:200]!r}"
    if tool is None:
        args = ", ".join(f"{k}={render_value(v)}" if k.isidentifier() else "" for k, v in arguments.items())
        return f"{to_identifier(name)}({args.strip(', ')})"
    return render_call(tool, arguments)


def build_prompt(
    messages: list[dict[str, Any]],
    toolset: Toolset,
    tool_choice: Any = "auto",
    parallel: bool = True,
    made: Sequence[MadeFunction] = (),
    stubs_of: Toolset | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for the model, in code form; ``made``: functions the model defined in
    earlier turns of its session, shown beside the tools."""
    system_parts: list[str] = []
    out: list[dict[str, Any]] = []
    calls_by_id: dict[str, str] = {}
    observations: list[str] = []

    def flush_observations() -> None:
        if observations:
            out.append({"role": "user", "content": "Observation:\n" + "\n".join(observations)})
            observations.clear()

    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            if out:
                flush_observations()
                out.append({"role": "system", "content": content_text(message.get("content"))})
            else:
                system_parts.append(content_text(message.get("content")))
            continue
        if role in ("tool", "function"):
            key = str(message.get("tool_call_id") or message.get("name") or "")
            label = calls_by_id.get(key, f"result of {key or 'a call'}")
            observations.append(f"{label} -> {content_text(message.get('content')).strip()}")
            continue
        flush_observations()
        if role == "assistant":
            text = content_text(message.get("content")).strip()
            tool_calls = message.get("tool_calls") or []
            if tool_calls:
                lines = []
                for call in tool_calls:
                    code = _call_code(toolset, call)
                    calls_by_id[str(call.get("id", ""))] = code
                    lines.append(code)
                block = "```python\n" + "\n".join(lines) + "\n```"
                text = f"{text}\n\n{block}" if text else block
            elif text and tool_choice != "none":  # an answer, marked as the instructions ask
                text = f"{ANSWER_MARK} {text}"
            out.append({"role": "assistant", "content": text})
            continue
        content = message.get("content")
        has_media = isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") != "text" for p in content
        )
        out.append({"role": "user", "content": content if has_media else content_text(content)})
    flush_observations()
    system = "\n\n".join(
        p
        for p in [
            action_preamble(tool_choice),
            *system_parts,
            action_instructions(toolset, tool_choice, parallel, made, stubs_of),
        ]
        if p.strip()
    )
    example = EXAMPLE if tool_choice != "none" else []
    return [{"role": "system", "content": system}, *example, *out]
