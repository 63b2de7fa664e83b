"""The HTTP/1.1 response parser: the status line, the headers and the body's framing.

Pure: bytes in, state out, no asyncio and no socket. `ResponseParser` is the state
of one answer; `proxy.backend.http1.connection._Conn` feeds it what the transport
reads and overrides `_push` (body bytes, with flow control) and `_wake` (progress,
for whoever waits). Content-Length, chunked (trailers checked and dropped) and
until-close bodies; interim 1xx answers skipped.

RFC 9110 5.1 and 5.5: a field name is a token; a value holds visible characters,
obs-text, spaces and tabs, and no other control character (CR, LF, NUL...). A line
ends in CRLF or, as RFC 9112 2.2 allows, in a bare LF; a CR anywhere else is
refused, and so is obs-fold (a line that starts with a space or a tab).
"""

from __future__ import annotations

import re

from proxy.backend.base import ResponseError

MAX_HEAD = 64 * 1024  # status line and headers
MAX_CHUNK_LINE = 4096

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TEXT = r"[\t\x20-\x7e\x80-\xff]*"
# the whole head, decoded as latin-1, less its blank line: the status line (a reason
# phrase may be left out) then the header lines
_HEAD_RE = re.compile(rf"HTTP/1\.([0-9]) ([0-9]{{3}})(?: {_TEXT})?(?:\r?\n{_TOKEN}:{_TEXT})*")
# the trailer section of a chunked body, each line with its end
_TRAILERS_RE = re.compile(rf"(?:{_TOKEN}:{_TEXT}\r?\n)*".encode("latin-1"))
# a chunk size line less its CRLF: the size, then (after optional blanks, RFC 9112
# 7.1.1) extensions, which are not parsed but may hold no control character
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?[ \t]*")

