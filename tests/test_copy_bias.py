"""Copy bias: which string literals it sees, which tokens it favours, and the embedded model
copying a value from the request with it (SmolLM2-135M, in process)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import openai
import pytest

from proxy.app import create_app
from proxy.backends.copy_bias import CopyBias
from proxy.backends.program_tracker import ProgramTracker
from proxy.config import load_settings
from tests.servers import UvicornThread
from translators.tools import Param

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
        tracker = ProgramTracker()
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
    tracker = ProgramTracker()
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


@pytest.mark.parametrize(
    ("text", "name", "line_start"),
    [
        (BLOCK + "print(", "", False),
        (BLOCK + "print(area_", "area_", False),
        (BLOCK + "x = area(", "", False),  # the caller tells a function's own argument list apart
        (BLOCK + "print(f(a=1", None, False),
        (BLOCK + 'print(f(a="area', None, False),  # a string, not a name
        (BLOCK + "print(f(a=1))\n", None, True),
        (BLOCK + "print(f(a=1))\n  ", None, True),
        (BLOCK + "print(f(a=1))  # done\n", None, True),
        (BLOCK + "print(f(a=1))\n```", None, False),  # the block is closed
        ("print(", None, False),  # not in the python block
    ],
)
def test_tracker_knows_where_a_function_name_goes(text: str, name: str | None, line_start: bool) -> None:
    for pieces in ([text], list(text)):
        tracker = ProgramTracker()
        for piece in pieces:
            tracker.feed(piece)
        assert (tracker.name, tracker.at_line_start) == (name, line_start)


def test_tracker_lists_the_calls_made() -> None:
    tracker = ProgramTracker()
    tracker.feed(BLOCK + 'print(area(r=f("x(y)")))\nprint(')
    assert tracker.called == ["print", "area", "f", "print"]
    assert tracker.opener == "print"


def _params(*names: str, optional: tuple[str, ...] = (), **choices: list[str]) -> tuple[Param, ...]:
    """Parameters as a toolset has them: ``names`` required, ``optional`` not; enums by name."""
    return tuple(
        Param(n, n, {"type": "string", **({"enum": choices[n]} if n in choices else {})}, n in names)
        for n in (*names, *optional)
    )


AREAS = {
    "volume_cylinder": _params("radius", "height"),
    "area_rectangle": _params("length", "breadth"),
    "area_circle": _params("radius"),
}


def test_asked_functions_are_named_by_a_word_only_they_have() -> None:
    words = Words()
    ask = "Find the area of a rectangle with length 7. Also the areas of circles with radius 5."
    bias = CopyBias(ask, 3.0, words, AREAS)
    # "area" is in two names, "cylinder" is not asked about; "circles" names area_circle
    assert bias.asked == {"area_rectangle": {"rectangle"}, "area_circle": {"circle"}}
    assert CopyBias(ask, 3.0, words, {"area_circle": _params("radius")}).asked == {}  # one function


def test_the_next_call_favours_a_named_function_not_yet_called() -> None:
    words = Words()
    ask = "Find the area of a rectangle with length 7 and breadth 3. Also the area of a circle with radius 5."
    bias = CopyBias(ask, 3.0, words, AREAS)
    logits = np.zeros(words.id("zzz") + 1, dtype=np.float32)
    bias.accept(BLOCK.encode() + b"print(")
    bias.apply(logits)  # the two named ones over the cylinder
    assert logits[words.id("are")] == 12.0 and np.count_nonzero(logits) == 1
    logits[:] = 0
    bias.accept(b"area_")
    bias.apply(logits)
    assert not logits.any()  # both named, neither called: nothing to tell apart (the model picks)
    bias.accept(b"rectangle(length=7, breadth=3))\n")
    bias.apply(logits)  # one call of two named: the block may not close yet
    fences = [words.id(f) for f in ("```", "``", "`")]
    assert (logits[fences] == -3.0).all() and np.count_nonzero(logits) == 3
    logits[:] = 0
    bias.accept(b"print(")
    bias.apply(logits)
    assert logits[words.id("are")] == 12.0 and np.count_nonzero(logits) == 1  # area_circle's start
    logits[:] = 0
    bias.accept(b"area_")
    bias.apply(logits)  # area_rectangle fits too: the circle's next piece
    assert logits[words.id("cir")] == 12.0 and np.count_nonzero(logits) == 1
    logits[:] = 0
    bias.accept(b"circle(")
    bias.apply(logits)  # inside its own arguments: no names favoured
    assert not logits.any()
    bias.accept(b"radius=5))\n")
    bias.apply(logits)  # both called: the model may close the block
    assert not logits.any()


def test_a_word_a_call_answered_asks_for_nothing_more() -> None:
    """ "initial speed" names final_speed, but it is a parameter of the displacement call."""
    words = Words()
    functions = {
        "calculate_displacement": _params("initial_speed", "acceleration", "time"),
        "calculate_final_speed": _params("initial_speed", "acceleration", "time"),
    }
    ask = "Calculate the displacement of a car at an initial speed of 20 m/s for 5 seconds."
    bias = CopyBias(ask, 3.0, words, functions)
    assert set(bias.asked) == {"calculate_displacement", "calculate_final_speed"}
    logits = np.zeros(words.id("zzz") + 1, dtype=np.float32)
    bias.accept(BLOCK.encode() + b"print(calculate_displacement(initial_speed=20, acceleration=0, time=5))\n")
    bias.apply(logits)
    assert not logits.any()


def test_a_value_copies_on_over_one_comma() -> None:
    words = Words()
    bias = CopyBias("Im at Riga, Latvia, Can you tell me the temperature?", 3.0, words)
    assert bias.next_tokens("Riga") == {words.id(", L")}  # "Riga, Latvia"
    assert bias.next_tokens("Riga, Latvia") == set()  # not on into ", Can"


def test_a_quoted_phrase_copies_on_to_its_closing_quote() -> None:
    words = Words()
    said = "I'd like the dish called 'chicken dish' made 'extra spicy', please. It's 'hot' now"
    bias = CopyBias(said, 3.0, words)
    assert bias.next_tokens("chicken") == {words.id(" di")}  # lowercase, but inside the quotes
    assert bias.next_tokens("chicken dish") == set()  # the closing quote is the model's
    assert bias.next_tokens("extra") == {words.id(" sp")}
    assert bias.next_tokens("like") == set()  # "'d like ... '" is no quoted phrase
    assert bias.next_tokens("It") == set()  # nor "It's 'hot'"
    # two quotes of a phrase that runs on to the end: never past the source
    assert CopyBias('say "hello world', 3.0, words).next_tokens("hello") == set()
    bias.accept(f'{BLOCK}f(food="chicken'.encode())
    logits = np.zeros(words.id("zzz") + 1, dtype=np.float32)
    bias.apply(logits)
    assert logits[words.id(" di")] == 6.0  # twice the bias: a quoted phrase is a name


def test_odd_sources_cost_little_and_break_nothing() -> None:
    words = Words()
    logits = np.zeros(words.id("zzz") + 1, dtype=np.float32)
    bias = CopyBias("?? !!", 3.0, words)  # no word at all: nothing to start a value with
    bias.accept(f'{BLOCK}f(x="'.encode())
    bias.apply(logits)
    assert not logits[words.id('"')]
    # a value a long tool result repeats: the places looked at are the latest ones
    repeated = CopyBias("alpha, " * 300 + "and the star alpha Centauri", 3.0, words)
    assert repeated.next_tokens("alpha") == {words.id(" Ce")}
    # quotes of two kinds make no phrase
    assert CopyBias("""say "hello' now""", 3.0, words)._quoted_texts == set()


