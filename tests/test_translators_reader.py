"""translators.reader: what may be shown or started while the model's output streams.

However the text is split, the prose shown is what ``parse_output`` calls the thought (or the
answer), code never is prose, and the last statements seen are the program ``parse_output``
finds."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from translators import Action, Answer, parse_output
from translators.errors import OutputError
from translators.reader import BlockClosed, OutputReader, Prose, Statements


def read(text: str, cuts: list[int] | None = None, **kwargs: bool) -> tuple[str, list[str], bool]:
    """(prose shown, statement prefixes seen, block closed) for ``text`` fed in pieces."""
    reader = OutputReader(**kwargs)
    points = sorted({0, len(text), *(c for c in cuts or range(len(text) + 1) if 0 <= c <= len(text))})
    events = []
    for start, end in itertools.pairwise(points):
        events += reader.feed(text[start:end])
    events += reader.close()
    assert reader.text == text
    prose = "".join(e.text for e in events if isinstance(e, Prose))
    statements = [e.source for e in events if isinstance(e, Statements)]
    return prose, statements, any(isinstance(e, BlockClosed) for e in events)


@pytest.mark.parametrize(
    ("text", "prose", "statements"),
    [
        pytest.param("Just an answer.", "Just an answer.", [], id="answer"),
        pytest.param("  \n Hello  \n\n", "Hello", [], id="answer-whitespace"),
        pytest.param("Answer: It is 18C.", "It is 18C.", [], id="answer-mark-dropped"),
        pytest.param("Answer:\nIt is 18C.", "It is 18C.", [], id="answer-mark-on-its-own-line"),
        pytest.param("Answers vary.", "Answers vary.", [], id="not-the-mark"),
        pytest.param("Ans", "Ans", [], id="mark-prefix-at-the-end-is-prose"),
        pytest.param("I said Answer: no.", "I said Answer: no.", [], id="mark-only-at-the-start"),
        pytest.param(
            "Checking.\n\n```python\nf(a=1)\ng(b=2)\n```",
            "Checking.",
            ["f(a=1)", "f(a=1)\ng(b=2)"],
            id="thought-and-two-calls",
        ),
        pytest.param("```python\nf(\n  a=1,\n)\n```", "", ["f(\n  a=1,\n)"], id="call-over-lines"),
        pytest.param(
            "```python\nfor c in x:\n    f(c)\n\nprint(1)\n```",
            "",
            ["for c in x:\n    f(c)", "for c in x:\n    f(c)\n\nprint(1)"],
            id="compound-completes-at-the-next-top-level-line",
        ),
        pytest.param(
            "```python\nif a:\n    f()\nelse:\n    g()\n```",
            "",
            ["if a:\n    f()\nelse:\n    g()"],
            id="else-continues-the-if",
        ),
        pytest.param("    ```python\n    f(a=1)\n    ```", "", ["f(a=1)"], id="indented-block"),
        pytest.param(
            "Use ```x``` like this:\n```json\n{}\n```\ndone",
            "Use ```x``` like this:\n```json\n{}\n```\ndone",
            [],
            id="other-fences-are-prose",
        ),
        pytest.param("A\n```py\nf()\n```\nignored after", "A", ["f()"], id="text-after-the-block-not-read"),
        pytest.param("A\n```\nf()\n```", "A", ["f()"], id="bare-fence-is-code"),
        pytest.param('```python\ns = """a\nb"""\n```', "", ['s = """a\nb"""'], id="multiline-string"),
    ],
)
def test_reader(text: str, prose: str, statements: list[str]) -> None:
    for cuts in (None, [len(text) // 2], []):
        assert read(text, cuts) == (prose, statements, bool(statements))


def test_prose_only_shows_everything_as_text() -> None:
    assert read("A\n```python\nf()\n```", prose_only=True)[0] == "A\n```python\nf()\n```"


def test_a_fence_prefix_is_held_back_only_while_ambiguous() -> None:
    reader = OutputReader()
    assert reader.feed("Thought.\n``") == [Prose("Thought.")]
    assert reader.feed("`py") == []  # may still open the block
    assert reader.feed("thon\nf()\n") == [Statements("f()")]
    reader = OutputReader()
    reader.feed("x\n``")
    assert reader.feed("a") == [Prose("\n``a")]  # not a fence after all: shown at once


LINES = st.sampled_from(
    [
        "f(a=1)",
        "x = g()",
        "for i in y:",
        "    f(i)",
        "print(x)",
        "",
        "# note",
        "h(\n  b=2)",
        "if x:",
        "    pass",
    ]
)
PROSE = st.text(alphabet=st.sampled_from(list("ab `\n.")), max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    mark=st.sampled_from(["", "Answer:", "Answer: ", " Answer:\n", "Ans"]),
    thought=PROSE,
    lines=st.lists(LINES, max_size=6),
    lang=st.sampled_from(["python", "py", "", "json"]),
    closed=st.booleans(),
    cuts=st.lists(st.integers(0, 200), max_size=12),
)
def test_reader_agrees_with_parse_output(
    mark: str, thought: str, lines: list[str], lang: str, closed: bool, cuts: list[int]
) -> None:
    text = f"{mark}{thought}\n```{lang}\n" + "\n".join(lines) + ("\n```" if closed else "")
    prose, statements, _ = read(text, cuts)
    try:
        parsed = parse_output(text)
    except OutputError:
        return  # the loop asks for a repair; what was shown was prose before a fence
    if isinstance(parsed, Answer):
        assert prose == parsed.text
        return
    assert isinstance(parsed, Action)
    assert prose == parsed.thought
    assert "```" not in prose or "```" in parsed.thought
    if statements:  # every statement seen is a prefix of the program
        assert parsed.source.startswith(statements[-1].strip("\n")) or not parsed.source.strip()


def test_statements_are_what_parse_output_makes_of_the_block() -> None:
    """A whitespace-only line inside a string is emptied by parse_output's dedent: the
    statements sent early must carry the same text, or the kernel's call would not match."""
    text = "```python\nsend(body='''Hi,\n    \nBye''')\nprint(1)\n```"
    _, statements, _ = read(text)
    parsed = parse_output(text)
    assert isinstance(parsed, Action) and statements[-1] == parsed.source


def test_a_huge_int_argument_is_still_json() -> None:
    from translators.actions import Call

    assert Call("f", {"cents": 2**70}).arguments_json == '{"cents":1180591620717411303424}'