# states of the body parser
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseParser:
    """The parse state of one answer; `_reset_parse()` readies it for the next."""

    __slots__ = (
        "_body",
        "_buffered",
        "_cbuf",
        "_expect_body",
        "_head",
        "_keep_alive",
        "_remaining",
        "_state",
        "headers",
        "reason",
        "status",
    )

    def __init__(self) -> None:
        self._reset_parse()

    def _reset_parse(self) -> None:
        self._state = _HEAD
        self._head = b""
        self._remaining = 0
        self._cbuf = b""
        self._body: list[bytes] = []  # body bytes parsed and not yet taken
        self._buffered = 0
        self._keep_alive = True
        self._expect_body = True  # False for the answer to a HEAD
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}

    def _push(self, data: bytes) -> None:
        """Body bytes parsed (or b"" when the body's end was reached without any)."""
        if data:
            self._body.append(data)
            self._buffered += len(data)
        self._wake()

    def _wake(self) -> None:
        """The head is complete, or body bytes or the body's end arrived."""

    def _parse_head(self, data: bytes) -> bytes:
        head = self._head + data if self._head else data
        while True:
            # the head ends at the first empty line: "\n\r\n" (in CRLFCRLF) or "\n\n"
            # (a line may end in a bare LF, RFC 9112 2.2; some small servers)
            lf = head.find(b"\n\r\n")
            bare = head.find(b"\n\n", 0, lf + 1 if lf >= 0 else len(head))
            if bare >= 0:
                lf, skip = bare, 2
            else:
                skip = 3
            if lf < 0:
                if len(head) > MAX_HEAD:
                    raise ResponseError("the response headers are too long")
                if not head.startswith(b"HTTP/") and not b"HTTP/".startswith(head):
                    raise ResponseError("the backend's answer is not HTTP/1.x")
                self._head = head
                return b""
            if lf > MAX_HEAD:
                raise ResponseError("the response headers are too long")
            stop = lf - 1 if lf and head[lf - 1] == 13 else lf  # less the CR of its CRLF
            text = head[:stop].decode("latin-1")
            head = head[lf + skip :]
            match = _HEAD_RE.fullmatch(text)
            if match is None:
                raise ResponseError(_head_fault(text))
            status = int(match[2])
            if status < 100:
                raise ResponseError("the backend's status code is out of range")
            # the pattern leaves a CR only at the end of a line, after the colon of a
            # header line: stripped from the value with the blanks
            lines = text.split("\n")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                key = name.lower()
                value = value.strip(" \t\r")
                if key in headers:
                    headers[key] += ", " + value
                else:
                    headers[key] = value
            te = headers.get("transfer-encoding")
            # only chunked: a body in any other coding could not be passed on as is
            if te is not None and te.lower() != "chunked":
                raise ResponseError("the backend's transfer-encoding is not supported")
            length = headers.get("content-length")
            if length is not None and not (
                length.isascii() and length.isdigit() and len(length) < 19
            ):
                headers["content-length"] = _one_length(length)
            if status < 200:
                if status == 101:  # this client never asks for an upgrade
                    raise ResponseError("the backend switched protocols unasked")
                continue  # 100 Continue and other interim answers
            self.status = status
            status_line = lines[0].rstrip("\r")
            self.reason = status_line[13:] if len(status_line) > 12 else ""
            self.headers = headers
            self._head = b""
            connection = headers.get("connection")
            if connection is not None:
                connection = connection.lower()
                if connection != "keep-alive":  # else kept alive, in 1.0 as in 1.1
                    tokens = {t.strip(" \t") for t in connection.split(",")}
                    if "close" in tokens or (match[1] == "0" and "keep-alive" not in tokens):
                        self._keep_alive = False
            elif match[1] == "0":  # HTTP/1.0: closed after the answer unless kept alive
                self._keep_alive = False
            self._frame(headers)
            return head

    def _frame(self, headers: dict[str, str]) -> None:
        """The body's framing, from headers `_parse_head` has checked."""
        if not self._expect_body or self.status in (204, 304):
            self._state = _DONE
            return
        if "transfer-encoding" in headers:
            if "content-length" in headers:
                # RFC 9112 6.3: chunked wins, but such an answer smells of smuggling;
                # the connection is not trusted with another request
                self._keep_alive = False
            self._state = _CHUNK_SIZE
            return
        length = headers.get("content-length")
        if length is not None:
            self._remaining = int(length)
            self._state = _LENGTH if self._remaining else _DONE
            return
        self._state = _UNTIL_CLOSE
        self._keep_alive = False

    def _feed_body(self, data: bytes) -> None:
        state = self._state
        if state == _LENGTH:
            n = len(data)
            if n >= self._remaining:
                if n > self._remaining:
                    data = data[: self._remaining]
                    self._keep_alive = False
                self._remaining = 0
                self._state = _DONE
            else:
                self._remaining -= n
            self._push(data)
        elif state == _UNTIL_CLOSE:
            self._push(data)
        elif state == _DONE:
            self._keep_alive = False  # bytes past the end: do not trust this connection
        else:
            self._dechunk(data)

    def _dechunk(self, data: bytes) -> None:
        buf = self._cbuf + data if self._cbuf else data
        pos = 0
        n = len(buf)
        out: list[bytes] = []
        state = self._state
        while pos < n:
            if state == _CHUNK_DATA:
                take = min(self._remaining, n - pos)
                out.append(buf[pos : pos + take] if take < n or pos else buf)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if n - pos < 2:
                    if buf[pos] != 13:  # not even the CR: no need to wait for the LF
                        raise ResponseError("a chunk of the backend's answer is malformed")
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ResponseError("a chunk of the backend's answer is malformed")
                pos += 2
                state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > MAX_CHUNK_LINE:
                        raise ResponseError("a chunk size line is too long")
                    break
                line = _CHUNK_LINE.fullmatch(buf, pos, eol)
                if line is None:
                    raise ResponseError("a chunk size of the backend's answer is malformed")
                self._remaining = int(line[1], 16)
                pos = eol + 2
                state = _CHUNK_DATA if self._remaining else _TRAILERS
            elif state == _TRAILERS:
                # header lines (dropped, but checked as a head's are) to an empty line
                if buf.startswith(b"\r\n", pos):
                    pos += 2
                elif buf.startswith(b"\n", pos):
                    pos += 1
                else:
                    lf = buf.find(b"\n\r\n", pos)
                    bare = buf.find(b"\n\n", pos, lf + 1 if lf >= 0 else n)
                    if bare >= 0:
                        lf, skip = bare, 2
                    else:
                        skip = 3
                    if lf < 0:
                        if n - pos > MAX_HEAD:
                            raise ResponseError("the response trailers are too long")
                        break
                    if _TRAILERS_RE.fullmatch(buf, pos, lf + 1) is None:
                        raise ResponseError("a response trailer line is malformed")
                    pos = lf + skip
                state = _DONE
                if pos < n:
                    self._keep_alive = False
                break
            else:
                break
        self._state = state
        self._cbuf = buf[pos:] if state != _DONE and pos < n else b""
        if out:
            self._push(out[0] if len(out) == 1 else b"".join(out))
        elif state == _DONE:
            self._wake()


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS = re.compile(r"HTTP/1\.[0-9] ")
_CODE = re.compile(r"HTTP/1\.[0-9] [0-9]{3}(?:[ \r\n]|$)")


def _head_fault(text: str) -> str:
    """Why a head that `_HEAD_RE` refused is wrong (off the fast path)."""
    if not _STATUS.match(text):
        return "the backend's answer is not HTTP/1.x"
    if not _CODE.match(text):
        return "the backend's status code is not three digits"
    if _CONTROL.search(text.replace("\r\n", "").replace("\n", "")):
        return "a response header holds a control character"
    return "a response header line is malformed"


def _one_length(value: str) -> str:
    """A Content-Length other than plain digits: one value repeated ("5, 5", or the
    field sent twice; RFC 9110 8.6 lets a recipient take it as one) is that value;
    anything else is an error."""
    values = {v.strip(" \t") for v in value.split(",")}
    if len(values) != 1:
        raise ResponseError("the backend's content-length values conflict")
    length = values.pop()
    if not (length.isascii() and length.isdigit()):
        raise ResponseError("the backend's content-length is not a number")
    if len(length) > 18:
        raise ResponseError("the backend's content-length is too large")
    return length