def _closing_boost(source: str, written: str) -> dict[str, float]:
    """The closing tokens' bias once ``written`` is the value so far of a double-quoted argument."""
    words = Words()
    bias = CopyBias(source, 3.0, words)
    bias.accept(f'{BLOCK}f(city="{written}'.encode())
    logits = np.zeros(words.id("zzz") + 1, dtype=np.float32)
    bias.apply(logits)
    return {t: float(logits[words.id(t)]) for t in ('"', '")', '",', "'", "')")}


def test_a_whole_name_or_quoted_phrase_favours_its_closing_quote() -> None:
    said = "I'm at Bengaluru. The weather in Chennai, Tamil Nadu in fahrenheit?"
    assert _closing_boost(said, "Chennai, Tamil Nadu") == {'"': 3, '")': 3, '",': 3, "'": 0, "')": 0}
    assert set(_closing_boost(said, "Chennai, Tamil Nadu, 2022").values()) == {0}  # run on already
    assert set(_closing_boost(said, "Chennai, Tamil").values()) == {0}  # the copy goes on
    assert set(_closing_boost(said, "Chenn").values()) == {0}  # not a word's end
    assert set(_closing_boost(said, "Madras").values()) == {0}  # not the request's
    # a lowercase phrase ends where the model says; a quoted one at its quote
    assert set(_closing_boost("verbatim: no onions, extra cheese", "no onions").values()) == {0}
    assert _closing_boost("the dish called 'chicken dish'", "chicken dish")['")'] == 3
    assert set(_closing_boost("the dish called 'chicken dish'", "chicken").values()) == {0}


