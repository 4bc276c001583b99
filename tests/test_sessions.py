"""Session stores (a real redis-server, and the in-process one) and tool-call ids."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from proxy.sessions import (
    CallIds,
    InMemorySessionStore,
    RedisSessionStore,
    SessionBusy,
    SessionStore,
    new_session_id,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        made: SessionStore = InMemorySessionStore(ttl=60, lock_ttl=0.5)
    else:
        made = RedisSessionStore(
            request.getfixturevalue("redis_url"), ttl=60, lock_ttl=0.5, prefix=f"t{new_session_id()}:"
        )
    yield made
    await made.aclose()


async def test_log_appends_in_order(store: SessionStore) -> None:
    sid = new_session_id()
    assert await store.events(sid) == []
    assert await store.append(sid, {"kind": "tools", "digest": "abc"}) == 1
    assert (
        await store.append(
            sid, {"kind": "cell", "source": "x = 1"}, {"kind": "result", "call": 1, "value": [1, "é", None]}
        )
        == 3
    )
    events = await store.events(sid)
    assert [e["kind"] for e in events] == ["tools", "cell", "result"]
    assert events[2]["value"] == [1, "é", None]
    events[0]["kind"] = "changed"  # callers get copies
    assert (await store.events(sid))[0]["kind"] == "tools"
    assert sid in await store.sessions()
    await store.delete(sid)
    assert await store.events(sid) == [] and sid not in await store.sessions()


async def test_sessions_expire(store: SessionStore) -> None:
    store.ttl = 0.3
    sid = new_session_id()
    await store.append(sid, {"kind": "tools"})
    await asyncio.sleep(0.5)
    assert await store.events(sid) == []
    assert sid not in await store.sessions()


async def test_expired_sessions_are_purged_untouched() -> None:
    store = InMemorySessionStore(ttl=0.2)
    for _ in range(3):
        await store.append(new_session_id(), {"kind": "tools"})
    kept = new_session_id()
    await asyncio.sleep(0.3)
    await store.append(kept, {"kind": "tools"})
    assert await store.purge_expired() == 3  # never read again, still gone: memory stays bounded
    assert await store.sessions() == [kept]


async def test_lock_excludes_and_expires(store: SessionStore) -> None:
    sid = new_session_id()
    order: list[str] = []

    async def holder(name: str, hold: float) -> None:
        async with store.lock(sid, wait=2.0):
            order.append(f"{name} in")
            await asyncio.sleep(hold)
            order.append(f"{name} out")

    await asyncio.gather(holder("a", 0.2), holder("b", 0.0))
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
    async with store.lock(sid):
        with pytest.raises(SessionBusy) as info:
            async with store.lock(sid, wait=0.1):
                pass
    assert info.value.http_status == 409
    # a holder that died: its lock expires after lock_ttl and the session is free again
    assert await store._try_lock(sid, "dead-holder")
    async with store.lock(sid, wait=2.0):
        pass


async def test_a_lock_is_kept_while_its_holder_works(store: SessionStore) -> None:
    """A request that holds the lock longer than lock_ttl (a stream a slow client reads) keeps
    it: it is refreshed while held, and free at once when let go."""
    sid = new_session_id()
    store.lock_ttl = 0.3
    async with store.lock(sid):
        await asyncio.sleep(1.0)  # over three times lock_ttl
        with pytest.raises(SessionBusy):
            async with store.lock(sid, wait=0.1):
                pass
    async with store.lock(sid, wait=0.1):
        pass


async def test_values_are_kept_replaced_expired_and_deleted(store: SessionStore) -> None:
    key = f"response:{new_session_id()}"
    assert await store.get_value(key) is None
    await store.put_value(key, b"\x00first", ttl=60)
    assert await store.get_value(key) == b"\x00first"  # bytes kept as they are
    await store.put_value(key, b"second", ttl=60)
    assert await store.get_value(key) == b"second"
    assert await store.delete_value(key) is True
    assert await store.delete_value(key) is False
    assert await store.get_value(key) is None
    await store.put_value(key, b"short", ttl=0.2)
    await store.touch_values([key, "absent"], ttl=60)  # kept longer; an absent key stays absent
    await asyncio.sleep(0.4)
    assert await store.get_value(key) == b"short" and await store.get_value("absent") is None
    await store.touch_values([key], ttl=0.2)
    await asyncio.sleep(0.4)
    assert await store.get_value(key) is None
    await store.put_value(key, b"for good", ttl=None)
    assert await store.get_value(key) == b"for good"
    await store.delete_value(key)
    assert key.split(":", 1)[1] not in await store.sessions()  # values are not sessions


async def test_redis_log_is_shared_by_replicas(redis_url: str) -> None:
    first = RedisSessionStore(redis_url, prefix="replica:")
    second = RedisSessionStore(redis_url, prefix="replica:")
    sid = new_session_id()
    try:
        await first.append(sid, {"kind": "cell", "source": "print(1)"})
        [event] = await second.events(sid)
        assert event.pop("at") == pytest.approx(time.time(), abs=60)  # stamped when appended
        assert event == {"kind": "cell", "source": "print(1)"}
        async with first.lock(sid):
            with pytest.raises(SessionBusy):
                async with second.lock(sid, wait=0.1):
                    pass
        assert await second.ping()
    finally:
        await first.aclose()
        await second.aclose()


async def test_unreachable_redis_is_a_503() -> None:
    from proxy.errors import ServiceUnavailable
    from tests.servers import free_port

    store = RedisSessionStore(f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert not await store.ping()
        with pytest.raises(ServiceUnavailable, match="unreachable"):
            await store.events("x")
    finally:
        await store.aclose()


def test_call_ids_name_their_session_and_cannot_be_forged() -> None:
    ids = CallIds(b"0123456789abcdef-secret")
    sid = new_session_id()
    call = ids.issue(sid, 7)
    assert call.startswith("call_") and ids.parse(call) == (sid, 7)
    other = CallIds(b"another-replica-secret!")
    assert other.parse(call) is None  # a different secret: not ours
    forged = call.replace(f"_{7}_", "_8_")
    assert ids.parse(forged) is None
    foreign_sid = new_session_id()
    assert ids.parse(call.replace(sid, foreign_sid)) is None  # cannot point at another session
    for foreign in ("call_abc", "call_JMW1whyEaYG438VE1OIflxA2", "", "call_" + "0" * 16 + "_1_" + "0" * 16):
        assert ids.parse(foreign) is None
    with pytest.raises(ValueError):
        CallIds(b"short")
