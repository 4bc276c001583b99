"""Pure translators between OpenAI tools/messages and Python code actions.

This package imports nothing from ``proxy``: it is synchronous, pure and usable
as a library on its own.

- ``Toolset.from_openai(tools)``: the request's tools, checked, with Python names;
- ``render_stubs``: the tools as typed Python stubs (what the model sees);
- ``toolset_from_openapi`` / ``build_request``: OpenAPI operations as tools, and their HTTP calls;
- ``build_prompt``: OpenAI messages in code form; ``parse_output``: Answer or Action;
- ``classify``: a program as ``StaticCalls`` (parallel tool_calls) or ``KernelProgram``;
- ``build_grammar`` / ``lark_to_gbnf``: per-request grammars for constrained generation;
- ``render_kernel_stubs``: the tools as functions that call back through a kernel's stdin;
- ``made_functions``: the documented functions a session's programs defined, as stubs.
"""

from translators.actions import Call, KernelProgram, StaticCalls, check_call, classify, render_call
from translators.errors import CallError, OutputError, ToolsetError, TranslationError
from translators.gbnf import GrammarError, lark_to_gbnf, parser_for
from translators.grammar import build_grammar, normalize_tool_choice
from translators.kernel_stubs import render_kernel_stubs
from translators.made import MadeFunction, defined_functions, made_functions
from translators.openapi import HttpRequest, HttpSpec, Operation, build_request, toolset_from_openapi
from translators.output import Action, Answer, closing_fence, parse_output, without_answer_mark
from translators.prompt import build_prompt
from translators.stubs import render_stubs
from translators.tools import Toolset, ToolsetCache

__all__ = [
    "Action",
    "Answer",
    "Call",
    "CallError",
    "GrammarError",
    "HttpRequest",
    "HttpSpec",
    "KernelProgram",
    "MadeFunction",
    "Operation",
    "OutputError",
    "StaticCalls",
    "Toolset",
    "ToolsetCache",
    "ToolsetError",
    "TranslationError",
    "build_grammar",
    "build_prompt",
    "build_request",
    "check_call",
    "classify",
    "closing_fence",
    "defined_functions",
    "lark_to_gbnf",
    "made_functions",
    "normalize_tool_choice",
    "parse_output",
    "parser_for",
    "render_call",
    "render_kernel_stubs",
    "render_stubs",
    "toolset_from_openapi",
    "without_answer_mark",
]
