"""Lark grammar -> GBNF, the grammar format of llama.cpp.

Lark compiles a grammar to plain BNF (repetitions become left-recursive helper
rules); this module writes those rules as GBNF:

- rule names map to ``r-...`` and terminals to ``t-...`` (GBNF names allow only
  letters, digits and ``-``);
- immediate left recursion ``X -> X a | b``, which llama.cpp rejects, becomes
  ``X ::= (b) (a)*``;
- string terminals become GBNF literals, regex terminals are translated from
  Python's regex parse tree (literals, classes, ranges, ``\\d``/``\\s``/``\\w``,
  groups, alternation, ``*``/``+``/``?``/``{m,n}``); lookarounds, backreferences
  and flags are refused with a ``GrammarError``;
- only rules reachable from the start rule are written.

The output is also the EBNF xgrammar reads (vLLM's default structured-output backend, the
``ebnf`` grammar mode): its parser takes GBNF's names, literals, classes and repetitions.
Control characters are written ``\\uXXXX``, which both read the same way (xgrammar's ``\\x``
takes every hex digit that follows, llama.cpp's exactly two).
"""

from __future__ import annotations

import re._constants as sre_c  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]
from typing import Any

from lark import Lark
from lark.grammar import NonTerminal, Rule, Terminal

from translators.errors import TranslationError

__all__ = ["GrammarError", "lark_to_gbnf", "parser_for", "regex_to_gbnf"]


class GrammarError(TranslationError):
    pass


_CLASS_SPECIAL = set("]\\^-[")


def _char(c: str, in_class: bool) -> str:
    code = ord(c)
    if c == "\n":
        return "\\n"
    if c == "\t":
        return "\\t"
    if c == "\r":
        return "\\r"
    if c == "\\":
        return "\\\\"
    if (in_class and c in _CLASS_SPECIAL) or (not in_class and c == '"'):
        return "\\" + c
    if code < 0x20 or code == 0x7F:
        return f"\\u{code:04X}"  # exactly 4 digits: xgrammar reads \\x with as many as follow
    return c


def _literal(text: str) -> str:
    return '"' + "".join(_char(c, False) for c in text) + '"'


def _class_items(items: list[tuple[Any, Any]]) -> tuple[bool, str]:
    negate = False
    parts: list[str] = []
    for op, av in items:
        if op is sre_c.NEGATE:
            negate = True
        elif op is sre_c.LITERAL:
            parts.append(_char(chr(av), True))
        elif op is sre_c.RANGE:
            parts.append(f"{_char(chr(av[0]), True)}-{_char(chr(av[1]), True)}")
        elif op is sre_c.CATEGORY:
            if av is sre_c.CATEGORY_DIGIT:
                parts.append("0-9")
            elif av is sre_c.CATEGORY_SPACE:
                parts.append(" \\t\\n\\r\\u000B\\u000C")
            elif av is sre_c.CATEGORY_WORD:
                parts.append("a-zA-Z0-9_")
            else:
                raise GrammarError(f"regex class category {av} has no GBNF form")
        else:
            raise GrammarError(f"regex class item {op} has no GBNF form")
    return negate, "".join(parts)


def _quantifier(lo: int, hi: int) -> str:
    if hi is sre_c.MAXREPEAT or hi == sre_c.MAXREPEAT:
        return "*" if lo == 0 else "+" if lo == 1 else f"{{{lo},}}"
    if (lo, hi) == (0, 1):
        return "?"
    return f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}"


def _seq(pattern: Any) -> str:
    out: list[str] = []
    pending = ""
    for op, av in pattern:
        if op is sre_c.LITERAL:
            pending += chr(av)
            continue
        if pending:
            out.append(_literal(pending))
            pending = ""
        out.append(_item(op, av))
    if pending:
        out.append(_literal(pending))
    return " ".join(p for p in out if p) or '""'


