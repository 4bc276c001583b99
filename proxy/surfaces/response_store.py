"""Stored responses of the Responses API: what ``previous_response_id`` and
``GET``/``DELETE /v1/responses/{id}`` read.

Each response is one value in the session store's key-value space (Redis when configured,
so any replica can continue a chain; else in-process), under ``response:<id>``, expiring
with the session TTL. The value holds the response object as it was sent and the chat
messages of the whole conversation up to and including that response's output, so a
follow-up rebuilds its history with one read. ``instructions`` are not part of it: as on
OpenAI's API, a follow-up's own ``instructions`` (or none) apply. A response belongs to
the API key that made it; another key reads it as not found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from proxy.errors import ResponseNotFound

__all__ = ["KeyValueStore", "ResponseStore", "StoredResponse"]


class KeyValueStore(Protocol):
    """The session store's key-value methods (``proxy.sessions.store.SessionStore``)."""

    async def get_value(self, key: str) -> bytes | None: ...

    async def put_value(self, key: str, value: bytes, ttl: float | None) -> None: ...

    async def delete_value(self, key: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: dict[str, Any]  # the response object, as the client received it
    messages: list[dict[str, Any]]  # chat messages: the conversation, this response's output last
    session_id: str | None = None  # the session that answered it (None: no tools, no session)


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as chat messages: its text and function calls, one assistant turn."""
    text = "".join(
        part.get("text", "")
        for item in output
        if item.get("type") == "message"
        for part in item.get("content", [])
        if part.get("type") == "output_text"
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item.get("type") == "function_call"
    ]
    if not text and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


class ResponseStore:
    def __init__(self, store: KeyValueStore, ttl: float) -> None:
        self._store = store
        self._ttl = ttl

    @staticmethod
    def _key(response_id: str) -> str:
        return f"response:{response_id}"

    async def save(
        self,
        owner: str,
        history: list[dict[str, Any]],
        response: dict[str, Any],
        session_id: str | None = None,
    ) -> None:
        """Keep ``response`` (a final response object) with the conversation that led to it
        and the session that answered it."""
        value = {
            "owner": owner,
            "session_id": session_id,
            "response": response,
            "messages": [*history, *output_messages(response.get("output", []))],
        }
        await self._store.put_value(self._key(response["id"]), orjson.dumps(value), self._ttl)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        raw = await self._store.get_value(self._key(response_id))
        if raw is None:
            return None
        value = orjson.loads(raw)
        if value.get("owner") != owner:
            return None
        return StoredResponse(
            response=value["response"], messages=value["messages"], session_id=value.get("session_id")
        )

    async def require(self, response_id: str, owner: str, param: str | None = None) -> StoredResponse:
        """The stored response, or ``ResponseNotFound`` (404) naming the fix."""
        stored = await self.get(response_id, owner)
        if stored is None:
            raise ResponseNotFound(
                f"No response with id {response_id!r} is stored for this API key: it was made with "
                "'store': false, by another key, has expired or was deleted. Send the whole "
                "conversation as 'input' instead.",
                param=param,
            )
        return stored

    async def delete(self, response_id: str, owner: str) -> bool:
        """Forget a response; False if there was none for this key."""
        if await self.get(response_id, owner) is None:
            return False
        await self._store.delete_value(self._key(response_id))
        return True
