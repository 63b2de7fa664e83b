"""The floor for any Python proxy: a bare aiohttp relay with nothing in it.

One ClientSession; the request body is forwarded as it is to the same path on the
backend; a streamed (SSE) answer is written back chunk by chunk as it arrives, any
other answer is read whole and returned with its length. No parsing, no logging, no
headers beyond Content-Type.

    python bench/bare_relay.py --port 9001 --backend http://127.0.0.1:9000 [--loop uvloop]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
BACKEND = web.AppKey("backend", str)


async def relay(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with session.request(
        request.method, request.app[BACKEND] + request.path_qs, data=body, headers=headers
    ) as resp:
        ctype = resp.headers.get("Content-Type", "application/octet-stream")
        if not ctype.startswith("text/event-stream"):
            data = await resp.read()
            return web.Response(status=resp.status, body=data, headers={"Content-Type": ctype})
        out = web.StreamResponse(status=resp.status, headers={"Content-Type": ctype})
        await out.prepare(request)
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


def build(backend: str) -> web.Application:
    app = web.Application()
    app[BACKEND] = backend.rstrip("/")

    async def client(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=2000, keepalive_timeout=120)
        app[SESSION] = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True, help="origin, e.g. http://127.0.0.1:9000")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    loop = None
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(
        build(args.backend),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=4096,
        loop=loop,
    )


if __name__ == "__main__":
    main()
