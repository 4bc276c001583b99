"""The seam every model backend implements, and the mapping of upstream failures.

A backend serves one route, two ways:

- pass-through: ``complete`` returns the response body as JSON bytes; ``open_stream``
  does everything up to the first byte (so failures there are still errors with a
  status, and can be retried or fall back), then returns an ``SSEStream`` of
  already-framed ``data: ...\\n\\n`` bytes;
- the action loop: ``generate`` opens one completion of a code-form prompt, constrained
  by the request's grammar where the backend can, and returns a ``Generation``: an
  async iterator of text deltas as the model writes them, with the usage once it ends.
  Every backend streams; the loop never asks which kind it has.
"""

from __future__ import annotations

import abc
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import orjson

from proxy.config import ModelEntry
from proxy.errors import (
    CablectlError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from proxy.schemas import ChatCompletionRequest
from translators.tools import Param

__all__ = [
    "GRAMMAR_FIELDS",
    "LLGUIDANCE_LINE",
    "Generation",
    "GenerationRequest",
    "Grammar",
    "ModelBackend",
    "SSEStream",
    "error_from_upstream",
    "import_litellm",
]


class SSEStream(abc.ABC):
    """An open upstream stream: iterate it for SSE bytes, always ``aclose`` it."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Grammar:
    """The request's grammar in the dialect the route sends: GBNF for ``gbnf`` and ``ebnf``,
    Lark for ``lark`` and ``llguidance`` (``mode``, as in config's ``grammar``)."""

    mode: Literal["gbnf", "llguidance", "lark", "ebnf"]
    text: str


# llama.cpp hands a grammar to llguidance (as Lark) only when it starts with this line
LLGUIDANCE_LINE = "%llguidance {}\n"

# mode -> the request fields that carry the grammar, as each kind of server reads them
GRAMMAR_FIELDS: dict[str, Callable[[str], dict[str, Any]]] = {
    # llama.cpp's server reads "grammar" (tools/server: params_from_json_cmpl, also on
    # /v1/chat/completions) as GBNF with root rule "root" (common/sampling.cpp:
    # llama_sampler_init_grammar); llama-cpp-python's server has the same field
    # (llama_cpp/server/types.py CreateChatCompletionRequest.grammar -> LlamaGrammar)
    "gbnf": lambda text: {"grammar": text},
    # llama.cpp built with -DLLAMA_LLGUIDANCE=ON: common/sampling.cpp gives a "grammar" whose
    # first 11 characters are "%llguidance" to llama_sampler_init_llg(vocab, "lark", ...);
    # a build without it aborts (GGML_ABORT) on such a grammar. SGLang reads "ebnf"
    # (entrypoints/openai/protocol.py) and, with --grammar-backend llguidance, compiles it
    # with llguidance.grammar_from("ebnf", ...), which keeps text that starts with
    # "%llguidance" or "start:" as Lark (llguidance/gbnf_to_lark.py is_lark_syntax). Each
    # server ignores the other's field (llama.cpp reads known keys; SGLang's pydantic
    # request ignores extra ones).
    "llguidance": lambda text: {"grammar": LLGUIDANCE_LINE + text, "ebnf": LLGUIDANCE_LINE + text},
    # vLLM (>= 0.10.2; guided_grammar before): ChatCompletionRequest.structured_outputs
    # (StructuredOutputsParams.grammar). Its guidance backend compiles it with
    # llguidance.grammar_from("grammar", ...) (v1/structured_output/backend_guidance.py),
    # Lark as it is
    "lark": lambda text: {"structured_outputs": {"grammar": text}},
    # the same field, for vLLM's default xgrammar backend: a grammar with a "::=" line is
    # not "likely Lark" (v1/structured_output/utils.py grammar_is_likely_lark), so it goes
    # to xgr.Grammar.from_ebnf / compile_grammar as it is; xgrammar's EBNF reads GBNF.
    # Lark there would go through convert_lark_to_ebnf (vLLM with xgrammar < 0.2.5), which
    # leaves /regex/ terminals in place, and xgrammar refuses them
    "ebnf": lambda text: {"structured_outputs": {"grammar": text}},
}


# what the upstream must not see when it is asked for a code action
_NOT_FORWARDED = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "stream",
        "stream_options",
        "functions",
        "function_call",
        "n",
    }
)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One inner model call of the action loop."""

    messages: list[dict[str, Any]]  # the code-form prompt
    request: ChatCompletionRequest  # the client's request (sampling settings, limits)
    payload: dict[str, Any]  # the client's JSON (unknown fields pass through to upstreams)
    grammar: Grammar | None = None
    # the offered tools' parameters by the tools' Python names, as the prompt shows them
    functions: Mapping[str, tuple[Param, ...]] = field(default_factory=dict)

    def chat_body(self) -> dict[str, Any]:
        """The chat-completions body an OpenAI-compatible upstream gets (streamed)."""
        body = {k: v for k, v in self.payload.items() if k not in _NOT_FORWARDED}
        body["messages"] = self.messages
        if self.grammar is not None:
            body.update(GRAMMAR_FIELDS[self.grammar.mode](self.grammar.text))
        return body


@dataclass
class Generation(abc.ABC):
    """An open generation: iterate it for text deltas; ``usage`` is complete once it ends.

    Always ``aclose`` it: that stops the model (a local context is given back once its
    sampling thread has stopped; a remote stream is closed) and never awaits long."""

    usage: dict[str, int] = field(default_factory=dict)
    grammar_enforced: bool = False  # the backend applied the grammar itself (no need to check)
    server: str | None = None  # what the upstream says it is (its Server header), for logs
    finish_reason: str | None = None  # once it ends: "stop", "length", ... (None: not said)

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[str]: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...


def import_litellm() -> Any:
    """litellm, imported offline: it fetches a price list from the network on import unless
    told not to, and this proxy runs without a network."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


