"""Grammar files shipped as package data, loaded with ``importlib.resources``.

- ``response.lark``: the turn shape (free text, optionally one ```python block) and
  the call-only subset of Python;
- ``values.lark``: Python literals (strings, numbers, bools, None, lists, dicts).

``translators.grammar`` adds the per-request rules generated from the tools.
"""

from functools import cache
from importlib.resources import files

__all__ = ["load"]


@cache
def load(name: str) -> str:
    """The text of ``grammars/<name>.lark``."""
    return (files(__name__) / f"{name}.lark").read_text(encoding="utf-8")
