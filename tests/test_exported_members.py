"""The public surface of each module is what its ``__all__`` says, and nothing is missing."""

from __future__ import annotations

import importlib

import pytest

import grammars

MODULES = [
    "proxy",
    "proxy.accesslog",
    "proxy.app",
    "proxy.auth",
    "proxy.backends",
    "proxy.backends.base",
    "proxy.backends.direct",
    "proxy.backends.litellm_backend",
    "proxy.backends.local",
    "proxy.backends.sse",
    "proxy.cli",
    "proxy.config",
    "proxy.config_errors",
    "proxy.endpoints",
    "proxy.front",
    "proxy.library",
    "proxy.metrics",
    "proxy.tracing",
    "proxy.views",
    "proxy.errors",
    "proxy.routing",
    "proxy.schemas",
    "proxy.backends.llama_grammar",
    "proxy.kernels",
    "proxy.kernels.base",
    "proxy.kernels.execution",
    "proxy.kernels.gateway",
    "proxy.kernels.local",
    "proxy.kernels.pool",
    "proxy.kernels.sandbox",
    "proxy.actions",
    "proxy.actions.approval",
    "proxy.actions.artifacts",
    "proxy.actions.events",
    "proxy.actions.history",
    "proxy.actions.programs",
    "proxy.actions.step",
    "proxy.actions.turn",
    "proxy.actions.loop",
    "proxy.actions.respond",
    "proxy.actions.runtime",
    "proxy.toolsets",
    "proxy.sessions",
    "proxy.sessions.ids",
    "proxy.sessions.store",
    "proxy.surfaces",
    "proxy.surfaces.bridge",
    "proxy.surfaces.common",
    "proxy.surfaces.messages",
    "proxy.surfaces.response_store",
    "proxy.surfaces.responses",
    "translators",
    "translators.actions",
    "translators.affordance",
    "translators.errors",
    "translators.gbnf",
    "translators.grammar",
    "translators.kernel_stubs",
    "translators.made",
    "translators.names",
    "translators.openapi",
    "translators.output",
    "translators.prompt",
    "translators.reader",
    "translators.schema",
    "translators.stubs",
    "translators.tools",
    "grammars",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    for member in module.__all__:
        assert hasattr(module, member), f"{name}.__all__ lists {member!r}, which is missing"


def test_top_level_surfaces() -> None:
    import proxy
    import proxy.errors

    assert proxy.__all__ == ["__version__"]
    assert set(proxy.errors.__all__) == {
        "ArtifactNotFound",
        "AuthRateLimited",
        "AuthenticationFailed",
        "CablectlError",
        "ConfigError",
        "InvalidRequest",
        "MethodNotAllowed",
        "ModelNotFound",
        "ModelOutputInvalid",
        "NotFound",
        "PermissionDenied",
        "RequestTooLarge",
        "ResponseNotFound",
        "ServiceUnavailable",
        "SessionNotFound",
        "UnknownURL",
        "UpstreamError",
        "UpstreamRateLimited",
        "UpstreamRejected",
        "UpstreamTimeout",
        "UpstreamUnavailable",
    }


def test_translators_do_not_import_proxy() -> None:
    """translators/ is a pure library: importing it must not pull in the server."""
    import subprocess
    import sys

    code = (
        "import sys, translators, grammars; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'proxy'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_grammar_files_are_package_data() -> None:
    """The fixed rules load through importlib.resources and complete a generated grammar."""
    from translators.gbnf import parser_for
    from translators.grammar import build_grammar
    from translators.tools import Toolset

    assert "action:" in grammars.load("response") and "STRING:" in grammars.load("values")
    toolset = Toolset.from_openai(
        [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ]
    )
    parser = parser_for(build_grammar(toolset, "auto"))
    tree = parser.parse('```python\nget_weather(city="Paris")\n```')
    assert len(list(tree.find_data("action"))) == 1
    assert parser.parse("Answer: Just an answer, no code.")
