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

    __slots__ = ("_head", "_limit", "_z")

    def __init__(self, encoding: str, limit: int) -> None:
        self._z: zlib._Decompress | None = None
        # deflate: the first two bytes, until they tell a zlib stream from one sent
        # raw, without its wrapper (as some servers do)
        self._head: bytes | None = None
        if encoding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._head = b""
        else:
            raise CannotDecode(f"the backend's answer is encoded with {encoding!r}")
        self._limit = limit

    def feed(self, data: bytes) -> bytes:
        if self._head is not None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return b""
            self._head = None
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0  # RFC 1950
            self._z = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        z = self._z
        assert z is not None
        try:
            out = z.decompress(data, self._limit + 1)
        except zlib.error:
            raise CannotDecode("the backend's encoded answer does not decode") from None
        if len(out) > self._limit or z.unconsumed_tail:
            raise CannotDecode("the backend's encoded answer decodes to too many bytes")
        return out

    def end(self) -> bytes:
        """What the decoder still holds once the encoded bytes have ended; an
        encoding cut short is an error."""
        if self._z is None:
            raise CannotDecode("the backend's encoded answer is cut short")
        if self._z.eof:
            return b""
        try:
            tail = self._z.flush()
        except zlib.error:
            raise CannotDecode("the backend's encoded answer does not decode") from None
        if not self._z.eof:
            raise CannotDecode("the backend's encoded answer is cut short")
        return tail


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
