"""The code that makes a toolset callable inside a kernel.

Each tool becomes a real function with the stub's signature. Calling it asks the
proxy through the kernel's stdin channel: ``input()`` sends an ``input_request``
whose prompt is ``PROMPT_PREFIX`` + JSON ``{id, tool, arguments}``; the proxy answers
with an ``input_reply`` holding JSON ``{"result": ...}`` or ``{"error": "..."}``.
A stub never touches the network or a secret; arguments go out under the tool's
original parameter names.
"""

from __future__ import annotations

from translators.stubs import render_value
from translators.tools import Tool, Toolset

__all__ = ["PRELUDE", "PROMPT_PREFIX", "render_kernel_stubs"]

PROMPT_PREFIX = "\x1bcablectl-call:"

PRELUDE = f'''
import json as _cablectl_json


class ToolError(Exception):
    """A tool call failed; the message says why."""


_CABLECTL_UNSET = object()
_cablectl_calls = 0


def _cablectl_call(_tool, _arguments):
    global _cablectl_calls
    _cablectl_calls += 1
    _request = {{"id": _cablectl_calls, "tool": _tool, "arguments": _arguments}}
    _reply = _cablectl_json.loads(input({PROMPT_PREFIX!r} + _cablectl_json.dumps(_request)))
    if "error" in _reply:
        raise ToolError(_reply["error"])
    return _reply.get("result")
'''


def _kernel_function(tool: Tool) -> str:
    params = []
    for param in tool.params:
        params.append(param.py if param.required else f"{param.py}=_CABLECTL_UNSET")
    collected = ", ".join(f"({param.name!r}, {param.py})" for param in tool.params)
    doc = tool.description.strip().replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    lines = [f"def {tool.py}({', '.join(params)}):"]
    if doc:
        lines.append(f'    """{doc}"""')
    lines.append(
        f"    _arguments = {{_k: _v for _k, _v in [{collected}] if _v is not _CABLECTL_UNSET}}"
        if tool.params
        else "    _arguments = {}"
    )
    lines.append(f"    return _cablectl_call({render_value(tool.name)}, _arguments)")
    return "\n".join(lines)


def render_kernel_stubs(toolset: Toolset) -> str:
    """Source to run once in a session's kernel: the prelude, then one function per tool."""
    return PRELUDE + "\n\n" + "\n\n\n".join(_kernel_function(tool) for tool in toolset.tools) + "\n"
