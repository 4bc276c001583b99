"""Copy bias: favour what the request says (its words, numbers and functions) in a code action.

A small model asked for ``get_weather(location="...")`` about "Tel Aviv" may well write
"Taliban": its next-token guess after ``location="`` is poor, while the value it needs is right
there in the request. Pointer (copy) mechanisms in summarisation models address the same thing;
here it is a logit bias, applied while the model writes a string literal of its program:

- at a value's start, the first token of every word of the conversation gets ``bias`` added
  to its logit: the token the model's own tokenizer would start that word with (a model that
  starts "Hyderabad" with "H" rather than its usual "Hy" has lost the word already);
- after that, wherever the value so far occurs in the conversation (from a word's start), the
  token that carries on the conversation's text there gets the bias, while the text goes on
  with a letter or digit, or a space and a capitalised word or a number (and once over a comma
  and a capitalised word: "Riga, Latvia", not on into "Riga, Latvia, Can"), and anywhere up
  to the closing quote inside a quoted phrase, with twice the bias ("the dish called 'chicken
  dish'"); the model decides where a value ends, and may write a value that is nowhere in the
  conversation, but a value that is a whole capitalised name of the request ("Chennai, Tamil
  Nadu") or a whole quoted phrase favours its closing quote;
- at a keyword argument's value, a lone quote gets the bias over tokens that open and close a
  string at once (``""``, ``",``): SmolLM2 writes ``special=""`` for "who has black as their special
  request" otherwise.

The same idea picks functions. Offered ``area_rectangle`` and ``area_circle`` and asked for "the area
of a rectangle ... Also, the area of a circle", SmolLM2 calls ``area_rectangle`` twice: its urge to
repeat the line it just wrote beats the request. A function the request *names* (a word of its
name that no other offered function's name has, "circle", is in the request) and that the
program has not called yet, nor answered with another call (whose name or parameters have that
word), is favoured where a call's function is written (``print(`` and the name so far), and
the block's closing fence loses the bias while the program has made fewer calls than the
request names functions.

Numbers and arguments, likewise: a keyword argument's number favours the request's numbers the
program has not written yet ("the GCD of 96 and 128 and the LCM of 15 and 25" gets
``gcd(num1=15, num2=25)`` otherwise); once a call's required arguments are given, a comma that
would begin another loses the bias when no argument left is one the request asks about (a
weather call otherwise gets ``unit="celsius"`` it was not asked for, over its default).

Only string literals that are a call's arguments or items of one (after ``=``, ``(``, ``,``,
``[``, ``{`` or ``:``) are biased, only inside the python block: never triple-quoted strings,
comments, or a plain-text answer. Greedy decoding stays deterministic.
"""

from __future__ import annotations

import codecs
import collections
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from proxy.backends.program_tracker import ProgramTracker
from translators.tools import Param

__all__ = ["CopyBias"]

MAX_SOURCE = 32_000  # characters of the conversation's end looked at
MAX_WORDS = 4_000  # word starts looked at (the last ones)
MAX_PLACES = 32  # places a partial value is continued from
MAX_SCANNED = 4 * MAX_PLACES  # places a partial value is looked at, the latest first
SNIPPET = 24  # characters tokenized to find the next token of the source


