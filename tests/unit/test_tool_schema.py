"""Keyword rules' arguments: placeholders filled from the match, then fitted to the
JSON schema the request declares (checked here with the jsonschema library)."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.middleware.tool_schema import Unfit, fill_arguments, fit, placeholders


def obj(properties: dict[str, Any], required: list[str] | None = None, **more: Any) -> Any:
    schema: dict[str, Any] = {"type": "object", "properties": properties, **more}
    if required is not None:
        schema["required"] = required
    return schema


def fitted(arguments: dict[str, Any], schema: Any, **groups: Any) -> dict[str, Any]:
    out = fit(arguments, groups, schema)
    if isinstance(schema, dict):
        jsonschema.validate(out, schema)
    return out


def unfit(arguments: dict[str, Any], schema: Any, **groups: Any) -> str:
    with pytest.raises(Unfit) as info:
        fit(arguments, groups, schema)
    return str(info.value)


STRING = {"type": "string"}
INTEGER = {"type": "integer"}


# --- tools that take nothing, and undeclared properties ----------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        None,  # no `parameters` at all
        True,
        {},
        {"type": "object"},
        {"type": "object", "properties": {}},
        {"type": "object", "properties": {}, "additionalProperties": False},
    ],
)
def test_a_tool_declared_with_no_parameters_gets_an_empty_object(schema: Any) -> None:
    assert fit({"reason": "the conversation is over"}, {}, schema) == {}


def test_undeclared_properties_left_out_where_additional_properties_is_false() -> None:
    schema = obj({"reason": STRING}, ["reason"], additionalProperties=False)
    assert fitted({"reason": "done", "message": "bye", "note": 1}, schema) == {"reason": "done"}


def test_undeclared_properties_kept_where_the_schema_allows_them() -> None:
    schema = obj({"reason": STRING}, ["reason"])
    assert fitted({"reason": "done", "note": 1}, schema) == {"reason": "done", "note": 1}


def test_undeclared_properties_fitted_to_a_schema_of_additional_properties() -> None:
    schema = obj({"reason": STRING}, additionalProperties=INTEGER)
    assert fitted({"reason": "x", "n": "4", "bad": "four"}, schema) == {"reason": "x", "n": 4}


def test_pattern_properties_declare_names() -> None:
    schema = obj({}, patternProperties={"^x_": INTEGER}, additionalProperties=False)
    assert fitted({"x_a": "1", "y": 2}, schema) == {"x_a": 1}


def test_nested_objects_are_fitted_too() -> None:
    inner = obj({"id": INTEGER}, ["id"], additionalProperties=False)
    schema = obj({"target": inner}, ["target"], additionalProperties=False)
    assert fitted({"target": {"id": "7", "name": "x"}}, schema) == {"target": {"id": 7}}


# --- required properties -----------------------------------------------------------------


def test_required_properties_from_the_rule_the_groups_or_the_schema() -> None:
    schema = obj(
        {
            "reason": STRING,
            "agent_number": INTEGER,
            "mode": {"type": "string", "default": "warm"},
            "kind": {"const": "system"},
            "channel": {"enum": ["phone"]},
        },
        ["reason", "agent_number", "mode", "kind", "channel"],
        additionalProperties=False,
    )
    assert fitted({"reason": "billing"}, schema, agent_number="2") == {
        "reason": "billing",
        "agent_number": 2,
        "mode": "warm",
        "kind": "system",
        "channel": "phone",
    }


def test_a_group_fills_only_declared_properties() -> None:
    schema = obj({"reason": STRING})
    assert fitted({}, schema, reason="asked", helper="x") == {"reason": "asked"}


def test_the_rule_wins_over_a_group_of_the_same_name() -> None:
    assert fitted({"reason": "rule"}, obj({"reason": STRING}), reason="group") == {"reason": "rule"}


def test_a_required_property_nobody_fills_makes_the_rule_unfit() -> None:
    schema = obj({"transfer_number": STRING, "reason": STRING}, ["transfer_number"])
    assert unfit({"reason": "x"}, schema) == "the required property 'transfer_number' has no value"


def test_a_required_property_that_is_not_in_properties() -> None:
    assert fitted({"reason": "x"}, {"type": "object", "required": ["reason"]}) == {"reason": "x"}
    assert "'reason' has no value" in unfit({}, {"type": "object", "required": ["reason"]})


# --- types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "schema", "expected"),
    [
        ("3", INTEGER, 3),
        (" -12 ", INTEGER, -12),
        (3.0, INTEGER, 3),
        ("3", {"type": "number"}, 3),
        ("2.5", {"type": "number"}, 2.5),
        (2, {"type": "number"}, 2),
        ("true", {"type": "boolean"}, True),
        ("FALSE", {"type": "boolean"}, False),
        (1, STRING, "1"),
        (2.0, STRING, "2"),
        (2.5, STRING, "2.5"),
        (True, STRING, "true"),
        ("x", {"type": "array", "items": STRING}, ["x"]),
        (["1", 2], {"type": "array", "items": INTEGER}, [1, 2]),
        ("4", {"type": ["null", "integer"]}, 4),
        (None, {"type": ["null", "integer"]}, None),
        ("es", {"type": "string", "enum": ["en", "es"]}, "es"),
        ("ES", {"type": "string", "enum": ["en", "es"]}, "es"),
        (" Es ", {"enum": ["en", "es"]}, "es"),
        ("1", {"enum": [0, 1, 2]}, 1),
        (1, {"enum": ["0", "1"]}, "1"),
        ("x", {"const": "x"}, "x"),
        ("7", {"anyOf": [{"type": "boolean"}, INTEGER]}, 7),
        ("7", {"oneOf": [{"type": "null"}, STRING]}, "7"),
        ("7", {"allOf": [INTEGER, {"minimum": 0}]}, 7),
        ("anything", True, "anything"),
    ],
)
def test_values_take_the_declared_type(value: Any, schema: Any, expected: Any) -> None:
    out = fitted({"v": value}, obj({"v": schema}, ["v"]))
    assert out == {"v": expected}
    assert type(out["v"]) is type(expected)


@pytest.mark.parametrize(
    ("value", "schema"),
    [
        ("three", INTEGER),
        ("2.5", INTEGER),
        ("nan", {"type": "number"}),
        ("inf", {"type": "number"}),
        ("yes", {"type": "boolean"}),
        ({"a": 1}, STRING),
        ("de", {"enum": ["en", "es"]}),
        (True, {"enum": [1]}),  # a boolean is not the number 1
        ("y", {"const": "x"}),
        ("x", {"anyOf": [INTEGER, {"type": "boolean"}]}),
        ("x", False),
    ],
)
def test_a_value_that_cannot_take_the_type(value: Any, schema: Any) -> None:
    # required: the rule cannot fire; optional: the property is left out
    assert unfit({"v": value}, obj({"v": schema}, ["v"])).startswith("v: ")
    assert fitted({"v": value, "w": "kept"}, obj({"v": schema, "w": STRING})) == {"w": "kept"}


def test_refs_inside_the_schema_are_followed() -> None:
    schema = obj(
        {"agent_number": {"$ref": "#/$defs/number"}, "target": {"$ref": "#/$defs/target"}},
        ["agent_number", "target"],
        **{
            "$defs": {
                "number": {"type": "integer", "default": 0},
                "target": obj({"id": {"$ref": "#/$defs/number"}}, ["id"]),
            }
        },
    )
    assert fitted({"target": {"id": "5"}}, schema) == {"agent_number": 0, "target": {"id": 5}}


def test_a_ref_that_leads_nowhere_makes_the_rule_unfit() -> None:
    schema = obj({"n": {"$ref": "#/$defs/missing"}}, ["n"])
    assert "leads nowhere" in unfit({"n": 1}, schema)


def test_a_ref_that_loops_does_not_hang() -> None:
    schema = obj({"n": {"$ref": "#/$defs/a"}}, ["n"], **{"$defs": {"a": {"$ref": "#/$defs/a"}}})
    assert "too deep" in unfit({"n": 1}, schema)


# --- the final check with jsonschema -------------------------------------------------------


def test_constraints_the_fitting_does_not_handle_are_checked() -> None:
    dtmf = obj({"dtmf_tones": {"type": "string", "pattern": "^[0-9*#wW]+$"}}, ["dtmf_tones"])
    assert fitted({"dtmf_tones": 12}, dtmf) == {"dtmf_tones": "12"}
    assert unfit({"dtmf_tones": "1 2"}, dtmf) == "dtmf_tones: '1 2' does not match '^[0-9*#wW]+$'"
    small = obj({"agent_number": {"type": "integer", "maximum": 2}}, ["agent_number"])
    assert "agent_number: 5 is greater than the maximum of 2" in unfit({"agent_number": "5"}, small)


@pytest.mark.parametrize(
    "schema",
    [
        obj({"v": {"type": "string", "pattern": "("}}, ["v"]),  # not a regular expression
        obj({"v": {"type": "strange"}}, ["v"]),  # no such type
        "not a schema",
        ["a", "list"],
    ],
)
def test_a_schema_that_cannot_be_used_makes_the_rule_unfit(schema: Any) -> None:
    unfit({"v": "x"}, schema)


# --- placeholders --------------------------------------------------------------------------


def match(pattern: str, text: str) -> re.Match[str]:
    m = re.search(pattern, text, re.IGNORECASE)
    assert m is not None
    return m


def test_placeholders_filled_from_the_match_and_its_groups() -> None:
    m = match(r"press (?P<digits>\d+)(?: for (?P<what>\w+))?", "Now press 42 for sales")
    arguments = {
        "dtmf_tones": "{digits}",
        "reason": "{match} ({what})",
        "nested": ["{what}", {"d": "{digits}"}],
        "literal": "{not_a_group}",
        "number": 1,
    }
    assert fill_arguments(arguments, m, {}) == (
        {
            "dtmf_tones": "42",
            "reason": "press 42 for sales (sales)",
            "nested": ["sales", {"d": "42"}],
            "literal": "{not_a_group}",
            "number": 1,
        },
        {"digits": "42", "what": "sales"},
    )


def test_a_group_that_did_not_match_leaves_its_argument_out() -> None:
    m = match(r"press (?P<digits>\d+)(?: for (?P<what>\w+))?", "press 42")
    arguments = {"what": "{what}", "reason": "for {what}!", "list": ["{what}", "x"]}
    assert fill_arguments(arguments, m, {}) == (
        {"reason": "for !", "list": ["x"]},
        {"digits": "42"},
    )


def test_values_map_filled_texts_and_groups() -> None:
    m = match(r"switch to\s+(?P<language>\w+)", "switching... switch to  SPANISH")
    values = {"language": {"spanish": "es"}}
    arguments = {"language": "{language}", "reason": "asked for {language}"}
    assert fill_arguments(arguments, m, values) == (
        {"language": "es", "reason": "asked for SPANISH"},
        {"language": "es"},
    )
    m = match(r"switch to\s+(?P<language>\w+)", "switch to Klingon")
    assert fill_arguments(arguments, m, values)[0]["language"] == "Klingon"


def test_placeholders_lists_the_names() -> None:
    assert placeholders({"a": "{x} and {match}", "b": ["{y}", 1, {"c": "{z}"}], "d": 2}) == {
        "x",
        "match",
        "y",
        "z",
    }


# --- whatever fit returns validates --------------------------------------------------------

_LEAF = st.sampled_from(
    [
        STRING,
        INTEGER,
        {"type": "number"},
        {"type": "boolean"},
        {"type": "string", "enum": ["en", "es"]},
        {"enum": [0, 1, 2]},
        {"type": "integer", "default": 3},
        {"type": "string", "pattern": "^[0-9]+$"},
        {"type": ["string", "null"]},
        {"type": "array", "items": INTEGER},
    ]
)
_NAMES = st.sampled_from(["reason", "language", "agent_number", "dtmf_tones", "extra"])
_VALUES = st.one_of(
    st.sampled_from(["3", "ES", "true", "12", "x", "", "2.5", " 1 "]),
    st.integers(-3, 3),
    st.booleans(),
    st.none(),
    st.lists(st.sampled_from(["1", "a", 2]), max_size=2),
)


@st.composite
def schemas(draw: st.DrawFn) -> dict[str, Any]:
    props = draw(st.dictionaries(_NAMES, _LEAF, max_size=4))
    required = draw(st.lists(st.sampled_from(sorted(props) or ["reason"]), unique=True))
    schema = obj(props, required)
    if draw(st.booleans()):
        schema["additionalProperties"] = draw(st.sampled_from([False, True, INTEGER]))
    return schema


@settings(max_examples=400, deadline=None)
@given(
    schemas(),
    st.dictionaries(_NAMES, _VALUES, max_size=4),
    st.dictionaries(_NAMES, st.sampled_from(["7", "es", "Spanish"]), max_size=2),
)
def test_what_fit_returns_validates_against_the_schema(
    schema: dict[str, Any], arguments: dict[str, Any], groups: dict[str, str]
) -> None:
    try:
        out = fit(arguments, groups, schema)
    except Unfit:
        return
    jsonschema.validate(out, schema)
    if schema.get("additionalProperties") is False:
        assert set(out) <= set(schema["properties"])
