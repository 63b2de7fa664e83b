"""Assembling a streamed chat completion into the shape of a non-streamed one."""

from __future__ import annotations

from typing import Any


class Accumulator:
    """Feeds on `chat.completion.chunk` payloads; `result()` is a `chat.completion`."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.usage: dict[str, Any] | None = None
        self.choices: dict[int, dict[str, Any]] = {}
        self._tools: dict[int, dict[int, dict[str, Any]]] = {}
        self.error: Any = None

    def feed(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        if "error" in chunk and "choices" not in chunk:
            self.error = chunk["error"]
            return
        self.id = self.id or chunk.get("id")
        self.model = chunk.get("model") or self.model
        self.created = self.created or chunk.get("created")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int):
                continue
            acc = self.choices.setdefault(
                index, {"index": index, "parts": [], "finish_reason": None}
            )
            delta = choice.get("delta") or {}
            if isinstance(delta, dict):
                text = delta.get("content")
                if isinstance(text, str) and text:
                    acc["parts"].append(text)
                calls = delta.get("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    self._feed_tool(index, call)
            if choice.get("finish_reason"):
                acc["finish_reason"] = choice["finish_reason"]

    def _feed_tool(self, choice: int, call: Any) -> None:
        if not isinstance(call, dict):
            return
        calls = self._tools.setdefault(choice, {})
        pos = call.get("index", len(calls))
        if not isinstance(pos, int):
            pos = len(calls)
        cur = calls.setdefault(
            pos, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if call.get("id"):
            cur["id"] = call["id"]
        fn = call.get("function") or {}
        if isinstance(fn, dict):
            if isinstance(fn.get("name"), str):
                cur["function"]["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                cur["function"]["arguments"] += fn["arguments"]

    def result(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            acc = self.choices[index]
            parts = acc["parts"]
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(parts) if parts else None,
            }
            tools = self._tools.get(index)
            if tools:
                message["tool_calls"] = [tools[k] for k in sorted(tools)]
            choices.append(
                {"index": index, "message": message, "finish_reason": acc["finish_reason"]}
            )
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage,
        }