class ModelBackend(abc.ABC):
    """One route's model. Real implementations: direct (aiohttp), litellm, local (llama.cpp)."""

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry

    @property
    def name(self) -> str:
        return self.entry.model_name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load or connect; called once in the app's lifespan."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what ``start`` took."""

    def ready(self) -> bool:
        return True

    @abc.abstractmethod
    async def complete(self, payload: dict[str, Any], request: ChatCompletionRequest) -> bytes:
        """Return the chat.completion JSON body."""

    @abc.abstractmethod
    async def open_stream(self, payload: dict[str, Any], request: ChatCompletionRequest) -> SSEStream:
        """Start a streamed completion; raise before returning if it cannot start."""

    @abc.abstractmethod
    async def generate(self, job: GenerationRequest) -> Generation:
        """Start one generation of the action loop; raise before returning if it cannot start."""

    async def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        """About how many input tokens ``messages`` (and ``tools``) cost on this route's model:
        litellm's counter for the upstream model (its own tokenizer where litellm ships one,
        else cl100k), run off the event loop."""
        token_counter = import_litellm().token_counter
        model = str(self.entry.litellm_params.model or self.name)
        return int(
            await anyio.to_thread.run_sync(
                lambda: token_counter(model=model, messages=messages, tools=tools or None)
            )
        )


def _error_fields(body: bytes) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, type, param, code) from an upstream error body, if it has that shape."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None, None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = err.get("code")
        return (
            str(err.get("message") or "") or None,
            err.get("type") if isinstance(err.get("type"), str) else None,
            err.get("param") if isinstance(err.get("param"), str) else None,
            str(code) if code is not None else None,
        )
    if isinstance(err, str):
        return err, None, None, None
    return None, None, None, None


def error_from_upstream(status: int, body: bytes, model_name: str) -> CablectlError:
    """Map an upstream HTTP failure to the error the client should get."""
    message, type_, param, code = _error_fields(body)
    detail = message or body[:300].decode("utf-8", "replace").strip() or "no body"
    if status == 429:
        return UpstreamRateLimited(
            f"The upstream for model {model_name!r} is rate limiting (429): {detail}. Retry later."
        )
    if status in (408, 504):
        return UpstreamTimeout(f"The upstream for model {model_name!r} timed out ({status}): {detail}")
    if status in (401, 403):
        return UpstreamError(
            f"The upstream for model {model_name!r} refused the proxy's credentials ({status}): "
            f"{detail}. The operator should check litellm_params.api_key for this model."
        )
    if 400 <= status < 500:
        return UpstreamRejected(detail, status=status, param=param, code=code, type_=type_)
    return UpstreamError(f"The upstream for model {model_name!r} failed with HTTP {status}: {detail}")
