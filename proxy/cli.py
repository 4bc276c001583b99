"""``cablectl``: the command line.

    cablectl serve [--config PATH] [--host H] [--port P]
    cablectl sessions ls [--json]                 sessions in the store, newest activity first
    cablectl sessions show ID                     a session's log as a tree
    cablectl sessions export --jsonl [ID ...]     one JSON line per model turn (fine-tuning data)
    cablectl tools ls [ID] [--json]               functions models defined in their sessions
    cablectl tools show ID NAME                   one such function's source, to review it
    cablectl tools promote ID NAME --toolset T    keep it in stored toolset T, for other sessions
    cablectl kernels ls [--json]                  every replica's kernels
    cablectl config check PATH                    validate a config, print the resolved routes

The ``sessions``, ``tools`` and ``kernels`` commands read the session store named by the config
(``sessions.redis_url``) or by ``--redis-url``; in-process sessions live inside one
proxy process and cannot be read from outside it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from proxy import __version__
from proxy.actions.history import completed_programs
from proxy.config import Settings, load_settings
from proxy.errors import CablectlError, ConfigError
from proxy.library import Library
from proxy.sessions import RedisSessionStore, SessionStore
from proxy.views import Node, export_turns, session_tree, summarize
from translators import MadeFunction, made_functions

__all__ = ["main"]

T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cablectl", description="OpenAI-compatible proxy that gives any model code actions."
    )
    parser.add_argument("--version", action="version", version=f"cablectl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "config.yaml (litellm model_list shape); default: $CABLECTL_CONFIG, else the embedded model"

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--config", help=config_help)
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 4000)")

    def store_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help=config_help)
        p.add_argument("--redis-url", help="the session store (default: sessions.redis_url of the config)")

    sessions = sub.add_parser("sessions", help="inspect sessions in the store").add_subparsers(
        dest="action", required=True
    )
    ls = sessions.add_parser("ls", help="list sessions")
    store_options(ls)
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = sessions.add_parser("show", help="one session's log as a tree")
    store_options(show)
    show.add_argument("session_id")
    export = sessions.add_parser("export", help="model turns as JSON lines, for fine-tuning")
    store_options(export)
    export.add_argument("--jsonl", action="store_true", help="JSON lines (the only format; the default)")
    export.add_argument("-o", "--output", help="write to this file instead of stdout")
    export.add_argument("session_ids", nargs="*", help="sessions to export (default: all)")

    tools = sub.add_parser(
        "tools", help="functions models defined in their sessions; promote reviewed ones"
    ).add_subparsers(dest="action", required=True)
    tls = tools.add_parser("ls", help="functions sessions' programs defined (documented, top level)")
    store_options(tls)
    tls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    tls.add_argument("session_id", nargs="?", help="one session (default: all)")
    tshow = tools.add_parser("show", help="one function's source, to review it")
    store_options(tshow)
    tshow.add_argument("session_id")
    tshow.add_argument("name")
    promote = tools.add_parser(
        "promote", help="keep a reviewed function in a stored toolset (toolsets: NAME: {promoted: true})"
    )
    store_options(promote)
    promote.add_argument("session_id")
    promote.add_argument("name")
    promote.add_argument("--toolset", required=True, help="the stored toolset to keep it in")

    kernels = sub.add_parser("kernels", help="inspect kernel pools").add_subparsers(
        dest="action", required=True
    )
    kls = kernels.add_parser("ls", help="every replica's kernels")
    store_options(kls)
    kls.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    config = sub.add_parser("config", help="work with config files").add_subparsers(
        dest="action", required=True
    )
    check = config.add_parser("check", help="validate a config and print the resolved routes")
    check.add_argument("path")
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


class _StartupProgress:
    """Rich progress on stderr while the proxy loads its models and warms its kernel pool."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.tasks:
            self.progress.start()
        if what not in self.tasks:
            self.tasks[what] = self.progress.add_task(what, total=total)
        self.progress.update(self.tasks[what], completed=done, total=total)
        if all(self.progress.tasks[t].finished for t in self.tasks.values()) and what == "ready":
            self.progress.stop()


def serve(config: str | None, host: str | None, port: int | None) -> int:
    import uvicorn

    from proxy.app import create_app

    try:
        settings = load_settings(config, overrides={"host": host, "port": port})
    except ConfigError as exc:
        print(f"cablectl: {exc.message}", file=sys.stderr)
        return 2
    _configure_logging(settings.server.log_level)
    try:
        app = create_app(settings, progress=_StartupProgress(Console(stderr=True)))
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


# --- sessions and kernels --------------------------------------------------------------------


