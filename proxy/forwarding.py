"""A request for a session whose kernel lives on another replica is answered by that replica.

Behind an ordinary load balancer, a conversation's next request usually lands on a replica
that does not hold its kernel. Replaying the log there would work (``proxy.actions.runtime``),
but runs every earlier program again; so while the owner (``proxy.sessions.owners``) is alive,
the request goes to it instead: the same method, path, body and client credentials, and the
answer (JSON or a stream) comes back byte for byte. Between replicas only:

- signed: ``x-cablectl-forwarded: <unix time>.<HMAC>`` of the time, method, path and body under
  the shared session secret; a header that does not verify (or is over a minute old) is a 403,
  so a client cannot pass for a replica;
- one hop: a forwarded request is answered where it arrives (replaying there if it must), never
  forwarded again;
- only if the owner cannot be reached at all (connection refused or timed out: nothing was sent)
  is the request answered here instead, by replay.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from proxy.errors import PermissionDenied, ServiceUnavailable
from proxy.sessions.owners import OwnedElsewhere

__all__ = ["FORWARDED_HEADER", "Forwarder"]

log = logging.getLogger("cablectl.app")

FORWARDED_HEADER = "x-cablectl-forwarded"
MAX_AGE = 60.0  # seconds a forwarded request's signature stays good
# what a client's request carries that its answer depends on (credentials, API versions, body type)
PASSED = frozenset(
    {
        "authorization",
        "x-api-key",
        "api-key",
        "anthropic-version",
        "anthropic-beta",
        "content-type",
        "accept",
        "user-agent",
        "openai-organization",
        "openai-project",
        "x-cablectl-session",
    }
)
# what the owner's answer carries back (its body's type, the session, the trace, a retry hint)
RETURNED = frozenset(
    {
        "content-type",
        "content-encoding",
        "cache-control",
        "retry-after",
        "x-accel-buffering",
        "x-cablectl-session-id",
        "x-cablectl-trace-id",
    }
)


class Forwarder:
    """Sends requests to the replica that owns their session; checks the ones sent here.
    ``sign``: an HMAC under the shared session secret; ``on_forward`` is told each outcome
    (``sent``, ``unreachable``, ``received``)."""

    def __init__(
        self,
        sign: Callable[[bytes], str],
        on_forward: Callable[[str], None] | None = None,
        connect_timeout: float = 2.0,
    ) -> None:
        self._sign = sign
        self.on_forward = on_forward
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=30.0, pool=connect_timeout),
            trust_env=False,  # replicas reach each other directly, never through an HTTP proxy
        )

    def _count(self, outcome: str) -> None:
        if self.on_forward is not None:
            self.on_forward(outcome)

    def _mac(self, at: int, method: str, target: str, body: bytes) -> str:
        return self._sign(f"{at}\n{method}\n{target}\n".encode() + hashlib.sha256(body).digest())

    @staticmethod
    def _target(request: Request) -> str:
        query = request.url.query
        return request.url.path + (f"?{query}" if query else "")

    def received(self, request: Request, body: bytes) -> bool:
        """Whether another replica sent this request (it is then answered here, whoever owns
        its session); a forwarding header that does not verify is refused."""
        header = request.headers.get(FORWARDED_HEADER)
        if header is None:
            return False
        at_text, _, mac = header.partition(".")
        ok = at_text.isdigit() and abs(time.time() - int(at_text)) <= MAX_AGE
        if ok:
            expected = self._mac(int(at_text), request.method, self._target(request), body)
            ok = hmac.compare_digest(mac, expected)
        if not ok:
            raise PermissionDenied(
                f"The {FORWARDED_HEADER} header is for cablectl replicas, and this one does not verify "
                "(replicas must share sessions.secret, and their clocks must agree within a minute)",
                code="bad_forwarding_signature",
            )
        self._count("received")
        return True

    async def send(self, request: Request, body: bytes, moved: OwnedElsewhere) -> Response | None:
        """The owner's answer, streamed back as it comes; None if the owner could not be reached
        (nothing was sent: the caller answers by replay)."""
        address = str(moved.owner.address).rstrip("/")
        target = self._target(request)
        at = int(time.time())
        headers = {k: v for k, v in request.headers.items() if k.lower() in PASSED}
        headers[FORWARDED_HEADER] = f"{at}.{self._mac(at, request.method, target, body)}"
        outgoing = self._client.build_request(request.method, address + target, content=body, headers=headers)
        try:
            answer = await self._client.send(outgoing, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            log.warning(
                "session %s: its replica %s at %s cannot be reached (%s); replaying its log here",
                moved.session_id,
                moved.owner.replica,
                address,
                type(exc).__name__,
            )
            self._count("unreachable")
            return None
        except httpx.HTTPError as exc:  # sent, and then lost: it may have run there
            raise ServiceUnavailable(
                f"The replica holding this session did not answer ({type(exc).__name__}); retry shortly",
                code="owner_unavailable",
            ) from exc
        log.info(
            "session %s forwarded to replica %s at %s: %d",
            moved.session_id,
            moved.owner.replica,
            address,
            answer.status_code,
        )
        self._count("sent")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:  # the owner went away mid-answer: the client sees it end
                log.warning("session %s: forwarded answer broke off: %s", moved.session_id, exc)
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await answer.aclose()

        returned = {k: v for k, v in answer.headers.items() if k.lower() in RETURNED}
        return StreamingResponse(relay(), status_code=answer.status_code, headers=returned)

    async def aclose(self) -> None:
        await self._client.aclose()