def _function(name: str, description: str, **params: str) -> dict[str, object]:
    properties = {p: {"type": "number", "description": d} for p, d in params.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(params)},
        },
    }


def test_embedded_model_calls_each_function_the_request_names(
    embedded: tuple[openai.OpenAI, openai.OpenAI],
) -> None:
    """SmolLM2-135M greedy, asked for a rectangle's area and a circle's (BFCL parallel_multiple_1):
    with the copy bias it calls area_rectangle and then area_circle; without, it calls
    area_rectangle twice."""
    tools = [  # as BFCL has them
        _function(
            "volume_cylinder.calculate",
            "Calculate the volume of a cylinder given the radius and the height.",
            radius="The radius of the cylinder.",
            height="The height of the cylinder.",
        ),
        _function(
            "area_rectangle.calculate",
            "Calculate the area of a rectangle given the length and breadth.",
            length="The length of the rectangle.",
            breadth="The breadth of the rectangle.",
        ),
        _function(
            "area_circle.calculate",
            "Calculate the area of a circle given the radius.",
            radius="The radius of the circle.",
        ),
    ]
    ask = "Find the area of a rectangle with length 7 and breadth 3. Also, calculate the area of a circle with radius 5."
    names = []
    for client in embedded:
        result = client.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": ask}],
            tools=tools,  # type: ignore[arg-type]
            tool_choice="auto",
            temperature=0,
        )
        names.append([c.function.name for c in result.choices[0].message.tool_calls or []])
    assert names[0] == ["area_rectangle.calculate", "area_circle.calculate"]
    assert names[1] != names[0]


@pytest.mark.parametrize(
    ("text", "number", "written"),
    [
        (BLOCK + "f(a=", None, []),
        (BLOCK + "f(a=1", "1", []),
        (BLOCK + "f(a=12.", "12.", []),
        (BLOCK + "f(a=-2", "-2", []),
        (BLOCK + "f(a=12, b=", None, ["12"]),
        (BLOCK + "f(a=[3, 4", None, ["3"]),  # an item, not a value of its own
        (BLOCK + 'f(a="x1", b=2', "2", []),  # digits in a string are not numbers
        (BLOCK + "f(x2=5", "5", []),  # nor in a name
    ],
)
def test_tracker_follows_numbers(text: str, number: str | None, written: list[str]) -> None:
    tracker = ProgramTracker()
    tracker.feed(text)
    assert (tracker.number, tracker.numbers) == (number, written)


def test_a_number_value_favours_the_requests_numbers_not_yet_used() -> None:
    words = Words()
    bias = CopyBias("The GCD of 96 and 128, and the LCM of 15 and -25.", 3.0, words, AREAS)
    logits = np.zeros(words.id("zzz") + 1, dtype=np.float32)
    bias.accept(BLOCK.encode() + b"print(gcd(a=")
    bias.apply(logits)  # the lone quote and every number's first token
    assert {int(i) for i in np.flatnonzero(logits)} == {
        words.id(x) for x in ('"', "'", "96", "128", "15", "-25")
    }
    logits[:] = 0
    bias.accept(b"96, b=")
    bias.apply(logits)
    assert {int(i) for i in np.flatnonzero(logits)} == {words.id(x) for x in ('"', "'", "128", "15", "-25")}
    logits[:] = 0
    bias.accept(b"1")
    bias.apply(logits)  # on from "1": 128's and 15's next pieces
    assert {int(i) for i in np.flatnonzero(logits)} == {words.id("28"), words.id("5")}
    logits[:] = 0
    bias.accept(b"28))\nprint(lcm(a=15, b=-")
    bias.apply(logits)
    assert {int(i) for i in np.flatnonzero(logits)} == {words.id("25")}


