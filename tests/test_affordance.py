"""Affordance: with more tools than ``affordance.max_stubs``, the prompt shows the relevant
stubs (BM25 over names, descriptions and parameters), always the named and the used ones,
and ``search_tools`` in the kernel finds the rest; calls to tools not shown stay valid.

Recall is measured on BFCL's ``multiple`` category with every function set concatenated;
the proxy part runs through uvicorn and the openai SDK with real kernels."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.bfcl import cases, tools_of
from tests.conftest import ProxyFactory, upstream_models
from tests.servers import UvicornThread
from tests.test_actions import program
from tests.upstream import ScriptedUpstream
from translators import Toolset, render_stubs
from translators.affordance import ToolIndex, tokens


def many_tools() -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Every function of BFCL multiple (first definition of a name wins, at most 300), and
    (question, the function its answer calls) for the cases whose function is among them."""
    tools: dict[str, dict[str, Any]] = {}
    questions = []
    for entry, answer in cases("multiple"):
        for tool in tools_of(entry):
            if len(tools) < 300:
                tools.setdefault(tool["function"]["name"], tool)
        (name,) = answer["ground_truth"][0]
        text = " ".join(m["content"] for turn in entry["question"] for m in turn if m["role"] == "user")
        questions.append((text, name))
    return list(tools.values()), [(q, n) for q, n in questions if n in tools]


def test_the_right_function_is_shown_for_95_percent_of_questions_among_300() -> None:
    tools, questions = many_tools()
    assert len(tools) == 300 and len(questions) >= 140
    toolset = Toolset.from_openai(tools)
    index = ToolIndex(toolset)
    shown_for = [index.shown(q, 23) for q, _ in questions]
    hits = sum(
        name in {t.name for t in shown.tools} for shown, (_, name) in zip(shown_for, questions, strict=True)
    )
    assert hits / len(questions) >= 0.95, f"{hits}/{len(questions)}"
    full = len(render_stubs(toolset, header=False))
    mean = sum(len(render_stubs(s, header=False)) for s in shown_for) / len(shown_for)
    assert mean / full <= 0.2, (mean, full)  # the stubs shrink by more than 80%


def test_kept_tools_are_always_shown_and_limits_hold() -> None:
    tools, _ = many_tools()
    toolset = Toolset.from_openai(tools)
    index = ToolIndex(toolset)
    last = toolset.tools[-1].name
    shown = index.shown("the weather in Paris", 5, keep=[last, "no_such_tool"])
    names = [t.name for t in shown.tools]
    assert len(names) == 5 and last in names and shown.digest == toolset.digest
    assert [t.name for t in index.rank("", 3)] == [t.name for t in toolset.tools[:3]]  # no words: in order
    assert tokens("getPetById send_email HTTPServer the a") == [
        "pet",
        "id",
        "send",
        "email",
        "http",
        "server",
    ]


def numbered_tools() -> list[dict[str, Any]]:
    def tool(name: str, description: str) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": name,
                "description": description,
                "parameters": {
                    "type": "object",
                    "properties": {"text": {"type": "string"}},
                    "required": ["text"],
                },
            },
        }

    fillers = [tool(f"filler_{i}", f"Does filler job number {i} with spreadsheets.") for i in range(10)]
    return [
        *fillers,
        tool("send_email", "Send an email message to a recipient."),
        tool("translate_text", "Translate text into French."),
    ]


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy(
        {
            "model_list": upstream_models(upstream_url),
            "kernels": {"min_idle": 1, "max_total": 4},
            "affordance": {"max_stubs": 4},
        }
    )


def test_a_large_toolset_shows_the_relevant_stubs_and_search_tools_finds_more(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        tools = numbered_tools()
        messages: list[Any] = [{"role": "user", "content": "Please send an email saying hello."}]
        upstream.plan(
            program("```python\nprint(search_tools(query='translate french', limit=1))\n```"),
            program("```python\ntranslate_text(text='hello')\n```"),
        )
        result = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
        system = upstream.received[-2].json["messages"][0]["content"]
        assert "def send_email(" in system and "def search_tools(" in system
        assert system.count("\ndef ") + system.startswith("def ") <= 4
        assert "9 more functions are defined but not shown" in system
        assert "def translate_text(" not in system
        observation = upstream.received[-1].json["messages"][-1]["content"]
        assert "def translate_text(text: str)" in observation  # search_tools returned its stub
        # a call to a tool the prompt did not show is still a valid call
        [call] = result.choices[0].message.tool_calls or []
        assert call.function.name == "translate_text"
        # next turn: the tool used is shown, whatever the question
        messages += [
            result.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "bonjour"},
        ]
        upstream.plan(program("Bonjour."))
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
        assert "def translate_text(" in upstream.received[-1].json["messages"][0]["content"]


def test_a_named_tool_choice_is_shown_and_small_toolsets_show_everything(
    proxy: UvicornThread, upstream: ScriptedUpstream
) -> None:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        upstream.plan(program("```python\nfiller_7(text='x')\n```"))
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Send an email."}],
            tools=numbered_tools(),
            tool_choice={"type": "function", "function": {"name": "filler_7"}},
        )
        assert "def filler_7(" in upstream.received[-1].json["messages"][0]["content"]
        upstream.plan(program("Fine."))
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi."}], tools=numbered_tools()[:4]
        )
        system = upstream.received[-1].json["messages"][0]["content"]
        assert "search_tools" not in system and "def filler_3(" in system
