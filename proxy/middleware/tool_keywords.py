"""Tool calls from keywords: a reply that says a rule's keyword becomes a tool call.

For models without native function calling. When the assistant's text contains a
rule's keyword (case-insensitive, whole words) or matches its pattern (a
case-insensitive regular expression), and the request declared that tool, the
choice gets `message.tool_calls = [one call]` and `finish_reason: "tool_calls"`;
its text stays in `content`.

Decisions:
- Rules are tried in the order of the file and the first rule that matches (with
  arguments that fit, below) wins, wherever its match lies in the text; one tool
  call per choice.
- A rule fires only when the request's `tools` holds a function tool of that name
  and `tool_choice` allows it: absent, "auto" and "required" allow every declared
  tool, "none" none, `{"type":"function","function":{"name":X}}` only X, and
  `{"type":"allowed_tools",...}` only the tools it lists.
- A choice that already carries native tool calls (or a legacy `function_call`) is
  left alone.
- In arguments, `{match}` in any string value becomes the text that matched, as
  written in the reply, and `{NAME}` the text of the pattern's named group NAME; a
  value that is only the placeholder of a group that did not match is left out.
  `values` maps a filled argument's text (case-insensitive) to the value to send, e.g.
  "Spanish" to "es".
- The arguments are made to fit the JSON schema the request declares for the tool
  (proxy/middleware/tool_schema.py): undeclared properties left out where the schema
  forbids them, missing ones filled from the named group of that name or the schema's
  default, values of the declared types. A match whose arguments cannot fit does not
  fire: the rule's next match is tried (when its arguments depend on the match), then
  the next rule, and a warning says so once per rule and tool.

In a stream, content deltas pass through untouched as they arrive; each choice's
text is accumulated and matched once, when its final chunk (the one with a
`finish_reason`) arrives. That chunk is then preceded by one chunk carrying the
`tool_calls` delta and rewritten with `finish_reason: "tool_calls"`. A choice whose
stream ends without a final chunk is left as it is.

Why one module of over 400 lines: the rules, their matching and the rewriting of a
body and of a stream's last chunk are one feature, read together (the schema fitting
is apart, in tool_schema.py).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import REGISTRY, Counter
from pydantic import Field, field_validator, model_validator

from proxy import sse
from proxy.chain import BuildContext, register
from proxy.config import Model
from proxy.exchange import Exchange, Handler, Middleware
from proxy.middleware.tool_schema import Unfit, fill_arguments, fit, folded, placeholders
from proxy.routes import CHAT

log = logging.getLogger("chat_proxy.tool_keywords")

_METRIC = "chat_proxy_tool_calls_rewritten_total"


def _make_counter() -> Counter:
    try:
        return Counter(
            _METRIC,
            "Replies turned into tool calls by the tool_keywords middleware, by tool.",
            ["tool"],
        )
    except ValueError:  # already registered: this module was loaded a second time
        existing = REGISTRY._names_to_collectors.get(_METRIC)
        if isinstance(existing, Counter):
            return existing
        raise


REWRITTEN: Counter = _make_counter()
_REWRITTEN_BY_TOOL: dict[str, Any] = {}  # the counter's child per tool (the rules' tools)

_ALNUM = string.ascii_letters + string.digits
_NATIVE_FINISH = ("tool_calls", "function_call")
_CHUNK_FIELDS = ("id", "object", "created", "model", "system_fingerprint", "service_tier")
_MAX_TRIES = 16  # matches of one rule tried against the schema, for one reply


class Rule(Model):
    tool: str
    keywords: tuple[str, ...] | None = None
    pattern: str | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    values: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("tool")
    @classmethod
    def _tool(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("keywords")
    @classmethod
    def _keywords(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must not be empty")
        if any(not k.strip() for k in value):
            raise ValueError("a keyword must not be blank")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        if compiled.search("") is not None:
            raise ValueError("matches the empty string, so it would fire on every reply")
        return value

    @field_validator("arguments")
    @classmethod
    def _arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError("must hold only JSON values") from None
        return value

    @field_validator("values")
    @classmethod
    def _values(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError("must hold only JSON values") from None
        for name, table in value.items():
            if any(not text.strip() for text in table):
                raise ValueError(f"{name}: a text to map must not be blank")
        return value

    @model_validator(mode="after")
    def _one_matcher(self) -> Rule:
        if (self.keywords is None) == (self.pattern is None):
            raise ValueError("give either keywords or pattern")
        groups = set(re.compile(self.pattern).groupindex) if self.pattern is not None else set()
        for name in placeholders(self.arguments):
            if name != "match" and name not in groups:
                raise ValueError(
                    f"arguments: {{{name}}} names no group of the pattern "
                    "(placeholders: {match} and the pattern's named groups)"
                )
        for name in self.values:
            if name not in self.arguments and name not in groups:
                raise ValueError(f"values: {name} names no argument and no group of the pattern")
        return self


class ToolKeywordsOptions(Model):
    rules: tuple[Rule, ...] = Field(min_length=1)


def keyword_regex(keywords: tuple[str, ...]) -> re.Pattern[str]:
    """One case-insensitive regex for a list of keywords: whole words, and the words
    of a multi-word keyword separated by any whitespace."""
    alternatives = []
    for keyword in keywords:
        words = keyword.split()
        body = r"\s+".join(re.escape(w) for w in words)
        head = r"(?<!\w)" if re.match(r"\w", words[0]) else ""
        tail = r"(?!\w)" if re.search(r"\w$", words[-1]) else ""
        alternatives.append(head + body + tail)
    return re.compile("|".join(f"(?:{a})" for a in alternatives), re.IGNORECASE)


@dataclass(frozen=True)
class CompiledRule:
    index: int  # its place in the file's rules
    tool: str
    regex: re.Pattern[str]
    arguments: dict[str, Any]
    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # texts folded
    match_dependent: bool = False  # another match may give other arguments

    def fill(self, m: re.Match[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The rule's arguments filled from the match `m`, and the named groups that
        matched, both with `values` applied."""
        return fill_arguments(self.arguments, m, self.values)


