"""The parsed relay: any split of the backend's bytes gives the client the same
bytes, and an event that never ends is cut at MAX_EVENT_BYTES."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.exchange import Exchange
from proxy.transform import MAX_EVENT_BYTES, EventTooLarge, StreamTransformer
from tests.fixtures.sse_streams import parse_all, streams, view


def transformer() -> StreamTransformer:
    request = make_mocked_request("POST", "/v1/chat/completions")
    return StreamTransformer(Exchange(request=request, route="chat", scope="chat", request_id="r"))


def relay(parts: list[bytes]) -> bytes:
    t = transformer()
    return b"".join(t.feed(p) for p in parts) + t.end()


@settings(max_examples=200, deadline=None)
@given(streams(), st.lists(st.integers(0, 400), max_size=8))
def test_any_split_relays_like_the_whole(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    parts = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    split, whole = relay(parts), relay([data])
    assert view(parse_all([split])[0]) == view(parse_all([whole])[0])
    if b"\r" not in data:  # a CR|LF split may end an event at the CR: same events
        assert split == whole


def test_a_long_line_in_many_reads_is_one_event() -> None:
    text = b"y" * 300_000
    parts = [b'data: {"choices": [{"delta": {"content": "']
    parts += [text[i : i + 1000] for i in range(0, len(text), 1000)]
    parts += [b'"}}]}\n', b"\n", b"data: [DONE]\n\n"]
    out = relay(parts)
    assert out == b"".join(parts)


def test_an_event_past_the_limit_raises() -> None:
    t = transformer()
    t.feed(b"data: ")
    piece = b"z" * 1024 * 1024
    with pytest.raises(EventTooLarge):
        for _ in range(MAX_EVENT_BYTES // len(piece) + 1):
            t.feed(piece)
    t2 = transformer()
    with pytest.raises(EventTooLarge):  # many lines, never a blank one
        for _ in range(MAX_EVENT_BYTES // len(piece) + 1):
            t2.feed(b"data: " + piece + b"\n")
