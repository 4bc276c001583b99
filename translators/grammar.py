"""Per-request Lark grammars generated from the tools.

The fixed rules come from ``grammars/response.lark`` and ``grammars/values.lark``;
this module adds ``start`` (from ``tool_choice`` and ``parallel_tool_calls``),
``call`` (one alternative per tool, or only the named one) and, per tool, its
keyword arguments in stub order (required first, each optional one optional)
with a value rule per parameter type: strings, numbers, bools, lists, typed
dicts, enums and consts as literals, unions, ``$ref`` (recursion included).
A typed dict's keys come in schema order (required first); other keys may follow
unless ``additionalProperties`` is false, as JSON Schema has it and as the value
checks (``translators.schema.check_value``) accept them.

The result is one grammar text: parse model output with it (Lark), convert it
for llama.cpp (``translators.gbnf``), or hand it to servers that take Lark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import grammars
from translators.errors import ToolsetError
from translators.output import ANSWER_MARK
from translators.schema import MAX_DEPTH, Refs, merge_all_of, schema_types
from translators.tools import Tool, Toolset

__all__ = ["ToolChoice", "build_grammar", "lark_literal", "normalize_tool_choice"]

ToolChoice = str  # "none" | "auto" | "required" | "function:<name>"
MAX_ITEMS = 16  # items in one list or dict
MAX_LINES = 16  # statements in one action


def normalize_tool_choice(tool_choice: Any, toolset: Toolset) -> ToolChoice:
    """OpenAI's ``tool_choice`` as one string; an unknown function name is a ToolsetError."""
    if tool_choice is None:
        return "auto"
    if tool_choice in ("none", "auto", "required"):
        return str(tool_choice)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if isinstance(name, str) and toolset.by_name(name) is not None:
            return f"function:{name}"
        raise ToolsetError(
            f"tool_choice names function {name!r}, which is not among the request's tools",
            param="tool_choice",
        )
    raise ToolsetError("tool_choice must be 'none', 'auto', 'required' or a function", param="tool_choice")


