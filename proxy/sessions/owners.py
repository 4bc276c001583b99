"""Which replica holds each session's kernel, so that its next request goes there.

A kernel is a cache of its session's log, and any replica can rebuild it by replaying the log;
but a replay runs every earlier program again. So the replica that takes a kernel for a session
*claims* the session in the store (``owner:<session>``: that replica and kernel, kept as long as
the session's log), and gives the claim up when it gives the kernel back. Each replica announces
itself every few seconds with a short TTL (``proxy.app``), with the address other replicas reach
it at (``server.advertise_url``). A request for a session claimed by another replica whose
announcement is live is forwarded there (``proxy.forwarding``); a claim naming a replica that is
gone means the log is replayed here, and this replica claims the session instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from proxy.sessions.store import SessionStore

__all__ = ["OwnedElsewhere", "Owner", "Owners"]

PREFIX = "owner:"


@dataclass(frozen=True)
class Owner:
    replica: str
    kernel: str
    mine: bool  # this replica's claim
    address: str | None  # where the owner listens; None when it is gone, stopping or unreachable


class OwnedElsewhere(Exception):
    """Raised before anything is done: this request's session is held by another live replica
    (``proxy.forwarding`` sends the request there)."""

    def __init__(self, session_id: str, owner: Owner) -> None:
        super().__init__(f"session {session_id} is held by replica {owner.replica}")
        self.session_id = session_id
        self.owner = owner


class Owners:
    """Claims on sessions in ``store``, made by this replica (``replica_id`` at ``address``)."""

    def __init__(self, store: SessionStore, replica_id: str, address: str | None) -> None:
        self.store = store
        self.replica_id = replica_id
        self.address = address

    def _value(self, kernel_id: str) -> bytes:
        return orjson.dumps({"replica": self.replica_id, "kernel": kernel_id})

    async def claim(self, session_id: str, kernel_id: str) -> None:
        """This replica holds the session's kernel now (replacing any other claim)."""
        await self.store.put_value(PREFIX + session_id, self._value(kernel_id), self.store.ttl)

    async def keep(self, session_id: str) -> None:
        """The session was used here: keep the claim as long as its log."""
        await self.store.touch_values([PREFIX + session_id], self.store.ttl)

    async def release(self, session_id: str, kernel_id: str) -> None:
        """The kernel was given back: drop the claim, unless another replica claimed it since."""
        await self.store.delete_value_if(PREFIX + session_id, self._value(kernel_id))

    async def find(self, session_id: str) -> Owner | None:
        """The replica holding the session's kernel, if any claims it."""
        raw = await self.store.get_value(PREFIX + session_id)
        if raw is None:
            return None
        try:
            claim = orjson.loads(raw)
            replica, kernel = str(claim["replica"]), str(claim["kernel"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if replica == self.replica_id:
            return Owner(replica, kernel, True, self.address)
        announced = await self.store.replica(replica)
        address = None
        if announced is not None and not announced.get("stopping") and announced.get("address"):
            address = str(announced["address"])
        return Owner(replica, kernel, False, address)
