"""The Redis round trips and commands one request makes through the full chain (auth,
rate_limit, validate, session, model_override) with `store.backend: redis`:
`.venv/bin/python bench/redis_trips.py [--url redis://127.0.0.1:6379/0] [-n 20]`.

Method: the proxy runs in this process (aiohttp's test server) in front of a stand-in
backend that answers a canned chat.completion. Each call of proxy.shared_redis's
`send` is one round trip (as is each write of redis-py's own connections, for a script
loaded), each command it packs one command sent (the commands of a script run in the
server are not counted separately); those the session writer's task makes are counted
apart. The counts are read when the request reaches the backend (what it cost before
going upstream), when the response has reached the client and the middlewares'
`finally` blocks have run (after); the session writer's (off the request's path, one
batch for every turn queued meanwhile: one turn per batch here, where requests come
one at a time) are counted in its own task.
Requests go one at a time, so each phase's counts are that request's alone.

Two conversations: a new one (system prompt and one user message: no session lookup,
the bench's load) and a continued one (user, assistant, user: the session is looked
up by its history). Keys go under a prefix of the run's own, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.app import build_app
from proxy.loader import load_text

KEY = "sk-redis-trips-0123456789abcdef"

CONFIG = """
upstreams:
  - name: json
    url: {backend}/v1
    models: ["trips-json"]
store: {{backend: redis, url: "{url}", prefix: "{prefix}"}}
middleware:
  - type: auth
    keys:
      - id: trips
        key: {key}
        scopes: [chat]
  - type: rate_limit
    requests_per_minute: 100000000
    tokens_per_minute: 1000000000000
    max_concurrent: 100000
  - type: validate
  - type: session
  - type: model_override
    default: trips-json
    aliases: {{trips-alias: trips-json}}
"""

COMPLETION = {
    "id": "chatcmpl-trips",
    "object": "chat.completion",
    "created": 0,
    "model": "trips-json",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 24, "completion_tokens": 4, "total_tokens": 28},
}

NEW = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello in one short sentence."},
]


def continued(i: int) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"Question {i}?"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "And again?"},
    ]


class Counts:
    def __init__(self) -> None:
        self.trips = 0
        self.commands: Counter[str] = Counter()
        # the session writer's, counted apart: its own task, off the request's path
        self.writer_trips = 0
        self.writer_commands: Counter[str] = Counter()
        self.names: dict[str, str] = {}

    def snapshot(self) -> tuple[int, Counter[str]]:
        return self.trips, Counter(self.commands)

    def writer_snapshot(self) -> tuple[int, Counter[str]]:
        return self.writer_trips, Counter(self.writer_commands)


def _in_writer() -> bool:
    task = asyncio.current_task()
    return task is not None and task.get_name() == "session-writer"


COUNTS = Counts()


def instrument() -> None:
    """Count round trips where the request (or the writer) asks for them: each call of
    proxy.shared_redis's send is one (its lane may carry several callers' sends in
    one write; here requests go one at a time), each command it packs one; what goes
    through redis-py's own connections (a script loaded, a cluster) is counted at
    the connection, except the lanes' writes, already counted by their callers."""
    import hiredis

    from proxy import shared_redis

    send = AbstractConnection.send_packed_command
    pack = AbstractConnection.pack_command
    add = shared_redis._Lane.add

    def count(args: Any) -> None:
        name = str(args[0]).upper()
        if name == "EVALSHA" and len(args) > 1:
            name = f"EVALSHA {COUNTS.names.get(str(args[1]), str(args[1])[:8])}"
        (COUNTS.writer_commands if _in_writer() else COUNTS.commands)[name] += 1

    def trip() -> None:
        if _in_writer():
            COUNTS.writer_trips += 1
        else:
            COUNTS.trips += 1

    async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        task = asyncio.current_task()
        if task is None or task.get_name() != "redis-lane":
            trip()
        await send(self, command, check_health)

    def pack_command(self: Any, *args: Any) -> Any:
        count(args)
        return pack(self, *args)

    class Packer:
        @staticmethod
        def pack_command(args: Any) -> bytes:
            count(args)
            packed: bytes = hiredis.pack_command(args)
            return packed

    def lane_add(self: Any, payload: bytes, n: int) -> Any:
        trip()
        return add(self, payload, n)

    AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
    AbstractConnection.pack_command = pack_command  # type: ignore[method-assign]
    shared_redis.hiredis = Packer  # type: ignore[assignment]
    shared_redis._Lane.add = lane_add  # type: ignore[method-assign]


