"""Toolsets and stubs: names, types, golden output, schemas from the wild."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bfcl import CATEGORIES, cases, tools_of
from translators.errors import ToolsetError
from translators.names import NameMap, to_identifier
from translators.stubs import render_stubs
from translators.tools import MAX_TOOLS, Toolset, ToolsetCache


def fn(name: str, parameters: dict[str, Any] | None = None, description: str = "") -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


@pytest.mark.parametrize(
    ("name", "ident"),
    [
        pytest.param("spotify.play", "spotify_play", id="dot"),
        pytest.param("get-sum", "get_sum", id="dash"),
        pytest.param("class", "class_", id="keyword"),
        pytest.param("match", "match_", id="soft-keyword"),
        pytest.param("1st", "_1st", id="digit"),
        pytest.param("print", "print_", id="builtin-we-use"),
        pytest.param("ok_name", "ok_name", id="unchanged"),
        pytest.param("名前", "__", id="non-ascii-becomes-ascii"),
    ],
)
def test_to_identifier(name: str, ident: str) -> None:
    assert to_identifier(name) == ident


def test_name_map_is_reversible_under_collisions() -> None:
    names = ["a.b", "a-b", "a_b", "class", "class_", "名前", "名字"]
    mapping = NameMap(names)
    idents = [mapping.py(n) for n in names]
    assert len(set(idents)) == len(names)
    assert all(i.isidentifier() for i in idents)
    assert mapping.py("a_b") == "a_b" and mapping.py("class_") == "class_"  # valid names keep theirs
    assert [mapping.original(i) for i in idents] == names


WEATHER = fn(
    "get_weather",
    {
        "type": "object",
        "properties": {
            "location": {
                "type": "object",
                "description": "Where.",
                "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                "required": ["city"],
            },
            "unit": {
                "type": "string",
                "enum": ["c", "f"],
                "default": "c",
                "description": "Temperature unit.",
            },
            "days": {"type": "integer", "description": "How many days\nof forecast."},
        },
        "required": ["location"],
    },
    "Current weather and forecast.",
)

GOLDEN_WEATHER = '''from typing import Any, Literal, NotRequired, TypedDict

class Location(TypedDict):
    """Where."""
    city: str
    country: NotRequired[str]

def get_weather(location: Location, unit: Literal['c', 'f'] = 'c', days: int | None = None):
    """Current weather and forecast.