def compile_rules(options: ToolKeywordsOptions) -> list[CompiledRule]:
    out = []
    for index, rule in enumerate(options.rules):
        if rule.keywords is not None:
            regex = keyword_regex(rule.keywords)
        else:
            assert rule.pattern is not None
            regex = re.compile(rule.pattern, re.IGNORECASE)
        values = {
            name: {folded(text): v for text, v in table.items()}
            for name, table in rule.values.items()
        }
        dependent = bool(regex.groupindex) or bool(placeholders(rule.arguments))
        out.append(CompiledRule(index, rule.tool, regex, dict(rule.arguments), values, dependent))
    return out


def _declared_tools(body: dict[str, Any]) -> dict[str, Any]:
    """The declared function tools: name -> its `parameters` (None where absent)."""
    declared: dict[str, Any] = {}
    tools = body.get("tools")
    if not isinstance(tools, list):
        return declared
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type", "function") == "function":
            fn = tool.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                declared.setdefault(fn["name"], fn.get("parameters"))
    return declared


def _function_names(items: Any) -> set[str] | None:
    if not isinstance(items, list):
        return None
    names: set[str] = set()
    for item in items:
        if isinstance(item, dict):
            fn = item.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.add(fn["name"])
            elif isinstance(item.get("name"), str):
                names.add(item["name"])
    return names


def allowed_tools(body: dict[str, Any]) -> dict[str, Any]:
    """The tools a rewrite may call for this request, from `tools` and `tool_choice`:
    name -> the `parameters` schema it declares (None where it declares none)."""
    declared = _declared_tools(body)
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "required"):
        return declared
    if isinstance(choice, dict):
        if choice.get("type") == "allowed_tools":
            spec = choice.get("allowed_tools")
            listed = _function_names(spec.get("tools") if isinstance(spec, dict) else None)
            return {k: v for k, v in declared.items() if k in listed} if listed else {}
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        return {name: declared[name]} if isinstance(name, str) and name in declared else {}
    return {}  # "none", or a value this middleware does not understand


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def tool_call(tool: str, arguments: str) -> dict[str, Any]:
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": tool, "arguments": arguments},
    }


