"""Server-side toolsets: an OpenAPI toolset backed by a small local HTTP app, a real stdio MCP
server (mcp-server-time), programs mixing them with client tools, and keys limited to toolsets."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import ProxyFactory, upstream_models
from tests.servers import UvicornThread
from tests.upstream import Reply, ScriptedUpstream, canned_completion

PETSTORE = Path(__file__).resolve().parents[2] / "shared" / "data" / "swagger-petstore-v3.openapi.yaml"
WEATHER: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


class PetApp:
    """GET /api/v3/pet/{id}, only with the right api_key header; records what it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append({"path": scope["path"], **headers})
        if headers.get("api_key") != "s3cret":
            status, body = 401, {"message": "no key"}
        elif scope["path"].startswith("/api/v3/pet/"):
            pet_id = int(scope["path"].rsplit("/", 1)[1])
            status, body = 200, {"id": pet_id, "name": "rex", "status": "available"}
        else:
            status, body = 404, {"message": "not found"}
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": orjson.dumps(body)})


@pytest.fixture(scope="module")
def pet_app() -> Iterator[tuple[PetApp, str]]:
    app = PetApp()
    with UvicornThread(app, lifespan="off") as server:
        yield app, server.url


@pytest.fixture(scope="module")
def proxy(make_proxy: ProxyFactory, upstream_url: str, pet_app: tuple[PetApp, str]) -> UvicornThread:
    time_server = shutil.which("mcp-server-time") or str(Path(sys.executable).with_name("mcp-server-time"))
    models = upstream_models(upstream_url)
    for model in models:
        model["toolsets"] = ["petstore", "time"]
    return make_proxy(
        {
            "model_list": models,
            "toolsets": {
                "petstore": {
                    "openapi": str(PETSTORE),
                    "base_url": pet_app[1] + "/api/v3",
                    "headers": {"api_key": "os.environ/PET_KEY"},
                },
                "time": {"mcp": {"command": [time_server, "--local-timezone", "UTC"]}},
            },
            "keys": [
                {"id": "full", "key": "sk-full-0123456789"},
                {"id": "time-only", "key": "sk-time-0123456789", "toolsets": ["time"]},
            ],
            "kernels": {"min_idle": 1, "max_total": 4},
        },
        env={"PET_KEY": "s3cret"},
    )


def client(proxy: UvicornThread, key: str = "sk-full-0123456789") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


def program(text: str) -> Reply:
    return Reply(json=canned_completion("scripted", text))


def test_openapi_toolset_runs_in_the_proxy(
    proxy: UvicornThread, upstream: ScriptedUpstream, pet_app: tuple[PetApp, str]
) -> None:
    upstream.plan(
        program("```python\npet = getPetById(petId=7)\nprint(pet['name'], pet['id'])\n```"),
        program("It is Rex."),
    )
    with client(proxy) as sdk:
        result = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Who is pet 7?"}]
        )
    assert result.choices[0].message.content == "It is Rex." and result.choices[0].finish_reason == "stop"
    first, second = (r.json["messages"] for r in upstream.received[-2:])
    assert "def getPetById(petId: int):" in first[0]["content"]
    assert second[-1]["content"] == "Observation:\nrex 7"
    assert pet_app[0].seen[-1]["path"] == "/api/v3/pet/7" and pet_app[0].seen[-1]["api_key"] == "s3cret"
    assert "s3cret" not in json.dumps(first)  # the credential never reaches the model (or the kernel)


def test_mcp_toolset_over_stdio(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    upstream.plan(
        program(
            "```python\nnow = get_current_time(timezone='UTC')\nprint(now['timezone'], 'T' in now['datetime'])\n```"
        ),
        program("It is daytime somewhere."),
    )
    with client(proxy) as sdk:
        result = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Time?"}]
        )
    assert result.choices[0].message.content == "It is daytime somewhere."
    assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\nUTC True"


def test_server_and_client_tools_in_one_program(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    upstream.plan(program("```python\npet = getPetById(petId=3)\nprint(get_weather(city=pet['name']))\n```"))
    messages: list[Any] = [{"role": "user", "content": "Weather where pet 3 lives?"}]
    with client(proxy) as sdk:
        first = sdk.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    calls = first.choices[0].message.tool_calls or []
    # the server call ran silently; only the client's tool goes out
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "rex"})
    ]
    upstream.plan(program("Sunny where Rex is."))
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
    ]
    with client(proxy) as sdk:
        final = sdk.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
    assert final.choices[0].message.content == "Sunny where Rex is."
    assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\nsunny"


def test_clashing_client_tool_name_is_400(proxy: UvicornThread) -> None:
    clash = [
        {
            "type": "function",
            "function": {"name": "getPetById", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    with client(proxy) as sdk, pytest.raises(openai.BadRequestError, match="clash"):
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], tools=clash
        )


def test_keys_limited_to_toolsets(proxy: UvicornThread, upstream: ScriptedUpstream) -> None:
    with client(proxy, "sk-time-0123456789") as limited:
        upstream.plan(program("ok"))
        limited.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        system = upstream.received[-1].json["messages"][0]["content"]
        assert "def get_current_time" in system and "getPetById" not in system  # not offered
        with pytest.raises(openai.PermissionDeniedError):
            limited.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "x"}],
                tools=WEATHER,
                tool_choice={"type": "function", "function": {"name": "getPetById"}},
            )
        # a program calling it anyway finds no such function in its kernel
        upstream.plan(program("```python\ngetPetById(petId=1)\n```"), program("no pets for you"))
        refused = limited.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
        assert refused.choices[0].message.content is not None


def test_mcp_toolset_over_streamable_http(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    from mcp.server.mcpserver import MCPServer

    mcp_server = MCPServer("adder")

    @mcp_server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    with UvicornThread(mcp_server.streamable_http_app()) as http_mcp:
        models = upstream_models(upstream_url)
        models[0]["toolsets"] = ["adder"]
        proxy = make_proxy(
            {"model_list": models, "toolsets": {"adder": {"mcp": {"url": http_mcp.url + "/mcp"}}}}
        )
        upstream.plan(program("```python\nprint(add(a=2, b=3))\n```"), program("Five."))
        with client(proxy) as sdk:
            result = sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "2+3?"}]
            )
        assert result.choices[0].message.content == "Five."
        assert "def add(a: int, b: int):" in upstream.received[-2].json["messages"][0]["content"]
        assert upstream.received[-1].json["messages"][-1]["content"] == "Observation:\n{'result': 5}"
        proxy.stop()  # close the MCP session while its server still runs