def _item(op: Any, av: Any) -> str:
    if op is sre_c.NOT_LITERAL:
        return f"[^{_char(chr(av), True)}]"
    if op is sre_c.ANY:
        return "[^\\n]"
    if op is sre_c.IN:
        negate, body = _class_items(av)
        return f"[{'^' if negate else ''}{body}]"
    if op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", None)):
        lo, hi, sub = av
        return f"({_seq(sub)}){_quantifier(lo, hi)}"
    if op is sre_c.SUBPATTERN:
        _, add_flags, del_flags, sub = av
        if add_flags or del_flags:
            raise GrammarError("regex inline flags have no GBNF form")
        return f"({_seq(sub)})"
    if op is sre_c.BRANCH:
        _, alternatives = av
        return "(" + " | ".join(_seq(a) for a in alternatives) + ")"
    if op is sre_c.AT and av in (
        sre_c.AT_BEGINNING,
        sre_c.AT_END,
        sre_c.AT_BEGINNING_STRING,
        sre_c.AT_END_STRING,
    ):
        return ""
    raise GrammarError(f"regex construct {op} has no GBNF form")


def regex_to_gbnf(pattern: str) -> str:
    """A Python regex (the subset grammars use) as a GBNF expression."""
    try:
        parsed = sre_parse.parse(pattern)
    except re_error as exc:
        raise GrammarError(f"invalid regex {pattern!r}: {exc}") from exc
    return _seq(parsed)


re_error = sre_c.error


def _rule_name(name: str) -> str:
    return "r-" + name.replace("_", "-")


def _term_name(name: str) -> str:
    return "t-" + name.replace("_", "-")


def _symbol(sym: Any) -> str:
    if isinstance(sym, NonTerminal):
        return _rule_name(sym.name)
    if isinstance(sym, Terminal):
        return _term_name(sym.name)
    raise GrammarError(f"unexpected grammar symbol {sym!r}")


def parser_for(lark_text: str, start: str = "start") -> Lark:
    """A Lark parser for a generated grammar (Earley: regex terminals, any ambiguity)."""
    return Lark(lark_text, start=start, parser="earley", lexer="dynamic")


def lark_to_gbnf(grammar: str | Lark, start: str = "start") -> str:
    parser = grammar if isinstance(grammar, Lark) else parser_for(grammar, start)
    by_origin: dict[str, list[Rule]] = {}
    for rule in parser.rules:
        by_origin.setdefault(rule.origin.name, []).append(rule)
    terminals = {t.name: t for t in parser.terminals}
    if start not in by_origin:
        raise GrammarError(f"the grammar has no rule {start!r}")

    reachable_rules: list[str] = []
    reachable_terms: list[str] = []
    todo = [start]
    seen = {start}
    while todo:
        name = todo.pop()
        reachable_rules.append(name)
        for rule in by_origin.get(name, []):
            for sym in rule.expansion:
                if isinstance(sym, NonTerminal) and sym.name not in seen:
                    seen.add(sym.name)
                    todo.append(sym.name)
                elif isinstance(sym, Terminal) and sym.name not in reachable_terms:
                    reachable_terms.append(sym.name)

    lines = [f"root ::= {_rule_name(start)}"]
    for name in sorted(reachable_rules, key=lambda n: (n != start, n)):
        if name not in by_origin:
            raise GrammarError(f"rule {name!r} is used but never defined")
        recursive, base = [], []
        for rule in by_origin[name]:
            expansion = list(rule.expansion)
            if expansion and isinstance(expansion[0], NonTerminal) and expansion[0].name == name:
                recursive.append(expansion[1:])
            else:
                base.append(expansion)
        if not base:
            raise GrammarError(f"rule {name!r} only refers to itself")

        def alt(expansion: list[Any]) -> str:
            return " ".join(_symbol(s) for s in expansion) or '""'

        body = " | ".join(alt(e) for e in base)
        if recursive:
            tail = " | ".join(alt(e) for e in recursive)
            body = f"({body}) ({tail})*"
        lines.append(f"{_rule_name(name)} ::= {body}")
    for name in sorted(reachable_terms):
        terminal = terminals[name]
        pattern = terminal.pattern
        if pattern.flags:
            raise GrammarError(f"terminal {name} uses regex flags, which GBNF cannot express")
        body = _literal(pattern.value) if pattern.type == "str" else regex_to_gbnf(pattern.value)
        lines.append(f"{_term_name(name)} ::= {body}")
    return "\n".join(lines) + "\n"
