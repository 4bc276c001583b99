"""What Langfuse tracing costs the proxy, side by side in one run: the same action-loop steps
through a proxy with tracing off and one exporting to a local OTLP receiver (Langfuse's SDK,
batched in its own thread). Proxy time = total minus upstream time (x-cablectl-overhead-ms).

    .venv/bin/python bench/tracing.py [--sessions 200]

Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loop import KERNEL, STATIC, Responder, run_sessions, warm  # noqa: E402
from bench.stats import pct  # noqa: E402
from proxy.app import create_app  # noqa: E402
from proxy.config import load_settings  # noqa: E402
from tests.otlp import OTLPReceiver  # noqa: E402
from tests.servers import UvicornThread  # noqa: E402


def proxy_config(upstream: str, receiver: str | None) -> Path:
    config: dict[str, Any] = {
        "model_list": [
            {"model_name": "gpt", "litellm_params": {"model": "openai/gpt", "api_base": upstream + "/v1"}}
        ],
        "kernels": {"min_idle": 4, "max_total": 12, "acquire_timeout": 120},
        "server": {"log_level": "warning"},
    }
    if receiver:
        config["tracing"] = {
            "langfuse": {"public_key": f"pk-{uuid.uuid4().hex}", "secret_key": "sk", "host": receiver}
        }
    path = Path(tempfile.mkdtemp()) / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def main(sessions: int) -> None:
    upstream = Responder()
    results: dict[str, dict[str, list[float]]] = {}
    with UvicornThread(upstream, lifespan="off") as up, OTLPReceiver() as receiver:
        for name, host in (("off", None), ("langfuse", receiver.url), ("off again", None)):
            app = create_app(load_settings(proxy_config(up.url, host), env={}))
            with UvicornThread(app) as proxy:
                await warm(app, 4)
                _, fast = await run_sessions(proxy.url, upstream, STATIC, sessions, 1)
                _, kernel = await run_sessions(proxy.url, upstream, KERNEL, 12, 1)
            results[name] = {"fast": fast["first"], "kernel": kernel["resume"]}
        spans = len(receiver.spans)
    print("proxy time per action-loop step at c=1, tracing off vs on (Langfuse SDK -> local OTLP receiver)")
    for step, label in (
        ("fast", "fast path step (static program -> tool_calls)"),
        ("kernel", "kernel path step (resume)"),
    ):
        off = results["off"][step] + results["off again"][step]
        on = results["langfuse"][step]
        print(
            f"  {label:<48} off p50 {pct(off, 0.5):6.2f} ms p99 {pct(off, 0.99):6.2f}  "
            f"on p50 {pct(on, 0.5):6.2f} ms p99 {pct(on, 0.99):6.2f}  (+{pct(on, 0.5) - pct(off, 0.5):.2f} ms p50)"
        )
    print(f"  spans received by the OTLP receiver: {spans}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=200)
    asyncio.run(main(parser.parse_args().sessions))
