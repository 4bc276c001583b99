"""The scripted upstream as its own process, for benchmarks: `python bench/upstream_server.py PORT`."""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.upstream import ScriptedUpstream


def main() -> None:
    port = int(sys.argv[1])
    uvicorn.run(
        ScriptedUpstream(), host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
    )


if __name__ == "__main__":
    main()
