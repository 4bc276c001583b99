"""What the lock file is checked against: the direct pins of pyproject.toml, and the lock's entries."""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["REPO", "LockEntry", "direct_pins", "parse_lock", "pins_digest"]

REPO = Path(__file__).resolve().parent.parent
EXTRAS = ("test", "dev")  # what the README's test command installs


def direct_pins(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The project's own requirements and those of the extras the tests install, as written."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    return [*project["dependencies"], *(r for name in EXTRAS for r in extras.get(name, []))]


def pins_digest(pyproject: Path = REPO / "pyproject.toml") -> str:
    return hashlib.sha256("\n".join(direct_pins(pyproject)).encode()).hexdigest()


@dataclass
class LockEntry:
    name: str
    version: str
    marker: str | None
    hashes: list[str] = field(default_factory=list)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> list[LockEntry]:
    entries: list[LockEntry] = []
    for line in text.splitlines():
        requirement = re.match(
            r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line
        )
        if requirement:
            name, version, marker = requirement.groups()
            entries.append(LockEntry(_normalize(name), version, marker))
            continue
        hashed = re.match(r"^\s+--hash=sha256:([0-9a-f]{64})", line)
        if hashed and entries:
            entries[-1].hashes.append(hashed.group(1))
    return entries
