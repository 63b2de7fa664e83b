"""Session digests are stored: a lookup must compute, byte for byte, the digest that
an earlier version of the proxy recorded, or a client continuing a conversation
across an upgrade would start a new session. The reference below is the plain
definition (the standard JSON encoder over the normalised messages, whitespace runs
collapsed with a regex); the middleware's faster path must agree with it on any
message."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sessions import digest

_ENC = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_WS = re.compile(r"\s+")


def _collapse(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return _collapse(content)
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                parts.append(_ENC(part))
        return _collapse(" ".join(parts))
    return _ENC(content)


def _arguments(value: Any) -> str:
    if isinstance(value, str):
        try:
            return _ENC(json.loads(value))
        except (ValueError, RecursionError):
            return _collapse(value)
    return _ENC(value)


def ref_normalise(message: dict[str, Any]) -> list[Any]:
    calls: list[list[str]] = []
    raw_calls = message.get("tool_calls")
    for call in raw_calls if isinstance(raw_calls, list) else ():
        if isinstance(call, dict):
            fn = call["function"] if isinstance(call.get("function"), dict) else {}
            calls.append([str(fn.get("name") or ""), _arguments(fn.get("arguments"))])
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        calls.append([str(legacy.get("name") or ""), _arguments(legacy.get("arguments"))])
    return [str(message.get("role") or ""), _text(message.get("content")), calls]


def ref_digest(owner: str, tail: list[list[Any]]) -> str:
    text = _ENC(tail).encode("utf-8", "surrogatepass")
    data = owner.encode("utf-8", "surrogateescape") + b"\0" + text
    return hashlib.sha256(data).hexdigest()[:32]


def ref_lookup(owner: str, convo: list[dict[str, Any]]) -> str | None:
    last = None
    for i in range(len(convo) - 1, -1, -1):
        if convo[i].get("role") == "assistant":
            last = i
            break
    if last is None or last < 1:
        return None
    tail = convo[max(0, last + 1 - 4) : last + 1]
    return ref_digest(owner, [ref_normalise(m) for m in tail])


def ref_record(
    owner: str, convo: list[dict[str, Any]], replies: list[dict[str, Any]]
) -> tuple[str, ...]:
    before = [ref_normalise(m) for m in convo[-3:]]
    out: list[str] = []
    for reply in replies:
        full = [*before, ref_normalise(reply)]
        for length in range(2, min(4, len(full)) + 1):
            d = ref_digest(owner, full[-length:])
            if d not in out:
                out.append(d)
    return tuple(out)


# text that exercises escaping and whitespace: controls, quotes, backslashes, every
# kind of Unicode space, non-ASCII, astral characters and lone surrogates
_TRICKY = [
    "",
    " ",
    "plain words",
    "  lead and trail\t\n",
    'quote " and \\ backslash',
    "\x00\x01\x1f\x7f controls",
    "\x1c\x1d\x1e\x1f separators",
    "nbsp\u00a0here\u2003em\u2028line\u2029para\u3000ideo\u0085nel",
    "héllo wörld ✓ 你好",
    "emoji 😀 𝄞",
    "lone \ud800 surrogate",
    "\udfff",
    "</script>&<>'",
]

texts = st.one_of(st.sampled_from(_TRICKY), st.text(max_size=40))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=6,
)
arguments = st.one_of(
    texts,
    json_values.map(lambda v: json.dumps(v)),
    json_values,
)
calls = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"id": texts, "type": st.just("function")},
            optional={
                "function": st.fixed_dictionaries(
                    {}, optional={"name": st.one_of(texts, st.none()), "arguments": arguments}
                )
            },
        ),
        json_values,
    ),
    max_size=2,
)
contents = st.one_of(
    st.none(),
    texts,
    st.lists(
        st.one_of(
            texts,
            st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
            st.fixed_dictionaries({"type": st.just("image_url"), "image_url": json_values}),
            json_values,
        ),
        max_size=3,
    ),
    json_values,
)
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool", "", None, 3])},
    optional={
        "content": contents,
        "tool_calls": st.one_of(calls, json_values),
        "function_call": st.one_of(
            st.fixed_dictionaries({"name": texts, "arguments": arguments}), json_values
        ),
        "name": texts,
    },
)
owners = st.one_of(st.just("bench"), st.just("ip:127.0.0.1"), texts)


def outcome(fn: Any, *args: Any) -> Any:
    """What a call gives: its value, or the type of what it raised (an owner that
    cannot be encoded)."""
    try:
        return fn(*args)
    except UnicodeEncodeError as exc:
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(owner=owners, convo=st.lists(messages, max_size=6), replies=st.lists(messages, max_size=3))
def test_digests_match_the_reference(
    owner: str, convo: list[dict[str, Any]], replies: list[dict[str, Any]]
) -> None:
    assert outcome(digest.lookup_digest, owner, convo) == outcome(ref_lookup, owner, convo)
    assert outcome(digest.record_digests, owner, convo, replies) == outcome(
        ref_record, owner, convo, replies
    )
    for m in [*convo, *replies]:
        assert digest.normalise(m) == ref_normalise(m)


def test_every_character_collapses_and_encodes_as_the_reference() -> None:
    chars = [chr(c) for c in range(0x110000)]
    for start in range(0, len(chars), 4096):
        block = "".join(chars[start : start + 4096])
        user = {"role": "user", "content": f"  a{block}b  {block[::-1]} "}
        reply = {"role": "assistant", "content": block}
        convo = [user, reply]
        assert digest.lookup_digest("k", convo) == ref_lookup("k", convo)
        assert digest.record_digests("k", [user], [reply]) == ref_record("k", [user], [reply])


def test_a_known_digest_is_unchanged() -> None:
    """A digest written by earlier versions (computed with the reference) still
    matches: the value is fixed here so that both sides cannot drift together."""
    convo = [
        {"role": "user", "content": "Say hello in one short sentence, please."},
        {"role": "assistant", "content": "Hello!  How can I\thelp?"},
    ]
    assert digest.lookup_digest("bench", convo) == ref_lookup("bench", convo)
    assert digest.lookup_digest("bench", convo) == "69873dac13c13cc295fdde5b0c177f55"
