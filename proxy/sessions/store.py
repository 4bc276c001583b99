"""Sessions as append-only event logs, with a TTL and a lock; kernels are only caches of them.

A session's log holds what is needed to rebuild its kernel anywhere: the tools
digest, each cell that ran, and every tool result that came back for it. Any
replica can read it; ``lock`` makes sure only one resumes a session at a time.

Two implementations of one ABC: ``RedisSessionStore`` (config ``redis_url``) and
``InMemorySessionStore`` (the default, one process). Keys in Redis:

    cablectl:s:<id>:log    LIST of JSON events (RPUSH), expires after the TTL
    cablectl:s:<id>:lock   the lock token (SET NX PX), expires by itself if its holder dies
    cablectl:r:<replica>   JSON: that replica's kernels, refreshed every few seconds, with a TTL
    cablectl:kv:<key>      a value another part keeps beside the sessions (stored responses), with a TTL

Every event is stamped with ``at`` (Unix time) when appended, unless it has one.
"""

from __future__ import annotations

import abc
import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from proxy.errors import CablectlError, ServiceUnavailable

__all__ = ["InMemorySessionStore", "RedisSessionStore", "SessionBusy", "SessionStore"]

Event = dict[str, Any]


AMBIGUOUS = "*"  # a conversation digest two sessions claimed


class SessionBusy(CablectlError):
    """Another request (maybe on another replica) is resuming this session right now."""

    status = 409
    type = "invalid_request_error"
    code = "session_busy"
    retryable = True


def _stamped(events: tuple[Event, ...]) -> list[Event]:
    now = round(time.time(), 3)
    return [e if "at" in e else {**e, "at": now} for e in events]


