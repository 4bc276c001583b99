"""Grammar files shipped as package data, loaded with ``importlib.resources``."""

from importlib.resources import files

__all__ = ["load"]


def load(name: str) -> str:
    """The text of ``grammars/<name>.lark``."""
    return (files(__name__) / f"{name}.lark").read_text(encoding="utf-8")
