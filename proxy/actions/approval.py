"""Approval: the user decides before an action runs.

``approval: none | server | kernel | all`` on a route and on a key (the stricter of the two
applies): ``kernel`` asks before any kernel program runs, ``server`` before any server-side
tool call (OpenAPI, MCP) is made, ``all`` both. Client tools need no approval from the proxy:
the client runs them itself.

The ask is an ordinary tool call to a client function (``approval_tool``, default
``approve_action``) that the request declares and the model never sees as a stub, with
arguments ``{"kind": "program" | "call", "source", "calls", "reason"}``. A result of ``yes``,
``approved`` (any case) or JSON ``{"approved": true}`` approves; anything else denies, and
its text is the reason the model is told. The ask and the answer are events in the session
log, so a pending approval survives restarts and is acted on once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from proxy.errors import InvalidRequest

__all__ = ["APPROVAL_PARAMETERS", "Approval", "approval_mode", "verdict"]

Mode = Literal["none", "server", "kernel", "all"]

APPROVAL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": ["program", "call"]},
        "source": {"type": "string", "description": "the program the model wrote"},
        "calls": {
            "type": "array",
            "description": "the functions it calls (program) or the call to make (call)",
            "items": {},
        },
        "reason": {"type": "string", "description": "what the model said it is doing"},
    },
    "required": ["kind", "source", "calls", "reason"],
}


def approval_mode(route: Mode, key: Mode | None) -> Mode:
    """The stricter of a route's and a key's approval."""
    server = "server" in (route, key) or "all" in (route, key)
    kernel = "kernel" in (route, key) or "all" in (route, key)
    return "all" if server and kernel else "server" if server else "kernel" if kernel else "none"


@dataclass(frozen=True, slots=True)
class Approval:
    mode: Mode
    tool: str = "approve_action"

    @property
    def programs(self) -> bool:
        return self.mode in ("kernel", "all")

    @property
    def server_calls(self) -> bool:
        return self.mode in ("server", "all")

    def check_declared(self, tools: list[Any], has_server_tools: bool) -> None:
        """A 400 naming the function to declare when this request may need it."""
        if not (self.programs or (self.server_calls and has_server_tools)):
            return
        names = {
            (t.get("function") or {}).get("name")
            for t in tools
            if isinstance(t, dict) and t.get("type") == "function"
        }
        if self.tool not in names:
            schema = orjson.dumps(
                {"type": "function", "function": {"name": self.tool, "parameters": APPROVAL_PARAMETERS}}
            ).decode()
            raise InvalidRequest(
                f"This model asks for approval before it runs {self._what()}: declare the client "
                f"function {self.tool!r} in 'tools' and answer its calls with 'yes' (or JSON "
                f'{{"approved": true}}) to approve, anything else to deny. Its schema: {schema}',
                param="tools",
                code="approval_function_missing",
            )

    def _what(self) -> str:
        return {"kernel": "programs", "server": "server-side tool calls"}.get(
            self.mode, "programs and server-side tool calls"
        )


def verdict(content: Any) -> tuple[bool, str]:
    """(approved, the client's words) from the approval call's result."""
    text = content if isinstance(content, str) else orjson.dumps(content).decode()
    stripped = text.strip()
    if stripped.lower().strip(".! ") in ("yes", "approved"):
        return True, stripped
    try:
        value = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict) and value.get("approved") is True:
        return True, str(value.get("reason") or stripped)
    if isinstance(value, dict) and "reason" in value:
        return False, str(value["reason"])
    return False, stripped or "(no reason given)"
