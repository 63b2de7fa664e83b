"""A chat completion as a Responses API Response object, and the pieces of one that
the stream's events (proxy/responses/events.py) share.

- `status` is "completed", or "incomplete" with `incomplete_details.reason`
  "max_output_tokens" when the backend stopped for length and "content_filter" when
  it filtered; the output item that was cut short is "incomplete" too.
- `output`: a `reasoning` item first when the backend returned reasoning text
  (`reasoning_content`, or `reasoning` as newer vLLM and Ollama name it), then a
  `message` item (output_text, and a refusal part for chat's `refusal`), then one
  `function_call` item per tool call (`call_id` = the chat tool call's id). An answer
  without tool calls always has a message item, even an empty one, so that clients
  looking for the final message find it.
- Item ids are derived from the response id and the item's position, so a streamed
  answer and the same answer unstreamed have the same ids.
- `output_text` is a property of the SDK's Response class, not a field of the API's
  object (`model_dump` leaves it out), so it is not written.
- `usage` maps prompt/completion tokens to input/output tokens, with cached and
  reasoning tokens from chat's details (0 where the backend gives none); null when
  the backend reported no usage.
- The request's parameters are echoed as OpenAI echoes them (`ChatCall.echo`).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from proxy.responses.translate import ChatCall

ERROR_CODES = frozenset(
    {
        "server_error",
        "rate_limit_exceeded",
        "invalid_prompt",
        "invalid_image",
        "invalid_image_format",
        "invalid_base64_image",
        "invalid_image_url",
        "image_too_large",
        "image_too_small",
        "image_parse_error",
        "image_content_policy_violation",
        "invalid_image_mode",
        "image_file_too_large",
        "unsupported_image_media_type",
        "empty_image_file",
        "failed_to_download_image",
        "image_file_not_found",
    }
)


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(24)


def item_id(prefix: str, response_id: str, index: int) -> str:
    """The id of output item `index` of a response: `msg_`, `fc_`, `rs_` and
    `call_` (a tool call id the backend did not give) share the response's hex."""
    base = response_id[5:] if response_id.startswith("resp_") else response_id
    return f"{prefix}_{base}{index:04x}"


def usage_of(usage: Any) -> dict[str, Any] | None:
    """Chat's usage as the Responses API's."""
    if not isinstance(usage, dict):
        return None

    def count(doc: Any, key: str) -> int:
        value = doc.get(key) if isinstance(doc, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    prompt = count(usage, "prompt_tokens")
    completion = count(usage, "completion_tokens")
    total = count(usage, "total_tokens") or prompt + completion
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": count(usage.get("prompt_tokens_details"), "cached_tokens"),
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": count(usage.get("completion_tokens_details"), "reasoning_tokens")
        },
        "total_tokens": total,
    }


def outcome(finish_reason: Any) -> tuple[str, dict[str, Any] | None]:
    """The Response status and incomplete_details for chat's finish_reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def response_error(error: Any) -> dict[str, Any]:
    """A backend error (the OpenAI shape, its inner object, or text) as a Response's
    `error`: its code one of the codes the API defines."""
    inner = error.get("error", error) if isinstance(error, dict) else error
    if not isinstance(inner, dict):
        inner = {"message": str(inner) if inner is not None else None}
    message = inner.get("message")
    if not isinstance(message, str) or not message.strip():
        message = "The backend reported an error."
    code = inner.get("code")
    kind = inner.get("type")
    if isinstance(code, str) and code in ERROR_CODES:
        mapped = code
    elif kind == "rate_limit_error" or code in (429, "429", "rate_limit"):
        mapped = "rate_limit_exceeded"
    else:
        mapped = "server_error"
    return {"code": mapped, "message": message}


def skeleton(
    call: ChatCall,
    response_id: str,
    created_at: float,
    model: str | None,
    status: str = "in_progress",
) -> dict[str, Any]:
    """A Response with no output yet: what response.created carries."""
    echo = call.echo()
    metadata = echo.pop("metadata")
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "model": model or call.model or "",
        "output": [],
        **echo,
        "usage": None,
        "metadata": metadata,
    }


def finish(
    response: dict[str, Any],
    status: str,
    details: dict[str, Any] | None,
    usage: dict[str, Any] | None,
    completed_at: float | None = None,
) -> dict[str, Any]:
    """The skeleton made final (in place): status, details, usage, completed_at."""
    response["status"] = status
    response["incomplete_details"] = details
    response["usage"] = usage
    if status == "completed":
        response["completed_at"] = completed_at if completed_at is not None else int(time.time())
    return response


# --- items --------------------------------------------------------------------------


def text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def refusal_part(text: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": text}


def message_item(
    ident: str, content: list[dict[str, Any]], status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": ident,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def function_call_item(
    ident: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": ident,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def reasoning_item(ident: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"id": ident, "type": "reasoning", "status": status, "summary": [], "content": content}


def token_logprob(entry: Any) -> dict[str, Any] | None:
    """One chat logprobs entry as an output_text logprob (with bytes)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        return None
    token = entry["token"]
    value = entry.get("logprob")
    raw = entry.get("bytes")
    top = []
    for alt in entry.get("top_logprobs") or ():
        one = token_logprob({**alt, "top_logprobs": None}) if isinstance(alt, dict) else None
        if one is not None:
            one.pop("top_logprobs")
            top.append(one)
    return {
        "token": token,
        "bytes": raw if isinstance(raw, list) else list(token.encode()),
        "logprob": value if isinstance(value, (int, float)) else 0.0,
        "top_logprobs": top,
    }


