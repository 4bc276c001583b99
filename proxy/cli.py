"""``cablectl``: the command line.

cablectl serve [--config PATH] [--host H] [--port P]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.errors import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cablectl", description="OpenAI-compatible proxy that gives any model code actions."
    )
    parser.add_argument("--version", action="version", version=f"cablectl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument(
        "--config",
        help="config.yaml (litellm model_list shape); default: $CABLECTL_CONFIG, else the embedded model",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 4000)")
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def serve(config: str | None, host: str | None, port: int | None) -> int:
    import uvicorn

    from proxy.app import create_app
    from proxy.config import load_settings

    try:
        settings = load_settings(config, overrides={"host": host, "port": port})
    except ConfigError as exc:
        print(f"cablectl: {exc.message}", file=sys.stderr)
        return 2
    _configure_logging(settings.server.log_level)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"cablectl: {exc.message}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        access_log=False,
        log_level=settings.server.log_level,
        timeout_graceful_shutdown=10,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args.config, args.host, args.port)
    return 2  # pragma: no cover - argparse enforces the subcommand


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
