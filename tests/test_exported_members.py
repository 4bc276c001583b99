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
    "proxy.cli",
    "proxy.config",
    "proxy.errors",
    "proxy.routing",
    "proxy.schemas",
    "translators",
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
        "AuthenticationFailed",
        "CablectlError",
        "ConfigError",
        "InvalidRequest",
        "ModelNotFound",
        "PermissionDenied",
        "RequestTooLarge",
        "ServiceUnavailable",
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


def test_grammar_is_package_data_and_loads_in_lark() -> None:
    import lark

    text = grammars.load("response")
    parser = lark.Lark(text, start="start", parser="earley")
    tree = parser.parse('Let me check.\n```python\nget_weather(city="Paris")\n```')
    actions = list(tree.find_data("action"))
    assert len(actions) == 1
    assert parser.parse("Just an answer, no code.")
