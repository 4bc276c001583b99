"""The request's ``tools`` as a checked, immutable ``Toolset``.

``Toolset.from_openai(tools)`` validates the OpenAI ``tools`` array (errors name the
offending ``param``), maps tool and parameter names to Python identifiers, and
orders parameters the way the stubs show them: required first, then optional.
``ToolsetCache`` keeps built toolsets by the digest of their JSON.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from translators.errors import ToolsetError
from translators.names import NameMap
from translators.schema import MAX_DEPTH, Refs, check_value, merge_all_of, schema_types, unknown_types

__all__ = ["MAX_TOOLS", "Param", "Tool", "Toolset", "ToolsetCache", "tools_digest"]

MAX_TOOLS = 512
MAX_NAME = 128
MAX_JSON_DEPTH = 2 * MAX_DEPTH + 8  # schema levels alternate with "properties"/"items" keys
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Param:
    name: str  # as the schema spells it; tool_calls use this
    py: str  # the Python keyword
    schema: dict[str, Any]
    required: bool
    default: Any = _MISSING

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    py: str
    description: str
    params: tuple[Param, ...]
    parameters: dict[str, Any]
    refs: Refs

    def param_for_py(self, py: str) -> Param | None:
        for param in self.params:
            if param.py == py:
                return param
        return None


def _depth(node: Any, limit: int) -> int:
    """Nesting depth of a JSON tree, counting no further than ``limit + 1``."""
    deepest = 0
    stack = [(node, 1)]
    while stack:
        item, level = stack.pop()
        if level > deepest:
            deepest = level
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            stack += [(v, level + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, level + 1) for v in item]
    return deepest


def tools_digest(tools: Any) -> str:
    if _depth(tools, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ToolsetError(f"'tools' nests deeper than {MAX_JSON_DEPTH} levels", param="tools")
    return hashlib.sha256(orjson.dumps(tools, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _json_default(schema: dict[str, Any], refs: Refs) -> Any:
    """The schema's default if it fits the schema (after the obvious coercions), else none."""
    if "default" not in schema:
        return _MISSING
    value = schema["default"]
    try:
        orjson.dumps(value)
    except TypeError:
        return _MISSING
    if value is None or not check_value(schema, value, "default", refs):
        return value
    if isinstance(value, str):  # seen in the wild: "false" for a boolean, "5" for an integer
        lowered = value.strip().lower()
        candidates: list[Any] = [lowered == "true"] if lowered in ("true", "false") else []
        for convert in (int, float):
            with contextlib.suppress(ValueError):
                candidates.append(convert(value))
        for candidate in candidates:
            if not check_value(schema, candidate, "default", refs):
                return candidate
    return _MISSING


def _params(fn: str, parameters: dict[str, Any], where: str, refs: Refs) -> tuple[Param, ...]:
    bad = unknown_types(parameters)
    if bad:
        at, name = bad[0]
        raise ToolsetError(
            f"{fn}: {at} has type {name!r}, which JSON Schema does not have; use one of "
            "string, number, integer, boolean, object, array, null",
            param=f"{where}.parameters",
        )
    if "allOf" in parameters:
        parameters = merge_all_of(parameters, refs)
    types = schema_types(parameters)
    if types and not set(types) <= {"object", "null"}:
        raise ToolsetError(
            f"{fn}: 'parameters' must be an object schema, not {'/'.join(types)}", param=f"{where}.parameters"
        )
    props = parameters.get("properties", {})
    if not isinstance(props, dict):
        raise ToolsetError(f"{fn}: 'properties' must be an object", param=f"{where}.parameters.properties")
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ToolsetError(f"{fn}: 'required' must be a list of names", param=f"{where}.parameters.required")
    unknown = [r for r in required if r not in props]
    if unknown:
        raise ToolsetError(
            f"{fn}: 'required' names {', '.join(map(repr, unknown))}, which 'properties' does not define",
            param=f"{where}.parameters.required",
        )
    for key, sub in props.items():
        if not isinstance(sub, (dict, bool)):
            raise ToolsetError(
                f"{fn}: the schema of parameter {key!r} must be an object",
                param=f"{where}.parameters.properties.{key}",
            )
    names = NameMap(props.keys())
    ordered = [k for k in props if k in required] + [k for k in props if k not in required]
    return tuple(
        Param(
            name=key,
            py=names.py(key),
            schema=props[key] if isinstance(props[key], dict) else {},
            required=key in required,
            default=_MISSING
            if key in required
            else _json_default(props[key] if isinstance(props[key], dict) else {}, refs),
        )
        for key in ordered
    )


