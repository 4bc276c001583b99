"""Code -> tool_calls, model output -> Answer/Action, history -> code-form prompt."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.bfcl import CATEGORIES, cases, expected_calls, tools_of
from translators.actions import Call, KernelProgram, StaticCalls, classify, render_call
from translators.errors import CallError, OutputError
from translators.output import Action, Answer, closing_fence, parse_output
from translators.prompt import EXAMPLE, action_preamble, build_prompt
from translators.tools import Toolset

TOOLS = Toolset.from_openai(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"type": "string", "enum": ["c", "f"]},
                        "days": {"type": "integer"},
                    },
                    "required": ["city"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "spotify.play",
                "parameters": {
                    "type": "object",
                    "properties": {"artist": {"type": "string"}, "class": {"type": "number"}},
                    "required": ["artist"],
                },
            },
        },
    ]
)


@pytest.mark.parametrize(
    ("source", "calls"),
    [
        pytest.param('get_weather(city="Paris")', [("get_weather", {"city": "Paris"})], id="one"),
        pytest.param(
            'a = get_weather(city="Paris", unit="c")\nprint(get_weather("Rome", "f", 3))',
            [
                ("get_weather", {"city": "Paris", "unit": "c"}),
                ("get_weather", {"city": "Rome", "unit": "f", "days": 3}),
            ],
            id="assigned-printed-positional",
        ),
        pytest.param(
            'spotify_play(artist="Maroon 5", class_=-1.5)\nspotify.play(artist="X")',
            [("spotify.play", {"artist": "Maroon 5", "class": -1.5}), ("spotify.play", {"artist": "X"})],
            id="renamed-tool-and-param-dotted-name",
        ),
    ],
)
def test_static_programs(source: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    program = classify(source, TOOLS)
    assert isinstance(program, StaticCalls)
    assert [(c.name, c.arguments) for c in program.calls] == calls
    assert json.loads(program.calls[0].arguments_json) == calls[0][1]


@pytest.mark.parametrize(
    "source",
    [
        pytest.param('for c in ["a", "b"]:\n    print(get_weather(city=c))', id="loop"),
        pytest.param('t = get_weather(city="Paris")\nget_weather(city=t)', id="data-flow"),
        pytest.param('x = len("abc")\nget_weather(city="Paris")', id="other-call"),
        pytest.param('get_weather(city="P" + "aris")', id="expression-argument"),
        pytest.param('a = get_weather(city="x")\na = get_weather(city="y")', id="rebinding"),
    ],
)
def test_kernel_programs(source: str) -> None:
    program = classify(source, TOOLS)
    assert isinstance(program, KernelProgram)
    assert program.tools_called == ("get_weather",)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        pytest.param(
            'get_weather(town="Paris")',
            "unexpected keyword argument 'town'; its parameters are: city, unit, days",
            id="unknown-kw",
        ),
        pytest.param("get_weather()", "missing required argument(s): city", id="missing"),
        pytest.param("get_weather(city=3)", "get_weather(city=...) must be string, got an int 3", id="type"),
        pytest.param('get_weather(city="P", unit="k")', "must be one of 'c', 'f'; got 'k'", id="enum"),
        pytest.param(
            'get_weather(city="P", days=True)', "must be integer, got a bool True", id="bool-is-not-int"
        ),
        pytest.param(
            'get_weather("a", "c", 1, 2)',
            "takes 3 argument(s) (city, unit, days) but 4 were given",
            id="too-many",
        ),
        pytest.param('get_weather("a", city="b")', "multiple values for argument 'city'", id="twice"),
        pytest.param(
            'for c in "ab":\n    get_weather(town=c)\nget_weather(city=5)',
            "must be string",
            id="checked-in-kernel-programs",
        ),
    ],
)
def test_call_errors_are_precise(source: str, message: str) -> None:
    with pytest.raises(CallError) as info:
        classify(source, TOOLS)
    assert message in info.value.message


@pytest.mark.parametrize(
    ("source", "where"),
    [
        pytest.param(
            "def get_weather(city):\n    return 1\nget_weather('x')", "get_weather (line 1)", id="def"
        ),
        pytest.param(
            "get_weather = lambda c: 1\nprint(get_weather('x'))", "get_weather (line 1)", id="lambda"
        ),
        pytest.param("import json as get_weather", "get_weather (line 1)", id="import-as"),
        pytest.param("from os import path as spotify_play", "spotify_play (line 1)", id="from-import-as"),
        pytest.param(
            "for get_weather in [print]:\n    get_weather(city='x')", "get_weather (line 1)", id="for-target"
        ),
        pytest.param(
            "def f():\n    get_weather = print\n    get_weather(city='x')\nf()",
            "get_weather (line 2)",
            id="local-in-a-function",
        ),
        pytest.param(
            "def f(get_weather):\n    return get_weather(city='x')", "get_weather (line 1)", id="param"
        ),
        pytest.param("class get_weather:\n    pass", "get_weather (line 1)", id="class"),
        pytest.param("[get_weather for get_weather in 'ab']", "get_weather (line 1)", id="comprehension"),
        pytest.param("if (get_weather := len):\n    pass", "get_weather (line 1)", id="walrus"),
        pytest.param("with open('f') as get_weather:\n    pass", "get_weather (line 1)", id="with-as"),
        pytest.param(
            "try:\n    pass\nexcept OSError as get_weather:\n    pass", "get_weather (line 3)", id="except-as"
        ),
        pytest.param("del get_weather", "get_weather (line 1)", id="del"),
        pytest.param(
            "x = 1\nspotify_play = 2\nget_weather = 3",
            "spotify_play (line 2), get_weather (line 3)",
            id="two-names",
        ),
    ],
)
def test_rebinding_a_tool_name_is_refused(source: str, where: str) -> None:
    """Its calls would reach the program's own function, not the client's tool."""
    for check in (True, False):
        with pytest.raises(OutputError) as info:
            classify(source, TOOLS, check=check)
        assert f"This program redefines {where}: " in info.value.message
        assert "must not be redefined" in info.value.message


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("weather = get_weather(city='x')\nprint(weather)", id="another-name"),
        pytest.param("def get_weather_twice(c):\n    return [get_weather(city=c)] * 2", id="longer-name"),
        pytest.param("class X:\n    pass\nx = X()\nx.get_weather = 1\nprint(x.get_weather)", id="attribute"),
        pytest.param("f = get_weather\nf(city='x')", id="alias-of-the-tool"),
        pytest.param("d = {'get_weather': 1}\nd['get_weather'] = 2", id="string-key"),
        pytest.param("print(dict(get_weather=1))", id="keyword-argument"),
    ],
)
def test_other_names_are_not_rebinding(source: str) -> None:
    classify(source, TOOLS)


@pytest.mark.parametrize(
    "stub",
    [
        'def get_weather(city: str, unit: str = "c") -> dict:\n    """Current temperature."""\n',
        "def get_weather(city):\n    ...\n",
        "async def get_weather(city):\n    pass\n",
    ],
)
def test_a_restated_stub_is_left_out(stub: str) -> None:
    """Small models write out the stub they were shown before calling it: a def of a tool's
    name with no body of its own is left out (kept, the call would go to it and do nothing)."""
    program = classify(stub + '\nget_weather("Oslo")\n', TOOLS)
    assert isinstance(program, StaticCalls) and program.calls == (Call("get_weather", {"city": "Oslo"}),)
    assert "def " not in program.source and 'get_weather("Oslo")' in program.source
    looped = classify(stub + "for c in ['a', 'b']:\n    get_weather(c)\n", TOOLS)
    assert isinstance(looped, KernelProgram) and "def " not in looped.source
    with pytest.raises(OutputError, match="only restates"):
        classify(stub, TOOLS)
    with pytest.raises(OutputError, match="redefines get_weather"):  # a body of its own: refused
        classify(stub + "    return {}\nget_weather('Oslo')\n", TOOLS)


def test_syntax_errors_point_at_the_line() -> None:
    with pytest.raises(OutputError, match="line 2"):
        classify('get_weather(city="a")\nget_weather(city="b"', TOOLS)


@pytest.mark.parametrize("category", CATEGORIES)
def test_bfcl_round_trip(category: str) -> None:
    """Every ground-truth call, rendered as code and parsed back, is the same call.

    Parsing skips the schema checks: a few BFCL answers break their own schemas
    (a string "data['sales']" for an array), which test_bfcl_answers_mostly_typecheck counts."""
    entries = cases(category)
    mismatches = []
    for entry, answer in entries:
        toolset = Toolset.from_openai(tools_of(entry))
        expected = expected_calls(entry, answer)
        tools = [toolset.by_name(name) for name, _ in expected]
        assert all(tools), entry["id"]
        source = "\n".join(
            render_call(tool, args) for tool, (_, args) in zip(tools, expected, strict=True) if tool
        )
        program = classify(source, toolset, check=False)
        got = [(c.name, c.arguments) for c in program.calls] if isinstance(program, StaticCalls) else None
        if got != expected:
            mismatches.append((entry["id"], source, got))
    assert mismatches == [], mismatches[:3]
    assert len(entries) >= 200


def test_bfcl_answers_mostly_typecheck() -> None:
    """With checks on, only the few answers that break their own schema are refused."""
    refused = []
    total = 0
    for category in CATEGORIES:
        for entry, answer in cases(category):
            toolset = Toolset.from_openai(tools_of(entry))
            for name, args in expected_calls(entry, answer):
                tool = toolset.by_name(name)
                assert tool is not None
                total += 1
                try:
                    classify(render_call(tool, args), toolset)
                except CallError:
                    refused.append(entry["id"])
    assert total > 1000
    assert len(refused) <= total // 100, refused


# --- model output ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Paris is sunny.", Answer("Paris is sunny."), id="answer"),
        pytest.param("Answer: Paris is sunny.", Answer("Paris is sunny."), id="answer-mark-dropped"),
        pytest.param(" Answer:\nsunny", Answer("sunny"), id="answer-mark-own-line"),
        pytest.param("Answered.", Answer("Answered."), id="only-the-whole-mark"),
        pytest.param(
            'Let me check.\n```python\nget_weather(city="Paris")\n```\n',
            Action('get_weather(city="Paris")', "Let me check."),
            id="action",
        ),
        pytest.param(
            "```py\n  x = 1\n  print(x)\n```", Action("x = 1\nprint(x)", ""), id="py-fence-dedented"
        ),
        pytest.param(
            'Here is JSON:\n```json\n{"a": 1}\n```',
            Answer('Here is JSON:\n```json\n{"a": 1}\n```'),
            id="json-fence-is-answer",
        ),
    ],
)
def test_parse_output(text: str, expected: Answer | Action) -> None:
    assert parse_output(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("```python\nget_weather(city='a')\n", "not closed", id="unclosed"),
        pytest.param("```python\na()\n```\nand\n```python\nb()\n```", "2 python blocks", id="two-blocks"),
        pytest.param("```python\n\n```", "empty", id="empty"),
    ],
)
def test_parse_output_errors(text: str, message: str) -> None:
    with pytest.raises(OutputError, match=message):
        parse_output(text)


@pytest.mark.parametrize(
    ("text", "fence"),
    [
        ("```python\nf(1)\n", "```"),
        ("Let me.\n```py\nf(1)", "\n```"),
        ("```python\nf(1)\n```", ""),  # closed already
        ("Just an answer.", ""),
        ("```json\n{", ""),  # not a python block: an answer's sample, not ours to close
    ],
)
def test_closing_fence(text: str, fence: str) -> None:
    assert closing_fence(text) == fence
    if fence:
        assert isinstance(parse_output(text + fence), Action)


# --- history ---------------------------------------------------------------------------


def test_history_becomes_code_form() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "spotify.play", "arguments": '{"artist": "X", "class": 2}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "playing"}]},
        {"role": "tool", "tool_call_id": "unknown", "content": "?"},
    ]
    prompt = build_prompt(messages, TOOLS)
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user", "assistant", "user"]
    system = prompt[0]["content"]
    # how to act (the same for every request) first, then the client's system message, then the stubs
    assert system.startswith(action_preamble("auto") + "\n\nBe brief.\n\n")
    assert system.index("Be brief.") < system.index("def get_weather")
    assert prompt[1:3] == EXAMPLE  # the worked example, before the conversation
    prompt = [prompt[0], *prompt[3:]]
    assert (
        "def get_weather(city: str, unit: Literal['c', 'f'] | None = None, days: int | None = None): ..."
        in system
    )
    assert "def spotify_play(artist: str, class_: float | None = None): ..." in system
    assert "from typing" not in system  # the prompt leaves the import out
    assert prompt[1]["content"] == "Weather in Paris and Rome?"
    assert (
        prompt[2]["content"]
        == "```python\nget_weather(city='Paris')\nspotify_play(artist='X', class_=2)\n```"
    )
    assert prompt[3]["content"] == (
        "Observation:\nget_weather(city='Paris') -> 18C\n"
        "spotify_play(artist='X', class_=2) -> playing\nresult of unknown -> ?"
    )


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "needle"),
    [
        pytest.param("none", True, "Do not write code", id="none"),
        pytest.param("required", True, "must be a ```python block that calls at least one", id="required"),
        pytest.param(
            {"type": "function", "function": {"name": "spotify.play"}}, True, "calls spotify_play", id="named"
        ),
        pytest.param("auto", False, "one function per reply", id="not-parallel"),
    ],
)
def test_tool_choice_in_prompt(tool_choice: Any, parallel: bool, needle: str) -> None:
    system = build_prompt([{"role": "user", "content": "x"}], TOOLS, tool_choice, parallel)[0]["content"]
    assert needle in system
    assert ("def get_weather" in system) == (tool_choice != "none")


def test_bad_history_arguments_do_not_crash() -> None:
    messages: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "tool_calls": [{"id": "c", "function": {"name": "get_weather", "arguments": "{not json"}}],
        },
        {
            "role": "assistant",
            "tool_calls": [{"id": "d", "function": {"name": "gone.tool", "arguments": '{"a-b": 1, "x": 2}'}}],
        },
    ]
    prompt = build_prompt(messages, TOOLS)
    assert "get_weather()  # arguments were not valid JSON" in prompt[3]["content"]
    assert "gone_tool(x=2)" in prompt[4]["content"]


def test_earlier_answers_carry_the_answer_mark() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "weather?"},
    ]
    prompt = build_prompt(messages, TOOLS)
    assert prompt[-2] == {"role": "assistant", "content": "Answer: Hello!"}
    assert "reply with Answer: and then your answer" in prompt[0]["content"]
    # tool_choice none: plain text asked for, no example, no mark
    plain = build_prompt(messages, TOOLS, "none")
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0]["content"] == "Answer in plain text. Do not write code in this reply."
    assert plain[2]["content"] == "Hello!"


def test_call_json_round_trip() -> None:
    call = Call("spotify.play", {"artist": 'é "q"', "class": 1.0})
    assert json.loads(call.arguments_json) == call.arguments
