"""Sessions: event logs in Redis (or in-process), locks, and tool-call ids that name them."""

from proxy.sessions.ids import CallIds, new_session_id
from proxy.sessions.store import InMemorySessionStore, RedisSessionStore, SessionBusy, SessionStore

__all__ = [
    "CallIds",
    "InMemorySessionStore",
    "RedisSessionStore",
    "SessionBusy",
    "SessionStore",
    "new_session_id",
]
