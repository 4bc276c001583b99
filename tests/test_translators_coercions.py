"""translators.schema.coerce_value, through check_call: the unambiguous readings taken before a
repair is asked for, and the ambiguous ones left for the model to fix."""

from __future__ import annotations

from typing import Any

import pytest

from translators import CallError, Toolset, check_call


def tool(schema: dict[str, Any]) -> Any:
    tools = Toolset.from_openai(
        [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {"type": "object", "properties": {"x": schema}, "required": ["x"]},
                },
            }
        ]
    )
    return tools.by_name("f")


@pytest.mark.parametrize(
    ("schema", "given", "sent"),
    [
        pytest.param({"type": "string", "enum": ["Horror", "Comedy"]}, "horror", "Horror", id="enum-case"),
        pytest.param(
            {"type": "string", "enum": ["Horror", "Comedy"]}, " COMEDY ", "Comedy", id="enum-case-space"
        ),
        pytest.param({"type": "string", "enum": ["True", "False"]}, True, "True", id="bool-to-enum-string"),
        pytest.param(
            {"type": "string", "enum": ["true", "false"]}, False, "false", id="bool-to-lower-string"
        ),
        pytest.param({"type": "boolean"}, "true", True, id="string-to-bool"),
        pytest.param({"type": "boolean"}, "False", False, id="string-to-bool-capital"),
        pytest.param({"type": "string", "const": "ALL"}, "all", "ALL", id="const-case"),
        pytest.param({"type": "array", "items": {"type": "string"}}, "Paris", ["Paris"], id="lone-to-list"),
        pytest.param(
            {"type": "array", "items": {"type": "string", "enum": ["A", "B"]}},
            "a",
            ["A"],
            id="lone-to-list-enum",
        ),
        pytest.param(
            {"type": "array", "items": {"type": "string", "enum": ["A", "B"]}},
            ["a", "B"],
            ["A", "B"],
            id="in-list",
        ),
        pytest.param(
            {"type": "object", "properties": {"g": {"type": "string", "enum": ["Jazz"]}}},
            {"g": "jazz"},
            {"g": "Jazz"},
            id="in-object",
        ),
        pytest.param(
            {"anyOf": [{"type": "string", "enum": ["X"]}, {"type": "integer"}]}, "x", "X", id="in-union"
        ),
        pytest.param({"type": "number"}, 3, 3, id="int-fits-a-number-unchanged"),
        pytest.param({"type": "string", "enum": ["Horror"]}, "Horror", "Horror", id="already-fits"),
    ],
)
def test_unambiguous_readings_are_taken(schema: dict[str, Any], given: Any, sent: Any) -> None:
    call = check_call(tool(schema), [], {"x": given})
    assert call.arguments == {"x": sent} and type(call.arguments["x"]) is type(sent)


@pytest.mark.parametrize(
    ("schema", "given"),
    [
        pytest.param({"type": "string", "enum": ["abc", "ABC"]}, "Abc", id="two-enum-values-up-to-case"),
        pytest.param({"type": "string", "enum": ["Horror", "Comedy"]}, "Drama", id="not-in-enum"),
        pytest.param({"type": "boolean"}, "yes", id="not-a-bool-word"),
        pytest.param({"type": "string", "enum": ["True", "False", "true"]}, True, id="bool-ambiguous"),
        pytest.param({"type": "array", "items": {"type": "integer"}}, "x", id="lone-value-of-the-wrong-type"),
        pytest.param({"type": "integer"}, "3", id="no-string-to-number"),
    ],
)
def test_ambiguous_or_wrong_values_still_ask_for_a_repair(schema: dict[str, Any], given: Any) -> None:
    with pytest.raises(CallError):
        check_call(tool(schema), [], {"x": given})
