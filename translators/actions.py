"""Code actions <-> tool calls.

``classify(source, toolset)`` parses a program with ``ast`` and returns either
``StaticCalls`` (only independent calls with literal arguments, possibly assigned
to names or printed: they can go out at once as parallel tool_calls, no kernel
needed) or ``KernelProgram`` (anything else). Every call to a tool is checked
against its schema either way: positional arguments are mapped to parameter
names, unknown or missing arguments and wrong types are ``CallError``s whose
messages are fit to send back to the model. A program that binds a tool's name
anywhere (``def``, assignment, import, loop target, parameter, ...) is an
``OutputError``: its calls would go to its own function instead of the tool; a
``def`` that only restates a tool's stub (no body of its own) is left out instead.

``render_call`` goes the other way (tool_calls in the history become code).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from translators.errors import CallError, OutputError
from translators.schema import check_value, coerce_value
from translators.stubs import render_value
from translators.tools import Tool, Toolset

__all__ = ["Call", "KernelProgram", "StaticCalls", "check_call", "classify", "parse_program", "render_call"]


@dataclass(frozen=True, slots=True)
class Call:
    name: str  # the tool's original name
    arguments: dict[str, Any]  # keyed by original parameter names

    @property
    def arguments_json(self) -> str:
        try:
            return orjson.dumps(self.arguments).decode()
        except TypeError:  # an int beyond 64 bits: the standard library writes it
            return json.dumps(self.arguments, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class StaticCalls:
    calls: tuple[Call, ...]
    source: str


@dataclass(frozen=True, slots=True)
class KernelProgram:
    source: str
    tools_called: tuple[str, ...] = field(default=())  # original names of the tools it mentions


class _NotLiteral(Exception):
    pass


def _literal(node: ast.expr) -> Any:
    """A JSON-able literal, or _NotLiteral. Tuples become lists."""
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, (str, bool, int, float)):
            if isinstance(node.value, float) and node.value != node.value:  # NaN
                raise _NotLiteral
            return node.value
        raise _NotLiteral
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _literal(node.operand)
        if isinstance(inner, bool) or not isinstance(inner, (int, float)):
            raise _NotLiteral
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:
                raise _NotLiteral
            k = _literal(key)
            if not isinstance(k, str):
                raise _NotLiteral
            out[k] = _literal(value)
        return out
    raise _NotLiteral


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _tool_of(node: ast.Call, toolset: Toolset) -> Tool | None:
    name = _dotted(node.func)
    if name is None:
        return None
    # the stub's identifier, or the original (dotted) name written out
    return toolset.by_py(name) or toolset.by_name(name)


def parse_program(source: str) -> ast.Module:
    try:
        return ast.parse(source, mode="exec")
    except SyntaxError as exc:
        where = f"line {exc.lineno}" + (f", column {exc.offset}" if exc.offset else "")
        text = (exc.text or "").rstrip("\n")
        shown = f"\n    {text}" if text else ""
        raise OutputError(f"The code has a syntax error at {where}: {exc.msg}{shown}") from exc


def check_call(tool: Tool, args: list[Any], kwargs: dict[str, Any], check: bool = True) -> Call:
    """Map and check one call's arguments; returns the call under original names.

    ``check=False`` maps names only: no schema checks, unknown keywords kept as written."""
    signature = ", ".join(p.py for p in tool.params) or "no arguments"
    if len(args) > len(tool.params):
        raise CallError(
            f"{tool.py}() takes {len(tool.params)} argument(s) ({signature}) but {len(args)} were given"
        )
    bound: dict[str, Any] = {}
    for positional, value in zip(tool.params, args, strict=False):
        bound[positional.name] = value
    for py, value in kwargs.items():
        # the stub's keyword, or the schema's own spelling
        param = tool.param_for_py(py) or next((p for p in tool.params if p.name == py), None)
        if param is None and not check:
            bound[py] = value  # unchecked: kept as written
            continue
        if param is None:
            raise CallError(
                f"{tool.py}() got an unexpected keyword argument {py!r}; its parameters are: {signature}"
            )
        if param.name in bound:
            raise CallError(f"{tool.py}() got multiple values for argument {param.py!r}")
        bound[param.name] = value
    missing = [p.py for p in tool.params if p.required and p.name not in bound]
    if missing and check:
        raise CallError(f"{tool.py}() is missing required argument(s): {', '.join(missing)}")
    errors: list[str] = []
    for param in tool.params if check else ():
        if param.name in bound:
            found = check_value(param.schema, bound[param.name], f"{tool.py}({param.py}=...)", tool.refs)
            if found:  # one unambiguous reading that fits is taken before a repair is asked for
                coerced = coerce_value(param.schema, bound[param.name], tool.refs)
                if not check_value(param.schema, coerced, "", tool.refs):
                    bound[param.name], found = coerced, []
            errors += found
    if errors:
        raise CallError("; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))
    return Call(tool.name, bound)


def _static_call(node: ast.expr, toolset: Toolset, check: bool = True) -> Call | None:
    """The call if ``node`` is a tool call with literal arguments only."""
    if not isinstance(node, ast.Call):
        return None
    tool = _tool_of(node, toolset)
    if tool is None:
        return None
    try:
        args = [_literal(a) for a in node.args if not isinstance(a, ast.Starred)]
        if len(args) != len(node.args) or any(k.arg is None for k in node.keywords):
            return None
        kwargs = {k.arg: _literal(k.value) for k in node.keywords if k.arg is not None}
    except _NotLiteral:
        return None
    return check_call(tool, args, kwargs, check)


def _statement_call(stmt: ast.stmt, toolset: Toolset, assigned: set[str], check: bool) -> Call | None:
    if isinstance(stmt, ast.Expr):
        value = stmt.value
        if (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id == "print"
            and len(value.args) == 1
            and not value.keywords
        ):
            value = value.args[0]
        return _static_call(value, toolset, check)
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        target = stmt.targets[0].id
        if target in assigned or toolset.by_py(target) is not None:
            return None  # rebinding a name (or a tool) is data flow: leave it to the kernel
        call = _static_call(stmt.value, toolset, check)
        if call is not None:
            assigned.add(target)
        return call
    return None


def _check_all_calls(module: ast.Module, toolset: Toolset, check: bool) -> tuple[str, ...]:
    """Check every tool call whose arguments are literals; list the tools mentioned."""
    mentioned: list[str] = []
    for node in ast.walk(module):
        if isinstance(node, ast.Call):
            tool = _tool_of(node, toolset)
            if tool is None:
                continue
            if tool.name not in mentioned:
                mentioned.append(tool.name)
            _static_call(node, toolset, check)  # raises CallError when literal arguments are wrong
    return tuple(mentioned)


def _bound_names(node: ast.AST) -> Iterator[str]:
    """The names ``node`` binds (or deletes) in the scope it runs in."""
    match node:
        case ast.Name(id=name, ctx=ast.Store() | ast.Del()):
            yield name
        case ast.FunctionDef(name=name) | ast.AsyncFunctionDef(name=name) | ast.ClassDef(name=name):
            yield name
        case ast.arg(arg=name):
            yield name
        case ast.Import(names=aliases) | ast.ImportFrom(names=aliases):
            for alias in aliases:
                yield alias.asname or alias.name.partition(".")[0]
        case ast.ExceptHandler(name=str() as name) | ast.MatchAs(name=str() as name):
            yield name
        case ast.MatchStar(name=str() as name) | ast.MatchMapping(rest=str() as name):
            yield name


def _restated_stub(stmt: ast.stmt, toolset: Toolset) -> bool:
    """A module-level ``def`` of a tool's name with no body of its own (a docstring, ``...``
    or ``pass``): the model wrote out the stub it was shown before calling it. Kept, it would
    turn the calls into calls of a function that does nothing."""
    if not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) or stmt.decorator_list:
        return False
    if toolset.by_py(stmt.name) is None:
        return False
    return all(
        isinstance(part, ast.Pass)
        or (
            isinstance(part, ast.Expr)
            and isinstance(part.value, ast.Constant)
            and (part.value.value is Ellipsis or isinstance(part.value.value, str))
        )
        for part in stmt.body
    )


def _without_restated_stubs(source: str, module: ast.Module, toolset: Toolset) -> tuple[str, ast.Module]:
    """The program with the tool stubs it restated (``_restated_stub``) left out."""
    restated = [stmt for stmt in module.body if _restated_stub(stmt, toolset)]
    if not restated:
        return source, module
    dropped = {n for stmt in restated for n in range(stmt.lineno - 1, stmt.end_lineno or stmt.lineno)}
    kept = "".join(line for i, line in enumerate(source.splitlines(keepends=True)) if i not in dropped)
    module.body = [stmt for stmt in module.body if stmt not in restated]
    return kept, module


def _check_no_tool_rebound(module: ast.Module, toolset: Toolset) -> None:
    """A tool's stub name must keep meaning the tool everywhere in the program."""
    rebound: dict[str, int] = {}
    for node in ast.walk(module):
        for name in _bound_names(node):
            if toolset.by_py(name) is not None:
                rebound.setdefault(name, getattr(node, "lineno", 0))
    if rebound:
        ordered = sorted(rebound.items(), key=lambda item: item[1])  # ast.walk goes breadth first
        where = ", ".join(f"{name} (line {line})" for name, line in ordered)
        one = len(rebound) == 1
        raise OutputError(
            f"This program redefines {where}: "
            f"{'that name is a function' if one else 'those names are functions'} you are given to call, "
            f"and must not be redefined. Call {'it as it is' if one else 'them as they are'}, "
            "and give your own functions and variables other names."
        )


