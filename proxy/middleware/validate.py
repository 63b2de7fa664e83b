"""validate: check a chat request's parameters before it reaches the backend (over 400
lines, on purpose: the checks of every parameter of the API are one table, read best
in one place).

Acts on POST /v1/chat/completions only. Every parameter of the Chat Completions API
is checked against its type and range; the first bad one answers 400 with `param`
naming it (`messages[2].role`, `tools[0].function.name`) and a message saying what
was expected. Top-level fields the API does not name (vLLM's `top_k`, `min_p`...)
are passed, dropped or refused according to `extra_params`.

ElevenLabs' fields (`elevenlabs_extra_body`, `user_id`) are taken out of the body
before the chain runs, by proxy/dialects/elevenlabs.py.

Numbers are JSON numbers: `true` and `"0.5"` are not numbers, NaN and Infinity are
refused anywhere in the body, and integer parameters take integers only (`2.0` is
refused, like `2.5`; JSON has one number type but every SDK writes integers without
a decimal point). Counts are bounded by 2**53 - 1 and `seed` by the 64-bit range.
An optional parameter set to null counts as absent and is forwarded as sent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web
from pydantic import Field

from proxy import jsonfast
from proxy.chain import BuildContext, register
from proxy.checks import array, boolean, mapping, missing, string
from proxy.config import Model
from proxy.errors import ProxyError, invalid_type, invalid_value
from proxy.exchange import Exchange, Handler, Middleware
from proxy.routes import CHAT


class ValidateOptions(Model):
    max_n: int = Field(8, gt=0)
    max_messages: int = Field(2048, gt=0)
    max_tools: int = Field(128, gt=0)
    extra_params: Literal["allow", "drop", "reject"] = "allow"


MAX_SAFE_INT = 2**53 - 1
INT64 = (-(2**63), 2**63 - 1)
ROLES = ("system", "developer", "user", "assistant", "tool")
_TEXT_ROLES = ("user", "system", "assistant", "developer")
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_STOP = 4

Checker = Callable[[str, Any, "Request"], None]


# --- messages -------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _one_of(values: tuple[str, ...]) -> str:
    quoted = [f"'{v}'" for v in values]
    return "one of " + ", ".join(quoted[:-1]) + " or " + quoted[-1]


# --- primitive checks -------------------------------------------------------------


def number(param: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid_type(param, "a number", value)
    if not lo <= value <= hi:
        raise invalid_value(param, f"a number between {_num(lo)} and {_num(hi)}", value)


def integer(param: str, value: Any, lo: int, hi: int = MAX_SAFE_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(param, "an integer", value)
    if not lo <= value <= hi:
        if lo == 1 and hi == MAX_SAFE_INT:
            expected = "a positive integer" if value < lo else f"an integer no larger than {hi}"
        else:
            expected = f"an integer between {lo} and {hi}"
        raise invalid_value(param, expected, value)


# raises ValueError at a NaN or an Infinity; one encoder for every request, and no
# escaping of text, which only the output would show
_finite_json = json.JSONEncoder(allow_nan=False, ensure_ascii=False).encode


def first_non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """The path of the first NaN or Infinity in a JSON tree (Python's parser takes
    them; no backend should receive them)."""
    finite = jsonfast.plain_tree(value)  # the fast path: no paths built
    if finite:
        return None
    if finite is None:
        try:
            _finite_json(value)
            return None
        except ValueError:
            pass
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                return where, node
        elif isinstance(node, dict):
            items = [(f"{where}.{k}" if where else str(k), v) for k, v in node.items()]
            stack.extend(reversed(items))
        elif isinstance(node, list):
            stack.extend(reversed([(f"{where}[{i}]", v) for i, v in enumerate(node)]))
    return None


# --- the request ----------------------------------------------------------------


class Request:
    """One chat request under validation: the body and the options."""

    __slots__ = ("body", "options")

    def __init__(self, body: dict[str, Any], options: ValidateOptions) -> None:
        self.body = body
        self.options = options


def check_messages(param: str, value: Any, req: Request) -> None:
    messages = array(param, value)
    if not messages:
        raise invalid_value(param, "a non-empty array of messages", value)
    limit = req.options.max_messages
    if len(messages) > limit:
        raise ProxyError(
            400,
            f"Invalid value for '{param}': expected at most {limit} messages, got {len(messages)}.",
            param=param,
            code="too_many_messages",
        )
    for i, message in enumerate(messages):
        # the usual message: a role other than tool, text content, no name, and for
        # the assistant no tool calls; all of which check_message accepts
        if type(message) is dict:
            role = message.get("role")
            if (
                type(message.get("content")) is str
                and role in _TEXT_ROLES
                and message.get("name") is None
                and (role != "assistant" or message.get("tool_calls") is None)
            ):
                continue
        check_message(f"{param}[{i}]", message)


def check_message(param: str, value: Any) -> None:
    message = mapping(param, value)
    role = message.get("role")
    if role is None:
        raise missing(f"{param}.role")
    if role not in ROLES:
        if not isinstance(role, str):
            raise invalid_type(f"{param}.role", "a string", role)
        raise invalid_value(f"{param}.role", _one_of(ROLES), role)
    if message.get("name") is not None:
        string(f"{param}.name", message["name"])
    tool_calls = message.get("tool_calls")
    has_calls = False
    if role == "assistant":
        if tool_calls is not None:
            calls = array(f"{param}.tool_calls", tool_calls)
            for j, call in enumerate(calls):
                check_tool_call(f"{param}.tool_calls[{j}]", call)
            has_calls = bool(calls)
        has_calls = has_calls or message.get("function_call") is not None
    if role == "tool":
        call_id = message.get("tool_call_id")
        if call_id is None:
            raise ProxyError(
                400,
                f"Missing required parameter: '{param}.tool_call_id' (a tool message answers "
                "the assistant's tool call of that id).",
                param=f"{param}.tool_call_id",
                code="missing_required_parameter",
            )
        string(f"{param}.tool_call_id", call_id)
    content = message.get("content")
    if content is None:
        if has_calls:
            return
        if "content" not in message:
            raise ProxyError(
                400,
                f"Missing required parameter: '{param}.content'.",
                param=f"{param}.content",
                code="missing_required_parameter",
            )
        raise invalid_type(
            f"{param}.content",
            "a string or an array of content parts (null only for an assistant message "
            "with tool_calls)",
            content,
        )
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise invalid_type(f"{param}.content", "a string or an array of content parts", content)
    if not content:
        raise invalid_value(f"{param}.content", "a non-empty array of content parts", content)
    for k, part in enumerate(content):
        check_part(f"{param}.content[{k}]", part)


def check_part(param: str, value: Any) -> None:
    part = mapping(param, value)
    kind = part.get("type")
    if kind is None:
        raise missing(f"{param}.type")
    string(f"{param}.type", kind)
    if kind == "text":
        string(f"{param}.text", part.get("text"))


def check_tool_call(param: str, value: Any) -> None:
    call = mapping(param, value)
    string(f"{param}.id", call.get("id"))
    if call.get("type") != "function":
        raise invalid_value(f"{param}.type", "'function'", call.get("type"))
    function = mapping(f"{param}.function", call.get("function"))
    string(f"{param}.function.name", function.get("name"))
    string(f"{param}.function.arguments", function.get("arguments"))


# --- tools ----------------------------------------------------------------------


def check_function(param: str, value: Any) -> None:
    function = mapping(param, value)
    name = string(f"{param}.name", function.get("name"))
    if not TOOL_NAME.fullmatch(name):
        raise invalid_value(
            f"{param}.name",
            "a name of 1 to 64 letters, digits, underscores or dashes",
            name,
        )
    if function.get("description") is not None:
        string(f"{param}.description", function["description"])
    if function.get("parameters") is not None:
        mapping(f"{param}.parameters", function["parameters"])
    if function.get("strict") is not None:
        boolean(f"{param}.strict", function["strict"])


def check_tools(param: str, value: Any, req: Request) -> None:
    tools = array(param, value)
    limit = req.options.max_tools
    if len(tools) > limit:
        raise ProxyError(
            400,
            f"Invalid value for '{param}': expected at most {limit} tools, got {len(tools)}.",
            param=param,
            code="too_many_tools",
        )
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        mapping(where, tool)
        if tool.get("type") != "function":
            raise invalid_value(f"{where}.type", "'function'", tool.get("type"))
        check_function(f"{where}.function", tool.get("function"))


def declared_tools(body: dict[str, Any]) -> set[str]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return set()
    return {t["function"]["name"] for t in tools}


def check_tool_choice(param: str, value: Any, req: Request) -> None:
    modes = ("none", "auto", "required")
    expected = _one_of(modes) + ' or {"type": "function", "function": {"name": ...}}'
    if isinstance(value, str):
        if value not in modes:
            raise invalid_value(param, expected, value)
        if value == "required" and not declared_tools(req.body):
            raise ProxyError(
                400,
                f"Invalid value for '{param}': 'required' needs at least one tool in 'tools'.",
                param=param,
                code="invalid_value",
            )
        return
    if not isinstance(value, dict):
        raise invalid_type(param, expected, value)
    if value.get("type") != "function":
        raise invalid_value(f"{param}.type", "'function'", value.get("type"))
    function = mapping(f"{param}.function", value.get("function"))
    name = function.get("name")
    string(f"{param}.function.name", name)
    if name not in declared_tools(req.body):
        raise invalid_value(
            f"{param}.function.name", "the name of a tool declared in 'tools'", name
        )


def check_functions(param: str, value: Any, req: Request) -> None:
    for i, function in enumerate(array(param, value)):
        check_function(f"{param}[{i}]", function)


def check_function_call(param: str, value: Any, req: Request) -> None:
    if isinstance(value, str):
        if value not in ("none", "auto"):
            raise invalid_value(param, "'none', 'auto' or {\"name\": ...}", value)
        return
    string(f"{param}.name", mapping(param, value).get("name"))


# --- the other parameters -----------------------------------------------------------


def check_stop(param: str, value: Any, req: Request) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise invalid_type(param, f"a string or an array of up to {MAX_STOP} strings", value)
    if len(value) > MAX_STOP:
        raise invalid_value(param, f"an array of up to {MAX_STOP} strings", value)
    for i, item in enumerate(value):
        string(f"{param}[{i}]", item)


def check_stream_options(param: str, value: Any, req: Request) -> None:
    options = mapping(param, value)
    if req.body.get("stream") is not True:
        raise ProxyError(
            400,
            f"Invalid value for '{param}': 'stream_options' is only allowed when 'stream' is true.",
            param=param,
            code="invalid_value",
        )
    for key in ("include_usage", "continuous_usage_stats", "include_obfuscation"):
        if options.get(key) is not None:
            boolean(f"{param}.{key}", options[key])


def check_top_logprobs(param: str, value: Any, req: Request) -> None:
    integer(param, value, 0, 20)
    if req.body.get("logprobs") is not True:
        raise ProxyError(
            400,
            f"Invalid value for '{param}': 'logprobs' must be true when 'top_logprobs' is set.",
            param=param,
            code="invalid_value",
        )


def check_logit_bias(param: str, value: Any, req: Request) -> None:
    for key, bias in mapping(param, value).items():
        if not key.isascii() or not key.isdigit():
            raise invalid_value(param, "token ids (strings of digits) as keys", key)
        number(f"{param}.{key}", bias, -100, 100)


def check_response_format(param: str, value: Any, req: Request) -> None:
    fmt = mapping(param, value)
    kind = fmt.get("type")
    string(f"{param}.type", kind)
    if kind == "json_schema":
        schema = mapping(f"{param}.json_schema", fmt.get("json_schema"))
        string(f"{param}.json_schema.name", schema.get("name"))
        if schema.get("schema") is not None:
            mapping(f"{param}.json_schema.schema", schema["schema"])


def check_strings(param: str, value: Any, req: Request) -> None:
    for i, item in enumerate(array(param, value)):
        string(f"{param}[{i}]", item)


def _n(param: str, value: Any, req: Request) -> None:
    integer(param, value, 1, req.options.max_n)


def _simple(check: Callable[[str, Any], Any], kind: type | None = None) -> Checker:
    """`check` as a rule; a value of exactly type `kind`, which `check` accepts,
    skips the call."""
    if kind is None:

        def run(param: str, value: Any, req: Request) -> None:
            check(param, value)

        return run

    def run_kind(param: str, value: Any, req: Request) -> None:
        if type(value) is not kind:
            check(param, value)

    return run_kind


def _range(lo: float, hi: float) -> Checker:
    def run(param: str, value: Any, req: Request) -> None:
        kind = type(value)
        if (kind is float or kind is int) and lo <= value <= hi:
            return
        number(param, value, lo, hi)

    return run


def _int(lo: int, hi: int = MAX_SAFE_INT) -> Checker:
    def run(param: str, value: Any, req: Request) -> None:
        if type(value) is int and lo <= value <= hi:
            return
        integer(param, value, lo, hi)

    return run


# Every top-level parameter of the Chat Completions API (the seed's table and the
# OpenAI fields clients send), with its check; a null value is not checked.
RULES: dict[str, Checker] = {
    "messages": check_messages,
    "model": _simple(string, str),
    "stream": _simple(boolean, bool),
    "temperature": _range(0, 2),
    "max_tokens": _int(1),
    "max_completion_tokens": _int(1),
    "top_p": _range(0, 1),
    "frequency_penalty": _range(-2, 2),
    "presence_penalty": _range(-2, 2),
    "stop": check_stop,
    "n": _n,
    "tools": check_tools,
    "tool_choice": check_tool_choice,
    "parallel_tool_calls": _simple(boolean, bool),
    "stream_options": check_stream_options,
    "user": _simple(string, str),
    "seed": _int(*INT64),
    "response_format": check_response_format,
    "logprobs": _simple(boolean, bool),
    "top_logprobs": check_top_logprobs,
    "logit_bias": check_logit_bias,
    "functions": check_functions,
    "function_call": check_function_call,
    "store": _simple(boolean, bool),
    "metadata": _simple(mapping, dict),
    "modalities": check_strings,
    "audio": _simple(mapping, dict),
    "prediction": _simple(mapping, dict),
    "web_search_options": _simple(mapping, dict),
    "reasoning_effort": _simple(string, str),
    "service_tier": _simple(string, str),
    "verbosity": _simple(string, str),
    "prompt_cache_key": _simple(string, str),
    "safety_identifier": _simple(string, str),
}


def validate_body(body: dict[str, Any], options: ValidateOptions) -> list[str]:
    """Raise ProxyError for the first bad parameter; return the unknown fields."""
    found = first_non_finite(body, "")
    if found is not None:
        where, value = found
        raise invalid_value(where, "a finite number", value)
    if body.get("messages") is None:
        raise ProxyError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    req = Request(body, options)
    unknown: list[str] = []
    rules = RULES
    for name, value in body.items():
        if name == "tool_choice":
            continue  # names a declared tool: checked once `tools` is known to be valid
        rule = rules.get(name)
        if rule is None:
            if options.extra_params == "reject":
                raise ProxyError(
                    400,
                    f"Unrecognized request argument supplied: '{name}'.",
                    param=name,
                    code="unknown_parameter",
                )
            unknown.append(name)
        elif value is not None:
            rule(name, value, req)
    if "tool_choice" in body:
        value = body["tool_choice"]
        if value is not None:
            rules["tool_choice"]("tool_choice", value, req)
    return unknown


@register("validate", ValidateOptions)
def validate(options: ValidateOptions, ctx: BuildContext) -> Middleware:
    def mw(ex: Exchange, call_next: Handler) -> Awaitable[web.StreamResponse]:
        # a plain function handing on the next handler's awaitable: no coroutine of
        # its own alive for the whole of a stream
        body = ex.body
        if ex.route is not CHAT or body is None:
            return call_next(ex)
        unknown = validate_body(body, options)
        if unknown and options.extra_params == "drop":
            for name in unknown:
                del body[name]
            ex.dropped_params = unknown
        return call_next(ex)

    return mw