@dataclass
class Matcher:
    """The rules this request allows, the schemas it declares for their tools, and the
    count of rewrites made."""

    rules: list[CompiledRule]
    ex: Exchange
    schemas: dict[str, Any] = field(default_factory=dict)  # tool -> declared parameters
    on_unfit: Callable[[CompiledRule, str], None] | None = None

    def find(self, text: str) -> tuple[CompiledRule, str] | None:
        """The first rule (in file order) with a match whose arguments fit the declared
        schema, and those arguments as a JSON string."""
        if not text:
            return None
        for rule in self.rules:
            failure: str | None = None
            tries = 0
            for m in rule.regex.finditer(text):
                arguments, groups = rule.fill(m)
                try:
                    fitted = fit(arguments, groups, self.schemas.get(rule.tool))
                except Unfit as exc:
                    failure = failure or str(exc)
                    tries += 1
                    if tries >= _MAX_TRIES or not rule.match_dependent:
                        break
                    continue
                return rule, json.dumps(fitted, ensure_ascii=False)
            if failure is not None and self.on_unfit is not None:
                self.on_unfit(rule, failure)
        return None

    def record(self, tool: str) -> None:
        counts = self.ex.tool_calls_rewritten
        if counts is None:
            counts = self.ex.tool_calls_rewritten = {}
        counts[tool] = counts.get(tool, 0) + 1
        child = _REWRITTEN_BY_TOOL.get(tool)
        if child is None:
            child = _REWRITTEN_BY_TOOL[tool] = REWRITTEN.labels(tool=tool)
        child.inc()


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def rewrite_completion(doc: dict[str, Any], matcher: Matcher) -> dict[str, Any]:
    """The non-streamed response with each matching choice turned into a tool call."""
    choices = doc.get("choices")
    if not isinstance(choices, list):
        return doc
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        if message.get("tool_calls") or message.get("function_call"):
            continue
        if choice.get("finish_reason") in _NATIVE_FINISH:
            continue
        found = matcher.find(_text(message.get("content")))
        if found is None:
            continue
        rule, arguments = found
        message["tool_calls"] = [tool_call(rule.tool, arguments)]
        choice["finish_reason"] = "tool_calls"
        matcher.record(rule.tool)
    return doc


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    native: bool = False


@dataclass
class StreamRewriter:
    """The event transform: forwards every event as it comes and adds the tool call
    chunk before a matching choice's final chunk."""

    matcher: Matcher
    choices: dict[int, _Choice] = field(default_factory=dict)

    def on_event(self, event: sse.Event) -> list[sse.Event]:
        if event.data is None or event.data == "[DONE]":
            return [event]
        payload = event.json()
        if not isinstance(payload, dict):
            return [event]
        choices = payload.get("choices")
        if not isinstance(choices, list):
            return [event]
        calls: dict[int, tuple[CompiledRule, dict[str, Any]]] = {}
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
                continue
            index: int = choice.get("index", 0)
            state = self.choices.setdefault(index, _Choice())
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content")
                if isinstance(text, str) and text:
                    state.text.append(text)
                if delta.get("tool_calls") or delta.get("function_call"):
                    state.native = True
            finish = choice.get("finish_reason")
            if not finish:
                continue
            if state.native or finish in _NATIVE_FINISH:
                continue
            found = self.matcher.find("".join(state.text))
            state.text.clear()
            if found is not None:
                rule, arguments = found
                calls[index] = (rule, tool_call(rule.tool, arguments))
        if not calls:
            return [event]
        head = {k: payload[k] for k in _CHUNK_FIELDS if k in payload}
        out: list[sse.Event] = []
        for index, (rule, call) in calls.items():
            delta = {"tool_calls": [{"index": 0, **call}]}
            out.append(
                sse.data_event(
                    {**head, "choices": [{"index": index, "delta": delta, "finish_reason": None}]}
                )
            )
            self.matcher.record(rule.tool)
        rewritten = [
            {**c, "finish_reason": "tool_calls"}
            if isinstance(c, dict) and c.get("index", 0) in calls and c.get("finish_reason")
            else c
            for c in choices
        ]
        out.append(sse.changed(event, {**payload, "choices": rewritten}))
        return out

    def on_end(self) -> list[sse.Event]:
        return []


@register("tool_keywords", ToolKeywordsOptions)
def tool_keywords(options: ToolKeywordsOptions, ctx: BuildContext) -> Middleware:
    rules = compile_rules(options)
    warned: set[tuple[int, str]] = set()  # (rule, tool): at most one per rule

    def on_unfit(rule: CompiledRule, reason: str) -> None:
        if (rule.index, rule.tool) in warned:
            return
        warned.add((rule.index, rule.tool))
        log.warning(
            "tool_keywords rules[%d] matched but does not fire: its arguments cannot fit the "
            "schema the request declares for %s (%s); said once for this rule",
            rule.index,
            rule.tool,
            reason,
            extra={"rule": rule.index, "tool": rule.tool, "reason": reason},
        )

    async def mw(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        if ex.route is not CHAT or ex.body is None:
            return await call_next(ex)
        allowed = allowed_tools(ex.body)
        usable = [r for r in rules if r.tool in allowed]
        if not usable:
            return await call_next(ex)
        matcher = Matcher(usable, ex, allowed, on_unfit)
        ex.body_transforms.append(lambda doc: rewrite_completion(doc, matcher))
        ex.event_transforms.append(StreamRewriter(matcher))
        return await call_next(ex)

    return mw