@pytest.mark.parametrize(
    ("text", "call"),
    [
        (BLOCK + "print(", None),  # print's own arguments are not a call the caller knows
        (BLOCK + "print(weather(", ("weather", [])),
        (BLOCK + 'print(weather(city="Rome', ("weather", ["city"])),
        (BLOCK + 'print(weather(city="Rome", days=[1, 2', None),  # inside a list argument
        (BLOCK + 'print(weather(city="Rome", days=[1, 2], unit=', ("weather", ["city", "days", "unit"])),
        (BLOCK + 'print(weather(city="Rome"))\n', None),
    ],
)
def test_tracker_knows_the_call_being_written(text: str, call: tuple[str, list[str]] | None) -> None:
    tracker = ProgramTracker()
    tracker.feed(text)
    got = tracker.call
    assert (got if got is None or got[0] != "print" else None) == call


def test_no_comma_for_an_argument_the_request_does_not_ask_about() -> None:
    words = Words()
    weather = {"weather": _params("city", optional=("unit",), unit=["celsius", "fahrenheit"])}
    logits = np.zeros(words.id("zzz") + 1, dtype=np.float32)
    bias = CopyBias("The weather in Naples, Florida?", 3.0, words, weather)
    bias.accept(BLOCK.encode() + b'print(weather(city="Nap')
    bias.apply(logits)  # closing the string with a comma loses the bias; the copy goes on
    assert logits[words.id('",')] == -3.0 and logits[words.id("les")] == 3.0
    logits[:] = 0
    bias.accept(b'les, Florida", ')
    bias.apply(logits)  # once written, the comma is the model's: nothing more here
    assert not logits.any()
    asked = CopyBias("The weather in Naples in fahrenheit?", 3.0, words, weather)
    asked.accept(BLOCK.encode() + b'print(weather(city="Nap')
    asked.apply(logits)  # the request names a unit: the model may go on to it
    assert logits[words.id('",')] == 0
    logits[:] = 0
    number = CopyBias("Weather for 3 days", 3.0, words, {"weather": _params("days", optional=("unit",))})
    number.accept(BLOCK.encode() + b"print(weather(days=3")
    number.apply(logits)  # after a number: a token that begins with a comma
    assert logits[words.id(",")] == -3.0
    logits[:] = 0
    required = CopyBias("Weather for 3 days", 3.0, words, {"weather": _params("days", "city")})
    required.accept(BLOCK.encode() + b"print(weather(days=3")
    required.apply(logits)  # a required argument is still to come
    assert logits[words.id(",")] == 0


def test_numbers_as_a_program_writes_them() -> None:
    """ "$200,000" is 200000; "$1M" is no number a program would write; "3m" is 3."""
    words = Words()
    bias = CopyBias("A $200,000 house, $1M in 2019, 3m away.", 3.0, words)
    logits = np.zeros(words.id("zzz") + 1, dtype=np.float32)
    bias.accept(BLOCK.encode() + b"f(cost=")
    bias.apply(logits)
    assert {int(i) for i in np.flatnonzero(logits)} == {words.id(x) for x in ('"', "'", "200", "201", "3")}
    logits[:] = 0
    bias.accept(b"200")
    bias.apply(logits)
    assert {int(i) for i in np.flatnonzero(logits)} == {words.id("000")}


def test_embedded_model_keeps_a_default_it_was_not_asked_about(
    embedded: tuple[openai.OpenAI, openai.OpenAI],
) -> None:
    """SmolLM2-135M greedy, asked for the weather in Naples, Florida (BFCL live_simple_11),
    offered a unit that defaults to fahrenheit: with the copy bias it leaves the unit out;
    without, it asks for celsius."""
    weather = {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Retrieves the current weather conditions for a specified city and state. "
            "If using state, then use short form like CA.",
            "parameters": {
                "type": "object",
                "required": ["location"],
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The location for which to get the weather, in the format of "
                        "'City, State', such as 'San Francisco, CA' if State for the city exists. 'City, "
                        "Country' if State for the city doesn't exist. If using state, then use short "
                        "form like CA.",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature for the weather report.",
                        "enum": ["celsius", "fahrenheit"],
                        "default": "fahrenheit",
                    },
                },
            },
        },
    }
    arguments = []
    for client in embedded:
        result = client.chat.completions.create(
            model="local",
            messages=[
                {
                    "role": "user",
                    "content": "Could you tell me the current weather conditions in Naples, Florida?",
                }
            ],
            tools=[weather],  # type: ignore[list-item]
            tool_choice="auto",
            temperature=0,
        )
        calls = result.choices[0].message.tool_calls or []
        assert len(calls) == 1
        arguments.append(json.loads(calls[0].function.arguments))
    assert arguments[0] == {"location": "Naples, Florida"}
    assert "unit" in arguments[1]
