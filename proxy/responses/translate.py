"""A Responses API request (POST /v1/responses) as a Chat Completions request.

`to_chat(body)` returns a `ChatCall`: the chat body to send, and what answering needs
(the fields a Response object echoes, the declared tools, whether logprobs were asked
for). It raises `ProxyError` 400 for what a chat backend cannot do, naming the
parameter (`param`) and saying why; nothing the client sent is dropped without a
word, except where this docstring says so.

How each parameter goes over:

- `input`: a string is one user message. A list holds items: messages (roles user,
  system, developer, assistant; `content` a string or parts `input_text`,
  `input_image`, and for the assistant `output_text` and `refusal`; the easy form
  without `type` too), `function_call` items (consecutive ones, and one following an
  assistant message, join one assistant message with `tool_calls`, as chat templates
  expect), `function_call_output` items (a `tool` message, `tool_call_id` = `call_id`)
  and `reasoning` items.
- `developer` becomes `system`: most chat templates know only system, user,
  assistant and tool, and llama.cpp and Ollama hand the role to the template.
  `instructions` and the system messages that open the conversation are joined into
  one leading system message (several templates refuse a second one).
- `reasoning` input items are accepted and not sent: chat templates drop earlier
  turns' reasoning anyway, and clients (the Agents SDK) send these items back on
  every turn, so refusing them would break every conversation with a reasoning
  model. They stay in `input_items`.
- `input_image` with `image_url` becomes a chat `image_url` part (in user messages):
  the proxy cannot know whether the backend has vision, so a backend without it
  refuses the request itself. `file_id` images, `input_file` and `input_audio` are
  refused: the proxy has no files API and chat backends take no audio or documents.
- `item_reference`, items of built-in tools (web_search_call, computer_call, ...)
  and other item types are refused.
- `tools` of type `function` become chat tools; every other type (web_search,
  file_search, code_interpreter, computer_use, mcp, image_generation, custom, shell,
  ...) is refused: OpenAI runs those tools on its side, and a chat backend only
  calls functions the client defines and runs.
- `tool_choice`: "auto", "none", "required" and {"type": "function", "name"} map to
  chat's; {"type": "allowed_tools"} becomes chat tools filtered to the allowed ones
  with its mode as tool_choice (chat's own allowed_tools is OpenAI's only).
- `max_output_tokens` becomes `max_tokens`: llama.cpp, Ollama and older vLLM read
  `max_tokens`, not `max_completion_tokens`.
- `text.format`: json_schema becomes `response_format` {type: json_schema,
  json_schema: {name, schema, strict, description}}, json_object {type:
  json_object}, text none. `text.verbosity` is echoed, not sent (no chat backend
  has it).
- `temperature`, `top_p`, `user`, `safety_identifier` and `prompt_cache_key` go over
  unchanged (the last two are Chat Completions parameters too; backends that do not
  know them ignore them). `parallel_tool_calls` is sent whenever there are tools
  (true when absent, the Responses default; llama.cpp's own default is false).
- `include`: "message.output_text.logprobs" asks the backend for logprobs
  (`logprobs: true`, `top_logprobs` = the request's, 0 when absent); OpenAI returns
  logprobs only then, and so does the proxy. The other includable values enrich
  items of built-in tools or features this proxy never produces and change nothing.
- `reasoning.effort` low, medium or high becomes chat `reasoning_effort` (vLLM's
  gpt-oss and Ollama's thinking models read it; the others ignore it); other
  efforts and `summary` have no chat equivalent and are only echoed. Refusing
  `reasoning` would break clients that send it by default for reasoning models.
- `stream` true streams with `stream_options: {include_usage: true}`, so the final
  event carries usage. `stream_options.include_obfuscation` is accepted; the proxy
  adds no obfuscation field.
- `truncation` ("auto" or "disabled") is echoed and left to the caller: chat
  backends have no truncation, and one whose context overflows answers 400, which is
  what "disabled" means.
- `metadata`, `store` and `previous_response_id` stay with the proxy; `instructions`
  are not carried to a later turn (as OpenAI does), which `with_history` respects.
- `max_tool_calls` counts built-in tool calls only: echoed, no effect.
  `service_tier`, `prompt_cache_retention`, `prompt_cache_options`, `image` and
  `access_programs` are OpenAI account and caching settings that mean nothing to a
  chat backend: accepted, not sent, not echoed.
- Refused: `background` true and `background_options` (the proxy answers within the
  request), `conversation` (use previous_response_id), `prompt` (templates live at
  OpenAI), `context_management` (compaction), `moderation`, and
  `prompt_cache_options.prewarm` true (it asks for no output at all).
- Any other top-level field is a 400 `unknown_parameter`, as at OpenAI, unless
  `extra_params` is "allow" (sent to the backend as is, for vLLM's `top_k` and the
  like) or "drop". Chat Completions fields that the translation itself produces
  (`messages`, `n`, `max_tokens`, `response_format`, ...) are refused in every mode,
  with the Responses parameter to use instead.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from proxy.errors import ProxyError, invalid_type, invalid_value

ExtraParams = Literal["reject", "allow", "drop"]

LOGPROBS_INCLUDE = "message.output_text.logprobs"
INCLUDABLE = frozenset(
    {
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
        "reasoning.encrypted_content",
        LOGPROBS_INCLUDE,
    }
)
CHAT_EFFORTS = ("low", "medium", "high")

# Top-level parameters of POST /v1/responses that this module handles (translated,
# kept, ignored or refused with a reason); anything else is unknown.
HANDLED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "max_tool_calls",
        "temperature",
        "top_p",
        "top_logprobs",
        "text",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "metadata",
        "store",
        "previous_response_id",
        "stream",
        "stream_options",
        "include",
        "reasoning",
        "truncation",
        "service_tier",
        "image",
        "access_programs",
        "background",
        "background_options",
        "conversation",
        "prompt",
        "context_management",
        "moderation",
    }
)

# Chat Completions fields a Responses client might send by habit, with the
# Responses way to say it.
CHAT_ONLY = {
    "messages": "use 'input' (a string or a list of items) and 'instructions'",
    "n": "the Responses API makes one answer per request",
    "max_tokens": "use 'max_output_tokens'",
    "max_completion_tokens": "use 'max_output_tokens'",
    "response_format": "use 'text.format'",
    "logprobs": "use 'include': ['message.output_text.logprobs']",
    "functions": "use 'tools' with tools of type 'function'",
    "function_call": "use 'tool_choice'",
    "reasoning_effort": "use 'reasoning.effort'",
    "verbosity": "use 'text.verbosity'",
}

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


@dataclass(frozen=True)
class ChatCall:
    """A Responses request translated: `body` is the Chat Completions request; the
    other fields are what the answer's translation and the response store need."""

    body: dict[str, Any]
    model: str | None
    stream: bool
    store: bool
    previous_response_id: str | None
    instructions: str | None
    metadata: dict[str, str]
    # the request's input as Responses items, each with a type, an id and a status,
    # message content as a list of parts: what a stored response lists as its input
    input_items: list[dict[str, Any]]
    # the chat messages of this request's input alone (no instructions, no history)
    messages: list[dict[str, Any]]
    # the Responses function tools as the Response object echoes them
    tools: list[dict[str, Any]]
    tool_names: frozenset[str]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    text: dict[str, Any]
    logprobs: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    truncation: str = "disabled"
    reasoning: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    include: list[str] = field(default_factory=list)
    # the chat messages of earlier turns (previous_response_id), set by with_history
    history: list[dict[str, Any]] = field(default_factory=list)

    def echo(self) -> dict[str, Any]:
        """The request's fields as a Response object repeats them. Sampling values
        the request left out are null: the backend's defaults are not known here."""
        text = dict(self.text)
        text.setdefault("format", {"type": "text"})
        return {
            "background": False,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": self.max_tool_calls,
            "metadata": dict(self.metadata),
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "prompt_cache_key": self.prompt_cache_key,
            "reasoning": dict(self.reasoning)
            if self.reasoning is not None
            else {"effort": None, "summary": None},
            "safety_identifier": self.safety_identifier,
            "store": self.store,
            "temperature": self.temperature,
            "text": text,
            "tool_choice": self.tool_choice,
            "tools": [dict(t) for t in self.tools],
            "top_logprobs": self.top_logprobs if self.top_logprobs is not None else 0,
            "top_p": self.top_p,
            "truncation": self.truncation,
            "user": self.user,
        }


