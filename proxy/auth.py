"""API keys: who is calling, and which models they may use.

With no ``keys:`` in config the proxy is open (local use) and every caller is the
anonymous principal. Keys are compared in constant time, against every
configured key, so timing says nothing about which key was close.

Guessing is rate limited: a client (by address) that sends more than
``failures_per_minute`` wrong keys within a minute gets 429 with ``Retry-After``
for every request until its oldest failure is a minute old, right key or not.
"""

from __future__ import annotations

import collections
import hmac
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from proxy.config import KeyEntry
from proxy.errors import AuthenticationFailed, AuthRateLimited, PermissionDenied

__all__ = ["ANONYMOUS", "FailureWindow", "KeyRing", "Principal"]

WINDOW_SECONDS = 60.0
MAX_TRACKED_CLIENTS = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``models`` is None when every model is allowed."""

    key_id: str
    models: frozenset[str] | None = None
    toolsets: frozenset[str] | None = None
    approval: Literal["none", "server", "kernel", "all"] | None = None  # the key's own, if set

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


class FailureWindow:
    """Wrong-key times per client over the last minute; bounded in clients and in entries."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def _recent(self, client: str, now: float) -> collections.deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        while times and times[0] <= now - WINDOW_SECONDS:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def check(self, client: str) -> None:
        if self.limit <= 0:
            return
        now = time.monotonic()
        times = self._recent(client, now)
        if times is not None and len(times) >= self.limit:
            wait = max(1, math.ceil(times[0] + WINDOW_SECONDS - now))
            raise AuthRateLimited(
                f"Too many wrong API keys from this client ({len(times)} in the last minute); "
                f"wait {wait} s before trying again, with the right key.",
                retry_after=wait,
            )

    def record(self, client: str) -> None:
        if self.limit <= 0:
            return
        now = time.monotonic()
        times = self._recent(client, now) or collections.deque(maxlen=self.limit)
        times.append(now)
        self._failures[client] = times
        self._failures.move_to_end(client)
        while len(self._failures) > MAX_TRACKED_CLIENTS:
            self._failures.popitem(last=False)


class KeyRing:
    """Resolves the ``Authorization`` header to a ``Principal``."""

    def __init__(self, keys: Sequence[KeyEntry], failures_per_minute: int = 10) -> None:
        self.failures = FailureWindow(failures_per_minute)
        self._keys = [
            (
                entry.key.encode(),
                Principal(
                    entry.id,
                    None if entry.models is None else frozenset(entry.models),
                    None if entry.toolsets is None else frozenset(entry.toolsets),
                    entry.approval,
                ),
            )
            for entry in keys
        ]

    @property
    def open(self) -> bool:
        return not self._keys

    def authenticate(self, headers: Mapping[str, str], client: str = "-") -> Principal:
        if not self._keys:
            return ANONYMOUS
        self.failures.check(client)
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
            self.failures.record(client)
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