def name_scripts() -> None:
    """The scripts' names by their SHA1, for the report."""
    import hashlib

    from proxy.ratelimit import redis as limiter
    from proxy.sessions.store import redis as store

    for module in (limiter, store):
        for attr in dir(module):
            value = getattr(module, attr)
            if isinstance(value, str) and "redis.call" in value:
                COUNTS.names[hashlib.sha1(value.encode()).hexdigest()] = attr.strip("_")


def delta(a: tuple[int, Counter[str]], b: tuple[int, Counter[str]]) -> tuple[int, Counter[str]]:
    return b[0] - a[0], b[1] - a[1]


async def run(url: str, n: int) -> int:
    prefix = f"trips-{uuid.uuid4().hex[:8]}:"
    arrived: list[tuple[int, Counter[str]]] = []

    async def chat(request: web.Request) -> web.Response:
        arrived.append(COUNTS.snapshot())
        await request.read()
        return web.json_response(COMPLETION)

    backend_app = web.Application()
    backend_app.router.add_post("/v1/chat/completions", chat)
    backend = TestServer(backend_app)
    await backend.start_server()
    backend_url = str(backend.make_url("")).rstrip("/")
    text = CONFIG.format(backend=backend_url, url=url, prefix=prefix, key=KEY)
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(load_text(text, env={}))))
    await client.start_server()
    headers = {"Authorization": f"Bearer {KEY}"}
    status = 0
    try:
        # warm up: connections opened, scripts loaded
        for i in range(3):
            for messages in (NEW, continued(10_000 + i)):
                async with client.post(
                    "/v1/chat/completions",
                    json={"model": "trips-alias", "messages": messages},
                    headers=headers,
                ) as resp:
                    await resp.read()
        await asyncio.sleep(0.5)
        for label, make in (("new conversation", lambda i: NEW), ("continued", continued)):
            before = Counter[str]()
            after = Counter[str]()
            trips_before = trips_after = 0
            start = COUNTS.writer_snapshot()
            for i in range(n):
                arrived.clear()
                s0 = COUNTS.snapshot()
                async with client.post(
                    "/v1/chat/completions",
                    json={"model": "trips-alias", "messages": make(i)},
                    headers=headers,
                ) as resp:
                    await resp.read()
                    if resp.status != 200:
                        status = 1
                await asyncio.sleep(0.02)  # the settlement in the middleware's finally
                s2 = COUNTS.snapshot()
                t, c = delta(s0, arrived[0])
                trips_before += t
                before += c
                t, c = delta(arrived[0], s2)
                trips_after += t
                after += c
            await asyncio.sleep(1.0)  # the session writer's batches
            background_trips, background = delta(start, COUNTS.writer_snapshot())
            print(f"{label}: {n} requests, per request")
            print(f"  before upstream: {trips_before / n:.2f} round trips  {fmt(before, n)}")
            print(f"  after:           {trips_after / n:.2f} round trips  {fmt(after, n)}")
            print(
                f"  writer (batched, off the request path): {background_trips / n:.2f} "
                f"round trips  {fmt(background, n)}"
            )
    finally:
        await client.close()
        await backend.close()
        r = Redis.from_url(url)
        keys = [k async for k in r.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()
    return status


def fmt(c: Counter[str], n: int) -> str:
    return ", ".join(f"{name} {count / n:.2f}" for name, count in sorted(c.items())) or "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("-n", type=int, default=20, help="requests per conversation kind")
    args = parser.parse_args()
    instrument()
    name_scripts()
    return asyncio.run(run(args.url, args.n))


if __name__ == "__main__":
    raise SystemExit(main())