@dataclass(frozen=True, slots=True)
class Toolset:
    tools: tuple[Tool, ...]
    digest: str

    @classmethod
    def from_openai(cls, tools: Any) -> Toolset:
        if not isinstance(tools, list):
            raise ToolsetError("'tools' must be a list", param="tools")
        if len(tools) > MAX_TOOLS:
            raise ToolsetError(
                f"at most {MAX_TOOLS} tools can be sent at once; got {len(tools)}", param="tools"
            )
        digest = tools_digest(tools)
        seen: dict[str, int] = {}
        specs: list[tuple[str, str, dict[str, Any], str]] = []
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            if (
                not isinstance(tool, dict)
                or tool.get("type") != "function"
                or not isinstance(tool.get("function"), dict)
            ):
                raise ToolsetError(
                    f"{where} must be {{'type': 'function', 'function': {{...}}}}", param=where
                )
            fn = tool["function"]
            name = fn.get("name")
            if (
                not isinstance(name, str)
                or not name.strip()
                or len(name) > MAX_NAME
                or any(c.isspace() for c in name)
            ):
                raise ToolsetError(
                    f"{where}.function.name must be a non-empty name of at most {MAX_NAME} characters, "
                    "no spaces",
                    param=f"{where}.function.name",
                )
            if name in seen:
                raise ToolsetError(
                    f"tool name {name!r} appears twice (tools[{seen[name]}] and {where}); "
                    "names must be unique",
                    param=f"{where}.function.name",
                )
            seen[name] = i
            parameters = fn.get("parameters") or {"type": "object", "properties": {}}
            if not isinstance(parameters, dict):
                raise ToolsetError(
                    f"{name}: 'parameters' must be an object", param=f"{where}.function.parameters"
                )
            description = fn.get("description") or ""
            if not isinstance(description, str):
                raise ToolsetError(
                    f"{name}: 'description' must be a string", param=f"{where}.function.description"
                )
            specs.append((name, description, parameters, f"{where}.function"))
        names = NameMap([s[0] for s in specs])
        built = []
        for name, description, parameters, where in specs:
            refs = Refs(parameters)
            built.append(
                Tool(
                    name=name,
                    py=names.py(name),
                    description=description,
                    params=_params(name, parameters, where, refs),
                    parameters=parameters,
                    refs=refs,
                )
            )
        return cls(tools=tuple(built), digest=digest)

    def by_py(self, py: str) -> Tool | None:
        for tool in self.tools:
            if tool.py == py:
                return tool
        return None

    def by_name(self, name: str) -> Tool | None:
        for tool in self.tools:
            if tool.name == name:
                return tool
        return None

    @property
    def signatures(self) -> dict[str, tuple[Param, ...]]:
        """Each tool's parameters by its Python name."""
        return {tool.py: tool.params for tool in self.tools}


class ToolsetCache:
    """Built toolsets (and what callers derive from them) by digest; least recently used go first."""

    def __init__(self, maxsize: int = 256) -> None:
        self._maxsize = maxsize
        self._items: collections.OrderedDict[str, Toolset] = collections.OrderedDict()

    def get(self, tools: Any) -> Toolset:
        digest = tools_digest(tools)
        hit = self._items.get(digest)
        if hit is not None:
            self._items.move_to_end(digest)
            return hit
        toolset = Toolset.from_openai(tools)
        self._items[digest] = toolset
        if len(self._items) > self._maxsize:
            self._items.popitem(last=False)
        return toolset
