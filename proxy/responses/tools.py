"""A Responses request's tools, tool_choice and text format as chat's."""

from __future__ import annotations

from typing import Any

from proxy.checks import array, boolean, mapping, missing, opt_string, string
from proxy.errors import ProxyError, invalid_value
from proxy.responses.checks import unsupported

# Why a tool type other than function cannot be served by a chat backend.
HOSTED_TOOLS = {
    "web_search": "web search",
    "web_search_preview": "web search",
    "web_search_2025_08_26": "web search",
    "web_search_preview_2025_03_11": "web search",
    "file_search": "file search over OpenAI vector stores",
    "code_interpreter": "the code interpreter",
    "computer": "computer use",
    "computer_use": "computer use",
    "computer_use_preview": "computer use",
    "mcp": "calls to remote MCP servers",
    "image_generation": "image generation",
    "local_shell": "the local shell tool",
    "shell": "the shell tool",
    "apply_patch": "the apply_patch tool",
    "tool_search": "tool search",
    "namespace": "tool namespaces",
    "programmatic_tool_calling": "programmatic tool calling",
}


# --- tools --------------------------------------------------------------------------


def translate_tools(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The function tools as echoed, and as chat tools."""
    if value is None:
        return [], []
    echoed: list[dict[str, Any]] = []
    chat: list[dict[str, Any]] = []
    for i, raw in enumerate(array("tools", value)):
        where = f"tools[{i}]"
        tool = mapping(where, raw)
        kind = tool.get("type")
        if kind is None:
            raise missing(f"{where}.type")
        if kind != "function":
            what = HOSTED_TOOLS.get(kind) if isinstance(kind, str) else None
            if kind == "custom":
                why = (
                    "custom tools take free-form input under a grammar, and chat backends "
                    "call only functions with JSON arguments. Declare it as a tool of type "
                    "'function'."
                )
            elif what is not None:
                why = (
                    f"it is {what}, a tool OpenAI runs on its own servers; the backends "
                    "behind this proxy only call functions that the client defines and "
                    "runs (tools of type 'function')."
                )
            else:
                why = "only tools of type 'function' can be translated to Chat Completions."
            raise unsupported(
                f"{where}.type",
                f"The tool {where} of type {kind!r} is not supported: {why}",
                "unsupported_tool",
            )
        name = tool.get("name")
        if name is None:
            if isinstance(tool.get("function"), dict):
                raise unsupported(
                    f"{where}.name",
                    f"The tool {where} has the Chat Completions shape: in the Responses API a "
                    'function tool is flat ({"type": "function", "name", "parameters", '
                    "...}).",
                    "missing_required_parameter",
                )
            raise missing(f"{where}.name")
        string(f"{where}.name", name)
        description = opt_string(f"{where}.description", tool.get("description"))
        parameters = tool.get("parameters")
        if parameters is not None:
            mapping(f"{where}.parameters", parameters)
        strict = tool.get("strict")
        if strict is not None:
            boolean(f"{where}.strict", strict)
        function: dict[str, Any] = {"name": name}
        if description is not None:
            function["description"] = description
        if parameters is not None:
            function["parameters"] = parameters
        if strict is not None:
            function["strict"] = strict
        chat.append({"type": "function", "function": function})
        echoed.append(
            {
                "type": "function",
                "name": name,
                "description": description,
                "parameters": parameters,
                "strict": strict,
            }
        )
    return echoed, chat


def translate_tool_choice(
    value: Any, names: frozenset[str], chat_tools: list[dict[str, Any]]
) -> tuple[str | dict[str, Any], list[dict[str, Any]]]:
    """Chat's tool_choice, and the chat tools (filtered for allowed_tools)."""
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise invalid_value("tool_choice", "'auto', 'none', 'required' or an object", value)
        if value == "required" and not names:
            raise ProxyError(
                400,
                "Invalid value for 'tool_choice': 'required' needs at least one tool in 'tools'.",
                param="tool_choice",
                code="invalid_value",
            )
        return value, chat_tools
    choice = mapping("tool_choice", value)
    kind = choice.get("type")
    if kind == "function":
        name = choice.get("name")
        if name is None:
            raise missing("tool_choice.name")
        string("tool_choice.name", name)
        if name not in names:
            raise invalid_value("tool_choice.name", "the name of a function in 'tools'", name)
        return {"type": "function", "function": {"name": name}}, chat_tools
    if kind == "allowed_tools":
        mode = choice.get("mode")
        if mode not in ("auto", "required"):
            raise invalid_value("tool_choice.mode", "'auto' or 'required'", mode)
        allowed: set[str] = set()
        for i, raw in enumerate(array("tool_choice.tools", choice.get("tools"))):
            where = f"tool_choice.tools[{i}]"
            entry = mapping(where, raw)
            if entry.get("type") != "function":
                raise unsupported(
                    f"{where}.type",
                    f"The allowed tool {where} of type {entry.get('type')!r} is not supported: "
                    "only tools of type 'function' exist here.",
                    "unsupported_tool",
                )
            name = string(f"{where}.name", entry.get("name"))
            if name not in names:
                raise invalid_value(f"{where}.name", "the name of a function in 'tools'", name)
            allowed.add(name)
        kept = [t for t in chat_tools if t["function"]["name"] in allowed]
        return mode, kept
    what = HOSTED_TOOLS.get(kind) if isinstance(kind, str) else None
    if kind == "custom" or what is not None:
        raise unsupported(
            "tool_choice.type",
            f"tool_choice of type {kind!r} is not supported: only function tools exist here.",
            "unsupported_tool",
        )
    raise invalid_value(
        "tool_choice.type", "'function' or 'allowed_tools' (or a string mode)", kind
    )


# --- text format --------------------------------------------------------------------


def translate_text(value: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The text config as echoed, and chat's response_format (None for plain text)."""
    if value is None:
        return {"format": {"type": "text"}}, None
    text = dict(mapping("text", value))
    for key in text:
        if key not in ("format", "verbosity"):
            raise ProxyError(
                400,
                f"Unknown parameter: 'text.{key}'.",
                param=f"text.{key}",
                code="unknown_parameter",
            )
    verbosity = text.get("verbosity")
    if verbosity is not None and verbosity not in ("low", "medium", "high"):
        raise invalid_value("text.verbosity", "'low', 'medium' or 'high'", verbosity)
    fmt = text.get("format")
    if fmt is None:
        text["format"] = {"type": "text"}
        return text, None
    fmt = mapping("text.format", fmt)
    kind = fmt.get("type")
    if kind == "text":
        return text, None
    if kind == "json_object":
        return text, {"type": "json_object"}
    if kind == "json_schema":
        name = fmt.get("name")
        if name is None:
            raise missing("text.format.name")
        string("text.format.name", name)
        schema = fmt.get("schema")
        if schema is None:
            raise missing("text.format.schema")
        mapping("text.format.schema", schema)
        spec: dict[str, Any] = {"name": name, "schema": schema}
        if fmt.get("strict") is not None:
            spec["strict"] = boolean("text.format.strict", fmt["strict"])
        if fmt.get("description") is not None:
            spec["description"] = string("text.format.description", fmt["description"])
        return text, {"type": "json_schema", "json_schema": spec}
    if kind is None:
        raise missing("text.format.type")
    raise invalid_value("text.format.type", "'text', 'json_schema' or 'json_object'", kind)