def _store_url(args: argparse.Namespace) -> str:
    if args.redis_url:
        return str(args.redis_url)
    settings: Settings = load_settings(args.config)
    if not settings.sessions.redis_url:
        raise ConfigError(
            f"{settings.source} keeps sessions in-process (no sessions.redis_url), where only that proxy "
            "can see them; set sessions.redis_url in the config, or pass --redis-url redis://host:6379/0"
        )
    return settings.sessions.redis_url


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


async def _with_store(args: argparse.Namespace, work: Callable[[SessionStore], Awaitable[T]]) -> T:
    url = _store_url(args)
    store = RedisSessionStore(url)
    try:
        if not await store.ping():
            raise ConfigError(f"cannot reach the session store at {_redacted(url)}; is Redis running there?")
        return await work(store)
    finally:
        await store.aclose()


_SESSION_COLUMNS = (
    "session_id",
    "turns",
    "tool_calls",
    "events",
    "model",
    "last_mode",
    "last_activity",
    "expires_in",
)
_KERNEL_COLUMNS = ("replica", "kernel_id", "state", "session_id", "pid", "age")


def _print_rows(
    out: Console, title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]], as_json: bool
) -> int:
    """JSON lines, or a table of ``columns``."""
    if as_json:
        for row in rows:
            out.print_json(orjson.dumps(row).decode(), indent=None)
        return 0
    table = Table(title=title)
    for column in columns:
        table.add_column(column.replace("_", " "), no_wrap=column.endswith("_id"))
    for row in rows:
        table.add_row(*("-" if row.get(c) is None else str(row[c]) for c in columns))
    out.print(table)
    return 0


def _tree(node: Node, into: Tree | None = None) -> Tree:
    tree = Tree(node.label) if into is None else into.add(node.label)
    for child in node.children:
        _tree(child, tree)
    return tree


async def _sessions_ls(store: SessionStore, out: Console, as_json: bool) -> int:
    rows = []
    for sid in await store.sessions():
        events = await store.events(sid)
        if events:
            rows.append((max((float(e.get("at", 0)) for e in events), default=0.0), sid, events))
    rows.sort(key=lambda r: r[0], reverse=True)
    summaries = [summarize(sid, events, await store.ttl_left(sid)) for _, sid, events in rows]
    return _print_rows(out, f"{len(summaries)} session(s)", _SESSION_COLUMNS, summaries, as_json)


async def _sessions_show(store: SessionStore, out: Console, session_id: str) -> int:
    events = await store.events(session_id)
    if not events:
        out.print(
            f"[red]no session {session_id!r} in the store[/red] (expired, or never created); "
            "list them with 'cablectl sessions ls'"
        )
        return 1
    out.print(_tree(session_tree(session_id, events)))
    return 0


async def _export_lines(store: SessionStore, ids: list[str]) -> tuple[list[bytes], int]:
    ids = ids or await store.sessions()
    lines = [
        orjson.dumps(record) + b"\n" for sid in ids for record in export_turns(sid, await store.events(sid))
    ]
    return lines, len(ids)


def _sessions_export(args: argparse.Namespace) -> int:
    lines, sessions = asyncio.run(_with_store(args, lambda store: _export_lines(store, args.session_ids)))
    if args.output:
        with open(args.output, "wb") as sink:
            sink.writelines(lines)
    else:
        sys.stdout.buffer.writelines(lines)
        sys.stdout.buffer.flush()
    print(f"exported {len(lines)} turn(s) from {sessions} session(s)", file=sys.stderr)
    return 0


def _age(started_at: Any) -> str:
    if not isinstance(started_at, int | float):
        return "-"
    return f"{max(0.0, time.time() - started_at):.0f}s"


async def _kernels_ls(store: SessionStore, out: Console, as_json: bool) -> int:
    rows = []
    for replica in sorted(await store.replicas(), key=lambda r: str(r.get("replica"))):
        if replica.get("stopping"):
            continue
        for kernel in replica.get("kernels", []):
            rows.append({"replica": replica.get("replica"), **kernel, "age": _age(kernel.get("started_at"))})
    return _print_rows(out, f"{len(rows)} kernel(s)", _KERNEL_COLUMNS, rows, as_json)


# --- config ----------------------------------------------------------------------------------