def classify(source: str, toolset: Toolset, check: bool = True) -> StaticCalls | KernelProgram:
    """Parse and classify a program; ``check=False`` skips the schema checks of literal values
    (a program that rebinds a tool's name is refused either way)."""
    module = parse_program(source)
    if not module.body:
        raise OutputError(
            "The python block is empty; write the calls to make, or answer without a code block."
        )
    source, module = _without_restated_stubs(source, module, toolset)
    if not module.body:
        raise OutputError("The python block only restates the functions you are given; call them instead.")
    _check_no_tool_rebound(module, toolset)
    assigned: set[str] = set()
    calls: list[Call] = []
    for stmt in module.body:
        call = _statement_call(stmt, toolset, assigned, check)
        if call is None:
            return KernelProgram(source, _check_all_calls(module, toolset, check))
        calls.append(call)
    return StaticCalls(tuple(calls), source)


def render_call(tool: Tool, arguments: dict[str, Any]) -> str:
    """``name(kw=value, ...)`` for a call given under original parameter names."""
    parts = []
    extra: dict[str, Any] = {}
    by_name = {p.name: p for p in tool.params}
    for key, value in arguments.items():
        param = by_name.get(key)
        if param is not None:
            parts.append(f"{param.py}={render_value(value)}")
        elif key.isidentifier():
            parts.append(f"{key}={render_value(value)}")
        else:
            extra[key] = value  # not a parameter the schema knows: kept, as **{...}
    if extra:
        parts.append(f"**{render_value(extra)}")
    return f"{tool.py}({', '.join(parts)})"
