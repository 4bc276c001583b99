"""Config validation errors that name the line and the fix.

``describe(exc, text, source)`` turns a pydantic ``ValidationError`` over a YAML file
into lines like::

    config.yaml:6: model_list[0].max_step: Extra inputs are not permitted
      fix: did you mean 'max_steps'? remove or rename 'max_step' (this section does not take it)

Line numbers come from the YAML node tree (``yaml.compose``), following the error's
location as far as the file has it (a missing key points at its parent mapping).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["describe", "locate"]


def locate(text: str | None, loc: Sequence[str | int]) -> int | None:
    """The 1-based line of ``loc`` in the YAML ``text`` (or of its deepest existing parent)."""
    if not text:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    line = node.start_mark.line
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    child, line = value, key.start_mark.line
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line
        if child is None:
            break
        node = child
    return line + 1


def _path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields(models: Iterable[type[BaseModel]]) -> set[str]:
    """Every field name of the config models, and of the models inside them."""
    seen: set[type[BaseModel]] = set()
    names: set[str] = set()
    todo = list(models)
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            for arg in _types_in(info.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    todo.append(arg)
    return names


def _types_in(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from _types_in(arg)


def _fix(error: Any, known: set[str]) -> str:
    kind = error["type"]
    loc = error["loc"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), sorted(known), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{hint}remove or rename '{loc[-1]}' (this section does not take it)"
    if kind == "missing":
        return f"add '{loc[-1]}:' here"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"use one of {expected}"
    if kind in ("int_parsing", "int_type", "float_parsing", "float_type"):
        return "write a number (no quotes, no units)"
    if kind in ("bool_parsing", "bool_type"):
        return "write true or false"
    if kind in ("string_type",):
        return "write a string (quote it if YAML reads it as something else)"
    if kind in ("list_type",):
        return "write a list ('- item' lines, or [a, b])"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "write a mapping ('key: value' lines under it)"
    if kind.startswith(("greater_than", "less_than")) or kind in ("too_short", "too_long"):
        return "change the value: " + str(error["msg"]).replace("Input should", "it should", 1)
    return "see the message above"


def describe(
    exc: ValidationError,
    text: str | None,
    source: str,
    models: Iterable[type[BaseModel]],
    prefix: Sequence[str | int] = (),
) -> str:
    known = _fields(models)
    lines = [f"{source} is not a valid cablectl config:"]
    for error in exc.errors():
        loc = (*prefix, *error["loc"])
        line = locate(text, loc)
        where = f"{source}:{line}" if line else source
        lines.append(f"  {where}: {_path(loc) or '(top level)'}: {error['msg']}")
        lines.append(f"    fix: {_fix({**error, 'loc': loc}, known)}")
    return "\n".join(lines)
