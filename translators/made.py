"""Functions a model defines for itself: found in its programs, shown back to it as stubs.

A function a program defines at the top level, with a docstring and a public name, is a
tool the model made: later turns show its signature and docstring beside the client's
tools so the model calls it instead of writing it again. Pure: source in, stubs out.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["MadeFunction", "defined_functions", "made_functions", "render_made"]


@dataclass(frozen=True, slots=True)
class MadeFunction:
    name: str
    stub: str  # ``def name(...) -> ...:`` with its docstring and ``...`` as body
    source: str  # the whole definition, as the program wrote it
    doc: str


def _stub(node: ast.FunctionDef) -> str:
    bare = copy.copy(node)
    bare.decorator_list = []
    doc = ast.get_docstring(node, clean=False) or ""
    bare.body = [ast.Expr(ast.Constant(doc)), ast.Expr(ast.Constant(...))]
    return ast.unparse(ast.fix_missing_locations(bare))


def defined_functions(source: str) -> list[MadeFunction]:
    """The documented public top-level functions ``source`` defines (none if it does not parse)."""
    try:
        module = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out: list[MadeFunction] = []
    for node in module.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        text = ast.get_source_segment(source, node) or ast.unparse(node)
        if node.decorator_list:  # the decorators belong to the definition
            first = min(d.lineno for d in node.decorator_list)
            text = "\n".join(source.splitlines()[first - 1 : node.end_lineno])
        out.append(MadeFunction(node.name, _stub(node), text, doc))
    return out


def made_functions(programs: Iterable[str], reserved: Iterable[str] = ()) -> dict[str, MadeFunction]:
    """The functions a session's programs (oldest first) left behind: a later definition of a
    name replaces an earlier one. Names in ``reserved`` (the tools' own) are left out."""
    taken = set(reserved)
    out: dict[str, MadeFunction] = {}
    for source in programs:
        for function in defined_functions(source):
            if function.name not in taken:
                out.pop(function.name, None)
                out[function.name] = function
    return out


def render_made(functions: Iterable[MadeFunction]) -> str:
    """The stubs, one after another, as the prompt shows them."""
    return "\n\n".join(f.stub for f in functions)
