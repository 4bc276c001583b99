"""OpenAPI -> toolset: the Petstore spec and specs written for the edges (3.0 and 3.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from translators.actions import StaticCalls, classify
from translators.errors import CallError, ToolsetError
from translators.openapi import ArgSpec, build_request, toolset_from_openapi
from translators.stubs import render_stubs
from translators.tools import Toolset

PETSTORE = Path(__file__).resolve().parents[2] / "shared" / "data" / "swagger-petstore-v3.openapi.yaml"


@pytest.fixture(scope="module")
def petstore() -> dict[str, Any]:
    return dict(yaml.safe_load(PETSTORE.read_text(encoding="utf-8")))


def test_petstore_operations(petstore: dict[str, Any]) -> None:
    ops = toolset_from_openapi(petstore)
    assert len(ops) == 19
    assert [o.name for o in ops][:4] == ["updatePet", "addPet", "findPetsByStatus", "findPetsByTags"]
    by = {o.name: o for o in ops}
    get = by["getPetById"]
    assert get.http.method == "GET" and get.http.path == "/pet/{petId}"
    assert get.http.base_url == "https://petstore3.swagger.io/api/v3"
    assert get.tool["function"]["parameters"]["required"] == ["petId"]
    delete = by["deletePet"].http
    assert delete.args == {"api_key": ArgSpec("header", "api_key"), "petId": ArgSpec("path", "petId")}
    add = by["addPet"]
    params = add.tool["function"]["parameters"]
    assert set(params["properties"]) == {"id", "name", "category", "photoUrls", "tags", "status"}
    assert params["required"] == ["name", "photoUrls"]  # the body's required fields, body required
    assert params["properties"]["category"] == {"$ref": "#/$defs/Category"}
    assert set(params["$defs"]) == {"Category", "Tag"}
    assert add.http.body_media_type == "application/json"
    assert by["uploadFile"].http.args["body"] == ArgSpec("body", "body")
    assert by["uploadFile"].http.body_media_type == "application/octet-stream"
    assert by["updatePetWithForm"].http.args["name"] == ArgSpec("query", "name")


def test_petstore_stubs_compile_and_calls_check(petstore: dict[str, Any]) -> None:
    toolset = Toolset.from_openai([o.tool for o in toolset_from_openapi(petstore)])
    source = render_stubs(toolset)
    exec(compile(source, "<petstore>", "exec"), {})
    assert source.count("class Category(TypedDict, total=False)") == 1
    assert "def findPetsByStatus(status: Literal['available', 'pending', 'sold'] = 'available'):" in source
    program = classify(
        'addPet(name="rex", photoUrls=["u"], category={"id": 1, "name": "dogs"}, status="sold")', toolset
    )
    assert isinstance(program, StaticCalls)
    with pytest.raises(CallError, match="must be one of 'available', 'pending', 'sold'"):
        classify('addPet(name="rex", photoUrls=["u"], status="lost")', toolset)


@pytest.mark.parametrize(
    ("operation", "arguments", "method", "url", "headers", "body"),
    [
        pytest.param("getPetById", {"petId": 5}, "GET", "/pet/5", {}, None, id="path"),
        pytest.param(
            "findPetsByTags",
            {"tags": ["a b", "c"]},
            "GET",
            "/pet/findByTags?tags=a+b&tags=c",
            {},
            None,
            id="query-list",
        ),
        pytest.param(
            "deletePet", {"petId": 5, "api_key": "k"}, "DELETE", "/pet/5", {"api_key": "k"}, None, id="header"
        ),
        pytest.param(
            "addPet",
            {"name": "rex", "photoUrls": ["u"]},
            "POST",
            "/pet",
            {"content-type": "application/json"},
            {"name": "rex", "photoUrls": ["u"]},
            id="json-body",
        ),
        pytest.param(
            "getOrderById", {"orderId": "a/b"}, "GET", "/store/order/a%2Fb", {}, None, id="path-escaped"
        ),
        pytest.param(
            "loginUser",
            {"username": "u", "password": None},
            "GET",
            "/user/login?username=u",
            {},
            None,
            id="none-omitted",
        ),
    ],
)
def test_build_request(
    petstore: dict[str, Any],
    operation: str,
    arguments: dict[str, Any],
    method: str,
    url: str,
    headers: dict[str, str],
    body: Any,
) -> None:
    op = {o.name: o for o in toolset_from_openapi(petstore)}[operation]
    request = build_request(op.http, arguments, base_url="http://127.0.0.1:9/api/")
    assert request.method == method
    assert request.url == "http://127.0.0.1:9/api" + url
    assert request.headers == headers
    assert (orjson.loads(request.body) if request.body else None) == body


def test_build_request_errors(petstore: dict[str, Any]) -> None:
    op = {o.name: o for o in toolset_from_openapi(petstore)}["getPetById"]
    with pytest.raises(ToolsetError, match="needs path parameter"):
        build_request(op.http, {})
    with pytest.raises(ToolsetError, match="not an argument"):
        build_request(op.http, {"petId": 1, "extra": 2})


EDGE_SPEC_31: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "edges", "version": "1"},
    "servers": [{"url": "https://{region}.example.test/v2", "variables": {"region": {"default": "eu"}}}],
    "paths": {
        "/items/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "patch": {
                "summary": "Patch an item.",
                "parameters": [
                    {"name": "dry-run", "in": "query", "schema": {"type": ["boolean", "null"]}},
                    {"$ref": "#/components/parameters/Trace"},
                    {"name": "Authorization", "in": "header", "schema": {"type": "string"}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "allOf": [
                                    {"$ref": "#/components/schemas/Base"},
                                    {
                                        "type": "object",
                                        "properties": {
                                            "shape": {
                                                "oneOf": [
                                                    {"$ref": "#/components/schemas/Circle"},
                                                    {"$ref": "#/components/schemas/Square"},
                                                ]
                                            },
                                            "id": {
                                                "type": "string",
                                                "description": "collides with the path id",
                                            },
                                        },
                                        "required": ["shape"],
                                    },
                                ]
                            }
                        }
                    },
                },
            },
        },
        "/ping": {"get": {}},
        "/tree": {
            "post": {
                "operationId": "tree.plant",
                "requestBody": {
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Node"}}}
                },
            }
        },
    },
    "components": {
        "parameters": {
            "Trace": {"name": "x-trace", "in": "header", "schema": {"type": "string", "const": "on"}}
        },
        "schemas": {
            "Base": {
                "type": "object",
                "properties": {"label": {"type": ["string", "null"]}},
                "required": ["label"],
            },
            "Circle": {"type": "object", "properties": {"r": {"type": "number"}}, "required": ["r"]},
            "Square": {"type": "object", "properties": {"side": {"type": "number", "exclusiveMinimum": 0}}},
            "Node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "kids": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
                },
            },
        },
    },
}


def test_edge_spec_31() -> None:
    ops = {o.name: o for o in toolset_from_openapi(EDGE_SPEC_31)}
    assert set(ops) == {"patch_items_id", "get_ping", "tree.plant"}
    patch = ops["patch_items_id"]
    params = patch.tool["function"]["parameters"]
    assert patch.http.base_url == "https://eu.example.test/v2"
    assert patch.http.args["dry-run"] == ArgSpec("query", "dry-run")
    assert patch.http.args["x-trace"] == ArgSpec("header", "x-trace")
    assert "Authorization" not in params["properties"]  # credentials come from the proxy, never the model
    assert patch.http.args["body_id"] == ArgSpec("body_field", "id")  # collision with the path id
    assert params["required"] == ["id", "label", "shape"]
    assert ops["get_ping"].tool["function"]["parameters"] == {"type": "object", "properties": {}}
    toolset = Toolset.from_openai([o.tool for o in ops.values()])
    source = render_stubs(toolset)
    exec(compile(source, "<edges>", "exec"), {})
    assert "def patch_items_id(id: int, label: str | None, shape: Circle | Square" in source
    assert "dry_run: bool | None = None" in source and "x_trace: Literal['on'] | None = None" in source
    assert 'class Node(TypedDict, total=False):\n    name: str\n    kids: list["Node"]' in source
    program = classify('patch_items_id(id=3, label=None, shape={"r": 2.5}, dry_run=True)', toolset)
    assert isinstance(program, StaticCalls)
    request = build_request(patch.http, program.calls[0].arguments)
    assert request.method == "PATCH"
    assert request.url == "https://eu.example.test/v2/items/3?dry-run=true"
    assert orjson.loads(request.body or b"") == {"label": None, "shape": {"r": 2.5}}


def test_nullable_30_and_enums() -> None:
    spec = {
        "openapi": "3.0.3",
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/search": {
                "get": {
                    "operationId": "search",
                    "parameters": [
                        {
                            "name": "q",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string", "nullable": True},
                        },
                        {
                            "name": "sort",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["asc", "desc"], "default": "asc"},
                        },
                    ],
                }
            }
        },
    }
    toolset = Toolset.from_openai([o.tool for o in toolset_from_openapi(spec)])
    assert "def search(q: str | None, sort: Literal['asc', 'desc'] = 'asc'): ..." in render_stubs(toolset)


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({"swagger": "2.0"}, id="swagger-2"),
        pytest.param(
            {"openapi": "3.0.0", "paths": {"/a": {"get": {"parameters": [{"$ref": "#/nope"}]}}}},
            id="dangling-ref",
        ),
        pytest.param(
            {"openapi": "3.0.0", "paths": {"/a": {"$ref": "https://elsewhere/x.yaml"}}}, id="remote-ref"
        ),
    ],
)
def test_bad_specs(spec: dict[str, Any]) -> None:
    with pytest.raises(ToolsetError):
        toolset_from_openapi(spec)
