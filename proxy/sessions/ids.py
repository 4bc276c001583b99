"""Tool-call ids that name their session, and cannot be forged.

``call_<session>_<seq>_<sig>``: ``sig`` is an HMAC of the session and sequence number
under the proxy's session secret (shared by every replica). A client that sends the
conversation back is enough to find the session again; a client that edits an id,
or invents one, gets ``None`` from ``parse``, and the conversation is then translated
statelessly: nothing it sends can reach another session's kernel.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

__all__ = ["CallIds", "new_session_id"]

_ID = re.compile(r"^call_([0-9a-f]{16})_([0-9]{1,9})_([0-9a-f]{16})$")


def new_session_id() -> str:
    return secrets.token_hex(8)


class CallIds:
    def __init__(self, secret: bytes) -> None:
        self.rekey(secret)

    def rekey(self, secret: bytes) -> None:
        """Sign with ``secret`` from now on (the app agrees on one with its replicas at startup)."""
        if len(secret) < 16:
            raise ValueError("the session secret must be at least 16 bytes")
        self._secret = secret

    def _sign(self, session_id: str, seq: int) -> str:
        return hmac.new(self._secret, f"{session_id}:{seq}".encode(), hashlib.sha256).hexdigest()[:16]

    def mac(self, data: bytes) -> str:
        """An HMAC of ``data`` under the session secret (what replicas sign forwarded requests with)."""
        return hmac.new(self._secret, data, hashlib.sha256).hexdigest()

    def issue(self, session_id: str, seq: int) -> str:
        return f"call_{session_id}_{seq}_{self._sign(session_id, seq)}"

    def parse(self, call_id: str) -> tuple[str, int] | None:
        """(session id, sequence number) of an id this proxy issued; None for any other id."""
        match = _ID.match(call_id)
        if match is None:
            return None
        session_id, seq_text, sig = match.groups()
        seq = int(seq_text)
        if not hmac.compare_digest(sig, self._sign(session_id, seq)):
            return None
        return session_id, seq
