"""Grammar-constrained sampling for llama-cpp-python at (nearly) unconstrained speed.

llama-cpp-python puts the grammar sampler into its sampler chain, so every token
runs the grammar over the whole vocabulary (49k candidates for SmolLM2): about
half the unconstrained speed on a small model. llama.cpp's own server samples
the other way round, and so does ``GrammarFirstSampler`` here ("grammar second"):

1. sample with the ordinary chain (penalties, top-k/p, temperature or greedy);
2. ask the grammar about that one token;
3. only if the grammar rejects it, apply the grammar to every candidate and
   sample again from what is left.

The output is the same distribution the grammar-in-chain sampler gives (for
greedy decoding, the same tokens); only rejected steps pay for the full pass.
``ConstrainedLlama`` is ``llama_cpp.Llama`` using it whenever a grammar is given.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama, LogitsProcessorList
from llama_cpp.llama_grammar import LlamaGrammar

from proxy.backends.copy_bias import CopyBias

__all__ = ["ConstrainedLlama", "GrammarFirstSampler"]

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class GrammarFirstSampler:
    """Quacks like ``llama_cpp._internals.LlamaSampler`` where ``Llama`` uses it (``sample``)."""

    def __init__(
        self, base: Any, model: Any, grammar: LlamaGrammar, n_vocab: int, copy: CopyBias | None = None
    ) -> None:
        self._base = base  # LlamaSampler chain without the grammar
        self._model = model
        self.copy = copy
        self._grammar = llama_cpp.llama_sampler_init_grammar(
            model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        if not self._grammar:
            raise ValueError("llama.cpp rejected the grammar")
        self._n_vocab = n_vocab
        self._full = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._full["id"] = np.arange(n_vocab, dtype=np.int32)
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self.rejections = 0
        self.steps = 0

    def _array(self, data: np.ndarray) -> llama_cpp.llama_token_data_array:
        return llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(data), selected=-1, sorted=False
        )

    def _grammar_allows(self, token: int) -> bool:
        self._one["id"][0] = token
        self._one["logit"][0] = 0.0
        arr = self._array(self._one)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        return bool(np.isfinite(self._one["logit"][0]))

    def sample(self, ctx: Any, idx: int = -1) -> int:
        self.steps += 1
        if self.copy is not None:  # in place: the grammar pass below reads the same logits
            logits = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
            self.copy.apply(np.ctypeslib.as_array(logits, shape=(self._n_vocab,)))
        token = int(llama_cpp.llama_sampler_sample(self._base.sampler, ctx.ctx, idx))
        if not self._grammar_allows(token):
            self.rejections += 1
            logits = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
            self._full["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
            self._full["p"] = 0.0
            arr = self._array(self._full)
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
            llama_cpp.llama_sampler_apply(self._base.sampler, ctypes.byref(arr))
            token = int(self._full["id"][arr.selected])
        llama_cpp.llama_sampler_accept(self._grammar, token)
        if self.copy is not None:
            self.copy.accept(token_piece(self._model, token))
        return token

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self._grammar, token)

    def reset(self) -> None:
        llama_cpp.llama_sampler_reset(self._grammar)

    def close(self) -> None:
        if self._grammar:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        self._base.close()

    def __del__(self) -> None:
        self.close()


def token_piece(model: Any, token: int) -> bytes:
    """A token's text as the model writes it (no special tokens)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, False)
    return buf.raw[: max(n, 0)]


class ConstrainedLlama(Llama):
    """``Llama`` whose grammar-constrained sampling checks the grammar second; a ``CopyBias``
    among the logits processors of a constrained generation is applied by that sampler."""

    last_sampler: GrammarFirstSampler | None = None

    def _init_sampler(self, **kwargs: Any) -> Any:  # type: ignore[override]
        grammar = kwargs.pop("grammar", None)
        processors = kwargs.pop("logits_processor", None) or []
        copy = next((p for p in processors if isinstance(p, CopyBias)), None)
        others = [p for p in processors if not isinstance(p, CopyBias)]
        base = super()._init_sampler(
            grammar=None, logits_processor=LogitsProcessorList(others) if others else None, **kwargs
        )
        if grammar is None:
            return base
        sampler = GrammarFirstSampler(base, self._model, grammar, self._n_vocab, copy)
        self.last_sampler = sampler
        return sampler