class SessionStore(abc.ABC):
    def __init__(self, ttl: float = 3600.0, lock_ttl: float = 30.0) -> None:
        self.ttl = ttl
        self.lock_ttl = lock_ttl

    @abc.abstractmethod
    async def append(self, session_id: str, *events: Event) -> int:
        """Add events to the log (creating it) and refresh the TTL; returns the new length."""

    @abc.abstractmethod
    async def events(self, session_id: str) -> list[Event]:
        """The whole log, oldest first; [] for an unknown or expired session."""

    @abc.abstractmethod
    async def sessions(self) -> list[str]:
        """Ids of the live sessions."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> None: ...

    @abc.abstractmethod
    async def ttl_left(self, session_id: str) -> float | None:
        """Seconds until the session expires; None if it does not exist."""

    @abc.abstractmethod
    async def publish_replica(self, replica_id: str, info: dict[str, Any], ttl: float) -> None:
        """Announce this replica and its kernels; the entry expires after ``ttl`` seconds."""

    @abc.abstractmethod
    async def replicas(self) -> list[dict[str, Any]]:
        """What every live replica last announced."""

    @abc.abstractmethod
    async def replica(self, replica_id: str) -> dict[str, Any] | None:
        """What this replica last announced; None once its announcement has expired."""

    @abc.abstractmethod
    async def _try_lock(self, session_id: str, token: str) -> bool: ...

    @abc.abstractmethod
    async def _unlock(self, session_id: str, token: str) -> None: ...

    @abc.abstractmethod
    async def _extend(self, session_id: str, token: str) -> bool:
        """Push the lock's expiry ``lock_ttl`` ahead while ``token`` still holds it."""

    async def shared_secret(self, candidate: bytes) -> bytes:
        """The secret every replica on this store signs tool-call ids with: ``candidate`` if
        none was agreed yet (set if absent), else the one stored first."""
        return candidate

    @abc.abstractmethod
    async def claim_digest(self, digest: str, session_id: str) -> None:
        """Record that the conversation with this digest is ``session_id``'s; a digest two
        sessions claim belongs to neither (``AMBIGUOUS``). Expires with the session TTL."""

    @abc.abstractmethod
    async def session_of_digest(self, digest: str) -> str | None:
        """The one session a conversation digest names, or None (unknown or ambiguous)."""

    @abc.abstractmethod
    async def get_value(self, key: str) -> bytes | None:
        """A value kept with ``put_value``; None if absent or expired."""

    @abc.abstractmethod
    async def put_value(self, key: str, value: bytes, ttl: float | None) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds, or for good with None (replacing
        what was there)."""

    @abc.abstractmethod
    async def delete_value(self, key: str) -> bool:
        """Forget a value; False if there was none."""

    @abc.abstractmethod
    async def delete_value_if(self, key: str, expected: bytes) -> bool:
        """Forget a value if it is still ``expected`` (atomically); False if it was not."""

    @abc.abstractmethod
    async def touch_values(self, keys: list[str], ttl: float) -> None:
        """Keep these values (those that exist) for ``ttl`` seconds from now."""

    async def ping(self) -> bool:
        return True

    async def purge_expired(self) -> int:
        """Drop expired sessions now; returns how many (Redis expires keys by itself: 0)."""
        return 0

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @asynccontextmanager
    async def lock(self, session_id: str, wait: float = 5.0) -> AsyncIterator[None]:
        """Hold the session's lock; ``SessionBusy`` if it stays taken for ``wait`` seconds."""
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait
        delay = 0.005
        while not await self._try_lock(session_id, token):
            if time.monotonic() >= deadline:
                raise SessionBusy(
                    "This conversation is being resumed by another request right now; "
                    "retry when that one has finished."
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        # held as long as the request works (a stream a slow client reads can outlast lock_ttl):
        # refreshed every third of it; a holder that dies stops refreshing and the lock expires
        keeper = asyncio.create_task(self._keep(session_id, token))
        try:
            yield
        finally:
            keeper.cancel()
            await asyncio.shield(self._unlock(session_id, token))

    async def _keep(self, session_id: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.lock_ttl / 3)
            try:
                if not await self._extend(session_id, token):
                    return
            except CablectlError:  # the store is unreachable now; try again next time
                continue


class InMemorySessionStore(SessionStore):
    """One process's sessions, kept as JSON bytes (as in Redis: compact, and callers get copies).
    Expired ones are dropped when touched and by ``purge_expired`` (the app's sweeper calls it)."""

    def __init__(self, ttl: float = 3600.0, lock_ttl: float = 30.0) -> None:
        super().__init__(ttl, lock_ttl)
        self._logs: dict[str, tuple[float, list[bytes]]] = {}
        self._locks: dict[str, tuple[float, str]] = {}
        self._replicas: dict[str, tuple[float, dict[str, Any]]] = {}
        self._digests: dict[str, tuple[float, str]] = {}
        self._values: dict[str, tuple[float, bytes]] = {}

    async def get_value(self, key: str) -> bytes | None:
        held = self._values.get(key)
        if held is None or held[0] < time.monotonic():
            self._values.pop(key, None)
            return None
        return held[1]

    async def put_value(self, key: str, value: bytes, ttl: float | None) -> None:
        self._values[key] = (math.inf if ttl is None else time.monotonic() + ttl, bytes(value))

    async def delete_value(self, key: str) -> bool:
        return await self.get_value(key) is not None and self._values.pop(key, None) is not None

    async def delete_value_if(self, key: str, expected: bytes) -> bool:
        return await self.get_value(key) == expected and await self.delete_value(key)

    async def touch_values(self, keys: list[str], ttl: float) -> None:
        for key in keys:
            value = await self.get_value(key)
            if value is not None:
                self._values[key] = (time.monotonic() + ttl, value)

    async def claim_digest(self, digest: str, session_id: str) -> None:
        held = self._digests.get(digest)
        owner = (
            session_id if held is None or held[0] < time.monotonic() or held[1] == session_id else AMBIGUOUS
        )
        self._digests[digest] = (time.monotonic() + self.ttl, owner)

    async def session_of_digest(self, digest: str) -> str | None:
        held = self._digests.get(digest)
        if held is None or held[0] < time.monotonic() or held[1] == AMBIGUOUS:
            return None
        return held[1]

    def _live(self, session_id: str) -> list[bytes] | None:
        entry = self._logs.get(session_id)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._logs[session_id]
            return None
        return entry[1]

    async def append(self, session_id: str, *events: Event) -> int:
        log = self._live(session_id) or []
        log.extend(orjson.dumps(e) for e in _stamped(events))
        self._logs[session_id] = (time.monotonic() + self.ttl, log)
        return len(log)

    async def events(self, session_id: str) -> list[Event]:
        return [orjson.loads(item) for item in self._live(session_id) or []]

    async def purge_expired(self) -> int:
        now = time.monotonic()
        expired = [sid for sid, (until, _) in self._logs.items() if until < now]
        for sid in expired:
            del self._logs[sid]
        for sid in [sid for sid, (until, _) in self._locks.items() if until < now]:
            del self._locks[sid]
        for digest in [d for d, (until, _) in self._digests.items() if until < now]:
            del self._digests[digest]
        for key in [k for k, (until, _) in self._values.items() if until < now]:
            del self._values[key]
        return len(expired)

    async def sessions(self) -> list[str]:
        return [s for s in list(self._logs) if self._live(s) is not None]

    async def delete(self, session_id: str) -> None:
        self._logs.pop(session_id, None)

    async def ttl_left(self, session_id: str) -> float | None:
        if self._live(session_id) is None:
            return None
        return self._logs[session_id][0] - time.monotonic()

    async def publish_replica(self, replica_id: str, info: dict[str, Any], ttl: float) -> None:
        self._replicas[replica_id] = (time.monotonic() + ttl, orjson.loads(orjson.dumps(info)))

    async def replicas(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [info for until, info in self._replicas.values() if until > now]

    async def replica(self, replica_id: str) -> dict[str, Any] | None:
        held = self._replicas.get(replica_id)
        return held[1] if held is not None and held[0] > time.monotonic() else None

    async def _try_lock(self, session_id: str, token: str) -> bool:
        held = self._locks.get(session_id)
        if held is not None and held[0] > time.monotonic():
            return False
        self._locks[session_id] = (time.monotonic() + self.lock_ttl, token)
        return True

    async def _unlock(self, session_id: str, token: str) -> None:
        held = self._locks.get(session_id)
        if held is not None and held[1] == token:
            del self._locks[session_id]

    async def _extend(self, session_id: str, token: str) -> bool:
        held = self._locks.get(session_id)
        if held is None or held[1] != token:
            return False
        self._locks[session_id] = (time.monotonic() + self.lock_ttl, token)
        return True


# Delete the lock only if we still hold it (it may have expired and been taken by another).
_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class RedisSessionStore(SessionStore):
    def __init__(
        self,
        url: str,
        ttl: float = 3600.0,
        lock_ttl: float = 30.0,
        prefix: str = "cablectl:s:",
        replica_prefix: str = "cablectl:r:",
        secret_key: str = "cablectl:secret",
        value_prefix: str = "cablectl:kv:",
    ) -> None:
        super().__init__(ttl, lock_ttl)
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._prefix = prefix
        self._replica_prefix = replica_prefix
        self._secret_key = secret_key
        self._value_prefix = value_prefix
        self._unlock_script = self._redis.register_script(_UNLOCK)
        self._claim_script = self._redis.register_script(_CLAIM)
        self._extend_script = self._redis.register_script(_EXTEND)

    def _log(self, session_id: str) -> str:
        return f"{self._prefix}{session_id}:log"

    def _lock_key(self, session_id: str) -> str:
        return f"{self._prefix}{session_id}:lock"

    async def _call(self, coro: Any) -> Any:
        import redis.exceptions

        try:
            return await coro
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise ServiceUnavailable(
                f"The session store (Redis) is unreachable: {exc}; retry shortly"
            ) from exc

    async def append(self, session_id: str, *events: Event) -> int:
        key = self._log(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *(orjson.dumps(e) for e in _stamped(events)))
            pipe.pexpire(key, int(self.ttl * 1000))
            length, _ = await self._call(pipe.execute())
        return int(length)

    async def events(self, session_id: str) -> list[Event]:
        raw = await self._call(self._redis.lrange(self._log(session_id), 0, -1))
        return [orjson.loads(item) for item in raw]

    async def sessions(self) -> list[str]:
        found = []
        async for key in self._redis.scan_iter(match=f"{self._prefix}*:log", count=500):
            name = key.decode() if isinstance(key, bytes) else str(key)
            found.append(name[len(self._prefix) : -len(":log")])
        return sorted(found)

    async def delete(self, session_id: str) -> None:
        await self._call(self._redis.delete(self._log(session_id), self._lock_key(session_id)))

    async def ttl_left(self, session_id: str) -> float | None:
        ms = int(await self._call(self._redis.pttl(self._log(session_id))))
        return None if ms < 0 else ms / 1000

    async def publish_replica(self, replica_id: str, info: dict[str, Any], ttl: float) -> None:
        key = f"{self._replica_prefix}{replica_id}"
        await self._call(self._redis.set(key, orjson.dumps(info), px=int(ttl * 1000)))

    async def replicas(self) -> list[dict[str, Any]]:
        keys = [k async for k in self._redis.scan_iter(match=f"{self._replica_prefix}*", count=500)]
        if not keys:
            return []
        values = await self._call(self._redis.mget(keys))
        return [orjson.loads(v) for v in values if v is not None]

    async def replica(self, replica_id: str) -> dict[str, Any] | None:
        raw = await self._call(self._redis.get(f"{self._replica_prefix}{replica_id}"))
        return None if raw is None else dict(orjson.loads(raw))

    async def _try_lock(self, session_id: str, token: str) -> bool:
        ok = await self._call(
            self._redis.set(self._lock_key(session_id), token, nx=True, px=int(self.lock_ttl * 1000))
        )
        return bool(ok)

    async def _unlock(self, session_id: str, token: str) -> None:
        await self._call(self._unlock_script(keys=[self._lock_key(session_id)], args=[token]))

    async def _extend(self, session_id: str, token: str) -> bool:
        ttl = int(self.lock_ttl * 1000)
        return bool(
            await self._call(self._extend_script(keys=[self._lock_key(session_id)], args=[token, ttl]))
        )

    def _digest_key(self, digest: str) -> str:
        return f"{self._prefix}digest:{digest}"

    async def claim_digest(self, digest: str, session_id: str) -> None:
        ttl = int(self.ttl * 1000)
        await self._call(
            self._claim_script(keys=[self._digest_key(digest)], args=[session_id, AMBIGUOUS, ttl])
        )

    async def session_of_digest(self, digest: str) -> str | None:
        held = await self._call(self._redis.get(self._digest_key(digest)))
        if held is None:
            return None
        owner = held.decode() if isinstance(held, bytes) else str(held)
        return None if owner == AMBIGUOUS else owner

    async def get_value(self, key: str) -> bytes | None:
        raw = await self._call(self._redis.get(self._value_prefix + key))
        return None if raw is None else bytes(raw)

    async def put_value(self, key: str, value: bytes, ttl: float | None) -> None:
        px = None if ttl is None else max(1, int(ttl * 1000))
        await self._call(self._redis.set(self._value_prefix + key, value, px=px))

    async def delete_value(self, key: str) -> bool:
        return bool(await self._call(self._redis.delete(self._value_prefix + key)))

    async def delete_value_if(self, key: str, expected: bytes) -> bool:
        # the lock's compare-and-delete script: delete only while it still holds ``expected``
        return bool(await self._call(self._unlock_script(keys=[self._value_prefix + key], args=[expected])))

    async def touch_values(self, keys: list[str], ttl: float) -> None:
        if not keys:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pexpire(self._value_prefix + key, max(1, int(ttl * 1000)))
            await self._call(pipe.execute())

    async def shared_secret(self, candidate: bytes) -> bytes:
        await self._call(self._redis.set(self._secret_key, candidate.hex(), nx=True))
        stored = await self._call(self._redis.get(self._secret_key))
        return bytes.fromhex(stored.decode() if isinstance(stored, bytes) else str(stored))

    async def ping(self) -> bool:
        import redis.exceptions

        try:
            return bool(await self._redis.ping())
        except (redis.exceptions.RedisError, OSError):  # readiness probes report, they do not raise
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()


# Push the lock's expiry ahead only if we still hold it.
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# A digest's owner: set if absent; another session's claim makes it ambiguous (for good).
_CLAIM = """
local held = redis.call('get', KEYS[1])
if (not held) or held == ARGV[1] then
    redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[3])
else
    redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""
