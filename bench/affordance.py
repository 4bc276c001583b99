"""Affordance on 300 tools: every function of BFCL ``multiple`` concatenated (first definition
of a name wins, 300 of them), each case's question ranked against all of them.

Prints, per number of stubs shown: how often the function the case's answer calls is among
them (recall), the stubs' tokens against all 300 stubs (cl100k through litellm's offline
counter), and the ranking's time per question (p50, index built once per toolset).

    .venv/bin/python bench/affordance.py

Needs ``bfcl-eval`` (see the README). Prints figures; asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stats import pct  # noqa: E402
from proxy.backends.base import import_litellm  # noqa: E402
from tests.test_affordance import many_tools  # noqa: E402
from translators import Toolset, render_stubs  # noqa: E402
from translators.affordance import ToolIndex  # noqa: E402


def main() -> None:
    tools, questions = many_tools()
    toolset = Toolset.from_openai(tools)
    counter = import_litellm().token_counter

    def tokens(ts: Toolset) -> int:
        return int(counter(model="gpt-4o", text=render_stubs(ts, header=False)))

    started = time.perf_counter()
    index = ToolIndex(toolset)
    built = (time.perf_counter() - started) * 1000
    full = tokens(toolset)
    print(
        f"{len(tools)} tools, {len(questions)} questions; all stubs: {full} tokens; index built in {built:.1f} ms"
    )
    print(f"{'shown':>6} {'recall':>8} {'tokens':>8} {'of all':>8} {'rank ms p50':>12}")
    for k in (5, 10, 23):
        hits, counts, times = 0, [], []
        for question, name in questions:
            t0 = time.perf_counter()
            shown = index.shown(question, k)
            times.append((time.perf_counter() - t0) * 1000)
            hits += name in {t.name for t in shown.tools}
            counts.append(tokens(shown))
        mean = sum(counts) / len(counts)
        print(
            f"{k + 1:>6} {hits / len(questions):>8.1%} {mean:>8.0f} {mean / full:>8.1%} {pct(times, 50):>12.2f}"
        )
    print("(shown counts search_tools too; its stub is not in the token figure)")


if __name__ == "__main__":
    main()
