"""Artifacts: the files a session's programs write in their working directory.

After each program ends, a small cell asks the kernel itself what changed in its working
directory (new, changed and deleted regular files; hidden names and ``__pycache__`` left
out). Reading through the kernel, not the host's file system, is what makes this safe (a
program's symlink to a host file cannot make the proxy read that file: the kernel sees its
own sandbox only) and what makes it work for remote kernels too.

Each changed file is recorded in the session's log (``artifact`` event: name, size, sha256,
the turn that made it) and its bytes kept in the session store beside the log, while the
session's total stays within ``sessions.max_artifact_bytes``; a file over that is recorded
as too large, without its bytes. The latest version of each file is what ``GET
/v1/sessions/{id}/artifacts`` lists and serves, what ``cablectl sessions show`` shows, and
what a replay puts back into a fresh kernel's working directory. The model's observation
mentions them.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.kernels import ExecLimits, Finished, PooledKernel
from proxy.sessions import SessionStore

__all__ = ["Artifacts", "latest_artifacts", "summary"]

log = logging.getLogger("cablectl.actions")

Event = dict[str, Any]
_MARK = "__cablectl_artifacts__"

# Runs in the kernel. ``seen`` (name -> (size, mtime_ns)) lives in the kernel under a name a
# program has no reason to touch; a program that does only confuses its own session.
_SNAPSHOT = """
def __cablectl_snapshot(budget, record=True, emit=True):
    import base64 as b64, hashlib, json, os, stat
    g = globals()
    seen = g.setdefault("__cablectl_seen", {})
    now = {}
    for root, dirs, files in os.walk("."):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for f in sorted(files):
            if f.startswith("."):
                continue
            path = os.path.join(root, f)[2:]
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                now[path] = (st.st_size, st.st_mtime_ns)
    out = []
    for path, key in now.items():
        if not record or seen.get(path) == key:
            continue
        entry = {"name": path, "size": key[0]}
        try:
            with open(path, "rb") as fh:
                if key[0] <= budget:
                    data = fh.read(budget + 1)
                    entry["size"] = len(data)
                    if len(data) <= budget:
                        entry["data"] = b64.b64encode(data).decode()
                        budget -= len(data)
                    else:
                        data = data + fh.read()
                else:
                    data = fh.read()
            entry["sha256"] = hashlib.sha256(data).hexdigest()
        except OSError as exc:
            entry["error"] = str(exc)
        out.append(entry)
    if record:
        out += [{"name": p, "deleted": True} for p in seen if p not in now]
    g["__cablectl_seen"] = now
    text = json.dumps(out)
    if emit:
        print("MARK" + text)
    return text
""".replace("MARK", _MARK)

# the snapshot function is defined once per kernel (again only if a program removed it)
_DEFINED = f"""try:
    __cablectl_snapshot
except NameError:
    exec({_SNAPSHOT!r})
"""

_RESTORE = """
def __cablectl_restore(files):
    import base64 as b64, os
    for name, data in files.items():
        folder = os.path.dirname(name)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(name, "wb") as fh:
            fh.write(b64.b64decode(data))
"""


_EXPRESSION = "cablectl_artifacts"


def _from_expression(evaluated: Any) -> list[dict[str, Any]] | None:
    """The snapshot's entries from a user_expressions result (the repr of its JSON text)."""
    if not isinstance(evaluated, dict) or evaluated.get("status") != "ok":
        return None
    try:
        text = ast.literal_eval(str((evaluated.get("data") or {}).get("text/plain", "")))
        value = orjson.loads(text)
    except (ValueError, SyntaxError, orjson.JSONDecodeError):
        return None
    return value if isinstance(value, list) else None


def _safe_name(name: str) -> bool:
    """A relative path inside the working directory: what the snapshot lists (a program that
    forges its output could send anything; such a name is never recorded, or written back)."""
    parts = name.split("/")
    return (
        0 < len(name) <= 1024
        and name.isprintable()
        and "\\" not in name
        and all(p and p not in (".", "..") and not p.startswith(".") for p in parts)
    )


def _value_key(session_id: str, sha256: str) -> str:
    return f"artifact:{session_id}:{sha256}"


def latest_artifacts(events: list[Event]) -> dict[str, Event]:
    """Each file's latest ``artifact`` event, by name (deleted files left out)."""
    out: dict[str, Event] = {}
    for event in events:
        if event.get("kind") != "artifact":
            continue
        if event.get("deleted"):
            out.pop(str(event["name"]), None)
        else:
            out[str(event["name"])] = event
    return out


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB"):
        if n < 1000 or unit == "MB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n = n / 1000  # type: ignore[assignment]
    return f"{n} bytes"  # pragma: no cover


