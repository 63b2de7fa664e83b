"""A keyword rule's arguments: filled from the match, made to fit the JSON schema the
request declares for the tool.

`fill_arguments(arguments, match, values)` puts the matched text in the rule's
placeholders: `{match}` is the whole match and `{NAME}` the pattern's named group
NAME (empty where it did not match; a value that is only such a placeholder is left
out), and `values` maps a filled text (case-insensitive) to the value to send.

`fit(arguments, groups, parameters)` takes the rule's arguments (placeholders already
filled), the named groups its pattern matched, and the tool's declared
`function.parameters`, and returns arguments that validate against that schema, or
raises `Unfit` saying why none can. Nothing here runs unless a rule has matched.

How the arguments are fitted, property by property:
- A tool declared with no `parameters`, or with no properties at all, gets `{}`.
- A property the schema does not declare is left out where `additionalProperties`
  is false; where it is a schema, the value is fitted to it; otherwise it is kept.
- A declared property the rule does not give is taken from the pattern's named group
  of the same name, when that group matched.
- A required property still missing takes the schema's `default`, else its `const`,
  else the one value of a one-value `enum`; with none of these the rule cannot fire.
- Values take the declared type where they can: "3" becomes 3 for an integer or a
  number, "true" and "false" become booleans, a number or a boolean becomes a string
  for a string, one value becomes a one-item array for an array. An `enum` member is
  found as it is, after that conversion, or for a string by a case-insensitive
  comparison ("ES" finds "es"). `anyOf` and `oneOf` take the first branch that fits,
  `allOf` fits each in turn, and `$ref` follows references inside the schema.
- An optional property whose value cannot be made to fit is left out; a required one
  makes the rule unfit.

Then the result is checked with the `jsonschema` library against the whole declared
schema (so `pattern`, `minLength`, `maximum` and the rest hold too); a schema that
cannot be used, or arguments that fail that check, make the rule unfit.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any

_INTEGER = re.compile(r"[+-]?\d+")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ABSENT = object()  # an argument left out: its group did not match
_MAX_DEPTH = 32  # schemas nest, and a $ref may point back up
_MISSING = object()


def placeholders(value: Any) -> set[str]:
    """The names in the `{NAME}` placeholders of a JSON value's strings."""
    if isinstance(value, str):
        return set(_PLACEHOLDER.findall(value))
    items = list(value.values()) if isinstance(value, dict) else value
    if isinstance(items, list):
        return set().union(*(placeholders(v) for v in items))
    return set()


def folded(text: str) -> str:
    """A text as `values` looks it up: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def fill_arguments(
    arguments: dict[str, Any], m: re.Match[str], values: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arguments with their placeholders filled from `m`, and the named groups that
    matched; `values` (folded text -> value, per name) applied to both."""
    groups: dict[str, Any] = {k: v for k, v in m.groupdict().items() if v is not None}
    names = m.re.groupindex

    def sub(p: re.Match[str]) -> str:
        name = p.group(1)
        if name == "match":
            return m.group(0)
        return groups.get(name, "") if name in names else p.group(0)

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            if "{" not in value:
                return value
            whole = _PLACEHOLDER.fullmatch(value)
            if whole and whole.group(1) in names and whole.group(1) not in groups:
                return _ABSENT
            return _PLACEHOLDER.sub(sub, value)
        if isinstance(value, dict):
            filled = {k: fill(v) for k, v in value.items()}
            return {k: v for k, v in filled.items() if v is not _ABSENT}
        if isinstance(value, list):
            return [v for v in (fill(v) for v in value) if v is not _ABSENT]
        return value

    filled: dict[str, Any] = fill(arguments)
    for name, table in values.items():
        for target in (filled, groups):
            text = target.get(name)
            if isinstance(text, str) and folded(text) in table:
                target[name] = table[folded(text)]
    return filled, groups


class Unfit(Exception):
    """No arguments of this rule validate against the declared schema; str() says why."""


