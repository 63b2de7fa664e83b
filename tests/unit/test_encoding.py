"""Content-Encoding of backend answers: what zlib reads, and every way it refuses."""

from __future__ import annotations

import gzip
import zlib

import pytest

from proxy.encoding import CannotDecode, Decoder, content_encoding, decode_whole

TEXT = b'{"choices": []}' * 400


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("encoding", "packed"),
    [
        ("gzip", gzip.compress(TEXT)),
        ("x-gzip", gzip.compress(TEXT)),
        ("deflate", zlib.compress(TEXT)),
        ("deflate", raw_deflate(TEXT)),  # sent without its zlib wrapper, as some servers do
    ],
)
def test_decodes_whole_and_in_every_split(encoding: str, packed: bytes) -> None:
    assert decode_whole(packed, encoding, len(TEXT)) == TEXT
    for cut in range(1, len(packed), 7):
        d = Decoder(encoding, len(TEXT))
        assert d.feed(packed[:cut]) + d.feed(packed[cut:]) + d.end() == TEXT


def test_refusals() -> None:
    with pytest.raises(CannotDecode, match="too many bytes"):
        decode_whole(gzip.compress(TEXT), "gzip", len(TEXT) - 1)
    with pytest.raises(CannotDecode, match="cut short"):
        decode_whole(gzip.compress(TEXT)[:-12], "gzip", len(TEXT))
    with pytest.raises(CannotDecode, match="does not decode"):
        decode_whole(b"not gzip at all", "gzip", len(TEXT))
    with pytest.raises(CannotDecode, match="'br'"):
        Decoder("br", 100)


def test_which_answers_are_encoded() -> None:
    assert content_encoding({"content-encoding": " GZIP "}) == "gzip"
    assert content_encoding({"content-encoding": "identity"}) is None
    assert content_encoding({}) is None
