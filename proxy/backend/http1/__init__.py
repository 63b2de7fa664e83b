"""The proxy's own HTTP/1.1 client: `parser` (pure), `connection` (the
asyncio.Protocol) and `pool` (the connections to one backend and their answers)."""

from proxy.backend.http1.pool import Pool, Response

__all__ = ["Pool", "Response"]
