"""BFCL cases (the ``bfcl-eval`` wheel's data, Apache-2.0) for translator tests."""

from __future__ import annotations

import importlib.resources
import json
from typing import Any

__all__ = ["CATEGORIES", "cases", "chosen_value", "expected_calls", "tools_of"]

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple")


def _data(name: str) -> list[dict[str, Any]]:
    root = importlib.resources.files("bfcl_eval") / "data"
    return [
        json.loads(line) for line in (root / name).read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def cases(category: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(question entry, ground-truth entry) pairs of one category."""
    questions = {q["id"]: q for q in _data(f"BFCL_v4_{category}.json")}
    answers = _data(f"possible_answer/BFCL_v4_{category}.json")
    return [(questions[a["id"]], a) for a in answers]


def tools_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": f} for f in entry["function"]]


def chosen_value(options: list[Any], required: bool) -> Any:
    """One acceptable value: the first real one ("" means 'may be omitted')."""
    real = [o for o in options if o != ""]
    if not real:
        return None
    return _unwrap(real[0])


def _unwrap(value: Any) -> Any:
    # nested dicts in BFCL answers hold option lists too
    if isinstance(value, dict):
        return {k: _unwrap(v[0]) if isinstance(v, list) and v else _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def expected_calls(entry: dict[str, Any], answer: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    required = {f["name"]: set((f.get("parameters") or {}).get("required") or []) for f in entry["function"]}
    calls = []
    for call in answer["ground_truth"]:
        ((name, args),) = call.items()
        chosen = {}
        for key, options in args.items():
            needed = key in required.get(name, set())
            if not needed and "" in options[:1]:
                continue  # the first acceptable answer omits it
            value = chosen_value(options, needed)
            if value is not None or needed:
                chosen[key] = value
        calls.append((name, chosen))
    return calls
