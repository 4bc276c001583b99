"""The client's conversation, seen through a session's log.

- ``check_tool_messages``: every assistant ``tool_calls`` entry is answered by a
  ``tool`` message before the conversation moves on, and every ``tool`` message
  answers one; anything else is a clear 400 naming the message.
- ``collapse``: the tool_calls of one *kernel* turn (a program that called tools one
  at a time) go back to what the model wrote: one assistant turn with the program,
  and, once the cell finished, one observation with its output. Calls of static
  turns stay as they are: the translators render those as code already.
- ``completed_programs``: the programs of a session that ran to their end without an
  error, oldest first: what the session's kernel holds (the model's own functions).
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from proxy.errors import InvalidRequest

__all__ = [
    "check_tool_messages",
    "collapse",
    "completed_programs",
    "conversation_digest",
    "trailing_tool_results",
]

Message = dict[str, Any]
Event = dict[str, Any]


def check_tool_messages(messages: list[Message]) -> None:
    open_calls: dict[str, int] = {}
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in open_calls:
                raise InvalidRequest(
                    f"messages[{i}] is a tool result for {call_id!r}, which no earlier assistant "
                    "message asked for (or which was already answered)",
                    param=f"messages[{i}].tool_call_id",
                )
            del open_calls[call_id]
            content = message.get("content")
            if content is None or (isinstance(content, list) and not content):
                raise InvalidRequest(
                    f"messages[{i}] (tool result for {call_id!r}) has no content",
                    param=f"messages[{i}].content",
                )
            continue
        if open_calls:
            missing = ", ".join(sorted(open_calls))
            raise InvalidRequest(
                f"tool call(s) {missing} of messages[{min(open_calls.values())}] have no tool message before "
                f"messages[{i}]; send one 'tool' message per tool_call_id",
                param=f"messages[{i}]",
            )
        for call in message.get("tool_calls") or [] if role == "assistant" else []:
            open_calls[str(call.get("id"))] = i


def completed_programs(events: list[Event]) -> list[str]:
    """Sources of the kernel programs that ran to their end without an error, oldest first."""
    sources = {
        int(e["turn"]): str(e["source"])
        for e in events
        if e.get("kind") == "turn" and e.get("mode") == "kernel" and "source" in e
    }
    ended = [int(e["turn"]) for e in events if e.get("kind") == "cell_end" and not e.get("error")]
    return [sources[turn] for turn in sorted(set(ended)) if turn in sources]


def trailing_tool_results(messages: list[Message]) -> list[Message]:
    """The tool messages at the end of the conversation (answers the client just sent)."""
    out: list[Message] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        out.append(message)
    return list(reversed(out))


def _program(event: Event) -> Message:
    thought = str(event.get("thought") or "").strip()
    block = f"```python\n{event.get('source', '')}\n```"
    return {"role": "assistant", "content": f"{thought}\n\n{block}" if thought else block}


def collapse(messages: list[Message], events: list[Event]) -> list[Message]:
    """Messages with each kernel turn's calls replaced by its program and output, and the
    programs earlier requests ran without asking the client (the client never saw them) put
    back where they ran, so the model knows what its kernel holds."""
    turn_of: dict[str, int] = {}
    turns: dict[int, Event] = {}
    outputs: dict[int, str] = {}
    asked: set[int] = set()  # kernel turns that asked the client something
    for event in events:
        if event.get("kind") == "turn" and event.get("mode") == "kernel":
            turns[int(event["turn"])] = event
        elif event.get("kind") == "call":
            turn_of[str(event["call_id"])] = int(event["turn"])
            if not event.get("server"):
                asked.add(int(event["turn"]))
        elif event.get("kind") == "cell_end":
            outputs[int(event["turn"])] = str(event.get("output", ""))
    unseen: dict[int, list[int]] = {}  # position in the client's history -> internal turns
    for number, event in sorted(turns.items()):
        at = event.get("after_messages")
        if number not in asked and isinstance(at, int) and at < len(messages):
            unseen.setdefault(at, []).append(number)
    if not turn_of and not unseen:
        return messages
    out: list[Message] = []
    shown: set[int] = set()
    pending_turn: int | None = None  # a finished kernel turn whose observation goes next
    for index, message in enumerate(messages):
        for number in unseen.get(index, []):
            out.append(_program(turns[number]))
            out.append({"role": "user", "content": f"Observation:\n{outputs.get(number) or '(no output)'}"})
        role = message.get("role")
        calls = message.get("tool_calls") or [] if role == "assistant" else []
        kernel_turns = {turn_of[str(c.get("id"))] for c in calls if str(c.get("id")) in turn_of}
        if kernel_turns:
            turn = min(kernel_turns)
            if turn not in shown:
                shown.add(turn)
                out.append(_program(turns.get(turn, {})))
            continue
        if role == "tool" and str(message.get("tool_call_id")) in turn_of:
            turn = turn_of[str(message.get("tool_call_id"))]
            if turn in outputs:
                pending_turn = turn
            continue
        if pending_turn is not None:
            out.append({"role": "user", "content": f"Observation:\n{outputs[pending_turn]}"})
            pending_turn = None
        out.append(message)
    if pending_turn is not None:
        out.append({"role": "user", "content": f"Observation:\n{outputs[pending_turn]}"})
    return out


def _arguments(raw: Any) -> Any:
    try:
        return orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        return raw


def _canonical(message: Message) -> list[Any]:
    """What identifies a message however a client echoes it (content as text or parts, null or
    "", arguments re-spaced)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    role = message.get("role")
    calls = [
        [
            str(c.get("id")),
            (c.get("function") or {}).get("name"),
            _arguments((c.get("function") or {}).get("arguments")),
        ]
        for c in message.get("tool_calls") or []
        if isinstance(c, dict)
    ]
    return [
        "system" if role == "developer" else role,
        str(content or "").strip(),
        calls,
        message.get("tool_call_id"),
    ]


def conversation_digest(owner: str, messages: list[Message]) -> str:
    """A conversation prefix's identity within one API key."""
    body = orjson.dumps([_canonical(m) for m in messages], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(owner.encode() + b"\0" + body).hexdigest()
