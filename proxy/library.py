"""Promoted toolsets: functions a model wrote in one session, reviewed and kept for others.

``cablectl tools promote SESSION NAME --toolset T`` copies one documented function a session's
program defined (``translators.made``) into the stored toolset ``T``: a value in the session
store (Redis when configured, so every replica has it), kept until replaced. A route lists
``T`` in its ``toolsets`` (declared in config as ``T: {promoted: true}``), keys limit it like
any toolset, and every session of that route gets the functions defined in its kernel (they
run there, sandboxed, never in the proxy) and shown to the model as stubs. Nothing becomes
shared without that command.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from proxy.errors import InvalidRequest
from proxy.sessions import SessionStore
from translators import MadeFunction

__all__ = ["Library", "library_source"]


def _key(toolset: str) -> str:
    return f"toolset:{toolset}"


def library_source(functions: list[MadeFunction]) -> str:
    """The cell that defines ``functions`` in a kernel."""
    return "\n\n".join(f.source for f in functions)


class Library:
    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def toolset(self, name: str) -> dict[str, dict[str, Any]]:
        """The stored functions of toolset ``name`` by function name ({} if none were promoted)."""
        raw = await self.store.get_value(_key(name))
        return dict(orjson.loads(raw)["functions"]) if raw else {}

    async def functions(self, toolsets: list[str]) -> list[MadeFunction]:
        """The functions of these toolsets, in their order (a later toolset's name wins)."""
        out: dict[str, MadeFunction] = {}
        for name in toolsets:
            for fname, f in (await self.toolset(name)).items():
                out.pop(fname, None)
                out[fname] = MadeFunction(fname, f["stub"], f["source"], f["doc"])
        return list(out.values())

    async def promote(self, toolset: str, function: MadeFunction, session_id: str) -> None:
        """Keep ``function`` in ``toolset`` (replacing one of the same name), for good."""
        if not toolset or not toolset.replace("_", "").replace("-", "").isalnum():
            raise InvalidRequest(f"toolset name {toolset!r}: use letters, digits, '-' and '_'")
        functions = await self.toolset(toolset)
        functions[function.name] = {
            "stub": function.stub,
            "source": function.source,
            "doc": function.doc,
            "from_session": session_id,
            "promoted_at": round(time.time(), 3),
        }
        await self.store.put_value(_key(toolset), orjson.dumps({"functions": functions}), ttl=None)
