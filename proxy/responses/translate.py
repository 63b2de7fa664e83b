"""A Responses API request (POST /v1/responses) as a Chat Completions request.

The top-level parameters are here; the input items are in items.py, the tools, the
tool choice and the text format in tools.py, the small value checks in checks.py.

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

Why one module of over 400 lines: every top-level parameter of a Responses request
and what it becomes is one table, read best in one place (the input items, tools and
value checks are apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from proxy.checks import array, boolean, mapping, missing, opt_string, string
from proxy.errors import ProxyError, invalid_type, invalid_value
from proxy.responses.checks import integer, number, unsupported
from proxy.responses.items import translate_input
from proxy.responses.tools import translate_text, translate_tool_choice, translate_tools

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

    model = opt_string("model", body.get("model"))
    stream = body.get("stream") is not None and boolean("stream", body["stream"])
    store = body.get("store") is None or boolean("store", body["store"])
    previous = opt_string("previous_response_id", body.get("previous_response_id"))
    instructions = opt_string("instructions", body.get("instructions"))
    metadata = _metadata(body.get("metadata"))
    if body.get("stream_options") is not None:
        options = mapping("stream_options", body["stream_options"])
        if not stream:
            raise invalid_value("stream_options", "set only when 'stream' is true", options)

    raw_input = body.get("input")
    if raw_input is None and previous is None:
        raise missing("input", "Send the conversation's input (a string or a list of items).")
    input_items, messages = translate_input(raw_input)

    tools, chat_tools = translate_tools(body.get("tools"))
    names = frozenset(t["name"] for t in tools)
    tool_choice = body.get("tool_choice")
    tool_choice = "auto" if tool_choice is None else tool_choice
    chat_choice, chat_tools = translate_tool_choice(tool_choice, names, chat_tools)
    parallel = body.get("parallel_tool_calls")
    parallel = True if parallel is None else boolean("parallel_tool_calls", parallel)

    text, response_format = translate_text(body.get("text"))
    include = _include(body.get("include"))
    logprobs = LOGPROBS_INCLUDE in include
    top_logprobs = integer("top_logprobs", body.get("top_logprobs"), 0, 20)
    temperature = number("temperature", body.get("temperature"), 0, 2)
    top_p = number("top_p", body.get("top_p"), 0, 1)
    max_output = integer("max_output_tokens", body.get("max_output_tokens"), 1)
    max_tool_calls = integer("max_tool_calls", body.get("max_tool_calls"), 0)
    truncation = body.get("truncation")
    if truncation is None:
        truncation = "disabled"
    elif truncation not in ("auto", "disabled"):
        raise invalid_value("truncation", "'auto' or 'disabled'", truncation)
    reasoning = None
    if body.get("reasoning") is not None:
        reasoning = mapping("reasoning", body["reasoning"])
        for key in reasoning:
            if key not in ("effort", "summary", "generate_summary"):
                raise ProxyError(
                    400,
                    f"Unknown parameter: 'reasoning.{key}'.",
                    param=f"reasoning.{key}",
                    code="unknown_parameter",
                )
    user = opt_string("user", body.get("user"))
    safety = opt_string("safety_identifier", body.get("safety_identifier"))
    cache_key = opt_string("prompt_cache_key", body.get("prompt_cache_key"))

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
    if body.get("background") is not None and boolean("background", body["background"]):
        raise unsupported(
            "background",
            "Background responses are not supported: the proxy answers within the request "
            "(stream it for long answers).",
        )
    if body.get("background_options") is not None:
        raise unsupported(
            "background_options",
            "Background responses are not supported: the proxy answers within the request.",
        )
    if body.get("conversation") is not None:
        raise unsupported(
            "conversation",
            "Conversations objects are not supported: continue a conversation with "
            "'previous_response_id'.",
        )
    if body.get("prompt") is not None:
        raise unsupported(
            "prompt",
            "Prompt templates are not supported: they are stored at OpenAI. Send the "
            "prompt as 'instructions' and 'input'.",
        )
    if body.get("context_management"):
        raise unsupported(
            "context_management",
            "Context management (compaction) is not supported by chat backends.",
        )
    if body.get("moderation") is not None:
        raise unsupported(
            "moderation", "Moderation is not supported: the proxy runs no moderation model."
        )
    options = body.get("prompt_cache_options")
    if isinstance(options, dict) and options.get("prewarm") is True:
        raise unsupported(
            "prompt_cache_options.prewarm",
            "Prewarming the prompt cache is not supported: every request here generates.",
        )


def _include(value: Any) -> list[str]:
    if value is None:
        return []
    include = []
    for i, raw in enumerate(array("include", value)):
        name = string(f"include[{i}]", raw)
        if name not in INCLUDABLE:
            expected = "one of " + ", ".join(f"'{v}'" for v in sorted(INCLUDABLE))
            raise invalid_value(f"include[{i}]", expected, name)
        include.append(name)
    return include


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    doc = mapping("metadata", value)
    for key, item in doc.items():
        string(f"metadata.{key}", item)
    return dict(doc)
