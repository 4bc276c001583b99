"""API keys: who is calling, and which models they may use.

With no ``keys:`` in config the proxy is open (local use) and every caller is the
anonymous principal. Keys are compared in constant time, against every
configured key, so timing says nothing about which key was close.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proxy.config import KeyEntry
from proxy.errors import AuthenticationFailed, PermissionDenied

__all__ = ["ANONYMOUS", "KeyRing", "Principal"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``models`` is None when every model is allowed."""

    key_id: str
    models: frozenset[str] | None = None
    toolsets: frozenset[str] | None = None

    def may_use_toolset(self, name: str) -> bool:
        return self.toolsets is None or name in self.toolsets

    def may_use(self, model_name: str) -> bool:
        return self.models is None or model_name in self.models

    def check_model(self, model_name: str) -> None:
        if not self.may_use(model_name):
            raise PermissionDenied(
                f"API key {self.key_id!r} may not use model {model_name!r}; "
                "add it to that key's 'models' in config.yaml or use another key",
                param="model",
            )


ANONYMOUS = Principal(key_id="anonymous")


class KeyRing:
    """Resolves the ``Authorization`` header to a ``Principal``."""

    def __init__(self, keys: Sequence[KeyEntry]) -> None:
        self._keys = [
            (
                entry.key.encode(),
                Principal(
                    entry.id,
                    None if entry.models is None else frozenset(entry.models),
                    None if entry.toolsets is None else frozenset(entry.toolsets),
                ),
            )
            for entry in keys
        ]

    @property
    def open(self) -> bool:
        return not self._keys

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        if not self._keys:
            return ANONYMOUS
        presented = _presented_key(headers)
        if presented is None:
            raise AuthenticationFailed(
                "No API key provided. Send it as 'Authorization: Bearer <key>' "
                "(the openai SDK does this with api_key=...)."
            )
        candidate = presented.encode()
        found: Principal | None = None
        for key, principal in self._keys:
            # compare against every key: constant time in the key and in its position
            if hmac.compare_digest(key, candidate):
                found = principal
        if found is None:
            raise AuthenticationFailed(
                "Incorrect API key provided. Check the key, or ask the operator for one "
                "listed under 'keys:' in the proxy's config.yaml."
            )
        return found


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    key = headers.get("x-api-key") or headers.get("api-key")
    return key.strip() if key else None