def fit(arguments: dict[str, Any], groups: Mapping[str, Any], parameters: Any) -> dict[str, Any]:
    """The arguments to send for a tool declared with `parameters` (None: not declared)."""
    if parameters is None or parameters is True:
        return {}  # no parameters: a tool that takes no arguments
    if not isinstance(parameters, dict):
        raise Unfit("its parameters are not a JSON schema object")
    fitter = _Fitter(parameters)
    fitted = fitter.object(arguments, parameters, groups, top=True)
    _check(fitted, parameters)
    return fitted


def _check(arguments: dict[str, Any], schema: dict[str, Any]) -> None:
    # imported at the first check: jsonschema takes about 8 MB a process, and only a
    # keyword rule that fires needs it
    from jsonschema import validators as _validators
    from jsonschema.exceptions import best_match

    try:
        validator = _validators.validator_for(schema)(schema)
        error = best_match(validator.iter_errors(arguments))
    except Exception as exc:  # a schema the validator cannot use: an unknown $ref, a bad regex...
        raise Unfit(
            f"its declared schema cannot be checked ({type(exc).__name__}: {exc})"
        ) from None
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path)
        raise Unfit(f"{where + ': ' if where else ''}{error.message}")


def _types(schema: dict[str, Any]) -> list[str]:
    declared = schema.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    return []


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "unknown"


def _is_type(value: Any, wanted: str) -> bool:
    have = _json_type(value)
    return have == wanted or (wanted == "number" and have == "integer")


def _convert(value: Any, wanted: str) -> Any:
    """`value` as a `wanted` JSON type, or _MISSING."""
    if _is_type(value, wanted):
        if wanted == "integer" and isinstance(value, float):
            return int(value)
        return value
    if wanted in ("integer", "number") and isinstance(value, str):
        text = value.strip()
        if _INTEGER.fullmatch(text):
            return int(text)
        if wanted == "number":
            try:
                number = float(text)
            except ValueError:
                return _MISSING
            return number if math.isfinite(number) else _MISSING
        return _MISSING
    if wanted == "boolean" and isinstance(value, str):
        word = value.strip().lower()
        return {"true": True, "false": False}.get(word, _MISSING)
    if wanted == "string":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return (
                str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
            )
        return _MISSING
    if wanted == "array" and not isinstance(value, list | dict):
        return [value]
    return _MISSING


