"""Affordance: the tools worth showing, when there are too many to show them all.

A route with a few MCP servers easily offers hundreds of functions; every stub costs prompt
tokens on every turn and small models pick worse from a long list. ``ToolIndex`` ranks a
toolset's tools against the conversation with BM25 (``bm25s``) over each tool's name (split
into words), description and parameter names and descriptions; ``shown`` keeps the best
``limit``, always with the tools a caller must keep (``tool_choice``'s, those used before).
Calls to tools that were not shown stay valid: they are checked against the whole toolset.
Pure and synchronous, like the rest of ``translators``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import bm25s

from translators.tools import Tool, Toolset

__all__ = ["ToolIndex", "tokens"]

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "get",
        "in",
        "is",
        "it",
        "of",
        "on",
        "or",
        "that",
        "the",
        "this",
        "to",
        "with",
        "what",
        "which",
        "who",
        "how",
        "do",
        "does",
        "can",
        "you",
        "me",
        "my",
        "i",
        "please",
    ]
)


def tokens(text: str) -> list[str]:
    """Words of ``text``: identifiers split at case changes and underscores, lower-cased,
    common words and single letters left out."""
    return [w for w in (m.group().lower() for m in _WORD.finditer(text)) if len(w) > 1 and w not in _STOP]


def _document(tool: Tool) -> list[str]:
    parts = [tool.name, tool.name, tool.description]  # the name counts twice: it is what a tool is
    for param in tool.params:
        parts += [param.name, str(param.schema.get("description", ""))]
    return tokens(" ".join(parts)) or tokens(tool.name) or ["tool"]


class ToolIndex:
    """A BM25 index over one toolset's tools."""

    def __init__(self, toolset: Toolset) -> None:
        self.toolset = toolset
        self._retriever = bm25s.BM25()
        self._retriever.index([_document(t) for t in toolset.tools], show_progress=False)

    def rank(self, query: str, k: int | None = None) -> list[Tool]:
        """The tools best matching ``query``, best first (ties keep the toolset's order); tools
        that match nothing come last, in order."""
        tools = self.toolset.tools
        k = min(len(tools), k or len(tools))
        words = tokens(query)
        if not words or not tools:
            return list(tools[:k])
        ids, scores = self._retriever.retrieve([words], k=len(tools), show_progress=False)
        ranked = sorted(
            zip(ids[0].tolist(), scores[0].tolist(), strict=True), key=lambda pair: (-pair[1], pair[0])
        )
        return [tools[i] for i, _ in ranked][:k]

    def shown(self, query: str, limit: int, keep: Iterable[str] = ()) -> Toolset:
        """At most ``limit`` tools for the prompt (plus those named in ``keep``, by name), in
        the toolset's own order, as a toolset of their own (same digest: not a new toolset)."""
        kept = {t.name for t in self.toolset.tools if t.name in set(keep)}
        chosen = set(kept)
        for tool in self.rank(query):
            if len(chosen) >= max(limit, len(kept)):
                break
            chosen.add(tool.name)
        return Toolset(
            tools=tuple(t for t in self.toolset.tools if t.name in chosen), digest=self.toolset.digest
        )
