"""The clients that talk to the backends: the interface and errors (`base`), the
proxy's own HTTP/1.1 client (`http1`) and one over aiohttp (`aiohttp_client`)."""

from proxy.backend.base import (
    BackendClient,
    BackendResponse,
    BodyTooLarge,
    ClientError,
    ConnectTimeout,
    Disconnected,
    PoolFull,
    ResponseError,
    request_target,
)

__all__ = [
    "BackendClient",
    "BackendResponse",
    "BodyTooLarge",
    "ClientError",
    "ConnectTimeout",
    "Disconnected",
    "PoolFull",
    "ResponseError",
    "request_target",
]