def with_history(call: ChatCall, history: list[dict[str, Any]]) -> ChatCall:
    """The call continuing a stored conversation: `history` (the chat messages of
    the earlier turns, as `answer.messages_after` gave them) goes between this
    request's instructions and its input."""
    history = list(history)
    body = dict(call.body)
    body["messages"] = compose(call.instructions, history, call.messages)
    return replace(call, body=body, history=history)


def compose(
    instructions: str | None, history: list[dict[str, Any]], messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Instructions, then the earlier turns, then this input; the system messages
    that open the conversation joined into one."""
    out: list[dict[str, Any]] = []
    lead: list[str] = [instructions] if instructions else []
    rest = [*history, *messages]
    i = 0
    while (
        i < len(rest)
        and rest[i].get("role") == "system"
        and isinstance(rest[i].get("content"), str)
    ):
        lead.append(rest[i]["content"])
        i += 1
    if lead:
        out.append({"role": "system", "content": "\n\n".join(lead)})
    out.extend(rest[i:])
    return out


# --- small checks -------------------------------------------------------------------


def _missing(param: str, why: str = "") -> ProxyError:
    return ProxyError(
        400,
        f"Missing required parameter: '{param}'." + (f" {why}" if why else ""),
        param=param,
        code="missing_required_parameter",
    )


def _unsupported(param: str, message: str, code: str = "unsupported_parameter") -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def _string(param: str, value: Any) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    return value


def _opt_string(param: str, value: Any) -> str | None:
    return None if value is None else _string(param, value)


def _bool(param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid_type(param, "a boolean", value)
    return value


def _object(param: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_type(param, "an object", value)
    return value


def _array(param: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise invalid_type(param, "an array", value)
    return value


def _number(param: str, value: Any, lo: float, hi: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid_type(param, "a number", value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise invalid_value(param, f"a number between {lo:g} and {hi:g}", value)
    return value


def _integer(param: str, value: Any, lo: int, hi: int = 2**53 - 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(param, "an integer", value)
    if not lo <= value <= hi:
        raise invalid_value(param, f"an integer between {lo} and {hi}", value)
    return value


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


# --- the request --------------------------------------------------------------------


def to_chat(body: dict[str, Any], *, extra_params: ExtraParams = "reject") -> ChatCall:
    """Translate a Responses request body; ProxyError 400 for what cannot be."""
    if not isinstance(body, dict):
        raise invalid_type("body", "a JSON object", body)
    extras: dict[str, Any] = {}
    for key, value in body.items():
        if key in HANDLED:
            continue
        if key in CHAT_ONLY:
            raise ProxyError(
                400,
                f"Unknown parameter: '{key}'. It is a Chat Completions parameter: "
                f"{CHAT_ONLY[key]}.",
                param=key,
                code="unknown_parameter",
            )
        if extra_params == "reject":
            raise ProxyError(
                400, f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter"
            )
        if extra_params == "allow":
            extras[key] = value

    _refuse_unsupported(body)

    model = _opt_string("model", body.get("model"))
    stream = body.get("stream") is not None and _bool("stream", body["stream"])
    store = body.get("store") is None or _bool("store", body["store"])
    previous = _opt_string("previous_response_id", body.get("previous_response_id"))
    instructions = _opt_string("instructions", body.get("instructions"))
    metadata = _metadata(body.get("metadata"))
    if body.get("stream_options") is not None:
        options = _object("stream_options", body["stream_options"])
        if not stream:
            raise invalid_value("stream_options", "set only when 'stream' is true", options)

    raw_input = body.get("input")
    if raw_input is None and previous is None:
        raise _missing("input", "Send the conversation's input (a string or a list of items).")
    input_items, messages = _input(raw_input)

    tools, chat_tools = _tools(body.get("tools"))
    names = frozenset(t["name"] for t in tools)
    tool_choice = body.get("tool_choice")
    tool_choice = "auto" if tool_choice is None else tool_choice
    chat_choice, chat_tools = _tool_choice(tool_choice, names, chat_tools)
    parallel = body.get("parallel_tool_calls")
    parallel = True if parallel is None else _bool("parallel_tool_calls", parallel)

    text, response_format = _text(body.get("text"))
    include = _include(body.get("include"))
    logprobs = LOGPROBS_INCLUDE in include
    top_logprobs = _integer("top_logprobs", body.get("top_logprobs"), 0, 20)
    temperature = _number("temperature", body.get("temperature"), 0, 2)
    top_p = _number("top_p", body.get("top_p"), 0, 1)
    max_output = _integer("max_output_tokens", body.get("max_output_tokens"), 1)
    max_tool_calls = _integer("max_tool_calls", body.get("max_tool_calls"), 0)
    truncation = body.get("truncation")
    if truncation is None:
        truncation = "disabled"
    elif truncation not in ("auto", "disabled"):
        raise invalid_value("truncation", "'auto' or 'disabled'", truncation)
    reasoning = None
    if body.get("reasoning") is not None:
        reasoning = _object("reasoning", body["reasoning"])
        for key in reasoning:
            if key not in ("effort", "summary", "generate_summary"):
                raise ProxyError(
                    400,
                    f"Unknown parameter: 'reasoning.{key}'.",
                    param=f"reasoning.{key}",
                    code="unknown_parameter",
                )
    user = _opt_string("user", body.get("user"))
    safety = _opt_string("safety_identifier", body.get("safety_identifier"))
    cache_key = _opt_string("prompt_cache_key", body.get("prompt_cache_key"))

    chat: dict[str, Any] = {}
    if model is not None:
        chat["model"] = model
    chat["messages"] = compose(instructions, [], messages)
    if chat_tools:
        chat["tools"] = chat_tools
        chat["tool_choice"] = chat_choice
        chat["parallel_tool_calls"] = parallel
    if max_output is not None:
        chat["max_tokens"] = max_output
    if temperature is not None:
        chat["temperature"] = temperature
    if top_p is not None:
        chat["top_p"] = top_p
    if response_format is not None:
        chat["response_format"] = response_format
    if logprobs:
        chat["logprobs"] = True
        chat["top_logprobs"] = top_logprobs or 0
    if user is not None:
        chat["user"] = user
    if safety is not None:
        chat["safety_identifier"] = safety
    if cache_key is not None:
        chat["prompt_cache_key"] = cache_key
    if reasoning is not None and reasoning.get("effort") in CHAT_EFFORTS:
        chat["reasoning_effort"] = reasoning["effort"]
    chat.update(extras)
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}

    return ChatCall(
        body=chat,
        model=model,
        stream=stream,
        store=store,
        previous_response_id=previous,
        instructions=instructions,
        metadata=metadata,
        input_items=input_items,
        messages=messages,
        tools=tools,
        tool_names=names,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        text=text,
        logprobs=logprobs,
        temperature=temperature,
        top_p=top_p,
        max_output_tokens=max_output,
        max_tool_calls=max_tool_calls,
        top_logprobs=top_logprobs,
        truncation=truncation,
        reasoning=reasoning,
        user=user,
        safety_identifier=safety,
        prompt_cache_key=cache_key,
        include=include,
    )


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("background") is not None and _bool("background", body["background"]):
        raise _unsupported(
            "background",
            "Background responses are not supported: the proxy answers within the request "
            "(stream it for long answers).",
        )
    if body.get("background_options") is not None:
        raise _unsupported(
            "background_options",
            "Background responses are not supported: the proxy answers within the request.",
        )
    if body.get("conversation") is not None:
        raise _unsupported(
            "conversation",
            "Conversations objects are not supported: continue a conversation with "
            "'previous_response_id'.",
        )
    if body.get("prompt") is not None:
        raise _unsupported(
            "prompt",
            "Prompt templates are not supported: they are stored at OpenAI. Send the "
            "prompt as 'instructions' and 'input'.",
        )
    if body.get("context_management"):
        raise _unsupported(
            "context_management",
            "Context management (compaction) is not supported by chat backends.",
        )
    if body.get("moderation") is not None:
        raise _unsupported(
            "moderation", "Moderation is not supported: the proxy runs no moderation model."
        )
    options = body.get("prompt_cache_options")
    if isinstance(options, dict) and options.get("prewarm") is True:
        raise _unsupported(
            "prompt_cache_options.prewarm",
            "Prewarming the prompt cache is not supported: every request here generates.",
        )


def _include(value: Any) -> list[str]:
    if value is None:
        return []
    include = []
    for i, raw in enumerate(_array("include", value)):
        name = _string(f"include[{i}]", raw)
        if name not in INCLUDABLE:
            expected = "one of " + ", ".join(f"'{v}'" for v in sorted(INCLUDABLE))
            raise invalid_value(f"include[{i}]", expected, name)
        include.append(name)
    return include


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    doc = _object("metadata", value)
    for key, item in doc.items():
        _string(f"metadata.{key}", item)
    return dict(doc)


# --- input --------------------------------------------------------------------------


def _input(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input as stored items and as chat messages."""
    if value is None:
        return [], []
    if isinstance(value, str):
        item = {
            "id": _new_id("msg"),
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": value}],
            "status": "completed",
        }
        return [item], [{"role": "user", "content": value}]
    items = _array("input", value)
    stored: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for i, raw in enumerate(items):
        where = f"input[{i}]"
        item = _object(where, raw)
        kind = item.get("type")
        if kind is None and "role" in item:
            kind = "message"
        if kind is None:
            raise _missing(
                f"{where}.type", "An input item needs a type (or a role, for a message)."
            )
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
            raise _unsupported(
                where,
                f"Input item {where} is an item_reference: items are referenced by id only in "
                "OpenAI's own store. Send the item itself, or continue with "
                "'previous_response_id'.",
                "unsupported_input",
            )
        elif isinstance(kind, str) and kind in HOSTED_ITEMS:
            raise _unsupported(
                where,
                f"Input item {where} of type '{kind}' belongs to {HOSTED_ITEMS[kind]}, a "
                "built-in OpenAI tool that chat backends do not have.",
                "unsupported_input",
            )
        else:
            raise _unsupported(
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
        raise _missing(f"{where}.role")
    if role not in ROLES:
        if not isinstance(role, str):
            raise invalid_type(f"{where}.role", "a string", role)
        raise invalid_value(
            f"{where}.role", "one of 'user', 'system', 'developer' or 'assistant'", role
        )
    content = item.get("content")
    if content is None:
        raise _missing(f"{where}.content")
    assistant = role == "assistant"
    if isinstance(content, str):
        parts = [{"type": "output_text" if assistant else "input_text", "text": content}]
    else:
        parts = _array(f"{where}.content", content)
    stored_parts: list[dict[str, Any]] = []
    chat_parts: list[dict[str, Any]] = []
    for k, raw in enumerate(parts):
        stored_part, chat_part = _part(f"{where}.content[{k}]", raw, role)
        stored_parts.append(stored_part)
        chat_parts.append(chat_part)
    stored: dict[str, Any] = {
        "id": item.get("id") if isinstance(item.get("id"), str) else _new_id("msg"),
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
    part = _object(where, raw)
    kind = part.get("type")
    if kind is None:
        raise _missing(f"{where}.type")
    assistant = role == "assistant"
    if kind in ("input_text", "output_text"):
        text = _string(f"{where}.text", part.get("text"))
        if kind == "output_text" and not assistant:
            raise _unsupported(
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
            raise _unsupported(
                f"{where}.type",
                f"Content part {where} of type 'refusal' belongs in an assistant message.",
                "invalid_value",
            )
        text = _string(f"{where}.refusal", part.get("refusal"))
        # chat backends have no refusal field; the model sees what it said as text
        return {"type": "refusal", "refusal": text}, {"type": "text", "text": text}
    if kind == "input_image":
        if role != "user":
            raise _unsupported(
                where,
                f"Content part {where} is an image in a {role} message: chat backends take "
                "images in user messages only.",
                "unsupported_input",
            )
        if part.get("file_id") is not None:
            raise _unsupported(
                f"{where}.file_id",
                f"Content part {where} names an image by file_id: the proxy has no files "
                "API. Send the image as 'image_url' (a URL or a data: URL).",
                "unsupported_input",
            )
        url = part.get("image_url")
        if url is None:
            raise _missing(f"{where}.image_url", "An image needs an image_url.")
        _string(f"{where}.image_url", url)
        detail = part.get("detail")
        image: dict[str, Any] = {"url": url}
        if detail is not None:
            image["detail"] = _string(f"{where}.detail", detail)
        return (
            {"type": "input_image", "image_url": url, "detail": detail or "auto"},
            {"type": "image_url", "image_url": image},
        )
    if kind == "input_file":
        raise _unsupported(
            where,
            f"Content part {where} is a file (input_file): chat backends cannot read "
            "documents, and the proxy does not extract their text. Send the text as "
            "'input_text'.",
            "unsupported_input",
        )
    if kind == "input_audio":
        raise _unsupported(
            where,
            f"Content part {where} is audio (input_audio): the chat backends behind this "
            "proxy take no audio input.",
            "unsupported_input",
        )
    raise _unsupported(
        f"{where}.type",
        f"Content part {where} of type {kind!r} cannot be translated: the types supported "
        "are input_text, input_image, and output_text and refusal in assistant messages.",
        "unsupported_input",
    )


def _function_call(where: str, item: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    call_id = item.get("call_id")
    if call_id is None:
        raise _missing(f"{where}.call_id")
    _string(f"{where}.call_id", call_id)
    name = item.get("name")
    if name is None:
        raise _missing(f"{where}.name")
    _string(f"{where}.name", name)
    arguments = item.get("arguments")
    if arguments is None:
        raise _missing(f"{where}.arguments")
    _string(f"{where}.arguments", arguments)
    stored = {
        "id": item.get("id") if isinstance(item.get("id"), str) else _new_id("fc"),
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
        raise _missing(
            f"{where}.call_id", "A function_call_output answers the function_call of that call_id."
        )
    _string(f"{where}.call_id", call_id)
    output = item.get("output")
    if output is None:
        raise _missing(f"{where}.output")
    if isinstance(output, str):
        text = output
    else:
        texts = []
        for k, raw in enumerate(_array(f"{where}.output", output)):
            part = _object(f"{where}.output[{k}]", raw)
            kind = part.get("type")
            if kind in ("input_text", "output_text"):
                texts.append(_string(f"{where}.output[{k}].text", part.get("text")))
            else:
                raise _unsupported(
                    f"{where}.output[{k}]",
                    f"Part {where}.output[{k}] of type {kind!r}: a chat tool message carries "
                    "text only, so a function's output can hold input_text parts only.",
                    "unsupported_input",
                )
        text = "".join(texts)
    stored = {
        "id": item.get("id") if isinstance(item.get("id"), str) else _new_id("fco"),
        "type": "function_call_output",
        "call_id": call_id,
        "output": output,
        "status": "completed",
    }
    return stored, {"role": "tool", "tool_call_id": call_id, "content": text}


def _reasoning(where: str, item: dict[str, Any]) -> dict[str, Any]:
    stored = dict(item)
    if not isinstance(stored.get("id"), str):
        stored["id"] = _new_id("rs")
    summary = stored.get("summary")
    stored["summary"] = _array(f"{where}.summary", summary) if summary is not None else []
    return stored


# --- tools --------------------------------------------------------------------------


def _tools(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The function tools as echoed, and as chat tools."""
    if value is None:
        return [], []
    echoed: list[dict[str, Any]] = []
    chat: list[dict[str, Any]] = []
    for i, raw in enumerate(_array("tools", value)):
        where = f"tools[{i}]"
        tool = _object(where, raw)
        kind = tool.get("type")
        if kind is None:
            raise _missing(f"{where}.type")
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
            raise _unsupported(
                f"{where}.type",
                f"The tool {where} of type {kind!r} is not supported: {why}",
                "unsupported_tool",
            )
        name = tool.get("name")
        if name is None:
            if isinstance(tool.get("function"), dict):
                raise _unsupported(
                    f"{where}.name",
                    f"The tool {where} has the Chat Completions shape: in the Responses API a "
                    'function tool is flat ({"type": "function", "name", "parameters", '
                    "...}).",
                    "missing_required_parameter",
                )
            raise _missing(f"{where}.name")
        _string(f"{where}.name", name)
        description = _opt_string(f"{where}.description", tool.get("description"))
        parameters = tool.get("parameters")
        if parameters is not None:
            _object(f"{where}.parameters", parameters)
        strict = tool.get("strict")
        if strict is not None:
            _bool(f"{where}.strict", strict)
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


def _tool_choice(
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
    choice = _object("tool_choice", value)
    kind = choice.get("type")
    if kind == "function":
        name = choice.get("name")
        if name is None:
            raise _missing("tool_choice.name")
        _string("tool_choice.name", name)
        if name not in names:
            raise invalid_value("tool_choice.name", "the name of a function in 'tools'", name)
        return {"type": "function", "function": {"name": name}}, chat_tools
    if kind == "allowed_tools":
        mode = choice.get("mode")
        if mode not in ("auto", "required"):
            raise invalid_value("tool_choice.mode", "'auto' or 'required'", mode)
        allowed: set[str] = set()
        for i, raw in enumerate(_array("tool_choice.tools", choice.get("tools"))):
            where = f"tool_choice.tools[{i}]"
            entry = _object(where, raw)
            if entry.get("type") != "function":
                raise _unsupported(
                    f"{where}.type",
                    f"The allowed tool {where} of type {entry.get('type')!r} is not supported: "
                    "only tools of type 'function' exist here.",
                    "unsupported_tool",
                )
            name = _string(f"{where}.name", entry.get("name"))
            if name not in names:
                raise invalid_value(f"{where}.name", "the name of a function in 'tools'", name)
            allowed.add(name)
        kept = [t for t in chat_tools if t["function"]["name"] in allowed]
        return mode, kept
    what = HOSTED_TOOLS.get(kind) if isinstance(kind, str) else None
    if kind == "custom" or what is not None:
        raise _unsupported(
            "tool_choice.type",
            f"tool_choice of type {kind!r} is not supported: only function tools exist here.",
            "unsupported_tool",
        )
    raise invalid_value(
        "tool_choice.type", "'function' or 'allowed_tools' (or a string mode)", kind
    )


# --- text format --------------------------------------------------------------------


def _text(value: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The text config as echoed, and chat's response_format (None for plain text)."""
    if value is None:
        return {"format": {"type": "text"}}, None
    text = dict(_object("text", value))
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
    fmt = _object("text.format", fmt)
    kind = fmt.get("type")
    if kind == "text":
        return text, None
    if kind == "json_object":
        return text, {"type": "json_object"}
    if kind == "json_schema":
        name = fmt.get("name")
        if name is None:
            raise _missing("text.format.name")
        _string("text.format.name", name)
        schema = fmt.get("schema")
        if schema is None:
            raise _missing("text.format.schema")
        _object("text.format.schema", schema)
        spec: dict[str, Any] = {"name": name, "schema": schema}
        if fmt.get("strict") is not None:
            spec["strict"] = _bool("text.format.strict", fmt["strict"])
        if fmt.get("description") is not None:
            spec["description"] = _string("text.format.description", fmt["description"])
        return text, {"type": "json_schema", "json_schema": spec}
    if kind is None:
        raise _missing("text.format.type")
    raise invalid_value("text.format.type", "'text', 'json_schema' or 'json_object'", kind)
