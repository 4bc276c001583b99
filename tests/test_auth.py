"""KeyRing: header forms, open mode, model limits."""

from __future__ import annotations

import pytest

from proxy.auth import ANONYMOUS, KeyRing
from proxy.config import KeyEntry
from proxy.errors import AuthenticationFailed, PermissionDenied

RING = KeyRing(
    [
        KeyEntry(id="alice", key="sk-alice-123456", models=["a"]),
        KeyEntry(id="bob", key="sk-bob-1234567"),
    ]
)


def test_open_when_no_keys() -> None:
    assert KeyRing([]).open
    assert KeyRing([]).authenticate({}) is ANONYMOUS


@pytest.mark.parametrize(
    ("headers", "key_id"),
    [
        pytest.param({"authorization": "Bearer sk-alice-123456"}, "alice", id="bearer"),
        pytest.param({"authorization": "bearer   sk-bob-1234567 "}, "bob", id="bearer-lowercase-spaces"),
        pytest.param({"x-api-key": "sk-bob-1234567"}, "bob", id="x-api-key"),
        pytest.param({"api-key": "sk-alice-123456"}, "alice", id="azure-style"),
    ],
)
def test_header_forms(headers: dict[str, str], key_id: str) -> None:
    assert RING.authenticate(headers).key_id == key_id


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="none"),
        pytest.param({"authorization": "Bearer "}, id="empty"),
        pytest.param({"authorization": "Token sk-alice-123456"}, id="scheme"),
        pytest.param({"authorization": "Bearer sk-alice-12345"}, id="prefix-of-key"),
        pytest.param({"authorization": "Bearer sk-alice-1234567"}, id="longer-than-key"),
    ],
)
def test_rejected(headers: dict[str, str]) -> None:
    with pytest.raises(AuthenticationFailed):
        RING.authenticate(headers)


def test_model_limits() -> None:
    alice = RING.authenticate({"authorization": "Bearer sk-alice-123456"})
    assert alice.may_use("a") and not alice.may_use("b")
    with pytest.raises(PermissionDenied, match="may not use model 'b'"):
        alice.check_model("b")
    assert RING.authenticate({"x-api-key": "sk-bob-1234567"}).may_use("anything")
