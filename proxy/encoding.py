"""Content-Encoding of backend answers. The proxy asks for `identity`; a backend that
encodes its answer anyway has it relayed with its header, or decoded where the proxy
must read it (a middleware parses the answer, or the stream is checked for its end).
zlib reads gzip and deflate; any other encoding cannot be read here."""

from __future__ import annotations

import zlib

from proxy.errors import ProxyError


class CannotDecode(Exception):
    """An encoding the proxy cannot read, bytes that do not decode, or more decoded
    bytes than allowed."""


def content_encoding(headers: dict[str, str]) -> str | None:
    """The answer's encoding, lower case; None for none or identity."""
    value = headers.get("content-encoding")
    if value is None:
        return None
    value = value.strip().lower()
    return None if value in ("", "identity") else value


class Decoder:
    """Incremental decoding of one answer; each `feed` yields at most `limit` bytes
    (a small compressed read may not expand without bound)."""

    __slots__ = ("_first", "_limit", "_z")

    def __init__(self, encoding: str, limit: int) -> None:
        if encoding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._z = zlib.decompressobj()
        else:
            raise CannotDecode(f"the backend's answer is encoded with {encoding!r}")
        self._first = encoding == "deflate"
        self._limit = limit

    def feed(self, data: bytes) -> bytes:
        try:
            out = self._z.decompress(data, self._limit + 1)
        except zlib.error:
            if not self._first:
                raise CannotDecode("the backend's encoded answer does not decode") from None
            # deflate sent raw, without its zlib wrapper (some servers do)
            self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            self._first = False
            return self.feed(data)
        self._first = False
        if len(out) > self._limit or self._z.unconsumed_tail:
            raise CannotDecode("the backend's encoded answer decodes to too many bytes")
        return out

    def end(self) -> bytes:
        if not self._z.eof and self._z.unused_data == b"":
            try:
                tail = self._z.flush()
            except zlib.error:
                raise CannotDecode("the backend's encoded answer does not decode") from None
            if not self._z.eof:
                raise CannotDecode("the backend's encoded answer is cut short")
            return tail
        return b""


def decode_whole(body: bytes, encoding: str, limit: int) -> bytes:
    decoder = Decoder(encoding, limit)
    out = decoder.feed(body)
    tail = decoder.end()
    if len(out) + len(tail) > limit:
        raise CannotDecode("the backend's encoded answer decodes to too many bytes")
    return out + tail if tail else out


def undecodable(exc: CannotDecode) -> ProxyError:
    return ProxyError(
        502, f"The proxy cannot read the backend's answer: {exc}.", code="upstream_bad_response"
    )
