"""Views of session logs for the CLI: pure functions over the events, no I/O.

- ``summarize``: one row of ``cablectl sessions ls``;
- ``session_tree``: ``cablectl sessions show``, model turns → actions → tool calls;
- ``export_turns``: ``cablectl sessions export --jsonl``, one record per model turn with
  the code-form prompt and the model's reply (chat fine-tuning format: ``messages``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["Node", "export_turns", "session_tree", "summarize"]

Event = dict[str, Any]


@dataclass
class Node:
    label: str
    children: list[Node] = field(default_factory=list)

    def add(self, label: str) -> Node:
        node = Node(label)
        self.children.append(node)
        return node

    def lines(self, indent: str = "") -> Iterator[str]:
        """Plain-text rendering (rich renders the same tree in colour)."""
        yield self.label
        for i, child in enumerate(self.children):
            last = i == len(self.children) - 1
            head, tail = ("└── ", "    ") if last else ("├── ", "│   ")
            first, *rest = list(child.lines())
            yield indent + head + first
            yield from (indent + tail + line for line in rest)


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ago(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    seconds = max(0.0, now - at)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def summarize(
    session_id: str, events: list[Event], ttl: float | None, now: float | None = None
) -> dict[str, Any]:
    now = time.time() if now is None else now
    turns = [e for e in events if e.get("kind") == "turn"]
    calls = [e for e in events if e.get("kind") in ("call", "static_call")]
    stamps = [float(e["at"]) for e in events if isinstance(e.get("at"), int | float)]
    return {
        "session_id": session_id,
        "events": len(events),
        "turns": len(turns),
        "tool_calls": len(calls),
        "model": next((str(t["model"]) for t in reversed(turns) if t.get("model")), "-"),
        "last_mode": str(turns[-1].get("mode", "-")) if turns else "-",
        "started": _ago(min(stamps) if stamps else None, now),
        "last_activity": _ago(max(stamps) if stamps else None, now),
        "expires_in": "-" if ttl is None else f"{ttl:.0f}s",
    }


def _usage(turn: Event) -> str:
    usage = turn.get("usage") or {}
    if not usage:
        return ""
    return f" · {usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)} tokens"


def session_tree(session_id: str, events: list[Event]) -> Node:
    results = {e["call_id"]: e for e in events if e.get("kind") == "result"}
    root = Node(f"session {session_id} · {len(events)} events")
    turn_nodes: dict[int, Node] = {}
    actions: dict[int, Node] = {}
    for event in events:
        kind = event.get("kind")
        if kind == "tools":
            root.add(f"tools {str(event.get('digest', ''))[:12]}")
        elif kind == "turn":
            number = int(event["turn"])
            mode = str(event.get("mode", "?"))
            attempts = int(event.get("attempts") or 1)
            repaired = f" · {attempts - 1} repair(s)" if attempts > 1 else ""
            node = root.add(f"turn {number} · {event.get('model', '-')} · {mode}{repaired}{_usage(event)}")
            turn_nodes[number] = node
            if mode == "answer":
                node.add(f"answer: {_short(event.get('completion', ''))}")
            else:
                if event.get("thought"):
                    node.add(f"thought: {_short(event['thought'])}")
                path = "kernel" if mode == "kernel" else "static tool_calls"
                actions[number] = node.add(f"action ({path}): {_short(event.get('source', ''))}")
        elif kind in ("call", "static_call"):
            parent = actions.get(int(event.get("turn", 0))) or root
            who = f"server {event['server']}" if event.get("server") else "client"
            label = f"call {event.get('tool', '?')}({_short(event.get('arguments', {}), 60)}) · {who}"
            call = parent.add(f"{label} · {event['call_id']}")
            answer = results.get(event["call_id"])
            if answer is None:
                call.add("waiting for the result")
            elif "error" in answer:
                call.add(f"error: {_short(answer['error'])}")
            else:
                call.add(f"result: {_short(answer.get('value'))}")
        elif kind == "cell_end":
            parent = actions.get(int(event.get("turn", 0))) or root
            error = f" · {event['error']}" if event.get("error") else ""
            took = f" · {event['duration_ms']:.0f} ms" if event.get("duration_ms") is not None else ""
            parent.add(f"output{error}{took}: {_short(event.get('output', '')) or '(none)'}")
        elif kind == "artifact":
            parent = actions.get(int(event.get("turn", 0))) or root
            if event.get("deleted"):
                parent.add(f"artifact {event['name']} · deleted")
            else:
                kept = "kept" if event.get("stored") else "too large, not kept"
                sha = str(event.get("sha256", ""))[:12]
                parent.add(f"artifact {event['name']} · {event.get('size')} bytes · sha256 {sha} · {kept}")
        elif kind == "approval":
            parent = actions.get(int(event.get("turn", 0))) or root
            verdict = "approved" if event.get("approved") else "denied"
            reason = _short(event.get("reason", ""))
            parent.add(f"{event.get('what', '?')} {verdict} by {event.get('by', '?')}: {reason}")
        elif kind == "library":
            root.add(f"promoted functions defined · {event.get('digest')}")
    return root


def export_turns(session_id: str, events: list[Event]) -> Iterator[dict[str, Any]]:
    """One record per model turn that has its prompt in the log."""
    for event in events:
        if event.get("kind") != "turn" or not event.get("prompt"):
            continue
        yield {
            "session_id": session_id,
            "turn": event["turn"],
            "model": event.get("model"),
            "mode": event.get("mode"),
            "messages": [*event["prompt"], {"role": "assistant", "content": event.get("completion", "")}],
            "action": event.get("source"),
            "attempts": event.get("attempts", 1),
            "usage": event.get("usage", {}),
        }