def chat_logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """The output_text logprobs of a chat choice (or chunk choice)."""
    doc = choice.get("logprobs")
    entries = doc.get("content") if isinstance(doc, dict) else None
    out = []
    for entry in entries if isinstance(entries, list) else ():
        one = token_logprob(entry)
        if one is not None:
            out.append(one)
    return out


def delta_logprobs(logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output_text logprobs in the shape of the text delta and done events."""
    return [
        {
            "token": lp["token"],
            "logprob": lp["logprob"],
            "top_logprobs": [
                {"token": t["token"], "logprob": t["logprob"]} for t in lp["top_logprobs"]
            ],
        }
        for lp in logprobs
    ]


def object_of(value: Any) -> dict[str, Any]:
    """The value when it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def text_of(content: Any) -> str:
    """Chat message content (a string or text parts) as text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def reasoning_of(message: dict[str, Any]) -> str | None:
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def arguments_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def _choice(completion: dict[str, Any]) -> dict[str, Any]:
    choices = completion.get("choices")
    if not isinstance(choices, list):
        return {}
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return next((c for c in choices if isinstance(c, dict)), {})


def _tool_calls(message: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    """(id, name, arguments) of a chat message's tool calls (and legacy function_call)."""
    out: list[tuple[str | None, str, str]] = []
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict):
            continue
        fn = object_of(call.get("function"))
        ident = call.get("id")
        name = fn.get("name")
        out.append(
            (
                ident if isinstance(ident, str) and ident else None,
                name if isinstance(name, str) else "",
                arguments_of(fn.get("arguments")),
            )
        )
    legacy = message.get("function_call")
    if not out and isinstance(legacy, dict):
        name = legacy.get("name")
        out.append(
            (None, name if isinstance(name, str) else "", arguments_of(legacy.get("arguments")))
        )
    return out


# --- the Response -------------------------------------------------------------------


def to_response(
    completion: dict[str, Any],
    call: ChatCall,
    response_id: str,
    created_at: float,
    *,
    completed_at: float | None = None,
) -> dict[str, Any]:
    """A chat.completion as a Response object."""
    choice = _choice(completion)
    message = object_of(choice.get("message"))
    status, details = outcome(choice.get("finish_reason"))
    model = completion.get("model")
    response = skeleton(call, response_id, created_at, model if isinstance(model, str) else None)

    output: list[dict[str, Any]] = []
    reasoning = reasoning_of(message)
    if reasoning is not None:
        output.append(reasoning_item(item_id("rs", response_id, len(output)), reasoning))
    text = text_of(message.get("content"))
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else None
    calls = _tool_calls(message)
    content: list[dict[str, Any]] = []
    if text or not (calls or refusal):
        content.append(text_part(text, chat_logprobs(choice) if call.logprobs else None))
    if refusal:
        content.append(refusal_part(refusal))
    if content:
        output.append(message_item(item_id("msg", response_id, len(output)), content))
    for ident, name, arguments in calls:
        index = len(output)
        call_id = ident or item_id("call", response_id, index)
        output.append(
            function_call_item(item_id("fc", response_id, index), call_id, name, arguments)
        )
    if status == "incomplete" and output:
        output[-1]["status"] = "incomplete"
    response["output"] = output
    return finish(response, status, details, usage_of(completion.get("usage")), completed_at)


def assistant_message(response: dict[str, Any]) -> dict[str, Any]:
    """The chat assistant message of a Response's output (reasoning left out)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in response.get("output") or ():
        if item.get("type") == "message":
            for part in item.get("content") or ():
                if part.get("type") == "output_text":
                    texts.append(part.get("text") or "")
                elif part.get("type") == "refusal":
                    texts.append(part.get("refusal") or "")
        elif item.get("type") == "function_call":
            calls.append(
                {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]},
                }
            )
    text = "".join(texts)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def messages_after(call: ChatCall, answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of the conversation so far, this exchange's answer
    included, without the instructions (they are not carried to a later turn): what
    a later request with previous_response_id continues from (`with_history`).

    `answer` is the Response object (from to_response or StreamTranslator.response)
    or the chat.completion. Pass the Response when the backend may leave tool call
    ids out: the call ids the proxy made up then match the ones the client saw."""
    if answer.get("object") != "response":
        answer = to_response(answer, call, "resp_", 0, completed_at=0)
    return [*call.history, *call.messages, assistant_message(answer)]