def _config_check(path: str, out: Console) -> int:
    settings = load_settings(path)
    table = Table(title=f"{settings.source}: {len(settings.model_list)} route(s)")
    for column in (
        "model",
        "upstream",
        "transport",
        "where",
        "code actions",
        "grammar",
        "toolsets",
        "fallbacks",
    ):
        table.add_column(column)
    for entry in settings.model_list:
        params = entry.litellm_params
        table.add_row(
            entry.model_name,
            params.model,
            entry.resolved_transport,
            params.api_base or params.model_path or "-",
            "on" if entry.code_actions else "off",
            entry.grammar_mode if entry.code_actions else "-",
            ", ".join(entry.toolsets) or "-",
            ", ".join(settings.router_settings.fallbacks_for(entry.model_name)) or "-",
        )
    out.print(table)
    for entry in settings.model_list:  # which grammar mode each route uses, and why
        why = "{} ({})".format(*entry.grammar_choice) if entry.code_actions else "- (code_actions: false)"
        out.print(f"grammar of {entry.model_name}: {why}", markup=False, highlight=False, soft_wrap=True)
    sessions = settings.sessions.redis_url or "in-process"
    kernels = settings.kernels.gateway_url or "local processes"
    tracing = "Langfuse at " + settings.tracing.langfuse.host if settings.tracing.langfuse else "off"
    out.print(
        f"sessions: {sessions} · kernels: {kernels} (max {settings.kernels.max_total}) · "
        f"keys: {len(settings.keys)} · tracing: {tracing}"
    )
    out.print("[green]config OK[/green]")
    return 0


# --- tools the models made ---------------------------------------------------------------------

_TOOL_COLUMNS = ("session_id", "name", "signature", "doc")


async def _made(store: SessionStore, session_id: str) -> dict[str, MadeFunction]:
    return made_functions(completed_programs(await store.events(session_id)))


async def _tools_ls(store: SessionStore, out: Console, session_id: str | None, as_json: bool) -> int:
    rows = [
        {
            "session_id": sid,
            "name": f.name,
            "signature": f.stub.splitlines()[0].removeprefix("def ").rstrip(":"),
            "doc": f.doc.splitlines()[0],
        }
        for sid in ([session_id] if session_id else await store.sessions())
        for f in (await _made(store, sid)).values()
    ]
    return _print_rows(out, f"{len(rows)} function(s)", _TOOL_COLUMNS, rows, as_json)


async def _made_one(store: SessionStore, out: Console, session_id: str, name: str) -> MadeFunction | None:
    made = await _made(store, session_id)
    if name not in made:
        known = ", ".join(sorted(made)) or "none"
        out.print(
            f"[red]session {session_id!r} defined no documented function {name!r}[/red] "
            f"(its functions: {known}; list them with 'cablectl tools ls {session_id}')"
        )
        return None
    return made[name]


async def _tools_show(store: SessionStore, out: Console, session_id: str, name: str) -> int:
    function = await _made_one(store, out, session_id, name)
    if function is None:
        return 1
    out.print(function.source, markup=False, highlight=False)
    return 0


async def _tools_promote(args: argparse.Namespace, store: SessionStore, out: Console) -> int:
    function = await _made_one(store, out, args.session_id, args.name)
    if function is None:
        return 1
    await Library(store).promote(args.toolset, function, args.session_id)
    out.print(
        f"{function.name} kept in toolset {args.toolset!r}; routes that list it (and keys that may use "
        f"it) get it in every new program's kernel. Declare it in config.yaml: "
        f"toolsets: {{{args.toolset}: {{promoted: true}}}}",
        markup=False,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # piped output gets wide tables instead of 80 columns of ellipses
    out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)
    try:
        if args.command == "serve":
            return serve(args.config, args.host, args.port)
        if args.command == "config":
            return _config_check(args.path, out)
        if args.command == "sessions" and args.action == "ls":
            return asyncio.run(_with_store(args, lambda s: _sessions_ls(s, out, args.json)))
        if args.command == "sessions" and args.action == "show":
            return asyncio.run(_with_store(args, lambda s: _sessions_show(s, out, args.session_id)))
        if args.command == "sessions" and args.action == "export":
            return _sessions_export(args)
        if args.command == "tools" and args.action == "ls":
            return asyncio.run(_with_store(args, lambda s: _tools_ls(s, out, args.session_id, args.json)))
        if args.command == "tools" and args.action == "show":
            return asyncio.run(_with_store(args, lambda s: _tools_show(s, out, args.session_id, args.name)))
        if args.command == "tools" and args.action == "promote":
            return asyncio.run(_with_store(args, lambda s: _tools_promote(args, s, out)))
        if args.command == "kernels":
            return asyncio.run(_with_store(args, lambda s: _kernels_ls(s, out, args.json)))
    except CablectlError as exc:
        print(f"cablectl: {exc.message}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse enforces the subcommands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
