"""proxy/backend/http1's response parser against h11's, on the same bytes.

(Long: it is mostly the table of cases, each with the reason it is there.)

Each backend answer goes to both parsers. Ours is driven the way the event loop
drives it, through `_Conn.data_received` and `_Conn.connection_lost`, with the
answer split at every byte position (and, from hypothesis, at random ones); h11
(`h11.Connection(our_role=h11.CLIENT)`, used only here) gets it whole, after the
same request. Both must agree on the status, the headers (lower-case names), the
body, whether the answer is an error, complete or still waiting for bytes, and
whether the connection may carry another request: for ours what `release()` would
decide once the body is read (`_Conn.reusable()`), for h11 both sides DONE with
nothing left over.

Where this client differs from h11 by design, the comparison says so, case by case
(`Differs`), with the reason; any other disagreement is a bug in proxy/backend/http1.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.backend.http1.connection import _Conn
from proxy.backend.http1.parser import _DONE, _HEAD, MAX_HEAD


class Differs(enum.Enum):
    """How, by design, this client's verdict differs from h11's on a case."""

    # This client refuses what h11 lets through: control characters other than HTAB
    # in a head or trailer (h11 allows \x01-\x08, \x0e-\x1f and \x7f, see its
    # _abnf.py), obs-fold (h11 unfolds it), a version other than HTTP/1.x, chunk sizes
    # of 17 to 20 hex digits and control characters in chunk extensions. A proxy
    # would pass such bytes on to its own clients.
    STRICTER = "stricter"
    # RFC 9112 7.1.1 allows blanks (BWS) before a chunk extension's ";"; h11 does not.
    CHUNK_EXT_BLANKS = "chunk-ext-blanks"
    # An HTTP/1.0 answer with "Connection: keep-alive" is kept alive here when its
    # end is known (RFC 9112 appendix C.2.2); h11 never reuses an HTTP/1.0
    # connection. This client must give what h11 gives for the same answer as
    # HTTP/1.1.
    HTTP10_KEEP_ALIVE = "http10-keep-alive"
    # Transfer-Encoding and Content-Length together: both read the chunked body, but
    # this client does not reuse the connection (RFC 9112 6.3: ought to be handled as
    # an error, a sign of request smuggling); h11 does.
    TE_AND_LENGTH = "te-and-length"
    # Bytes that cannot start "HTTP/": this client fails at once, h11 waits for the
    # end of the head (and fails then).
    NOT_HTTP_EARLY = "not-http-early"
    # A head longer than MAX_HEAD is refused here however it arrives; h11's
    # max_incomplete_event_size bounds only what it buffers while it waits for more.
    HEAD_LIMIT = "head-limit"


@dataclass(frozen=True)
class Case:
    name: str
    wire: bytes
    method: str = "GET"
    eof: bool = False  # the backend closes the connection after the bytes
    differs: Differs | None = None


@dataclass(frozen=True)
class Outcome:
    # "complete", "waiting" (for more bytes) or "error"
    state: str
    status: int | None = None
    headers: tuple[tuple[str, str], ...] | None = None
    body: bytes = b""
    reusable: bool | None = None  # only for a complete answer


# -- the two parsers


class _Pool:
    """What `_Conn` asks of its pool here."""

    loop = None

    def _forget(self, conn: _Conn) -> None:
        pass


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def get_write_buffer_size(self) -> int:
        return 0  # the request went out whole

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def ours(parts: list[bytes], method: str, eof: bool) -> Outcome:
    conn = _Conn(_Pool())  # type: ignore[arg-type]
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn._expect_body = method != "HEAD"
    conn._sent = True  # as Pool.request does before its write
    for part in parts:
        if transport.closed:
            break
        if part:  # the event loop never hands over an empty read
            conn.data_received(part)
    if eof or transport.closed:
        conn.connection_lost(None)
    if conn._error is not None:
        return Outcome("error")
    if conn._state == _HEAD:
        return Outcome("waiting")
    headers = tuple(conn.headers.items())
    body = b"".join(conn._body)
    if conn._state != _DONE:
        return Outcome("waiting", conn.status, headers, body)
    conn._body = []  # as if read
    return Outcome("complete", conn.status, headers, body, conn.reusable())


def theirs(wire: bytes, method: str, eof: bool) -> Outcome:
    conn = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "backend")]))
    conn.send(h11.EndOfMessage())
    status: int | None = None
    headers: tuple[tuple[str, str], ...] | None = None
    body: list[bytes] = []
    complete = False
    try:
        for data in (wire, b"") if eof else (wire,) if wire else ():
            conn.receive_data(data)  # b"" tells h11 the backend closed
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = _joined(event.headers)
                elif isinstance(event, h11.Data):
                    body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    complete = True
                elif isinstance(event, h11.ConnectionClosed):
                    break
    except h11.RemoteProtocolError:
        if not complete:
            return Outcome("error")
        # h11 refuses bytes past the end of an answer after which the connection
        # must close ("Got data when expecting EOF"), once it has handed over the
        # whole answer: the answer stands, the connection does not
        return Outcome("complete", status, headers, b"".join(body), False)
    if status is None:
        return Outcome("error" if eof else "waiting")
    if not complete:
        return Outcome("error" if eof else "waiting", status, headers, b"".join(body))
    reusable = (
        conn.our_state is h11.DONE
        and conn.their_state is h11.DONE
        and conn.trailing_data == (b"", False)
    )
    return Outcome("complete", status, headers, b"".join(body), reusable)


def _joined(fields: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    """h11's header list as this client gives headers: one entry per name, repeated
    fields joined with ", " in order (a dict is what the proxy needs), values as
    latin-1 text."""
    out: dict[str, str] = {}
    for raw_name, raw_value in fields:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        out[name] = out[name] + ", " + value if name in out else value
    return tuple(out.items())


def _normalised(outcome: Outcome) -> Outcome:
    """Header values whose case h11 changes: it lower-cases Transfer-Encoding."""
    if outcome.headers is None:
        return outcome
    headers = tuple((k, v.lower() if k == "transfer-encoding" else v) for k, v in outcome.headers)
    return Outcome(outcome.state, outcome.status, headers, outcome.body, outcome.reusable)


def expected(case: Case, mine: Outcome, h11s: Outcome) -> Outcome:
    """What this client must give: h11's verdict, less the differences by design."""
    d = case.differs
    if d in (Differs.STRICTER, Differs.NOT_HTTP_EARLY, Differs.HEAD_LIMIT):
        return Outcome("error")
    if d is Differs.CHUNK_EXT_BLANKS:
        assert h11s.state == "error", h11s
        return mine  # what it reads is checked on its own below
    if d is Differs.HTTP10_KEEP_ALIVE:
        at = case.wire.rfind(b"HTTP/1.0 ")
        if at < 0:  # cut short before the version ended
            return h11s
        as11 = case.wire[:at] + b"HTTP/1.1 " + case.wire[at + 9 :]
        return _normalised(theirs(as11, case.method, case.eof))
    if d is Differs.TE_AND_LENGTH:
        assert h11s.state == "complete" and h11s.reusable, h11s
        return Outcome(h11s.state, h11s.status, h11s.headers, h11s.body, False)
    return h11s


