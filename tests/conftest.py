"""Shared fixtures: real uvicorn servers on free ports, a scripted upstream, a scrubbed env."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import proxy.kernels.local as local_kernels
from proxy.app import create_app
from proxy.config import Settings, load_settings
from tests.servers import UvicornThread
from tests.upstream import ScriptedUpstream

SCRUBBED_PREFIXES = ("OPENAI_", "CABLECTL_", "ANTHROPIC_", "AZURE_", "LANGFUSE_", "ALICE_", "BOB_")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kernel-start",
        choices=("fork", "spawn"),
        default=None,
        help="how local kernels start where config says auto (default: the platform's, fork on Linux)",
    )


@pytest.fixture(autouse=True, scope="session")
def _kernel_start(pytestconfig: pytest.Config) -> Iterator[None]:
    """``--kernel-start``: every provider and app of this run starts kernels that way."""
    chosen = pytestconfig.getoption("--kernel-start")
    before = local_kernels.START_DEFAULT
    if chosen:
        local_kernels.START_DEFAULT = chosen
    yield
    local_kernels.START_DEFAULT = before


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(SCRUBBED_PREFIXES):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[tuple[ScriptedUpstream, UvicornThread]]:
    app = ScriptedUpstream()
    with UvicornThread(app, lifespan="off") as server:
        yield app, server


@pytest.fixture
def upstream(upstream_server: tuple[ScriptedUpstream, UvicornThread]) -> Iterator[ScriptedUpstream]:
    app, _ = upstream_server
    app.reset()
    yield app
    app.reset()


@pytest.fixture(scope="session")
def upstream_url(upstream_server: tuple[ScriptedUpstream, UvicornThread]) -> str:
    return upstream_server[1].url + "/v1"


def write_config(tmp: Path, config: dict[str, Any]) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def settings_from(tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> Settings:
    return load_settings(write_config(tmp, config), env=env or {})


ProxyFactory = Callable[..., UvicornThread]


@pytest.fixture(scope="module")
def make_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """Start proxies from config dicts (written to a real config.yaml); all stopped at module end."""
    started: list[UvicornThread] = []

    def factory(config: dict[str, Any], env: dict[str, str] | None = None) -> UvicornThread:
        settings = settings_from(tmp_path_factory.mktemp("cfg"), config, env)
        server = UvicornThread(create_app(settings)).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


def upstream_models(upstream_url: str) -> list[dict[str, Any]]:
    """The routes most tests use, all pointing at the scripted upstream."""
    return [
        {
            "model_name": "gpt-4o-mini",
            "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream_url},
        },
        {
            "model_name": "renamed",
            "litellm_params": {"model": "openai/upstream-name", "api_base": upstream_url, "api_key": "sk-up"},
        },
        {
            "model_name": "via-litellm",
            "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream_url, "api_key": "sk-up"},
            "transport": "litellm",
        },
        {
            "model_name": "slow",
            "litellm_params": {"model": "openai/slow", "api_base": upstream_url, "timeout": 0.5},
        },
        {
            "model_name": "plain-tools",  # code actions off: function calling passes through
            "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream_url},
            "code_actions": False,
        },
    ]


@pytest.fixture(autouse=True)
def _quiet_uvicorn() -> None:
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server on a free port (no persistence), stopped after the run.

    With no redis-server binary the Redis tests are skipped on a developer's machine,
    but fail in CI (CI=true), where a missing Redis is a broken setup."""
    import shutil
    import subprocess

    from tests.servers import free_port, wait_for_redis

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("redis-server is not installed, and CI needs it: apt-get install redis-server")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for_redis(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
