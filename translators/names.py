"""Tool and parameter names as Python identifiers, reversibly.

``spotify.play`` -> ``spotify_play``, ``get-sum`` -> ``get_sum``, ``class`` -> ``class_``,
``1st`` -> ``_1st``. A ``NameMap`` is built over one namespace (the tools of a
request, or the parameters of one tool) and resolves collisions with a numeric
suffix, so every original name has exactly one identifier and back.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Iterable

__all__ = ["NameMap", "to_identifier"]

_INVALID = re.compile(r"[^0-9A-Za-z_]")
# names a stub must not shadow inside the kernel
RESERVED = frozenset({"print", "Any", "Literal", "TypedDict", "NotRequired", "None", "True", "False"})


def to_identifier(name: str) -> str:
    """A valid Python identifier close to ``name`` (not unique on its own; see NameMap)."""
    ident = _INVALID.sub("_", name) or "_"
    if ident[0].isdigit():
        ident = "_" + ident
    if keyword.iskeyword(ident) or keyword.issoftkeyword(ident) or ident in RESERVED:
        ident += "_"
    return ident


class NameMap:
    """Bidirectional original <-> identifier map over one namespace."""

    def __init__(self, names: Iterable[str], taken: Iterable[str] = ()) -> None:
        self._to_py: dict[str, str] = {}
        self._to_orig: dict[str, str] = {}
        used = set(taken)
        originals = list(names)
        # names that are already valid identifiers keep them; others get what is left
        for name in originals:
            if name not in self._to_py and to_identifier(name) == name and name not in used:
                self._bind(name, name, used)
        for name in originals:
            if name in self._to_py:
                continue
            base = to_identifier(name)
            ident, n = base, 2
            while ident in used:
                ident, n = f"{base}_{n}", n + 1
            self._bind(name, ident, used)

    def _bind(self, original: str, ident: str, used: set[str]) -> None:
        self._to_py[original] = ident
        self._to_orig[ident] = original
        used.add(ident)

    def py(self, original: str) -> str:
        return self._to_py[original]

    def original(self, ident: str) -> str | None:
        return self._to_orig.get(ident)

    def items(self) -> list[tuple[str, str]]:
        return list(self._to_py.items())
