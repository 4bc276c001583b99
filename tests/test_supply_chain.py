"""The lock file covers what the test command installs, with hashes, and is in sync with pyproject.toml."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

from tests.supply_chain import REPO, LockEntry, direct_pins, parse_lock, pins_digest

LOCK = REPO / "requirements.lock"
MALICIOUS = {"litellm": {"1.82.7", "1.82.8"}}


@pytest.fixture(scope="module")
def lock_text() -> str:
    return LOCK.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def entries(lock_text: str) -> list[LockEntry]:
    parsed = parse_lock(lock_text)
    assert len(parsed) > 100
    return parsed


def applies(entry: LockEntry) -> bool:
    return entry.marker is None or Marker(entry.marker).evaluate()


def test_lock_was_made_from_these_pins(lock_text: str) -> None:
    recorded = re.search(r"^# pins-digest: ([0-9a-f]{64})$", lock_text, re.M)
    assert recorded is not None, "requirements.lock has no pins-digest header: run scripts/lock"
    assert recorded.group(1) == pins_digest(), (
        "pyproject.toml's dependencies changed since requirements.lock was made: run scripts/lock"
    )


def test_every_direct_pin_is_locked_at_its_version(entries: list[LockEntry]) -> None:
    locked = {(e.name, e.version) for e in entries}
    for pin in direct_pins():
        requirement = Requirement(pin)
        versions = [s.version for s in requirement.specifier if s.operator == "=="]
        assert len(versions) == 1, f"{pin} is not pinned exactly (==)"
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert (name, versions[0]) in locked, f"{pin} is not in requirements.lock: run scripts/lock"


def test_every_entry_is_hashed_and_none_is_known_bad(entries: list[LockEntry]) -> None:
    for entry in entries:
        assert entry.hashes, f"{entry.name}=={entry.version} has no hash"
        assert entry.version not in MALICIOUS.get(entry.name, set()), (
            f"{entry.name} {entry.version} is malicious"
        )


def test_the_no_deps_extra_is_hashed_too() -> None:
    [entry] = parse_lock((REPO / "requirements-bfcl.lock").read_text(encoding="utf-8"))
    assert entry.name == "bfcl-eval" and entry.hashes


def test_the_environment_is_what_the_lock_says(entries: list[LockEntry]) -> None:
    """Whatever CI installed for this run came from the lock: every locked package that applies
    here is installed at the locked version."""
    wrong = []
    for entry in filter(applies, entries):
        try:
            installed = importlib.metadata.version(entry.name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{entry.name} missing")
            continue
        if installed != entry.version:
            wrong.append(f"{entry.name} {installed} (lock: {entry.version})")
    assert not wrong, "installed packages differ from requirements.lock: " + ", ".join(wrong)


def test_no_stray_lock_output_at_the_root() -> None:
    """An old scripts/lock wrote `uv pip compile -o -` to a file named "-"."""
    root = Path(__file__).resolve().parents[1]
    assert not (root / "-").exists()
    assert "-o -" not in (root / "scripts" / "lock").read_text()
