"""proxy.backends.sse: upstream chat streams read as text deltas, fed in any pieces."""

from __future__ import annotations

import pytest

from proxy.backends.sse import ChatStreamParser, completion_text
from proxy.errors import UpstreamError
from tests.upstream import load_recording, text_stream


def read(raw: bytes, step: int) -> tuple[str, dict[str, int]]:
    parser = ChatStreamParser("m")
    text = ""
    for i in range(0, len(raw), step):
        text += parser.feed(raw[i : i + step])
    text += parser.finish()
    return text, parser.usage


@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_recorded_openai_stream(step: int) -> None:
    raw = b"".join(load_recording("single_tool.c6aa7e397b71.sse"))
    text, usage = read(raw, step)
    assert text == "" and usage["total_tokens"] > 0  # a tool-call stream has no content, but usage
    raw = b"".join(text_stream("m", ["Hel", "lo", " there"]))
    assert read(raw, step) == (
        "Hello there",
        {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    )
    parser = ChatStreamParser("m")
    parser.feed(raw)
    assert parser.finish_reason == "stop"  # said in the last content chunk's successor


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        pytest.param(b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n', "a", id="crlf"),
        pytest.param(b': keep-alive\n\ndata: {"choices":[{"delta":{"content":"a"}}]}\n\n', "a", id="comment"),
        pytest.param(b'event: x\ndata: {"choices":[{"delta":{"content":"a"}}]}\n\n', "a", id="event-name"),
        pytest.param(b'data: {"choices":[{"delta":{"content":"a"}}]}', "a", id="no-final-blank-line"),
        pytest.param(b'data: {"choices":[{"index":1,"delta":{"content":"b"}}]}\n\n', "", id="other-choice"),
        pytest.param(b"data: [DONE]\n\ndata: {}\n\n", "", id="nothing-after-done"),
    ],
)
def test_tolerated(raw: bytes, text: str) -> None:
    assert read(raw, 3)[0] == text


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"data: {not json\n\n", id="not-json"),
        pytest.param(b'data: {"error": {"message": "overloaded"}}\n\n', id="error-event"),
        pytest.param(b"data: [1, 2]\n\n", id="not-an-object"),
    ],
)
def test_broken_streams_are_upstream_errors(raw: bytes) -> None:
    with pytest.raises(UpstreamError):
        read(raw, 5)


def test_a_server_that_ignores_stream_answers_one_body() -> None:
    body = b'{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    assert completion_text(body, "m") == ("hi", {"prompt_tokens": 1, "completion_tokens": 1}, None)
    ended = b'{"choices":[{"message":{"content":"hi"},"finish_reason":"length"}]}'
    assert completion_text(ended, "m") == ("hi", {}, "length")
    for bad in (b"{", b"[]", b'{"error": "nope"}'):
        with pytest.raises(UpstreamError):
            completion_text(bad, "m")


def test_a_crlf_split_between_two_reads_is_one_frame_boundary() -> None:
    raw = b"".join(text_stream("m", ["Hel", "lo"])).replace(b"\n", b"\r\n")
    for cut in range(len(raw)):
        parser = ChatStreamParser("m")
        assert parser.feed(raw[:cut]) + parser.feed(raw[cut:]) + parser.finish() == "Hello", cut