class CopyBias:
    """One generation's copy bias: ``accept`` every sampled token's bytes; ``apply`` adds the
    bias to the next token's logits in place. ``tokenize`` is the model's tokenizer (no BOS)."""

    def __init__(
        self,
        source: str,
        bias: float,
        tokenize: Callable[[str], list[int]],
        functions: Mapping[str, Sequence[Param]] | None = None,
    ) -> None:
        self.source = source[-MAX_SOURCE:]
        # quoted phrases: their texts, and for every position inside one, where it ends (0
        # outside): looked up at every token, never searched
        quoted = [m.span(m.lastindex or 0) for m in _QUOTED.finditer(self.source)]
        self._quoted_texts = {self.source[start:end] for start, end in quoted}
        self._quote_end = [0] * len(self.source)
        for start, end in quoted:
            self._quote_end[start:end] = [end] * (end - start)
        self._params = functions or {}
        said = _words(self.source)
        self.asked = _asked(said, self._params)
        # what a call of each function answers: the words of its name and its parameters'
        self._covers = {f: _words(" ".join([f, *(p.py for p in ps)])) for f, ps in self._params.items()}
        # each function's parameters the request asks about (a word of the name or of a choice)
        self._asked_params = {
            f: {p.py for p in ps if _param_words(p) & said} for f, ps in self._params.items()
        }
        self._comma_tokens: tuple[list[int], list[int]] | None = None
        # as a program writes them, in the request's order, and how often each value occurs
        self._numbers = [n.replace(",", "") for n in _NUMBER.findall(self.source)]
        self._number_counts = collections.Counter(_as_number(n) for n in self._numbers)
        self.bias = float(bias)
        self._tokenize = tokenize
        self._firsts: dict[str, int | None] = {}
        self._starts: set[int] | None = None
        self._quote_tokens: list[int] | None = None
        self._fence_tokens: list[int] | None = None
        self._closer_tokens: dict[str, list[int]] = {}
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._tracker = ProgramTracker()
        self.boosted = 0  # steps at which some token was boosted

    def accept(self, piece: bytes) -> None:
        self._tracker.feed(self._decoder.decode(piece))

    def apply(self, logits: np.ndarray) -> None:
        if not self.source or self.bias == 0.0:
            return
        self._unasked_arguments(logits)
        partial = self._tracker.value
        if partial is None:
            if self._tracker.at_value:  # the quote alone, over tokens that open and close at
                logits[self._quotes()] += self.bias  # once ('""', '",'): a value comes next
                self.boosted += 1
                self._unused_numbers(logits, "")
            elif self._tracker.number is not None:
                self._unused_numbers(logits, self._tracker.number)
            elif self.asked:
                self._calls(logits)
            return
        tokens, quoted = self._continuations(partial)
        if tokens:  # twice the bias in a quoted phrase: "chicken" is a word, 'chicken dish' a name
            logits[sorted(tokens)] += self.bias * (2 if quoted else 1)
            self.boosted += 1
        elif self._copied_whole(partial):
            logits[self._closers(self._tracker.quote)] += self.bias
            self.boosted += 1

    def _copied_whole(self, partial: str) -> bool:
        """Whether ``partial`` is a whole name the request writes (capitalised, from a word's
        start to a word's end, where the copy stops: "Chennai, Tamil Nadu" of "... in Chennai,
        Tamil Nadu in fahrenheit") or a whole quoted phrase: then its closing quote is favoured,
        not the model's own run-on ("Chennai, Tamil Nadu, 2022-01-01"). A lowercase phrase
        ("no onions" of "no onions, extra cheese") ends where the model says."""
        if partial in self._quoted_texts:
            return True
        if not partial[:1].isupper():
            return False
        source = self.source
        for at in self._places(partial):
            end = at + len(partial)
            if (at == 0 or not source[at - 1].isalnum()) and not source[end : end + 1].isalnum():
                return True
        return False

    def _places(self, partial: str) -> Iterator[int]:
        """Where ``partial`` occurs in the source, the latest first, at most ``MAX_SCANNED``
        places (a long tool result that repeats a short value must not cost every token)."""
        at = self.source.rfind(partial)
        for _ in range(MAX_SCANNED):
            if at < 0:
                return
            yield at
            at = self.source.rfind(partial, 0, at + len(partial) - 1) if at > 0 else -1

    def next_tokens(self, partial: str) -> set[int]:
        return self._continuations(partial)[0]

    def _continuations(self, partial: str) -> tuple[set[int], bool]:
        """The tokens that copy on: at a value's start, the first token of each word of the
        source; after that, the next token of the source after each place ``partial`` occurs
        (from a word's start), while the source goes on there with a letter or digit, or with a
        space and a capitalised word or a number ("Tel Aviv", "Flight 12"); not over punctuation
        or into a lowercase word ("Seattle to Boston"): whether a value runs on there is the
        model's own choice. Inside a quoted phrase, anything up to its closing quote goes on
        (and the second value says the copy is in one)."""
        if not partial:
            if self._starts is None:
                self._starts = self._first_tokens(
                    self.source[at : at + SNIPPET] for at in _word_starts(self.source)
                )
            return self._starts, False
        source = self.source
        rests: list[str] = []
        quoted = False
        for at in self._places(partial):
            if len(rests) >= MAX_PLACES:
                break
            if at == 0 or not (source[at - 1].isalnum() and partial[0].isalnum()):
                end = at + len(partial)
                rest = source[end : end + SNIPPET]
                quote = self._quote_end[at]
                if end < quote:
                    rests.append(source[end : min(quote, end + SNIPPET)])  # a quoted phrase, whole
                    quoted = True
                elif rest[:1].isalnum() or (rest[:1] == " " and (rest[1:2].isupper() or rest[1:2].isdigit())):
                    rests.append(rest)
                elif rest[:2] == ", " and rest[2:3].isupper() and "," not in partial:
                    rests.append(rest)  # "Riga, Latvia", once: not on into "Riga, Latvia, Can"
        return self._first_tokens(rests), quoted

    def _calls(self, logits: np.ndarray) -> None:
        """Functions the request names (``asked``) that the program has not called, nor
        answered with another call (its name and parameters have the word that named them):
        where a call's function is being written and the name so far fits both those and
        others, their next tokens are favoured (4 times the bias: a small model's urge to
        repeat its last line is strong); at a new line after fewer calls than the request names
        functions, the closing fence loses the bias."""
        tracker = self._tracker
        called = [f for f in tracker.called if f in self._params]
        covered = set().union(*(self._covers[f] for f in called))
        left = {f for f, words in self.asked.items() if f not in called and words - covered}
        if not left:
            return
        name = tracker.name
        if name is not None and tracker.opener not in self._params:
            fits = [f for f in self._params if f.startswith(name) and f != name]
            favoured = [f[len(name) :] for f in fits if f in left]
            if favoured and len(favoured) < len(fits):
                logits[sorted(self._first_tokens(favoured))] += 4 * self.bias
                self.boosted += 1
        elif tracker.at_line_start and 0 < len(called) < len(self.asked):
            logits[self._fences()] -= self.bias
            self.boosted += 1

    def _unused_numbers(self, logits: np.ndarray, partial: str) -> None:
        """A keyword argument's number: the request's numbers that the program has not written
        yet (as many times as the request has them) and that go on from ``partial`` get the
        bias on their next token; a number it has used is the model's own choice again."""
        if not self._numbers:
            return
        left = self._number_counts.copy()
        left.subtract(_as_number(n) for n in self._tracker.numbers)
        rests = [
            n[len(partial) :] for n in self._numbers if left[_as_number(n)] > 0 and n.startswith(partial)
        ]
        tokens = self._first_tokens(r for r in rests if r)
        if tokens:
            logits[sorted(tokens)] += self.bias
            self.boosted += 1

    def _unasked_arguments(self, logits: np.ndarray) -> None:
        """In a call of an offered function whose required arguments are all given, a comma
        that would begin another loses the bias when no argument left is one the request asks
        about (a word of its name, or of one of its choices, is in the request): SmolLM2 adds
        ``unit="celsius"`` to a weather call otherwise, where the default is what was meant."""
        call = self._tracker.call
        if call is None or call[0] not in self._params:
            return
        name, given = call
        params = self._params[name]
        if any(p.required and p.py not in given for p in params):
            return
        left = [p for p in params if p.py not in given]
        if not left or any(p.py in self._asked_params[name] for p in left):
            return
        in_literal, in_code = self._commas()
        if self._tracker.value is not None:  # a string argument: its closing quote and a comma
            logits[in_literal] -= self.bias
        elif self._tracker.after_value:
            logits[in_code] -= self.bias
        else:
            return
        self.boosted += 1

    def _commas(self) -> tuple[list[int], list[int]]:
        """Tokens that close a string and add a comma; tokens that begin with a comma."""
        if self._comma_tokens is None:
            single = [t for t in map(self._tokenize, ('",', '", ', "',", "', ")) if len(t) == 1]
            starts = {t[0] for t in map(self._tokenize, (",", ", ")) if t}
            self._comma_tokens = (sorted({t[0] for t in single}), sorted(starts))
        return self._comma_tokens

    def _closers(self, quote: str) -> list[int]:
        """Tokens that close a string opened with ``quote``, alone or with what usually follows."""
        if quote not in self._closer_tokens:
            tokens = (self._tokenize(quote + after) for after in ("", ")", ",", ", ", "))", ")\n"))
            self._closer_tokens[quote] = sorted({t[0] for t in tokens if len(t) == 1})
        return self._closer_tokens[quote]

    def _fences(self) -> list[int]:
        if self._fence_tokens is None:
            self._fence_tokens = sorted({t[0] for t in map(self._tokenize, ("```", "``", "`")) if t})
        return self._fence_tokens

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