def check(case: Case, splits: list[list[bytes]]) -> None:
    h11s = _normalised(theirs(case.wire, case.method, case.eof))
    first: Outcome | None = None
    for parts in splits:
        mine = _normalised(ours(parts, case.method, case.eof))
        if first is None:
            first = mine
            want = expected(case, mine, h11s)
            assert mine == want, _short(f"{case}: ours {mine} != {want} (h11: {h11s})")
        # wherever the bytes are split, the same verdict
        assert mine == first, _short(f"{case} split as {[len(p) for p in parts]}: {mine}")


def _short(message: str) -> str:
    return message if len(message) < 3000 else message[:3000] + "..."


def every_split(wire: bytes) -> list[list[bytes]]:
    """Whole, in two at every byte position, and byte by byte."""
    return (
        [[wire]]
        + [[wire[:i], wire[i:]] for i in range(1, len(wire))]
        + [[wire[i : i + 1] for i in range(len(wire))]]
    )


# -- the explicit corpus


def http(status: bytes = b"200 OK", *headers: bytes, body: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def cl(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    return http(status, *headers, b"Content-Length: %d" % len(body), body=body)


CHUNKED = b"Transfer-Encoding: chunked"
S = Differs.STRICTER

CASES = [
    # Content-Length
    Case("length", cl(b"hello")),
    Case("length zero", cl(b"")),
    Case("length, headers", cl(b"{}", b"Content-Type: application/json", b"X-A: 1")),
    Case("length leading zeros", http(b"200 OK", b"Content-Length: 005", body=b"hello")),
    Case(
        "length twice, same",
        http(b"200 OK", b"Content-Length: 2", b"Content-Length: 2", body=b"ab"),
    ),
    Case("length list, same", http(b"200 OK", b"Content-Length: 2, 2", body=b"ab")),
    Case(
        "length twice, differing",
        http(b"200 OK", b"Content-Length: 2", b"Content-Length: 3", body=b"abc"),
    ),
    Case("length list, differing", http(b"200 OK", b"Content-Length: 2,3", body=b"abc")),
    Case("length 2 and 02", http(b"200 OK", b"Content-Length: 2, 02", body=b"ab")),
    Case("length not a number", http(b"200 OK", b"Content-Length: abc", body=b"abc")),
    Case("length negative", http(b"200 OK", b"Content-Length: -1", body=b"a")),
    Case("length plus sign", http(b"200 OK", b"Content-Length: +1", body=b"a")),
    Case("length empty", http(b"200 OK", b"Content-Length:", body=b"a")),
    Case("length in blanks", http(b"200 OK", b"Content-Length: \t 1 \t", body=b"a")),
    Case("length two numbers", http(b"200 OK", b"Content-Length: 1 1", body=b"a")),
    Case("length unicode digit", http(b"200 OK", b"Content-Length: \xb2", body=b"ab")),
    Case("length 19 digits", http(b"200 OK", b"Content-Length: " + b"1" * 19), eof=True),
    Case("length 20 digits", http(b"200 OK", b"Content-Length: " + b"9" * 20), eof=True),
    Case("length, bytes past the end", cl(b"ok") + b"HTTP/1.1 200 OK\r\n"),
    Case("length, cut short", http(b"200 OK", b"Content-Length: 10", body=b"hello"), eof=True),
    Case("length, still coming", http(b"200 OK", b"Content-Length: 10", body=b"hello")),
    Case("length, then close", cl(b"hello"), eof=True),
    # chunked
    Case("chunked", http(b"200 OK", CHUNKED, body=b"5\r\nhello\r\n0\r\n\r\n")),
    Case(
        "chunked, several",
        http(b"200 OK", CHUNKED, body=b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"),
    ),
    Case(
        "chunked, hex",
        http(b"200 OK", CHUNKED, body=b"A\r\n0123456789\r\n00b\r\nabcdefghijk\r\n0\r\n\r\n"),
    ),
    Case(
        "chunked, extensions",
        http(b"200 OK", CHUNKED, body=b'5;a=b\r\nhello\r\n6;x;y="q r"\r\n world\r\n0;z\r\n\r\n'),
    ),
    Case("chunked, size then blanks", http(b"200 OK", CHUNKED, body=b"5 \t\r\nhello\r\n0\r\n\r\n")),
    Case(
        "chunked, blanks before ;",
        http(b"200 OK", CHUNKED, body=b"5 ;a=b\r\nhello\r\n0\r\n\r\n"),
        differs=Differs.CHUNK_EXT_BLANKS,
    ),
    Case(
        "chunked, trailers",
        http(b"200 OK", CHUNKED, body=b"5\r\nhello\r\n0\r\nX-T: 1\r\nX-U: two\r\n\r\n"),
    ),
    Case(
        "chunked, trailers bare LF", http(b"200 OK", CHUNKED, body=b"5\r\nhello\r\n0\r\nX-T: 1\n\n")
    ),
    Case("chunked, empty trailer bare LF", http(b"200 OK", CHUNKED, body=b"5\r\nhello\r\n0\r\n\n")),
    Case(
        "chunked, malformed trailer",
        http(b"200 OK", CHUNKED, body=b"5\r\nhello\r\n0\r\nno colon\r\n\r\n"),
    ),
    Case("chunked, trailer NUL", http(b"200 OK", CHUNKED, body=b"0\r\nX-T: a\x00b\r\n\r\n")),
    Case(
        "chunked, trailer SOH",
        http(b"200 OK", CHUNKED, body=b"0\r\nX-T: a\x01b\r\n\r\n"),
        differs=S,
    ),
    Case(
        "chunked, trailer obs-fold",
        http(b"200 OK", CHUNKED, body=b"0\r\nX-T: a\r\n b\r\n\r\n"),
        differs=S,
    ),
    Case(
        "chunked, bytes past the end",
        http(b"200 OK", CHUNKED, body=b"2\r\nok\r\n0\r\n\r\nHTTP/1.1"),
    ),
    Case("chunked, cut in data", http(b"200 OK", CHUNKED, body=b"5\r\nhel"), eof=True),
    Case("chunked, cut after a chunk", http(b"200 OK", CHUNKED, body=b"5\r\nhello\r\n"), eof=True),
    Case("chunked, cut in trailers", http(b"200 OK", CHUNKED, body=b"0\r\nX-T: 1\r\n"), eof=True),
    Case("chunked, still coming", http(b"200 OK", CHUNKED, body=b"5\r\nhello\r\n")),
    Case("chunked, size not hex", http(b"200 OK", CHUNKED, body=b"zz\r\nhello\r\n0\r\n\r\n")),
    Case("chunked, size negative", http(b"200 OK", CHUNKED, body=b"-5\r\nhello\r\n0\r\n\r\n")),
    Case("chunked, size 0x", http(b"200 OK", CHUNKED, body=b"0x5\r\nhello\r\n0\r\n\r\n")),
    Case("chunked, size blank first", http(b"200 OK", CHUNKED, body=b" 5\r\nhello\r\n0\r\n\r\n")),
    Case("chunked, size empty", http(b"200 OK", CHUNKED, body=b"\r\nhello\r\n0\r\n\r\n")),
    Case("chunked, size bare LF", http(b"200 OK", CHUNKED, body=b"5\nhello\r\n0\r\n\r\n")),
    Case(
        "chunked, size 17 digits",
        http(b"200 OK", CHUNKED, body=b"0" * 16 + b"5\r\nhello\r\n0\r\n\r\n"),
        differs=S,
    ),
    Case(
        "chunked, size 21 digits",
        http(b"200 OK", CHUNKED, body=b"0" * 20 + b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    Case(
        "chunked, NUL in extension",
        http(b"200 OK", CHUNKED, body=b"5;a\x00\r\nhello\r\n0\r\n\r\n"),
        differs=S,
    ),
    Case(
        "chunked, CR in extension",
        http(b"200 OK", CHUNKED, body=b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
        differs=S,
    ),
    Case("chunked, no CRLF after data", http(b"200 OK", CHUNKED, body=b"5\r\nhelloXX0\r\n\r\n")),
    Case("chunked, LF after data", http(b"200 OK", CHUNKED, body=b"5\r\nhello\n0\r\n\r\n")),
    # h11 fails as soon as the byte after a chunk's data is no CR; this client waited
    # for a second byte before it looked (found by this test, now the same)
    Case("chunked, LF after data, waiting", http(b"200 OK", CHUNKED, body=b"5\r\nhello\n")),
    Case("chunked, upper case", http(b"200 OK", b"Transfer-Encoding: Chunked", body=b"0\r\n\r\n")),
    Case("chunked twice", http(b"200 OK", CHUNKED, CHUNKED, body=b"0\r\n\r\n")),
    Case("gzip, chunked", http(b"200 OK", b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n")),
    Case("gzip", http(b"200 OK", b"Transfer-Encoding: gzip", body=b"abc"), eof=True),
    Case("identity", http(b"200 OK", b"Transfer-Encoding: identity", body=b"abc"), eof=True),
    Case(
        "chunked and a length",
        http(b"200 OK", CHUNKED, b"Content-Length: 100", body=b"2\r\nok\r\n0\r\n\r\n"),
        differs=Differs.TE_AND_LENGTH,
    ),
    Case(
        "chunked and a bad length",
        http(b"200 OK", CHUNKED, b"Content-Length: x", body=b"0\r\n\r\n"),
    ),
    # until the backend closes
    Case(
        "until close", http(b"200 OK", b"Content-Type: text/plain", body=b"first second"), eof=True
    ),
    Case("until close, empty", http(b"200 OK"), eof=True),
    Case("until close, still coming", http(b"200 OK", body=b"first")),
    # HTTP/1.0 and Connection
    Case("1.0 length", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    Case(
        "1.0 keep-alive",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        differs=Differs.HTTP10_KEEP_ALIVE,
    ),
    Case(
        "1.0 keep-alive among others",
        b"HTTP/1.0 200 OK\r\nConnection: x, Keep-Alive\r\nContent-Length: 2\r\n\r\nok",
        differs=Differs.HTTP10_KEEP_ALIVE,
    ),
    Case(
        "1.0 keep-alive and close",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok",
    ),
    Case(
        "1.0 keep-alive until close",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nold",
        eof=True,
    ),
    Case("1.0 until close", b"HTTP/1.0 200 OK\r\n\r\nold", eof=True),
    Case(
        "1.0 chunked", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ),
    Case("1.2", b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    Case("connection close", cl(b"ok", b"Connection: close")),
    Case("connection CLOSE", cl(b"ok", b"Connection: CLOSE")),
    Case("connection close among others", cl(b"ok", b"Connection: x-trace, close")),
    Case("connection close twice", cl(b"ok", b"Connection: upgrade", b"Connection: close")),
    Case("connection x-close", cl(b"ok", b"Connection: x-close")),
    Case("connection keep-alive", cl(b"ok", b"Connection: keep-alive")),
    Case("connection empty", cl(b"ok", b"Connection:")),
    # interim answers
    Case("100 then 200", b"HTTP/1.1 100 Continue\r\n\r\n" + cl(b"late")),
    Case(
        "103 with headers",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + cl(b"x", b"X-A: 1"),
    ),
    Case("100 twice", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n" + cl(b"x")),
    Case("100 bare LF", b"HTTP/1.1 100 Continue\n\n" + cl(b"x")),
    Case("100 no reason", b"HTTP/1.1 100\r\n\r\n" + cl(b"x")),
    Case("100 then close", b"HTTP/1.1 100 Continue\r\n\r\n", eof=True),
    Case("100 then waiting", b"HTTP/1.1 100 Continue\r\n\r\n"),
    Case("100 with a bad length", b"HTTP/1.1 100 Continue\r\nContent-Length: x\r\n\r\n" + cl(b"x")),
    Case("100 with NUL", b"HTTP/1.1 100 Continue\r\nX: \x00\r\n\r\n" + cl(b"x")),
    Case(
        "101 unasked", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + cl(b"x")
    ),
    Case("199", b"HTTP/1.1 199 Odd\r\n\r\n" + cl(b"x")),
    # no body: 204, 304, HEAD
    Case("204", http(b"204 No Content")),
    Case("204 with a length", http(b"204 No Content", b"Content-Length: 10")),
    Case("204 with a bad length", http(b"204 No Content", b"Content-Length: x")),
    Case("204 chunked", http(b"204 No Content", CHUNKED)),
    Case("204 then bytes", http(b"204 No Content", body=b"oops")),
    Case("304 with a length", http(b"304 Not Modified", b"ETag: x", b"Content-Length: 10")),
    Case("HEAD length", http(b"200 OK", b"Content-Length: 5"), method="HEAD"),
    Case("HEAD chunked", http(b"200 OK", CHUNKED), method="HEAD"),
    Case("HEAD until close", http(b"200 OK"), method="HEAD"),
    Case("HEAD with a body", cl(b"hello"), method="HEAD"),
    Case("HEAD gzip", http(b"200 OK", b"Transfer-Encoding: gzip"), method="HEAD"),
    Case("HEAD then close", http(b"200 OK", b"Content-Length: 5"), method="HEAD", eof=True),
    # status lines
    Case("no reason", b"HTTP/1.1 201\r\nContent-Length: 0\r\n\r\n"),
    Case("empty reason", b"HTTP/1.1 201 \r\nContent-Length: 0\r\n\r\n"),
    Case("reason with blanks", b"HTTP/1.1 404 Not  Found \t\r\nContent-Length: 0\r\n\r\n"),
    Case("reason obs-text", b"HTTP/1.1 200 \xc9t\xe9\r\nContent-Length: 0\r\n\r\n"),
    Case("599", b"HTTP/1.1 599 X\r\nContent-Length: 0\r\n\r\n"),
    Case("999", b"HTTP/1.1 999 X\r\nContent-Length: 0\r\n\r\n"),
    Case("099", b"HTTP/1.1 099 Low\r\n\r\n"),
    Case("1000", b"HTTP/1.1 1000 High\r\n\r\n"),
    Case("two digits", b"HTTP/1.1 20 OK\r\n\r\n"),
    Case("letters", b"HTTP/1.1 abc OK\r\n\r\n"),
    Case("+200", b"HTTP/1.1 +200 OK\r\n\r\n"),
    Case("2_00", b"HTTP/1.1 2_00 OK\r\n\r\n"),
    Case("superscript digit", b"HTTP/1.1 \xb200 OK\r\n\r\n"),
    Case("two spaces", b"HTTP/1.1  200 OK\r\n\r\n"),
    Case("tab for space", b"HTTP/1.1\t200 OK\r\n\r\n"),
    Case("no status", b"HTTP/1.1\r\n\r\n"),
    Case("no space before reason", b"HTTP/1.1 200OK\r\n\r\n"),
    Case("reason NUL", b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n"),
    Case("reason SOH", b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n", differs=S),
    Case("reason bare CR", b"HTTP/1.1 200 O\rK\r\nContent-Length: 0\r\n\r\n"),
    Case("lower-case http", b"http/1.1 200 OK\r\n\r\n", eof=True),
    Case("HTTP/2", b"HTTP/2 200\r\n\r\n"),
    Case("HTTP/2.0", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", differs=S),
    Case("HTTP/0.9", b"HTTP/0.9 200 OK\r\nContent-Length: 0\r\n\r\n", differs=S),
    Case("HTTP/1.10", b"HTTP/1.10 200 OK\r\nContent-Length: 0\r\n\r\n"),
    Case("HTTP/1", b"HTTP/1 200 OK\r\n\r\n"),
    # not HTTP at all
    Case("nothing", b"", eof=True),
    Case("nothing yet", b""),
    Case("SSH banner", b"SSH-2.0-OpenSSH_9.6\r\n", eof=True),
    Case("SSH banner, waiting", b"SSH-2.0-OpenSSH_9.6\r\n", differs=Differs.NOT_HTTP_EARLY),
    Case("HTML", b"<html><body>hello</body></html>\r\n\r\n"),
    Case("ICY", b"ICY 200 OK\r\n\r\n"),
    Case("a blank line first", b"\r\n" + cl(b"x")),
    Case("a bare LF first", b"\n" + cl(b"x")),
    Case(
        "not HTTP after an interim answer",
        b"HTTP/1.1 100 Continue\r\n\r\nSSH-2.0-x\r\n",
        differs=Differs.NOT_HTTP_EARLY,
    ),
    Case("half a status line", b"HTTP/1.1 20", eof=True),
    Case("half a head", b"HTTP/1.1 200 OK\r\nContent-Le", eof=True),
    Case("half a head, waiting", b"HTTP/1.1 200 OK\r\nContent-Le"),
    # header lines
    Case("repeated fields", cl(b"", b"X-A: 1", b"x-a: 2", b"X-A:3")),
    Case("set-cookie twice", cl(b"", b"Set-Cookie: a=1", b"Set-Cookie: b=2")),
    Case("empty values", cl(b"", b"X-E:", b"X-F:   ", b"X-G:\t")),
    Case("blanks around a value", cl(b"", b"X-A: \t v w \t")),
    Case("tab inside a value", cl(b"", b"X-A: a\tb")),
    Case("obs-text value", cl(b"", b"X-A: caf\xe9 \x80\xff")),
    Case("no-break space value", cl(b"", b"X-A: \xa0v\xa0")),
    Case("every token character", cl(b"", b"!#$%&'*+-.^_`|~09AZaz: v")),
    Case("no colon", cl(b"", b"No colon here")),
    Case("blank before colon", cl(b"", b"X-A : 1")),
    Case("tab before colon", cl(b"", b"X-A\t: 1")),
    Case("empty name", cl(b"", b": no name")),
    Case("name with a space", cl(b"", b"X A: 1")),
    Case("name with parentheses", cl(b"", b"X(A): 1")),
    Case("name with a slash", cl(b"", b"X/A: 1")),
    Case("name with obs-text", cl(b"", b"X-\xe9: 1")),
    Case("name with DEL", cl(b"", b"X-\x7f: 1")),
    Case("obs-fold", cl(b"", b"X-A: 1", b" folded"), differs=S),
    Case("obs-fold tab", cl(b"", b"X-A: 1", b"\tfolded"), differs=S),
    Case("a blank first header line", http(b"200 OK", b" X-A: 1", b"Content-Length: 0")),
    Case("NUL in a value", cl(b"", b"X-A: a\x00b")),
    Case("NUL in a name", cl(b"", b"X\x00A: 1")),
    Case("bare CR in a value", cl(b"", b"X-A: a\rb")),
    Case("bare CR ends a line", b"HTTP/1.1 200 OK\r\nX-A: 1\rContent-Length: 0\r\n\r\n"),
    Case("CR CR LF", b"HTTP/1.1 200 OK\r\nX-A: 1\r\r\nContent-Length: 0\r\n\r\n"),
    Case("vertical tab", cl(b"", b"X-A: a\x0bb")),
    Case("form feed", cl(b"", b"X-A: a\x0cb")),
    Case("SOH", cl(b"", b"X-A: a\x01b"), differs=S),
    Case("ESC", cl(b"", b"X-A: \x1b[31mred"), differs=S),
    Case("unit separator", cl(b"", b"X-A: a\x1fb"), differs=S),
    Case("DEL", cl(b"", b"X-A: a\x7fb"), differs=S),
    Case(
        "too long a head",
        cl(b"", b"X-Long: " + b"x" * (MAX_HEAD + 1024)),
        differs=Differs.HEAD_LIMIT,
    ),
    Case("too long, unended", b"HTTP/1.1 200 OK\r\nX-Long: " + b"x" * (MAX_HEAD + 1024)),
    # line ends
    Case("bare LF head", b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 4\n\n\nabc"),
    Case("bare LF, then CRLF empty line", b"HTTP/1.1 200 OK\nContent-Length: 8\n\r\nbody\r\n\r\n"),
    Case(
        "CRLF lines, a bare LF among them",
        b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\nContent-Length: 2\r\n\r\nok",
    ),
    Case("CRLF, then LF empty line", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\nok"),
    Case("bare LF status line", b"HTTP/1.1 204 No Content\n\n"),
]


def _id(case: Case) -> str:
    return case.name


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_case_split_everywhere(case: Case) -> None:
    if len(case.wire) > 1024:  # the long heads: whole and in a few pieces
        step = len(case.wire) // 7
        splits = [[case.wire]] + [
            [case.wire[:i], case.wire[i:]] for i in range(1, len(case.wire), step)
        ]
        check(case, splits)
    else:
        check(case, every_split(case.wire))


def test_the_blanks_before_a_chunk_extension_are_read() -> None:
    # the one case where h11 refuses and this client reads: what it reads
    mine = ours([http(b"200 OK", CHUNKED, body=b"5 ;a=b\r\nhello\r\n0\r\n\r\n")], "GET", False)
    assert (mine.state, mine.body, mine.reusable) == ("complete", b"hello", True)


# -- generated answers


_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_NAMES = ["X-A", "x-a", "Content-Type", "Server", "Set-Cookie", "Link", "X-Empty"]
_VALUE_CHARS = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\xe9", "\x80", "\xff"]
_SIZES = st.integers(min_value=0, max_value=40)


@st.composite
def answers(draw: st.DrawFn) -> Case:
    """A whole answer from parts each parser must read alike: interim answers, a
    status line, header lines (each ended by CRLF or LF), a framing, a body in it.
    Now and then one thing goes wrong: the answer is cut short, bytes come past its
    end, the backend closes, or a header value holds a control character."""
    crlf = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))

    def end() -> bytes:
        return crlf if draw(st.integers(0, 9)) else draw(st.sampled_from([b"\r\n", b"\n"]))

    def fields(n: int) -> bytes:
        out = b""
        for _ in range(n):
            name = draw(st.sampled_from(_NAMES) | st.text(_TOKEN_CHARS, min_size=1, max_size=8))
            if name.lower() in ("content-length", "transfer-encoding", "connection"):
                name = "X-" + name
            value = draw(st.text(_VALUE_CHARS, max_size=12))
            out += name.encode() + b":" + value.encode("latin-1") + end()
        return out

    wire = b""
    for _ in range(draw(st.integers(0, 2))):
        code = draw(st.sampled_from([b"100", b"102", b"103"]))
        wire += b"HTTP/1.1 " + code + b" Info" + end() + fields(draw(st.integers(0, 2))) + end()
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    code = draw(st.sampled_from([b"200", b"201", b"204", b"304", b"400", b"404", b"500", b"503"]))
    reason = draw(st.sampled_from([b" OK", b"", b" ", b" Some Reason"]))
    head = b"HTTP/" + version + b" " + code + reason + end()
    trouble = draw(st.sampled_from(["none"] * 6 + ["cut", "more", "eof", "control"]))
    differs = None
    if trouble == "control":
        bad = draw(st.sampled_from([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]))
        head += b"X-Ctl: a" + bytes([bad]) + b"b" + end()
        differs = Differs.STRICTER
    head += fields(draw(st.integers(0, 4)))
    connection = draw(st.sampled_from([None, b"close", b"keep-alive", b"x, close", b"Keep-Alive"]))
    if connection is not None:
        head += b"Connection: " + connection + end()
        if version == b"1.0" and b"close" not in connection and differs is None:
            differs = Differs.HTTP10_KEEP_ALIVE
    method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD"]))
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "close"]))
    content = draw(st.binary(max_size=60))
    eof = False
    if framing == "length":
        head += b"Content-Length: %d" % len(content) + end()
        body = content
    elif framing == "chunked":
        head += b"Transfer-Encoding: chunked" + end()
        body = b""
        rest = content
        while rest:
            size = draw(st.integers(1, len(rest)))
            ext = draw(st.sampled_from([b"", b"", b";a=b", b';n="v"', b";x"]))
            body += b"%x" % size + ext + b"\r\n" + rest[:size] + b"\r\n"
            rest = rest[size:]
        body += b"0\r\n" + fields(draw(st.integers(0, 2))) + draw(st.sampled_from([b"\r\n", b"\n"]))
    else:
        body = content
        eof = True
    wire += head + end() + body
    if trouble == "cut":
        wire = wire[: draw(st.integers(0, len(wire) - 1))]
        eof = draw(st.booleans()) or eof
    elif trouble == "more":
        wire += draw(st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"x", b"\r\n"]))
    elif trouble == "eof":
        eof = True
    return Case("generated", wire, method, eof, differs)


@st.composite
def split_answers(draw: st.DrawFn) -> tuple[Case, list[bytes]]:
    case = draw(answers())
    points = sorted(draw(st.sets(st.integers(1, max(1, len(case.wire) - 1)), max_size=6)))
    parts, last = [], 0
    for p in points:
        if p < len(case.wire):
            parts.append(case.wire[last:p])
            last = p
    parts.append(case.wire[last:])
    return case, parts


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(split_answers())
def test_generated_answers_split_anywhere(case_parts: tuple[Case, list[bytes]]) -> None:
    case, parts = case_parts
    check(case, [[case.wire], parts])