location: Where.
unit: Temperature unit.
days: How many days of forecast."""
'''


def test_golden_stub() -> None:
    assert render_stubs(Toolset.from_openai([WEATHER])) == GOLDEN_WEATHER


KITCHEN_SINK = fn(
    "class",
    {
        "type": "object",
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["value"],
            },
            "Color": {"type": "string", "enum": ["red", "green"]},
        },
        "properties": {
            "first-name": {"type": ["string", "null"]},
            "tree": {"$ref": "#/$defs/Node"},
            "color": {"$ref": "#/$defs/Color"},
            "mode": {"enum": ["a", "b", None]},
            "k": {"const": 3},
            "scores": {"type": "object", "additionalProperties": {"type": "number"}},
            "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "kw": {"type": "object", "properties": {"from": {"type": "string"}}, "required": ["from"]},
            "merged": {
                "allOf": [
                    {"type": "object", "properties": {"x": {"type": "number"}}},
                    {"properties": {"y": {"type": "boolean"}}},
                ]
            },
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
            "bfcl_tuple": {"type": "tuple", "items": {"type": "float"}},
            "bfcl_dict": {"type": "dict", "properties": {"q": {"type": "any"}}},
            "nullable_30": {"type": "string", "nullable": True},
            "flag": {"type": "boolean", "default": "false"},
        },
        "required": ["tree", "first-name"],
    },
    'Says """hi""" \\ ok',
)

GOLDEN_KITCHEN_SINK = '''from typing import Any, Literal, NotRequired, TypedDict

class Node(TypedDict):
    value: int
    children: NotRequired[list["Node"]]

Kw = TypedDict('Kw', {'from': str})

class Merged(TypedDict, total=False):
    x: float
    y: bool

class BfclDict(TypedDict, total=False):
    q: Any

def class_(first_name: str | None, tree: Node, color: Literal['red', 'green'] | None = None, mode: Literal['a', 'b'] | None = None, k: Literal[3] | None = None, scores: dict[str, float] | None = None, either: str | int | None = None, kw: Kw | None = None, merged: Merged | None = None, pair: tuple[str, int] | None = None, bfcl_tuple: tuple[float, ...] | None = None, bfcl_dict: BfclDict | None = None, nullable_30: str | None = None, flag: bool = False):
    """Says \\"\\"\\"hi\\"\\"\\" \\\\ ok"""
'''


def test_golden_kitchen_sink() -> None:
    toolset = Toolset.from_openai([KITCHEN_SINK])
    source = render_stubs(toolset)
    assert source == GOLDEN_KITCHEN_SINK
    namespace: dict[str, Any] = {}
    exec(compile(source, "<stubs>", "exec"), namespace)
    assert callable(namespace["class_"])
    assert [p.name for p in toolset.tools[0].params][:2] == ["first-name", "tree"]  # required first


def test_shared_shapes_are_declared_once() -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    toolset = Toolset.from_openai(
        [
            fn("a", {"type": "object", "properties": {"point": point}}),
            fn("b", {"type": "object", "properties": {"point": point}}),
        ]
    )
    source = render_stubs(toolset)
    assert source.count("class Point(TypedDict)") == 1
    assert "point: Point | None" in source.split("def b")[1]


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_bfcl_function_set_compiles(category: str) -> None:
    for entry, _ in cases(category):
        source = render_stubs(Toolset.from_openai(tools_of(entry)))
        compile(source, entry["id"], "exec")


BAD_TOOLSETS = [
    pytest.param("nope", "tools", id="not-a-list"),
    pytest.param([{"type": "retrieval"}], "tools[0]", id="not-a-function"),
    pytest.param([fn("")], "tools[0].function.name", id="empty-name"),
    pytest.param([fn("has space")], "tools[0].function.name", id="space-in-name"),
    pytest.param([fn("a"), fn("a")], "tools[1].function.name", id="duplicate"),
    pytest.param([fn("a", {"type": "string"})], "tools[0].function.parameters", id="non-object-parameters"),
    pytest.param(
        [fn("a", {"type": "object", "properties": []})],
        "tools[0].function.parameters.properties",
        id="bad-properties",
    ),
    pytest.param(
        [fn("a", {"type": "object", "properties": {}, "required": ["x"]})],
        "tools[0].function.parameters.required",
        id="required-unknown",
    ),
    pytest.param(
        [fn("a", {"type": "object", "properties": {"x": 5}})],
        "tools[0].function.parameters.properties.x",
        id="bad-param-schema",
    ),
    pytest.param([fn(f"t{i}") for i in range(MAX_TOOLS + 1)], "tools", id="too-many"),
    pytest.param(
        [fn("a", {"type": "object", "properties": {"x": {"type": "array", "items": {"type": "strin"}}}})],
        "tools[0].function.parameters",
        id="unknown-type-in-items",
    ),
    pytest.param(
        [fn("a", {"type": "object", "properties": {"x": {"anyOf": [{"type": "HashMap"}]}}})],
        "tools[0].function.parameters",
        id="unknown-type-in-anyof",
    ),
]


def test_type_names_any_json_schema_or_bfcl_writes_are_accepted() -> None:
    props = {
        "a": {"type": "String"},  # BFCL's Java cases
        "b": {"type": ["integer", "null"]},
        "c": {"type": "dict", "properties": {"type": {"type": "string"}}},  # a property named "type"
        "d": {"type": "tuple", "items": {"type": "float"}},
        "e": {"type": "string", "default": {"type": "not-a-schema"}},  # values are not schemas
    }
    toolset = Toolset.from_openai([fn("ok", {"type": "object", "properties": props})])
    assert [p.name for p in toolset.tools[0].params] == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize(("tools", "param"), BAD_TOOLSETS)
def test_bad_toolsets_name_the_param(tools: Any, param: str) -> None:
    with pytest.raises(ToolsetError) as info:
        Toolset.from_openai(tools)
    assert info.value.param == param


def test_deep_nesting_is_refused_not_crashed() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(200):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(ToolsetError, match="nests deeper") as info:
        render_stubs(Toolset.from_openai([fn("deep", {"type": "object", "properties": {"x": schema}})]))
    assert info.value.param == "tools"
    # 30 levels are fine
    shallow: dict[str, Any] = {"type": "string"}
    for _ in range(30):
        shallow = {"type": "object", "properties": {"a": shallow}}
    compile(
        render_stubs(Toolset.from_openai([fn("ok", {"type": "object", "properties": {"x": shallow}})])),
        "s",
        "exec",
    )


def test_cache_by_digest() -> None:
    cache = ToolsetCache(maxsize=2)
    first = cache.get([WEATHER])
    assert cache.get([WEATHER]) is first
    cache.get([fn("a")])
    cache.get([fn("b")])
    assert cache.get([WEATHER]) is not first  # evicted, rebuilt
