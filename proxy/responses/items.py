"""A Responses request's input items as chat messages: messages and their content
parts, function calls and their outputs, reasoning items; what cannot be translated
is a 400 that names the item and why."""

from __future__ import annotations

from typing import Any

from proxy.checks import array, mapping, missing, string
from proxy.errors import invalid_type, invalid_value
from proxy.responses.checks import new_id, unsupported

# Input item types produced by OpenAI's built-in tools.
HOSTED_ITEMS = {
    "file_search_call": "file search",
    "computer_call": "computer use",
    "computer_call_output": "computer use",
    "web_search_call": "web search",
    "image_generation_call": "image generation",
    "code_interpreter_call": "the code interpreter",
    "local_shell_call": "the local shell tool",
    "local_shell_call_output": "the local shell tool",
    "shell_call": "the shell tool",
    "shell_call_output": "the shell tool",
    "apply_patch_call": "the apply_patch tool",
    "apply_patch_call_output": "the apply_patch tool",
    "mcp_list_tools": "MCP servers",
    "mcp_approval_request": "MCP servers",
    "mcp_approval_response": "MCP servers",
    "mcp_call": "MCP servers",
    "custom_tool_call": "custom tools",
    "custom_tool_call_output": "custom tools",
    "tool_search_call": "tool search",
    "tool_search_output": "tool search",
    "additional_tools": "tool search",
    "program": "programmatic tool calling",
    "program_output": "programmatic tool calling",
    "compaction": "compaction",
    "compaction_trigger": "compaction",
    "configuration_update": "WebSocket sessions",
}

ROLES = ("user", "system", "developer", "assistant")


# --- input --------------------------------------------------------------------------


