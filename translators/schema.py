"""JSON Schema, as tools use it, read three ways: Python annotations, value checks, defaults.

Covers string/integer/number/boolean/null, arrays (and tuples), objects with
properties (TypedDict), ``additionalProperties`` (``dict[str, T]``), enum and const
(``Literal``), anyOf/oneOf (unions), allOf (merged objects), type lists and
``nullable``, ``$ref`` into ``$defs``/``definitions`` (recursion included), and the
non-standard types seen in the wild: ``dict``, ``float``, ``tuple``, ``any``.
"""

from __future__ import annotations

import keyword
import math
from dataclasses import dataclass, field
from typing import Any

from translators.errors import ToolsetError
from translators.names import RESERVED

__all__ = [
    "KNOWN_TYPES",
    "Refs",
    "TypeRenderer",
    "TypedDictDecl",
    "check_value",
    "coerce_value",
    "docstring",
    "merge_all_of",
    "schema_types",
    "split_union",
    "unknown_types",
]

Schema = dict[str, Any]

_SCALARS = {
    "string": "str",
    "integer": "int",
    "number": "float",
    "float": "float",
    "boolean": "bool",
    "null": "None",
}
_ALIASES = {
    "dict": "object",
    "float": "number",
    "int": "integer",
    "str": "string",
    "bool": "boolean",
    "list": "array",
}
MAX_DEPTH = 64
# JSON Schema's types, the aliases above, and BFCL's "tuple" and "any"
KNOWN_TYPES = frozenset(
    {"string", "number", "integer", "boolean", "object", "array", "null", "tuple", "any", *_ALIASES}
)
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not")


def unknown_types(schema: Any) -> list[tuple[str, str]]:
    """(path, type) for every ``type`` in the schema's subschemas that no JSON Schema knows."""
    found: list[tuple[str, str]] = []
    todo: list[tuple[str, Any]] = [("", schema)]
    while todo:
        path, node = todo.pop()
        if not isinstance(node, dict):
            continue
        raw = node.get("type")
        for name in raw if isinstance(raw, list) else [raw] if raw is not None else []:
            if not isinstance(name, str) or name.lower() not in KNOWN_TYPES:  # BFCL writes "String"
                found.append((path or "(root)", str(name)))
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                todo += [(f"{path}.{key}.{k}".lstrip("."), v) for k, v in node[key].items()]
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                todo += [(f"{path}.{key}[{i}]".lstrip("."), v) for i, v in enumerate(node[key])]
        for key in _SCHEMA_ONE:
            todo.append((f"{path}.{key}".lstrip("."), node.get(key)))
    return sorted(found)


