"""Copy bias: which string literals it sees, which tokens it favours, and the embedded model
copying a value from the request with it (SmolLM2-135M, in process)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import openai
import pytest

from proxy.app import create_app
from proxy.backends.copy_bias import CopyBias, StringTracker
from proxy.config import load_settings
from tests.servers import UvicornThread

BLOCK = "```python\n"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('Answer: f(a="x', None),  # not in the python block
        (BLOCK + 'f(a="Tel', "Tel"),
        (BLOCK + 'f(a="x", b=\'Av', "Av"),
        (BLOCK + 'f(a="x")\nprint("hi', "hi"),
        (BLOCK + 'x = f"ab', "ab"),  # a prefix between the opener and the quote
        (BLOCK + 'f(rb"ab', "ab"),
        (BLOCK + 'f("""ab', None),  # triple-quoted
        (BLOCK + 'f(a="" + """ab', None),
        (BLOCK + 'f(["a", "b', "b"),
        (BLOCK + 'f({"k": "v', "v"),
        (BLOCK + '# f(a="x', None),  # a comment
        (BLOCK + 'f(a=1)  # "x\nf(b="y', "y"),
        (BLOCK + 'f(a="x\\"y', 'x\\"y'),  # an escaped quote does not close it
        (BLOCK + 'f(a="x")\n```\nf("a', None),  # the block is closed
        (BLOCK + 'print(x + "a', None),  # not an argument of its own
        (BLOCK + 'f(a="x\nf(b="y', "y"),  # an unterminated literal ends with its line
    ],
)
def test_tracker_sees_argument_strings_only(text: str, value: str | None) -> None:
    for pieces in ([text], list(text)):  # whole, and a character at a time
        tracker = StringTracker()
        for piece in pieces:
            tracker.feed(piece)
        assert tracker.value == value


@pytest.mark.parametrize(
    ("text", "at_value"),
    [
        (BLOCK + "f(a=", True),
        (BLOCK + "f(x=1, a = ", True),
        (BLOCK + "print(", False),  # a call may follow as well as a string
        (BLOCK + "f(a, ", False),
        (BLOCK + "f(a", False),
        (BLOCK + 'f(a="x"', False),
        ("f(a=", False),
    ],
)
def test_tracker_knows_where_a_value_may_open(text: str, at_value: bool) -> None:
    tracker = StringTracker()
    tracker.feed(text)
    assert tracker.at_value is at_value


class Words:
    """A tokenizer for the pure logic: a token is up to three characters (its id the code of
    each, base 256), as BPE pieces are; its vocabulary is every such piece."""

    def __call__(self, text: str) -> list[int]:
        return [self.id(text[i : i + 3]) for i in range(0, len(text), 3)]

    @staticmethod
    def id(piece: str) -> int:
        out = 0
        for c in piece:
            out = out * 256 + ord(c)
        return out


def test_a_value_starts_with_a_word_of_the_source_and_copies_on() -> None:
    words = Words()
    bias = CopyBias("Weather in Tel Aviv, please", 3.0, words)
    # the first token of every word (never one that starts mid-word, or with a space)
    assert bias.next_tokens("") == {words.id(w) for w in ("Wea", "in ", "Tel", "Avi", "ple")}
    assert bias.next_tokens("Tel") == {words.id(" Av")}  # a capitalised word goes on
    assert bias.next_tokens("Tel Avi") == {words.id("v, ")}
    assert bias.next_tokens("Tel Aviv") == set()  # punctuation next: the model decides
    assert bias.next_tokens("el") == set()  # not from a word's start
    assert bias.next_tokens("Rome") == set()  # not in the source
    assert CopyBias("weather in paris", 3.0, words).next_tokens("weather") == set()  # lowercase next


def test_bias_is_added_in_place_inside_argument_strings_only() -> None:
    words = Words()
    bias = CopyBias("What's the weather in Hyderabad?", 2.5, words)
    logits = np.zeros(words.id("zzz") + 1, dtype=np.float32)
    bias.accept(b"Answer: ")
    bias.apply(logits)
    assert not logits.any()
    bias.accept(BLOCK.encode() + b"get_weather(city=")
    bias.apply(logits)  # a value may open: the lone quote is favoured over '""' and '",'
    assert logits[words.id('"')] == 2.5 and logits[words.id('""')] == 0
    logits[:] = 0
    bias.accept(b'"Hyd')
    bias.apply(logits)
    assert logits[words.id("era")] == 2.5 and np.count_nonzero(logits) == 1
    assert bias.boosted == 2
    bias.accept(b'erabad")\n```')
    logits[:] = 0
    bias.apply(logits)
    assert not logits.any()


def test_off_with_no_source_or_no_bias() -> None:
    words = Words()
    logits = np.zeros(words.id("zzz") + 1, dtype=np.float32)
    for bias in (CopyBias("", 3.0, words), CopyBias("Paris", 0.0, words)):
        bias.accept(b'```python\nf(city="')
        bias.apply(logits)
    assert not logits.any()


def test_multibyte_characters_split_across_tokens() -> None:
    bias = CopyBias("Qual a temperatura em Divinópolis, MG?", 3.0, Words())
    text = '```python\nf(city="Divinó'.encode()
    cut = len(text) - 1  # inside the two bytes of "ó"
    bias.accept(text[:cut])
    bias.accept(text[cut:])
    assert bias._tracker.value == "Divinó"
    assert bias.next_tokens("Divinó") == {Words.id("pol")}


@pytest.fixture(scope="module")
def embedded() -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    """The embedded model twice: with the default copy bias, and with copy_bias 0."""
    on = load_settings(None, env={})
    routes = [
        e.model_copy(update={"litellm_params": e.litellm_params.model_copy(update={"copy_bias": 0.0})})
        for e in on.model_list
    ]
    off = on.model_copy(update={"model_list": routes})
    with (
        UvicornThread(create_app(on)) as with_bias,
        UvicornThread(create_app(off)) as without,
        openai.OpenAI(base_url=with_bias.url + "/v1", api_key="x", max_retries=0) as a,
        openai.OpenAI(base_url=without.url + "/v1", api_key="x", max_retries=0) as b,
    ):
        yield a, b


WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        },
    }
]


def test_embedded_model_copies_the_value_from_the_request(
    embedded: tuple[openai.OpenAI, openai.OpenAI],
) -> None:
    """SmolLM2-135M greedy, asked about Hyderabad: with the copy bias it writes "Hyderabad"
    (the default); the same model and prompt without it writes something else."""
    locations = []
    for client in embedded:
        result = client.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": "What's weather in Hyderabad in Fahrenheit"}],
            tools=WEATHER,
            tool_choice="required",
            temperature=0,
        )
        calls = result.choices[0].message.tool_calls or []
        assert calls and calls[0].function.name == "get_current_weather"
        locations.append(json.loads(calls[0].function.arguments)["location"])
    assert locations[0] == "Hyderabad"
    assert locations[1] != "Hyderabad"
