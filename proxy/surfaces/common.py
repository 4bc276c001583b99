"""What the Responses and Messages surfaces share: reading a JSON body, turning pydantic's
complaints into ``InvalidRequest`` (with the field as ``param``), ids, and SSE framing.

Nothing here knows either wire format.
"""

from __future__ import annotations

import secrets
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from proxy.errors import InvalidRequest
from proxy.schemas import ChatCompletionRequest

__all__ = ["chat_request", "invalid_from_validation", "json_object", "new_id", "sse", "validated"]

ModelT = TypeVar("ModelT", bound=BaseModel)


def json_object(raw: bytes, fields: str) -> dict[str, Any]:
    """The request body as a JSON object; ``fields`` names what it must carry (for the message)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc.msg}). Send a JSON object with {fields}."
        ) from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"The request body must be a JSON object with {fields}.")
    return data


def _param_of(loc: tuple[int | str, ...], data: Any) -> str | None:
    """The client's name for a location: parts that are not in the data (pydantic's names for
    union branches and tags) are left out, except a missing field at the end."""
    out = ""
    for i, part in enumerate(loc):
        present = (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and part < len(data)
        )
        if not present and i < len(loc) - 1:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
        data = data[part] if present else None  # type: ignore[index]
    return out or None


def invalid_from_validation(exc: ValidationError, data: Any) -> InvalidRequest:
    """The most specific of pydantic's errors (the deepest: a union's other branches fail
    shallower), as a 400 that names the field."""
    errors = exc.errors()
    first = max(errors, key=lambda e: len(e["loc"]))
    param = _param_of(tuple(first["loc"]), data)
    where = f"'{param}'" if param else "the request body"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return InvalidRequest(f"Invalid value for {where}: {first['msg']}{more}", param=param)


def validated(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_validation(exc, data) from exc


def chat_request(payload: dict[str, Any]) -> ChatCompletionRequest:
    """The neutral conversation validated as the action loop and the router take it."""
    return validated(ChatCompletionRequest, payload)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with its name (both surfaces name their events)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