class Refs:
    """Resolves ``#/$defs/X`` and ``#/definitions/X`` (and any ``#/a/b`` path) against a root."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def resolve(self, ref: str) -> tuple[str, Schema]:
        if not ref.startswith("#/"):
            raise ToolsetError(f"$ref {ref!r} is not supported: only local references (#/...) are")
        node: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise ToolsetError(f"$ref {ref!r} points at nothing")
            node = node[part]
        if not isinstance(node, dict):
            raise ToolsetError(f"$ref {ref!r} does not point at a schema")
        return ref.rsplit("/", 1)[-1], node


def schema_types(schema: Schema) -> list[str]:
    """The normalized type names a schema allows ([] when it says nothing)."""
    raw = schema.get("type")
    types = raw if isinstance(raw, list) else [raw] if isinstance(raw, str) else []
    out = [_ALIASES.get(t, t) for t in types]
    if schema.get("nullable") is True and "null" not in out:
        out.append("null")
    return out


def merge_all_of(schema: Schema, refs: Refs) -> Schema:
    """allOf of object schemas as one object schema (properties and required united)."""
    merged: Schema = {k: v for k, v in schema.items() if k != "allOf"}
    props: dict[str, Any] = dict(merged.get("properties") or {})
    required: list[str] = list(merged.get("required") or [])
    for part in schema.get("allOf") or []:
        if not isinstance(part, dict):
            continue
        if "$ref" in part:
            _, part = refs.resolve(part["$ref"])
        if "allOf" in part:
            part = merge_all_of(part, refs)
        props.update(part.get("properties") or {})
        required += [r for r in part.get("required") or [] if r not in required]
        for key in ("type", "description", "additionalProperties"):
            if key in part and key not in merged:
                merged[key] = part[key]
    if props:
        merged["properties"] = props
        merged.setdefault("type", "object")
    if required:
        merged["required"] = required
    return merged


def split_union(ann: str) -> list[str]:
    """``A | list[B | C] | None`` -> ``["A", "list[B | C]", "None"]``: top-level members only."""
    parts, depth, start, quote = [], 0, 0, ""
    i = 0
    while i < len(ann):
        c = ann[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif depth == 0 and ann.startswith(" | ", i):
            parts.append(ann[start:i])
            start = i + 3
            i += 2
        i += 1
    parts.append(ann[start:])
    return parts


def _class_name(hint: str) -> str:
    parts = [p for p in "".join(c if c.isalnum() else " " for c in hint).split() if p]
    name = "".join(p[:1].upper() + p[1:] for p in parts) or "Object"
    name = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name)
    if name[0].isdigit():
        name = "_" + name
    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or name in RESERVED:
        name += "_"
    return name


def _literal(value: Any) -> str:
    return repr(value)


@dataclass
class TypedDictDecl:
    name: str
    fields: list[tuple[str, str, bool]]  # key, annotation, required
    description: str | None = None

    def render(self) -> str:
        identifiers = all(k.isidentifier() and not keyword.iskeyword(k) for k, _, _ in self.fields)
        if identifiers and self.fields and not any(required for _, _, required in self.fields):
            # every key optional: total=False says it once, not NotRequired[...] per key
            lines = [f"class {self.name}(TypedDict, total=False):"]
            if self.description:
                lines.append(f"    {docstring(self.description, 4)}")
            lines += [f"    {key}: {ann}" for key, ann, _ in self.fields]
            return "\n".join(lines)
        if identifiers:
            lines = [f"class {self.name}(TypedDict):"]
            if self.description:
                lines.append(f"    {docstring(self.description, 4)}")
            for key, ann, required in self.fields:
                lines.append(f"    {key}: {ann if required else f'NotRequired[{ann}]'}")
            if len(lines) == 1:
                lines.append("    pass")
            return "\n".join(lines)
        items = ", ".join(
            f"{key!r}: {ann if required else f'NotRequired[{ann}]'}" for key, ann, required in self.fields
        )
        return f"{self.name} = TypedDict({self.name!r}, {{{items}}})"


def docstring(text: str, indent: int, close_inline: bool = False) -> str:
    """A docstring literal for ``text``, continuation lines indented by ``indent``;
    ``close_inline`` puts the closing quotes on the last line."""
    body = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"').strip()
    pad = " " * indent
    lines = body.split("\n")
    if len(lines) == 1:
        return f'"""{body + " " if body.endswith(chr(34)) else body}"""'
    rest = [pad + line if line.strip() else "" for line in lines[1:]]
    if close_inline:
        last = rest[-1] + " " if rest[-1].endswith('"') else rest[-1]
        return '"""' + "\n".join([lines[0], *rest[:-1], last]) + '"""'
    return '"""' + "\n".join([lines[0], *rest]) + "\n" + pad + '"""'


@dataclass
class TypeRenderer:
    """Schema -> annotation text, collecting TypedDict declarations on the way."""

    refs: Refs
    taken: set[str] = field(default_factory=set)
    decls: list[TypedDictDecl] = field(default_factory=list)
    shapes: dict[tuple[str, str, Any], str] = field(default_factory=dict)  # shared across tools
    _by_ref: dict[str, str] = field(default_factory=dict)
    _building: set[str] = field(default_factory=set)

    def _new_class(self, hint: str) -> str:
        base = _class_name(hint)
        name, n = base, 2
        while name in self.taken:
            name, n = f"{base}{n}", n + 1
        self.taken.add(name)
        return name

    def annotation(self, schema: Any, hint: str, depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            raise ToolsetError(f"schema for {hint!r} nests deeper than {MAX_DEPTH} levels")
        if schema is True or not isinstance(schema, dict) or not schema:
            return "Any"
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref in self._by_ref:
                known = self._by_ref[ref]
                # a class still being declared (recursion) is named as a forward reference
                return f'"{known}"' if known in self._building else known
            name, target = self.refs.resolve(ref)
            if _is_object_with_props(target, self.refs):
                cls = self._new_class(name)
                self._by_ref[ref] = cls
                self._building.add(cls)
                final = self._typed_dict(target, cls, depth)
                self._building.discard(cls)
                self._by_ref[ref] = final
                return final
            self._by_ref[ref] = "Any"  # a recursive non-object reference degrades to Any
            ann = self.annotation(target, name, depth + 1)
            self._by_ref[ref] = ann
            return ann
        nullable = "null" in schema_types(schema)
        ann = self._core(schema, hint, depth)
        if nullable and ann != "Any" and "None" not in split_union(ann):
            ann = f"{ann} | None"
        return ann

    def _core(self, schema: Schema, hint: str, depth: int) -> str:
        if "const" in schema:
            return f"Literal[{_literal(schema['const'])}]"
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            values = [v for v in schema["enum"] if v is not None and not isinstance(v, (dict, list))]
            has_none = None in schema["enum"]
            if not values:
                return "None" if has_none else "Any"
            ann = f"Literal[{', '.join(_literal(v) for v in values)}]"
            return f"{ann} | None" if has_none else ann
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                parts: list[str] = []
                for i, sub in enumerate(schema[key]):
                    ann = self.annotation(sub, f"{hint}_{i}" if len(schema[key]) > 1 else hint, depth + 1)
                    for piece in split_union(ann):
                        if piece not in parts:
                            parts.append(piece)
                if "Any" in parts:
                    return "Any"
                return " | ".join(parts) if parts else "Any"
        if isinstance(schema.get("allOf"), list):
            return self.annotation(merge_all_of(schema, self.refs), hint, depth + 1)
        types = [t for t in schema_types(schema) if t != "null"] or _implied_types(schema)
        if not types:
            return "Any" if "null" not in schema_types(schema) else "None"
        rendered = [self._typed(t, schema, hint, depth) for t in types]
        return " | ".join(dict.fromkeys(rendered))

    def _typed(self, type_: str, schema: Schema, hint: str, depth: int) -> str:
        if type_ in _SCALARS:
            return _SCALARS[type_]
        if type_ == "any":
            return "Any"
        if type_ == "tuple" or (type_ == "array" and isinstance(schema.get("prefixItems"), list)):
            items = schema.get("prefixItems") or (
                schema.get("items") if isinstance(schema.get("items"), list) else None
            )
            if items:
                inner = ", ".join(self.annotation(s, f"{hint}_item", depth + 1) for s in items)
                return f"tuple[{inner}]"
            item = schema.get("items")
            return f"tuple[{self.annotation(item, f'{hint}_item', depth + 1) if item else 'Any'}, ...]"
        if type_ == "array":
            items = schema.get("items")
            if isinstance(items, list):
                inner = ", ".join(self.annotation(s, f"{hint}_item", depth + 1) for s in items)
                return f"tuple[{inner}]"
            return f"list[{self.annotation(items, _singular(hint), depth + 1)}]"
        if type_ == "object":
            if _has_props(schema):
                return self._typed_dict(schema, self._new_class(hint), depth)
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict) and extra:
                return f"dict[str, {self.annotation(extra, f'{hint}_value', depth + 1)}]"
            return "dict[str, Any]"
        return "Any"

    def _typed_dict(self, schema: Schema, cls: str, depth: int) -> str:
        """Declare ``cls`` (or reuse an identical declaration made earlier); returns the name."""
        schema = merge_all_of(schema, self.refs) if "allOf" in schema else schema
        required = set(schema.get("required") or [])
        fields = [
            (key, self.annotation(sub, key, depth + 1), key in required)
            for key, sub in (schema.get("properties") or {}).items()
        ]
        description = schema.get("description")
        key = (cls.rstrip("0123456789"), repr(fields), description)
        same = self.shapes.get(key)
        if same is not None and f'"{cls}"' not in repr(fields):
            self.taken.discard(cls)
            return same
        self.shapes[key] = cls
        self.decls.append(TypedDictDecl(cls, fields, description))
        return cls


def _singular(hint: str) -> str:
    return hint[:-1] if hint.endswith("s") and len(hint) > 3 else f"{hint}_item"


def _has_props(schema: Schema) -> bool:
    return isinstance(schema.get("properties"), dict) and bool(schema["properties"])


def _is_object_with_props(schema: Schema, refs: Refs) -> bool:
    if "allOf" in schema:
        schema = merge_all_of(schema, refs)
    return _has_props(schema) and not ({"anyOf", "oneOf", "enum", "const"} & set(schema))


def _implied_types(schema: Schema) -> list[str]:
    if _has_props(schema) or "additionalProperties" in schema:
        return ["object"]
    if "items" in schema or "prefixItems" in schema:
        return ["array"]
    return []


# --- value checks ------------------------------------------------------------------------


def _type_ok(type_: str, value: Any) -> bool:
    if type_ == "string":
        return isinstance(value, str)
    if type_ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if type_ == "boolean":
        return isinstance(value, bool)
    if type_ == "null":
        return value is None
    if type_ in ("array", "tuple"):
        return isinstance(value, (list, tuple))
    if type_ == "object":
        return isinstance(value, dict)
    return True  # "any" and unknown names


def _describe(value: Any) -> str:
    kinds = {bool: "a bool", int: "an int", float: "a float", str: "a string", list: "a list", dict: "a dict"}
    if value is None:
        return "None"
    return kinds.get(type(value), type(value).__name__)


def check_value(schema: Any, value: Any, path: str, refs: Refs, depth: int = 0) -> list[str]:
    """Every way ``value`` breaks ``schema``, as messages naming ``path``."""
    if depth > MAX_DEPTH or schema is True or not isinstance(schema, dict) or not schema:
        return []
    if "$ref" in schema:
        _, schema = refs.resolve(schema["$ref"])
    if "allOf" in schema:
        schema = merge_all_of(schema, refs)
    if value is None and "null" in schema_types(schema):
        return []
    if "const" in schema and value != schema["const"]:
        return [f"{path} must be {schema['const']!r}, got {value!r}"]
    if isinstance(schema.get("enum"), list) and schema["enum"] and value not in schema["enum"]:
        options = ", ".join(repr(v) for v in schema["enum"][:20])
        return [f"{path} must be one of {options}; got {value!r}"]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            if any(not check_value(s, value, path, refs, depth + 1) for s in schema[key]):
                return []
            return [f"{path} matches none of the allowed shapes; got {_describe(value)} {value!r}"]
    types = schema_types(schema) or _implied_types(schema)
    if types and not any(_type_ok(t, value) for t in types):
        wanted = " or ".join(types)
        return [f"{path} must be {wanted}, got {_describe(value)} {value!r}"]
    errors: list[str] = []
    if isinstance(value, (list, tuple)):
        items = schema.get("prefixItems") or schema.get("items")
        if isinstance(items, list):
            for i, (sub, item) in enumerate(zip(items, value, strict=False)):
                errors += check_value(sub, item, f"{path}[{i}]", refs, depth + 1)
        elif isinstance(items, dict):
            for i, item in enumerate(value):
                errors += check_value(items, item, f"{path}[{i}]", refs, depth + 1)
    elif isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or []:
            if key not in value:
                errors.append(f"{path} is missing the required key {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if not isinstance(key, str):
                errors.append(f"{path} has a key {key!r} that is not a string")
            elif key in props:
                errors += check_value(props[key], item, f"{path}[{key!r}]", refs, depth + 1)
            elif extra is False:
                errors.append(f"{path} has an unknown key {key!r}; allowed: {', '.join(props) or 'none'}")
            elif isinstance(extra, dict):
                errors += check_value(extra, item, f"{path}[{key!r}]", refs, depth + 1)
    return errors


def _matching_label(value: Any, options: list[Any]) -> list[Any]:
    """Options ``value`` names up to case (a bool as 'True'/'true', a string as a bool)."""
    if isinstance(value, bool):
        return [o for o in options if isinstance(o, str) and o.lower() == str(value).lower()]
    if isinstance(value, str):
        text = value.strip().lower()
        return [
            o
            for o in options
            if (isinstance(o, str) and o.lower() == text) or (isinstance(o, bool) and text == str(o).lower())
        ]
    return []


def coerce_value(schema: Any, value: Any, refs: Refs, depth: int = 0) -> Any:
    """``value`` made to fit ``schema`` where there is exactly one way to read it, else as it is.

    Enum and const values up to case (``'horror'`` -> ``'Horror'``), Python booleans for the
    strings ``'True'``/``'False'`` an enum holds (and such strings for booleans), ints where a
    number is wanted (and do not fit as they are) become floats, a lone value where an array is
    wanted becomes a one-item list; inside lists, objects and unions. A value that already
    fits is returned unchanged, and so is one that fits no better coerced."""
    if depth > MAX_DEPTH or not isinstance(schema, dict) or not schema:
        return value
    if "$ref" in schema:
        _, schema = refs.resolve(schema["$ref"])
    if "allOf" in schema:
        schema = merge_all_of(schema, refs)
    if not check_value(schema, value, "", refs, depth):
        return value
    options = schema["enum"] if isinstance(schema.get("enum"), list) else None
    if "const" in schema:
        options = [schema["const"]]
    if options:
        found = _matching_label(value, options)
        return found[0] if len(found) == 1 else value
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            fits = [
                c
                for s in schema[key]
                if not check_value(s, c := coerce_value(s, value, refs, depth + 1), "", refs)
            ]
            return fits[0] if len(fits) == 1 else value
    types = schema_types(schema) or _implied_types(schema)
    if types == ["boolean"] and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if (
        "number" in types
        and "integer" not in types
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        return float(value)
    if ("array" in types or "tuple" in types) and not isinstance(value, (list, tuple)) and value is not None:
        items = schema.get("items")
        one = [coerce_value(items, value, refs, depth + 1)] if isinstance(items, dict) else [value]
        return one if not check_value(schema, one, "", refs, depth) else value
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [coerce_value(schema["items"], item, refs, depth + 1) for item in value]
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        props = schema["properties"]
        return {k: coerce_value(props[k], v, refs, depth + 1) if k in props else v for k, v in value.items()}
    return value
