"""A ``Toolset`` as a Python module of typed stubs: what the model is shown.

    from typing import Any, Literal, NotRequired, TypedDict

    class Location(TypedDict):
        city: str
        country: NotRequired[str]

    def get_weather(location: Location, unit: Literal['c', 'f'] = 'c') -> Any:
        \"\"\"Current weather.

        Args:
            location: Where.
            unit: Temperature unit.
        \"\"\"
        ...

TypedDicts are declared before the functions that use them. The module compiles.
"""

from __future__ import annotations

from typing import Any

from translators.schema import TypeRenderer, docstring, split_union
from translators.tools import Param, Tool, Toolset

__all__ = ["HEADER", "render_stubs", "render_tool", "render_value"]

HEADER = "from typing import Any, Literal, NotRequired, TypedDict"


def render_value(value: Any) -> str:
    """A JSON value as a Python literal (``true`` -> ``True``, ...)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{render_value(k)}: {render_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    return repr(value)


def _param(renderer: TypeRenderer, tool: Tool, param: Param) -> str:
    ann = renderer.annotation(param.schema, param.name)
    if param.required:
        return f"{param.py}: {ann}"
    if param.has_default and param.default is not None:
        return f"{param.py}: {ann} = {render_value(param.default)}"
    if ann != "Any" and "None" not in split_union(ann):
        ann = f"{ann} | None"
    return f"{param.py}: {ann} = None"


def _doc(tool: Tool) -> str:
    lines = [" ".join(tool.description.split())] if tool.description.strip() else []
    described = [(p.py, str(p.schema.get("description", "")).strip()) for p in tool.params]
    described = [(py, text) for py, text in described if text]
    if described:
        if lines:
            lines.append("")
        lines += [f"{py}: {' '.join(text.split())}" for py, text in described]
    return "\n".join(lines)


def render_tool(tool: Tool, renderer: TypeRenderer) -> str:
    """One ``def`` (its TypedDicts land in ``renderer.decls``): the signature, and a
    docstring holding the description and one ``name: text`` line per documented parameter.
    Compact on purpose: every token here is paid on every request."""
    params = ", ".join(_param(renderer, tool, p) for p in tool.params)
    doc = _doc(tool)
    if not doc:
        return f"def {tool.py}({params}): ..."
    # continuation lines unindented: inside a string indentation means nothing, and costs a token a line
    return f"def {tool.py}({params}):\n    {docstring(doc, 0, close_inline=True)}"


def render_stubs(toolset: Toolset, header: bool = True) -> str:
    """The whole stub module for a toolset. ``header=False`` leaves out the typing import
    (the prompt does: models know those names), the module still compiles with it."""
    taken = {t.py for t in toolset.tools}
    shapes: dict[tuple[str, str, Any], str] = {}
    functions = []
    decls_text = []
    for tool in toolset.tools:
        renderer = TypeRenderer(refs=tool.refs, taken=taken, shapes=shapes)
        functions.append(render_tool(tool, renderer))
        decls_text += [d.render() for d in renderer.decls]
    parts = [HEADER] if header else []
    parts += decls_text + functions
    return "\n\n".join(parts) + "\n"
