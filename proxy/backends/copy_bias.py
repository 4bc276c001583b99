"""Copy bias: inside a string argument, favour text that continues a span of the conversation.

A small model asked for ``get_weather(location="...")`` about "Tel Aviv" may well write
"Taliban": its next-token guess after ``location="`` is poor, while the value it needs is right
there in the request. Pointer (copy) mechanisms in summarisation models address the same thing;
here it is a logit bias, applied while the model writes a string literal of its program:

- at a value's start, the first token of every word of the conversation gets ``bias`` added
  to its logit: the token the model's own tokenizer would start that word with (a model that
  starts "Hyderabad" with "H" rather than its usual "Hy" has lost the word already);
- after that, wherever the value so far occurs in the conversation (from a word's start), the
  token that carries on the conversation's text there gets the bias, while the text goes on
  with a letter or digit, or a space and a capitalised word or a number: the model still
  decides where a value ends (the closing quote is never biased), and may write a value that
  is nowhere in the conversation;
- at a keyword argument's value, a lone quote gets the bias over tokens that open and close a
  string at once (``""``, ``",``): SmolLM2 writes ``special=""`` for "who has black as their special
  request" otherwise.

Only string literals that are a call's arguments or items of one (after ``=``, ``(``, ``,``,
``[``, ``{`` or ``:``) are biased, only inside the python block: never triple-quoted strings,
comments, or a plain-text answer. Greedy decoding stays deterministic.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable

import numpy as np

__all__ = ["CopyBias", "StringTracker"]

MAX_SOURCE = 32_000  # characters of the conversation's end looked at
MAX_WORDS = 4_000  # word starts looked at (the last ones)
MAX_PLACES = 32  # places a partial value is continued from
SNIPPET = 24  # characters tokenized to find the next token of the source
FENCE = "```python"
_OPENERS = "=(,[{:"
_PREFIXES = set("rRbBfFuU")


class StringTracker:
    """Fed the model's output as it comes; ``value`` is the text so far of the string literal
    it is inside, when that literal is an argument in the python block (escapes as written)."""

    def __init__(self) -> None:
        self._head = ""  # output before the block's fence
        self._in_block = False
        self._done = False  # the block was closed
        self._quote = ""  # the open literal's quote ('"', "'", '\"\"\"' or "'''"), "" outside one
        self._run = 0  # quote characters in a row inside a triple-quoted literal
        self._escape = False
        self._comment = False
        self._arg = False
        self._value: list[str] = []
        self._last = ""  # the last character outside literals that is not a space
        self._word = ""  # the name being written (a string prefix: f, r, b, u and pairs)
        self._before_word = ""
        self._ticks = 0
        self._empty = ""  # the quote of an empty literal just closed: a third one opens '\"\"\"'

    @property
    def value(self) -> str | None:
        if self._done or len(self._quote) != 1 or not self._arg:
            return None
        return "".join(self._value)

    @property
    def at_value(self) -> bool:
        """Whether the next token is a keyword argument's value (just after ``=``), which may
        open a string. Not after ``(``: ``print(`` goes on with a call as often as a string."""
        return (
            self._in_block
            and not self._done
            and not self._quote
            and not self._comment
            and not self._word
            and self._last == "="
        )

    def feed(self, text: str) -> None:
        for c in text:
            if self._done:
                return
            if not self._in_block:
                self._head = (self._head + c)[-len(FENCE) :]
                self._in_block = self._head == FENCE
            elif self._quote:
                self._literal(c)
            elif self._comment:
                self._comment = c != "\n"
            else:
                self._code(c)

    def _code(self, c: str) -> None:
        empty, self._empty = self._empty, ""
        if c in "\"'":
            if empty == c:  # '' followed by ': a triple-quoted literal
                self._open(c * 3, arg=False)
                return
            opener = self._last
            if self._word and len(self._word) <= 2 and set(self._word) <= _PREFIXES:
                opener = self._before_word
            self._open(c, arg=bool(opener) and opener in _OPENERS)
            return
        if c == "#":
            self._comment = True
            return
        self._ticks = self._ticks + 1 if c == "`" else 0
        if self._ticks == 3:
            self._done = True
        if c.isalnum() or c == "_":
            if not self._word:
                self._before_word = self._last
            self._word += c
        else:
            self._word = ""
        if not c.isspace():
            self._last = c

    def _open(self, quote: str, arg: bool) -> None:
        self._quote, self._arg, self._value, self._run, self._word = quote, arg, [], 0, ""

    def _close(self) -> None:
        self._empty = self._quote if len(self._quote) == 1 and not self._value else ""
        self._last, self._quote = self._quote[0], ""

    def _literal(self, c: str) -> None:
        if self._escape:
            self._escape = False
        elif c == "\\":
            self._escape = True
        elif len(self._quote) == 1:
            if c == self._quote:
                self._close()
                return
            if c == "\n":  # an unterminated literal ends with its line
                self._quote = ""
                return
        else:
            self._run = self._run + 1 if c == self._quote[0] else 0
            if self._run == 3:
                self._close()
                return
        self._value.append(c)


class CopyBias:
    """One generation's copy bias: ``accept`` every sampled token's bytes; ``apply`` adds the
    bias to the next token's logits in place. ``tokenize`` is the model's tokenizer (no BOS)."""

    def __init__(self, source: str, bias: float, tokenize: Callable[[str], list[int]]) -> None:
        self.source = source[-MAX_SOURCE:]
        self.bias = float(bias)
        self._tokenize = tokenize
        self._firsts: dict[str, int | None] = {}
        self._starts: set[int] | None = None
        self._quote_tokens: list[int] | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._tracker = StringTracker()
        self.boosted = 0  # steps at which some token was boosted

    def accept(self, piece: bytes) -> None:
        self._tracker.feed(self._decoder.decode(piece))

    def apply(self, logits: np.ndarray) -> None:
        if not self.source or self.bias == 0.0:
            return
        partial = self._tracker.value
        if partial is None:
            if self._tracker.at_value:  # the quote alone, over tokens that open and close at
                logits[self._quotes()] += self.bias  # once ('""', '",'): a value comes next
                self.boosted += 1
            return
        tokens = self.next_tokens(partial)
        if tokens:
            logits[sorted(tokens)] += self.bias
            self.boosted += 1

    def next_tokens(self, partial: str) -> set[int]:
        """The tokens that copy on: at a value's start, the first token of each word of the
        source; after that, the next token of the source after each place ``partial`` occurs
        (from a word's start), while the source goes on there with a letter or digit, or with a
        space and a capitalised word or a number ("Tel Aviv", "Flight 12"); not over punctuation
        or into a lowercase word ("Seattle to Boston"): whether a value runs on there is the
        model's own choice."""
        if not partial:
            if self._starts is None:
                self._starts = self._first_tokens(
                    self.source[at : at + SNIPPET] for at in _word_starts(self.source)
                )
            return self._starts
        source, at = self.source, self.source.find(partial)
        rests: list[str] = []
        while at >= 0 and len(rests) < MAX_PLACES:
            if at == 0 or not (source[at - 1].isalnum() and partial[0].isalnum()):
                rest = source[at + len(partial) : at + len(partial) + SNIPPET]
                if rest[:1].isalnum() or (rest[:1] == " " and (rest[1:2].isupper() or rest[1:2].isdigit())):
                    rests.append(rest)
            at = source.find(partial, at + 1)
        return self._first_tokens(rests)

    def _quotes(self) -> list[int]:
        if self._quote_tokens is None:
            self._quote_tokens = sorted(
                {t[0] for t in (self._tokenize('"'), self._tokenize("'")) if len(t) == 1}
            )
        return self._quote_tokens

    def _first_tokens(self, snippets: Iterable[str]) -> set[int]:
        out = set()
        for snippet in snippets:
            if snippet not in self._firsts:
                tokens = self._tokenize(snippet)
                self._firsts[snippet] = tokens[0] if tokens else None
            token = self._firsts[snippet]
            if token is not None:
                out.add(token)
        return out


def _word_starts(source: str) -> list[int]:
    """Where each word of ``source`` begins (a letter or digit after anything else)."""
    return [i for i, c in enumerate(source) if c.isalnum() and (i == 0 or not source[i - 1].isalnum())][
        -MAX_WORDS:
    ]
