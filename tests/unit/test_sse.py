"""The SSE parser and encoder: WHATWG framing, any split, byte-exact raw events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import Event, encode, flush
from tests.fixtures.sse_streams import parse_all, streams, view


def test_line_endings_lf_crlf_cr() -> None:
    for nl in (b"\n", b"\r\n", b"\r"):
        text = b"data: a" + nl + b"data: b" + nl + nl + b"event: e" + nl + b"data: c" + nl + nl
        events, pending = parse_all([text])
        assert view(events) == [
            ("a\nb", None, None, None, (), None),
            ("c", "e", None, None, (), None),
        ]
        assert pending.buf == b""


def test_fields_comments_id_retry_and_unknown() -> None:
    text = b': hello\n: \nid: 7\nretry: 3000\nretry: x\nerror: {"m":1}\ndata\ndata:x\n\n'
    [ev], _ = parse_all([text])
    assert ev.comments == ["hello", ""]
    assert ev.id == "7"
    assert ev.retry == 3000
    assert ev.data == "\nx"
    assert ev.other == {"error": '{"m":1}'}


def test_comment_only_block_has_no_data_but_keeps_bytes() -> None:
    [ev], _ = parse_all([b": keepalive\n\n"])
    assert ev.data is None
    assert encode(ev) == b": keepalive\n\n"


def test_utf8_character_split_across_reads() -> None:
    text = "data: ¡adiós, señor! 你好\n\n".encode()
    for cut in range(len(text) + 1):
        events, _ = parse_all([text[:cut], text[cut:]])
        assert [e.data for e in events] == ["¡adiós, señor! 你好"]


def test_crlf_split_between_reads_is_one_line_end() -> None:
    events, pending = parse_all([b"data: a\r", b"\n\r", b"\n", b"data: b\r\n\r\n"])
    assert [e.data for e in events] == ["a", "b"]
    assert b"".join(e.raw or b"" for e in events) + pending.buf == b"data: a\r\n\r\ndata: b\r\n\r\n"


def test_unterminated_last_event_is_flushed() -> None:
    events, pending = parse_all([b"data: a\n\ndata: tail"])
    assert [e.data for e in events] == ["a"]
    [tail] = flush(pending)
    assert tail.data == "tail" and tail.raw is None
    assert encode(tail) == b"data: tail\n\n"


def test_encode_new_event() -> None:
    ev = Event(data="line1\nline2", event="x", id="1", comments=["c"])
    assert encode(ev) == b": c\nevent: x\nid: 1\ndata: line1\ndata: line2\n\n"
    [back], _ = parse_all([encode(ev)])
    assert (back.data, back.event, back.id, back.comments) == ("line1\nline2", "x", "1", ["c"])


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(0, 400), max_size=8))
def test_any_split_parses_like_the_whole(data: bytes, cuts: list[int]) -> None:
    whole, _whole_pending = parse_all([data])
    points = sorted({min(c, len(data)) for c in cuts})
    parts = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    split, split_pending = parse_all(parts)
    assert view(split) == view(whole)
    # nothing is lost or duplicated: the raw bytes add up to the input
    assert b"".join(e.raw or b"" for e in split) + split_pending.buf == data


@settings(max_examples=200, deadline=None)
@given(streams())
def test_every_single_byte_split(data: bytes) -> None:
    whole, _ = parse_all([data])
    split, _ = parse_all([data[i : i + 1] for i in range(len(data))])
    assert view(split) == view(whole)