class _Fitter:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def resolve(self, schema: Any, depth: int) -> Any:
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
            if depth > _MAX_DEPTH:
                raise Unfit("its schema nests too deep")
            ref = schema["$ref"]
            if not ref.startswith("#"):
                return schema  # not ours to follow: the final check decides
            target: Any = self.root
            parts = ref[1:].lstrip("/").split("/") if ref != "#" else []
            for part in (p.replace("~1", "/").replace("~0", "~") for p in parts):
                if not isinstance(target, dict) or part not in target:
                    raise Unfit(f"its schema has a $ref that leads nowhere ({ref})")
                target = target[part]
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if rest and isinstance(target, dict) else target
            depth += 1
        return schema

    def value(self, value: Any, schema: Any, depth: int = 0) -> Any:
        """`value` fitted to `schema`, or Unfit."""
        if depth > _MAX_DEPTH:
            raise Unfit("its schema nests too deep")
        schema = self.resolve(schema, depth)
        if schema is True or not isinstance(schema, dict):
            if schema is False:
                raise Unfit("the schema allows no value here")
            return value
        for branch_key in ("anyOf", "oneOf"):
            branches = schema.get(branch_key)
            if isinstance(branches, list) and branches:
                reasons = []
                for branch in branches:
                    try:
                        value = self.value(value, branch, depth + 1)
                        break
                    except Unfit as exc:
                        reasons.append(str(exc))
                else:
                    raise Unfit(f"no branch of {branch_key} fits ({'; '.join(reasons)})")
        all_of = schema.get("allOf")
        if isinstance(all_of, list):
            for branch in all_of:
                value = self.value(value, branch, depth + 1)
        types = _types(schema)
        if types and not any(_is_type(value, t) for t in types):
            for wanted in types:
                converted = _convert(value, wanted)
                if converted is not _MISSING:
                    value = converted
                    break
            else:
                raise Unfit(f"{_shown(value)} is not of type {' or '.join(types)}")
        elif "integer" in types and isinstance(value, float):
            value = int(value)
        if "const" in schema:
            value = self.member(value, [schema["const"]], "const")
        enum = schema.get("enum")
        if isinstance(enum, list):
            value = self.member(value, enum, "enum")
        if isinstance(value, dict) and (
            "object" in types or "properties" in schema or "additionalProperties" in schema
        ):
            return self.object(value, schema, {}, depth=depth + 1)
        if isinstance(value, list):
            items = schema.get("items")
            if isinstance(items, dict | bool):
                return [self.value(item, items, depth + 1) for item in value]
        return value

    def member(self, value: Any, members: list[Any], what: str) -> Any:
        for member in members:
            if member == value and type(member) is type(value):
                return member
        for member in members:
            if member == value and not isinstance(member, bool) and not isinstance(value, bool):
                return member
        for member in members:
            converted = _convert(value, _json_type(member)) if member is not None else _MISSING
            if converted is not _MISSING and converted == member:
                return member
        if isinstance(value, str):
            folded = value.strip().casefold()
            for member in members:
                if isinstance(member, str) and member.casefold() == folded:
                    return member
        allowed = ", ".join(_shown(m) for m in members[:8])
        more = ", ..." if len(members) > 8 else ""
        raise Unfit(f"{_shown(value)} is not one of the {what} values ({allowed}{more})")

    def object(
        self,
        given: dict[str, Any],
        schema: dict[str, Any],
        groups: Mapping[str, Any],
        *,
        top: bool = False,
        depth: int = 0,
    ) -> dict[str, Any]:
        raw_props = schema.get("properties")
        props: dict[str, Any] = raw_props if isinstance(raw_props, dict) else {}
        raw_required = schema.get("required")
        required = (
            [r for r in raw_required if isinstance(r, str)]
            if isinstance(raw_required, list)
            else []
        )
        raw_patterns = schema.get("patternProperties")
        patterns = raw_patterns if isinstance(raw_patterns, dict) else {}
        extra = schema.get("additionalProperties", True)
        if top and not props and not required and not patterns and not isinstance(extra, dict):
            return {}  # a tool that takes no arguments
        out: dict[str, Any] = {}
        for name, value in given.items():
            sub = self.declared(name, props, patterns, extra)
            if sub is _MISSING:
                continue  # undeclared where the schema forbids it
            try:
                out[name] = self.value(value, sub, depth + 1)
            except Unfit as exc:
                if name in required:
                    raise Unfit(f"{name}: {exc}") from None
        for name, sub in props.items():
            if name in out or name not in groups:
                continue
            try:
                out[name] = self.value(groups[name], sub, depth + 1)
            except Unfit as exc:
                if name in required:
                    raise Unfit(f"{name}: {exc}") from None
        for name in required:
            if name in out:
                continue
            fill = self.fallback(props.get(name), depth + 1)
            if fill is _MISSING:
                raise Unfit(f"the required property {name!r} has no value")
            out[name] = fill
        return out

    @staticmethod
    def declared(name: str, props: dict[str, Any], patterns: dict[str, Any], extra: Any) -> Any:
        """The schema a property `name` must fit, or _MISSING where it may not appear."""
        if name in props:
            return props[name]
        for pattern, sub in patterns.items():
            try:
                if re.search(pattern, name):
                    return sub
            except re.error:
                continue
        if extra is False:
            return _MISSING
        return extra if isinstance(extra, dict) else True

    def fallback(self, schema: Any, depth: int) -> Any:
        """The value the schema gives a required property nobody filled, or _MISSING."""
        schema = self.resolve(schema, depth)
        if not isinstance(schema, dict):
            return _MISSING
        if "default" in schema:
            return copy.deepcopy(schema["default"])
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        enum = schema.get("enum")
        if isinstance(enum, list) and len(enum) == 1:
            return copy.deepcopy(enum[0])
        return _MISSING


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