def translate_input(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input as stored items and as chat messages."""
    if value is None:
        return [], []
    if isinstance(value, str):
        item = {
            "id": new_id("msg"),
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": value}],
            "status": "completed",
        }
        return [item], [{"role": "user", "content": value}]
    items = array("input", value)
    stored: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for i, raw in enumerate(items):
        where = f"input[{i}]"
        item = mapping(where, raw)
        kind = item.get("type")
        if kind is None and "role" in item:
            kind = "message"
        if kind is None:
            raise missing(f"{where}.type", "An input item needs a type (or a role, for a message).")
        if kind == "message":
            stored_item, message = _message(where, item)
            stored.append(stored_item)
            messages.append(message)
        elif kind == "function_call":
            stored_item, call = _function_call(where, item)
            stored.append(stored_item)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if last.get("content") == "":
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            stored_item, message = _function_output(where, item)
            stored.append(stored_item)
            messages.append(message)
        elif kind == "reasoning":
            stored.append(_reasoning(where, item))
        elif kind == "item_reference":
            raise unsupported(
                where,
                f"Input item {where} is an item_reference: items are referenced by id only in "
                "OpenAI's own store. Send the item itself, or continue with "
                "'previous_response_id'.",
                "unsupported_input",
            )
        elif isinstance(kind, str) and kind in HOSTED_ITEMS:
            raise unsupported(
                where,
                f"Input item {where} of type '{kind}' belongs to {HOSTED_ITEMS[kind]}, a "
                "built-in OpenAI tool that chat backends do not have.",
                "unsupported_input",
            )
        else:
            raise unsupported(
                f"{where}.type",
                f"Input item {where} of type {kind!r} cannot be translated to Chat "
                "Completions: the types supported are message, function_call, "
                "function_call_output and reasoning.",
                "unsupported_input",
            )
    return stored, messages


def _message(where: str, item: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    role = item.get("role")
    if role is None:
        raise missing(f"{where}.role")
    if role not in ROLES:
        if not isinstance(role, str):
            raise invalid_type(f"{where}.role", "a string", role)
        raise invalid_value(
            f"{where}.role", "one of 'user', 'system', 'developer' or 'assistant'", role
        )
    content = item.get("content")
    if content is None:
        raise missing(f"{where}.content")
    assistant = role == "assistant"
    if isinstance(content, str):
        parts = [{"type": "output_text" if assistant else "input_text", "text": content}]
    else:
        parts = array(f"{where}.content", content)
    stored_parts: list[dict[str, Any]] = []
    chat_parts: list[dict[str, Any]] = []
    for k, raw in enumerate(parts):
        stored_part, chat_part = _part(f"{where}.content[{k}]", raw, role)
        stored_parts.append(stored_part)
        chat_parts.append(chat_part)
    stored: dict[str, Any] = {
        "id": item.get("id") if isinstance(item.get("id"), str) else new_id("msg"),
        "type": "message",
        "role": role,
        "content": stored_parts,
        "status": "completed",
    }
    chat_role = "system" if role == "developer" else role
    texts = [p["text"] for p in chat_parts if p["type"] == "text"]
    chat_content: str | list[dict[str, Any]]
    if len(texts) == len(chat_parts) and (chat_role != "user" or len(texts) == 1):
        chat_content = ("" if assistant else "\n").join(texts)
    else:
        chat_content = chat_parts
    return stored, {"role": chat_role, "content": chat_content}


def _part(where: str, raw: Any, role: str) -> tuple[dict[str, Any], dict[str, Any]]:
    part = mapping(where, raw)
    kind = part.get("type")
    if kind is None:
        raise missing(f"{where}.type")
    assistant = role == "assistant"
    if kind in ("input_text", "output_text"):
        text = string(f"{where}.text", part.get("text"))
        if kind == "output_text" and not assistant:
            raise unsupported(
                f"{where}.type",
                f"Content part {where} of type 'output_text' belongs in an assistant "
                "message; use 'input_text'.",
                "invalid_value",
            )
        stored = (
            {"type": "output_text", "text": text, "annotations": []}
            if assistant
            else {
                "type": "input_text",
                "text": text,
            }
        )
        return stored, {"type": "text", "text": text}
    if kind == "refusal":
        if not assistant:
            raise unsupported(
                f"{where}.type",
                f"Content part {where} of type 'refusal' belongs in an assistant message.",
                "invalid_value",
            )
        text = string(f"{where}.refusal", part.get("refusal"))
        # chat backends have no refusal field; the model sees what it said as text
        return {"type": "refusal", "refusal": text}, {"type": "text", "text": text}
    if kind == "input_image":
        if role != "user":
            raise unsupported(
                where,
                f"Content part {where} is an image in a {role} message: chat backends take "
                "images in user messages only.",
                "unsupported_input",
            )
        if part.get("file_id") is not None:
            raise unsupported(
                f"{where}.file_id",
                f"Content part {where} names an image by file_id: the proxy has no files "
                "API. Send the image as 'image_url' (a URL or a data: URL).",
                "unsupported_input",
            )
        url = part.get("image_url")
        if url is None:
            raise missing(f"{where}.image_url", "An image needs an image_url.")
        string(f"{where}.image_url", url)
        detail = part.get("detail")
        image: dict[str, Any] = {"url": url}
        if detail is not None:
            image["detail"] = string(f"{where}.detail", detail)
        return (
            {"type": "input_image", "image_url": url, "detail": detail or "auto"},
            {"type": "image_url", "image_url": image},
        )
    if kind == "input_file":
        raise unsupported(
            where,
            f"Content part {where} is a file (input_file): chat backends cannot read "
            "documents, and the proxy does not extract their text. Send the text as "
            "'input_text'.",
            "unsupported_input",
        )
    if kind == "input_audio":
        raise unsupported(
            where,
            f"Content part {where} is audio (input_audio): the chat backends behind this "
            "proxy take no audio input.",
            "unsupported_input",
        )
    raise unsupported(
        f"{where}.type",
        f"Content part {where} of type {kind!r} cannot be translated: the types supported "
        "are input_text, input_image, and output_text and refusal in assistant messages.",
        "unsupported_input",
    )


def _function_call(where: str, item: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    call_id = item.get("call_id")
    if call_id is None:
        raise missing(f"{where}.call_id")
    string(f"{where}.call_id", call_id)
    name = item.get("name")
    if name is None:
        raise missing(f"{where}.name")
    string(f"{where}.name", name)
    arguments = item.get("arguments")
    if arguments is None:
        raise missing(f"{where}.arguments")
    string(f"{where}.arguments", arguments)
    stored = {
        "id": item.get("id") if isinstance(item.get("id"), str) else new_id("fc"),
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }
    return stored, {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _function_output(where: str, item: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    call_id = item.get("call_id")
    if call_id is None:
        raise missing(
            f"{where}.call_id", "A function_call_output answers the function_call of that call_id."
        )
    string(f"{where}.call_id", call_id)
    output = item.get("output")
    if output is None:
        raise missing(f"{where}.output")
    if isinstance(output, str):
        text = output
    else:
        texts = []
        for k, raw in enumerate(array(f"{where}.output", output)):
            part = mapping(f"{where}.output[{k}]", raw)
            kind = part.get("type")
            if kind in ("input_text", "output_text"):
                texts.append(string(f"{where}.output[{k}].text", part.get("text")))
            else:
                raise unsupported(
                    f"{where}.output[{k}]",
                    f"Part {where}.output[{k}] of type {kind!r}: a chat tool message carries "
                    "text only, so a function's output can hold input_text parts only.",
                    "unsupported_input",
                )
        text = "".join(texts)
    stored = {
        "id": item.get("id") if isinstance(item.get("id"), str) else new_id("fco"),
        "type": "function_call_output",
        "call_id": call_id,
        "output": output,
        "status": "completed",
    }
    return stored, {"role": "tool", "tool_call_id": call_id, "content": text}


def _reasoning(where: str, item: dict[str, Any]) -> dict[str, Any]:
    stored = dict(item)
    if not isinstance(stored.get("id"), str):
        stored["id"] = new_id("rs")
    summary = stored.get("summary")
    stored["summary"] = array(f"{where}.summary", summary) if summary is not None else []
    return stored
