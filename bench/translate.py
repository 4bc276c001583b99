"""Translation speed: stubs + grammar for a 20-tool request, and parsing a typical action.

Reports p50/p99 over repeated runs for: building the toolset, stubs and Lark grammar
text from scratch; the same through the digest cache (what the proxy pays per
request); compiling the grammar for Lark and converting it to GBNF (once per
toolset, cached); and classifying a typical model action. Asserts nothing.

    .venv/bin/python bench/translate.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.bfcl import cases, expected_calls, tools_of  # noqa: E402
from translators.actions import classify, render_call  # noqa: E402
from translators.gbnf import lark_to_gbnf, parser_for  # noqa: E402
from translators.grammar import build_grammar  # noqa: E402
from translators.output import Action, parse_output  # noqa: E402
from translators.stubs import render_stubs  # noqa: E402
from translators.tools import Toolset, ToolsetCache  # noqa: E402


def twenty_tools() -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    seen: set[str] = set()
    for entry, _ in cases("multiple"):
        for tool in tools_of(entry):
            if tool["function"]["name"] not in seen:
                seen.add(tool["function"]["name"])
                tools.append(tool)
            if len(tools) == 20:
                return tools
    return tools


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.99 * len(samples)))]


def main() -> int:
    tools = twenty_tools()
    cache = ToolsetCache()
    rendered: dict[str, tuple[str, str]] = {}

    def cold() -> None:
        toolset = Toolset.from_openai(tools)
        render_stubs(toolset)
        build_grammar(toolset, "auto")

    def cached() -> None:
        toolset = cache.get(tools)  # digest of the tools JSON, then a dict hit
        if toolset.digest not in rendered:
            rendered[toolset.digest] = (render_stubs(toolset), build_grammar(toolset, "auto"))

    toolset = Toolset.from_openai(tools)
    grammar = build_grammar(toolset, "auto")
    entry, answer = cases("multiple")[0]
    name, arguments = expected_calls(entry, answer)[0]
    tool = toolset.by_name(name)
    assert tool is not None
    action = f"I will look that up.\n```python\nresult = {render_call(tool, arguments)}\nprint(result)\n```"

    def parse_action() -> None:
        out = parse_output(action)
        assert isinstance(out, Action)
        classify(out.source, toolset)  # with the schema checks, as the proxy runs it

    rows = [
        ("stubs + grammar, 20 tools, cold", timed(cold, 200)),
        ("stubs + grammar, 20 tools, cached by digest", timed(cached, 2000)),
        ("Lark parser + GBNF, once per toolset", timed(lambda: lark_to_gbnf(parser_for(grammar)), 20)),
        ("parse + classify a typical action", timed(parse_action, 5000)),
    ]
    print(f"{len(tools)} tools; milliseconds (target: p50 < 1 ms for cached stubs+grammar and for parsing)")
    for label, (p50, p99) in rows:
        print(f"  {label:<46} p50 {p50:8.3f}   p99 {p99:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
