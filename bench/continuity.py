"""What a kernel that keeps its state is worth: a 5-turn conversation (one named session, each
user turn a program that builds on what earlier ones left in the kernel, then an answer),
continued in its live kernel against continued after the kernel was lost before every turn
(SIGKILL: the next program first replays the session's earlier programs onto a fresh kernel).

Per user turn, the proxy's own time (``x-cablectl-overhead-ms``: total minus the time waiting
on the scripted upstream), p50 over the conversations, live and replayed side by side, and
the ratio. Real uvicorn and real (sandboxed) kernels; conversations alternate between modes.

    .venv/bin/python bench/continuity.py [--conversations 12]

Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stats import pct  # noqa: E402
from proxy.actions.loop import SessionKey  # noqa: E402
from proxy.app import create_app  # noqa: E402
from proxy.config import load_settings  # noqa: E402
from tests.servers import UvicornThread  # noqa: E402
from tests.upstream import Reply, ScriptedUpstream, canned_completion  # noqa: E402

TURNS = 5
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def turn_program(k: int) -> str:
    """Turn k's program: new data, a helper, and everything earlier turns left behind."""
    if k == 1:
        body = "data = {i: [j * j for j in range(2000)] for i in range(20)}\nprint(len(data))"
    else:
        body = (
            f"def step{k}(xs):\n    '''Turn {k}'s reduction.'''\n    return sum(xs) % {997 + k}\n"
            f"data[{k}] = [step{k}(v) for v in data.values()]\n"
            + ("" if k == 2 else f"print(step{k - 1}(data[{k}]))\n")
            + f"print(len(data[{k}]))"
        )
    return f"```python\n{body}\n```"


def pid_dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def conversation(
    client: httpx.Client, upstream: ScriptedUpstream, runtime: Any, name: str, lose: bool
) -> list[float]:
    """One conversation; the proxy time of each user turn."""
    headers = {"x-cablectl-session": name}
    sid = SessionKey("anonymous", name).session_id
    messages: list[Any] = []
    out = []
    for k in range(1, TURNS + 1):
        if lose and sid in runtime.live:
            pid = runtime.live[sid].kernel.connection.pid()
            if pid:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while not pid_dead(pid) and time.monotonic() < deadline:
                    time.sleep(0.01)
        messages.append({"role": "user", "content": f"Turn {k}."})
        upstream.plan(
            Reply(json=canned_completion("s", turn_program(k))),
            Reply(json=canned_completion("s", f"Done {k}.")),
        )
        response = client.post(
            "/v1/chat/completions",
            json={"model": "gpt", "messages": messages, "tools": TOOLS},
            headers=headers,
        )
        response.raise_for_status()
        last = upstream.received[-1].body.decode()
        if "Error" in last and "NameError" in last:
            raise RuntimeError(f"turn {k} lost its state: {last[-300:]}")
        out.append(float(response.headers["x-cablectl-overhead-ms"]))
        messages.append({"role": "assistant", "content": f"Done {k}."})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=12, help="per mode")
    args = parser.parse_args()

    upstream = ScriptedUpstream()
    with UvicornThread(upstream) as up, tempfile.TemporaryDirectory() as tmp:
        config = {
            "model_list": [
                {"model_name": "gpt", "litellm_params": {"model": "openai/gpt", "api_base": up.url}}
            ],
            "kernels": {"min_idle": 4, "max_total": 16},
        }
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        app = create_app(load_settings(path, env={}))
        with UvicornThread(app) as proxy, httpx.Client(base_url=proxy.url, timeout=300) as client:
            runtime = app.state.loop.runtime
            figures: dict[str, list[list[float]]] = {"live": [], "replayed": []}
            conversation(client, upstream, runtime, "warm-up", lose=False)
            for i in range(args.conversations):
                for mode in ("live", "replayed"):
                    # finished conversations keep their kernels until the pool evicts them (idle)
                    figures[mode].append(
                        conversation(client, upstream, runtime, f"{mode}-{i}", mode == "replayed")
                    )

    print(f"{args.conversations} conversations of {TURNS} user turns per mode; proxy ms per turn (p50)")
    print(f"{'turn':>6} {'live':>10} {'replayed':>10} {'ratio':>8}  (replay runs the earlier programs again)")
    for k in range(TURNS):
        live = pct([c[k] for c in figures["live"]], 50)
        replayed = pct([c[k] for c in figures["replayed"]], 50)
        print(f"{k + 1:>6} {live:>10.2f} {replayed:>10.2f} {replayed / live:>8.2f}")
    total_live = pct([sum(c) for c in figures["live"]], 50)
    total_replayed = pct([sum(c) for c in figures["replayed"]], 50)
    print(f"{'all':>6} {total_live:>10.2f} {total_replayed:>10.2f} {total_replayed / total_live:>8.2f}")


if __name__ == "__main__":
    main()