# a number as a request writes it: "200,000" is one (a program writes 200000), "$1M" is none of
# the program's (a magnitude follows), "3m" and "4C" are 3 and 4 (units)
_NUMBER = re.compile(r"(?<![\w.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d.,]\d|[KMBk]\b)")


# a quoted phrase: its text (the group that matched) between a quote after no letter and the same
# kind of quote before none ("the dish called 'chicken dish'", not the "'d like ... '" of "I'd
# like ... 'chicken", nor "hello' of "hello')
_QUOTED = re.compile(
    r"(?<!\w)(?:'(\S[^'\n]{0,78}?)(?<=\S)'|\"(\S[^\"\n]{0,78}?)(?<=\S)\""
    r"|\u2018(\S[^\u2019\n]{0,78}?)(?<=\S)\u2019|\u201c(\S[^\u201d\n]{0,78}?)(?<=\S)\u201d)(?!\w)"
)


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # a lone "-"
        return None


def _words(text: str) -> set[str]:
    """The words of a name or a text, lowercased, of three letters or more, a plural's final
    s dropped: ``area_circle``, ``areaCircle`` and "areas of circles" share area and circle."""
    out = set()
    for word in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", text):
        if len(word) >= 3:
            word = word.lower()
            out.add(word[:-1] if len(word) > 4 and word.endswith("s") else word)
    return out


def _param_words(param: Param) -> set[str]:
    """The words of a parameter's name and of its choices (an enum's values)."""
    choices = param.schema.get("enum") if isinstance(param.schema, dict) else None
    return _words(param.py) | _words(" ".join(str(c) for c in choices or ()))


def _asked(said: set[str], functions: Mapping[str, Sequence[Param]]) -> dict[str, set[str]]:
    """The functions the request names, with the words that name them: words of the function's
    name that no other offered function's name has ("circle" of area_circle beside
    area_rectangle) and that the request says (``said``). None when only one is offered."""
    if len(functions) < 2:
        return {}
    names = {f: _words(f) for f in functions}
    asked = {}
    for f, words in names.items():
        others = set().union(*(w for g, w in names.items() if g != f))
        naming = (words - others) & said
        if naming:
            asked[f] = naming
    return asked