def summary(recorded: list[Event]) -> str:
    """What the model is told about the files a program wrote ("" for none)."""
    written = [e for e in recorded if not e.get("deleted")]
    deleted = [e for e in recorded if e.get("deleted")]
    parts = []
    if written:
        names = ", ".join(
            f"{e['name']} ({_size(int(e['size']))}{', not kept: too large' if e.get('too_large') else ''})"
            for e in written
        )
        parts.append(f"Files written: {names}.")
    if deleted:
        parts.append("Files deleted: " + ", ".join(str(e["name"]) for e in deleted) + ".")
    return " ".join(parts)


@dataclass
class Artifacts:
    store: SessionStore
    max_bytes: int  # per session, the bytes of the latest versions kept

    definition = _SNAPSHOT  # installed with the tool stubs in every kernel

    def budget(self, events: list[Event]) -> int:
        """How many bytes of files a session (its log) may still keep."""
        kept = latest_artifacts(events)
        return max(0, self.max_bytes - sum(int(e["size"]) for e in kept.values() if e.get("stored")))

    @staticmethod
    def expressions(budget: int) -> dict[str, str]:
        """For the program's own execute request: the snapshot taken right after it, in the same
        round trip (``user_expressions``; IPython evaluates them when the cell did not raise)."""
        return {_EXPRESSION: f"__cablectl_snapshot({budget}, emit=False)"}

    async def record(
        self, session_id: str, turn: int, kernel: PooledKernel, evaluated: dict[str, Any] | None = None
    ) -> list[Event]:
        """What the program changed (from ``evaluated``, its execute reply's expressions, or else
        a cell of its own); kept. Returns the recorded events."""
        events = await self.store.events(session_id)
        kept = latest_artifacts(events)
        budget = self.budget(events)
        entries = _from_expression((evaluated or {}).get(_EXPRESSION))
        if entries is None:
            entries = await self._run(kernel, f"__cablectl_snapshot({budget})", budget)
        if entries is None:
            return []
        recorded: list[Event] = []
        for entry in entries:
            name = str(entry.get("name", ""))
            if not _safe_name(name):
                log.warning("session %s: a file name that is not a plain relative path: %r", session_id, name)
                continue
            if entry.get("deleted"):
                if name in kept:
                    recorded.append({"kind": "artifact", "turn": turn, "name": name, "deleted": True})
                continue
            if "sha256" not in entry:
                continue
            event: Event = {
                "kind": "artifact",
                "turn": turn,
                "name": name,
                "size": int(entry["size"]),
                "sha256": str(entry["sha256"]),
                "stored": "data" in entry,
            }
            if "data" in entry:
                data = base64.b64decode(entry["data"])
                if hashlib.sha256(data).hexdigest() != event["sha256"]:
                    continue
                await self.store.put_value(_value_key(session_id, event["sha256"]), data, self.store.ttl)
            else:
                event["too_large"] = True
            recorded.append(event)
        if recorded:
            await self.store.append(session_id, *recorded)
        # the kept bytes live as long as the session's log (which this request just refreshed)
        kept_keys = {_value_key(session_id, str(e["sha256"])) for e in kept.values() if e.get("stored")}
        await self.store.touch_values(sorted(kept_keys), self.store.ttl)
        return recorded

    async def _run(self, kernel: PooledKernel, call: str, budget: int) -> list[dict[str, Any]] | None:
        limits = ExecLimits(timeout=60.0, max_output_chars=budget * 2 + 1_000_000)
        state = await kernel.execute(_DEFINED + call, limits)
        if not isinstance(state, Finished) or state.output.error is not None:
            log.warning("could not list the files of kernel %s: %s", kernel.kernel_id, state)
            return None
        for line in state.output.stdout.splitlines():
            if line.startswith(_MARK):
                value = orjson.loads(line[len(_MARK) :])
                return value if isinstance(value, list) else None
        return None

    async def read(self, session_id: str, event: Event) -> bytes | None:
        if not event.get("stored"):
            return None
        return await self.store.get_value(_value_key(session_id, str(event["sha256"])))

    async def restore(self, session_id: str, events: list[Event], kernel: PooledKernel) -> int:
        """Put the session's kept files back into a fresh kernel's working directory (after a
        replay); they become that kernel's baseline. Returns how many."""
        files: dict[str, str] = {}
        for name, event in latest_artifacts(events).items():
            data = await self.read(session_id, event)
            if data is not None:
                files[name] = base64.b64encode(data).decode()
        if files:
            state = await kernel.execute(
                _RESTORE + f"\n__cablectl_restore({orjson.dumps(files).decode()})",
                ExecLimits(timeout=60.0, max_output_chars=100_000),
            )
            if not isinstance(state, Finished) or state.output.error is not None:
                log.warning("could not restore the files of session %s: %s", session_id, state)
        await self._run(kernel, "__cablectl_snapshot(0, record=False)", 0)  # the new baseline
        return len(files)