def lark_literal(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _python_literal(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return "None"
    return repr(value)


def _key_literal(key: str) -> str:
    """A dict key and its colon, ``"name": ``, as a Lark literal."""
    return lark_literal(json.dumps(key, ensure_ascii=False) + ": ")


@dataclass
class _Builder:
    rules: list[str] = field(default_factory=lambda: ["_empty:"])
    _count: int = 0
    _json: dict[int, str] = field(default_factory=dict)
    _refs_done: dict[tuple[int, str], str] = field(default_factory=dict)

    def rule(self, prefix: str, body: str) -> str:
        name = f"{prefix}{self._count}"
        self._count += 1
        self.rules.append(f"{name}: {body}")
        return name

    def sequence(self, items: list[tuple[str, bool]], sep: str = ", ") -> str:
        """Items (text, required) in order: required ones always, optional ones each optional.

        Optional items are chained through rules of two alternatives each: inline
        ``(...)?`` groups would compile to 2^n expansions (and llama.cpp stacks)."""
        required = [text for text, req in items if req]
        optional = [text for text, req in items if not req]
        sep_lit = lark_literal(sep)
        chains: list[str | None] = [None] * (len(optional) + 1)  # chains[i]: optional items i.. each optional
        for i in range(len(optional) - 1, -1, -1):
            rest = f" {chains[i + 1]}" if chains[i + 1] else ""
            chains[i] = self.rule("opt", f"{sep_lit} {optional[i]}{rest} | {chains[i + 1] or '_empty'}")
        if required:
            return f" {sep_lit} ".join(required) + (f" {chains[0]}" if chains[0] else "")
        if not optional:
            return ""
        starts = [f"{text} {chains[i + 1]}" if chains[i + 1] else text for i, text in enumerate(optional)]
        return self.rule("first", " | ".join([*starts, "_empty"]))

    def bounded(self, item: str, sep: str, at_most: int, at_least: int = 0) -> str:
        """``item (sep item)*`` with at most ``at_most`` items (at least 0 or 1), as chained rules."""
        sep_lit = lark_literal(sep) if sep else ""
        tail: str | None = None
        for _ in range(at_most - 1):
            step = f"{sep_lit} {item}".strip() + (f" {tail}" if tail else "")
            tail = self.rule("more", f"{step} | _empty")
        core = f"{item} {tail}" if tail else item
        return core if at_least else self.rule("some", f"{core} | _empty")

    def json_value(self, depth: int = 2) -> str:
        """Any JSON-able value, nested at most ``depth`` containers deep."""
        if depth in self._json:
            return self._json[depth]
        if depth == 0:
            return "json_scalar"
        inner = self.json_value(depth - 1)
        items = self.bounded(inner, ", ", MAX_ITEMS)
        pairs = self.bounded(f'STRING ": " {inner}', ", ", MAX_ITEMS)
        name = self.rule("json", f'json_scalar | "[" {items} "]" | "{{" {pairs} "}}"')
        self._json[depth] = name
        return name

    def value(self, schema: Any, refs: Refs, depth: int = 0) -> str:
        """A grammar expression for values of ``schema``."""
        if depth > MAX_DEPTH:
            raise ToolsetError(f"a schema nests deeper than {MAX_DEPTH} levels")
        if schema is True or not isinstance(schema, dict) or not schema:
            return self.json_value()
        if "$ref" in schema:
            key = (id(refs.root), schema["$ref"])
            if key in self._refs_done:
                return self._refs_done[key]
            name = f"ref{self._count}"
            self._count += 1
            self._refs_done[key] = name
            _, target = refs.resolve(schema["$ref"])
            self.rules.append(f"{name}: {self.value(target, refs, depth + 1)}")
            return name
        nullable = "null" in schema_types(schema)
        expr = self._core(schema, refs, depth)
        return f"({expr} | NONE)" if nullable and expr != "NONE" and not expr.startswith("json") else expr

    def _core(self, schema: dict[str, Any], refs: Refs, depth: int) -> str:
        if "const" in schema:
            return lark_literal(_python_literal(schema["const"]))
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            literals = dict.fromkeys(
                lark_literal(_python_literal(v)) for v in schema["enum"] if not isinstance(v, (dict, list))
            )
            return f"({' | '.join(literals)})" if literals else self.json_value()
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                alts = dict.fromkeys(self.value(s, refs, depth + 1) for s in schema[key])
                return f"({' | '.join(alts)})"
        if isinstance(schema.get("allOf"), list):
            return self.value(merge_all_of(schema, refs), refs, depth + 1)
        types = [t for t in schema_types(schema) if t != "null"]
        if not types:
            if isinstance(schema.get("properties"), dict):
                types = ["object"]
            elif "items" in schema:
                types = ["array"]
            elif "null" in schema_types(schema):
                return "NONE"
            else:
                return self.json_value()
        alts = dict.fromkeys(self._typed(t, schema, refs, depth) for t in types)
        return next(iter(alts)) if len(alts) == 1 else f"({' | '.join(alts)})"

    def _typed(self, type_: str, schema: dict[str, Any], refs: Refs, depth: int) -> str:
        if type_ == "string":
            return "STRING"
        if type_ == "integer":
            return "INT"
        if type_ == "number":
            return "(FLOAT | INT)"
        if type_ == "boolean":
            return "BOOL"
        if type_ in ("array", "tuple"):
            items = schema.get("prefixItems") or schema.get("items")
            if isinstance(items, list) and items:
                inner = ' ", " '.join(self.value(s, refs, depth + 1) for s in items)
                return self.rule("tup", f'"[" {inner} "]"')
            item = self.value(items, refs, depth + 1) if isinstance(items, dict) else self.json_value()
            return self.rule("arr", f'"[" {self.bounded(item, ", ", MAX_ITEMS)} "]"')
        if type_ == "object":
            props = schema.get("properties")
            if isinstance(props, dict) and props:
                required = set(schema.get("required") or [])
                order = [k for k in props if k in required] + [k for k in props if k not in required]
                items = [
                    (
                        f"{_key_literal(k)} {self.value(props[k], refs, depth + 1)}",
                        k in required,
                    )
                    for k in order
                ]
                extra = schema.get("additionalProperties", True)
                if extra is not False:  # JSON Schema's objects are open unless they say otherwise
                    pair = f'STRING ": " {self.value(extra, refs, depth + 1)}'
                    items.append((self.bounded(pair, ", ", MAX_ITEMS, at_least=1), False))
                return self.rule("obj", f'"{{" {self.sequence(items)} "}}"')
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict) and extra:
                pairs = self.bounded(f'STRING ": " {self.value(extra, refs, depth + 1)}', ", ", MAX_ITEMS)
                return self.rule("map", f'"{{" {pairs} "}}"')
            pairs = self.bounded(f'STRING ": " {self.json_value()}', ", ", MAX_ITEMS)
            return self.rule("map", f'"{{" {pairs} "}}"')
        return self.json_value()

    def arguments(self, tool: Tool) -> str:
        items: list[tuple[str, bool]] = []
        for param in tool.params:
            items.append(
                (f"{lark_literal(param.py + '=')} {self.value(param.schema, tool.refs)}", param.required)
            )
        return self.sequence(items)


def build_grammar(toolset: Toolset, tool_choice: ToolChoice = "auto", parallel: bool = True) -> str:
    """The Lark grammar for one request. ``tool_choice`` as from ``normalize_tool_choice``."""
    builder = _Builder()
    if tool_choice.startswith("function:"):
        wanted = toolset.by_name(tool_choice.split(":", 1)[1])
        tools = [wanted] if wanted is not None else []
    else:
        tools = list(toolset.tools)
    calls = []
    for tool in tools:
        args = builder.arguments(tool)
        body = " ".join(part for part in (lark_literal(tool.py + "("), args, '")"') if part)
        calls.append(builder.rule("tool", body))
    action = "action" if parallel else "single_action"
    program = builder.bounded('line "\\n"', "", MAX_LINES, at_least=1)
    if tool_choice == "none" or not calls:
        start = "start: text"
    elif tool_choice == "auto":
        # the first thing written is the choice, to act or to answer: a small model that
        # could start with any text talks (and works things out itself) instead of acting
        start = f"start: {action} | {lark_literal(ANSWER_MARK + ' ')} text"
    else:
        # forced: the code block comes first, so a small model cannot talk its way
        # past the token limit before it acts
        start = f"start: {action}"
    parts = [start, f"program: {program}"]
    if calls:
        parts.append(f"call: {' | '.join(calls)}")
    else:
        parts.append('call: "_no_tool_()"')
    parts += builder.rules
    return "\n".join([*parts, "", grammars.load("response"), grammars.load("values")])
