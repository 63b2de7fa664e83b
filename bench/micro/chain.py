"""The CPU cost of each middleware of the full benchmark chain, per request.

    .venv/bin/python bench/micro/chain.py            # about 5 s
    .venv/bin/python bench/micro/chain.py -n 4000 --rounds 5
    .venv/bin/python bench/micro/chain.py --profile session   # cProfile of one row
    .venv/bin/python bench/micro/chain.py --rate 2500        # the benchmark's pace (c=64)

The chain is built from bench/configs/full.yaml exactly as the server builds it (the
SQLite store in a temporary directory, in /dev/shm unless --dir says otherwise; the
start-up hooks run: the in-process rate limiter, the session writer). No socket is
opened: each request is a mocked aiohttp request carrying the benchmark's body (system + user message, max_tokens 64,
temperature 0.7, bench/bench.py `request_body`), taken through what `entry` in
proxy/app.py does around the chain (an Exchange, the JSON body parsed, the metrics
observed at the end) to a terminal handler that stands in for the backend: it
serialises the body as the upstream handler would, answers the canned non-streamed
completion of the benchmark backend, parses it and runs the body transforms and the
completion callbacks when a middleware asked for them, as proxy/relay.py does.

The process runs on one CPU, as the benchmark pins the proxy (--cpu).

Rows: `empty` (no middleware), each middleware alone (those after auth get the
identity auth would have set, so that they take the same path as in the chain), and
`full`. Columns: CPU time per request of the whole process (every thread: the SQLite
writer thread included), of which in other threads than the event loop's, and the
difference with `empty`; the median of the runs, and the least. Each row is run
`--rounds` times, the rows taking turns, so that other work on the machine weighs
on every row alike. The session writer is flushed inside each timed run, so the
turns the requests queued are written (and paid for) before the clock stops.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench import KEY, completion_doc, request_body  # noqa: E402
from proxy import jsonfast, metrics  # noqa: E402
from proxy.chain import BuildContext, build_chain, compose  # noqa: E402
from proxy.exchange import Exchange, Handler, Identity  # noqa: E402
from proxy.loader import load  # noqa: E402
from proxy.routes import CHAT  # noqa: E402
from proxy.sessions.store import open_store  # noqa: E402

ORDER = ("auth", "rate_limit", "validate", "session", "model_override")

# what the benchmark sends and what its backend answers
REQUEST = request_body("bench-json")
COMPLETION = json.dumps(completion_doc(), separators=(",", ":")).encode()


async def terminal(ex: Exchange) -> web.StreamResponse:
    """The backend's side, as proxy/app.py's terminal, proxy/upstream.py and
    proxy/relay.py do it for a non-streamed answer, without the network."""
    body = ex.body
    identity = ex.identity
    if identity is not None and body is not None and not identity.may_use(ex.model):
        raise RuntimeError("the bench key may use every model")

    data = jsonfast.dumps(body)  # the body sent upstream
    forwarded = dict(ex.upstream_headers)
    forwarded["Content-Type"] = "application/json"
    del data, forwarded
    ex.attempts += 1
    ex.upstream = "json"
    ex.response_headers["x-upstream"] = "json"
    ex.ttfb = time.perf_counter() - ex.started
    ex.status = 200
    out_body = COMPLETION
    if ex.needs_parse:
        doc = jsonfast.loads(out_body)
        if isinstance(doc, dict):
            for transform in reversed(ex.body_transforms):
                doc = transform(doc)
            if ex.body_transforms:
                out_body = jsonfast.dumps(doc)
            ex.completion = doc
    headers = dict(ex.response_headers)
    headers["Content-Type"] = "application/json"
    out = web.Response(status=200, body=out_body, headers=headers)
    for callback in ex.on_complete:
        result = callback(ex)
        if result is not None:
            await result
    return out


class Row:
    def __init__(self, name: str, handler: Handler, identity: Identity | None) -> None:
        self.name = name
        self.handler = handler
        self.identity = identity  # preset for a middleware measured without auth
        self.total: list[float] = []
        self.threads: list[float] = []


async def run_requests(
    row: Row, request: web.Request, n: int, writers: list[Any], rate: float = 0.0
) -> None:
    handler = row.handler
    preset = row.identity
    start = time.perf_counter()
    for i in range(n):
        ex = Exchange(request=request, route=CHAT, scope="chat", request_id=f"req_bench{i}")
        ex.response_headers["X-Request-Id"] = ex.request_id
        ex.upstream_path = "/chat/completions"
        ex.raw_body = REQUEST
        doc = jsonfast.loads(REQUEST)
        ex.body = doc
        ex.requested_model = doc.get("model")
        if preset is not None:
            ex.identity = preset
        response = await handler(ex)
        ex.status = ex.status or response.status
        metrics.observe(ex)
        # what a server does between requests: the loop runs other tasks (the session
        # writer among them); paced, it waits for the next request's time
        wait = (start + (i + 1) / rate - time.perf_counter()) if rate else 0.0
        await asyncio.sleep(wait if wait > 0 else 0)
    for writer in writers:
        await writer.flush(10.0)


async def main(args: argparse.Namespace) -> None:
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})  # before any thread starts: they inherit it
    tmp = tempfile.TemporaryDirectory(prefix="chain-bench-", dir=args.dir)
    env = dict(os.environ)
    env.update(
        BENCH_PORT="18080",
        BENCH_BACKEND="http://127.0.0.1:18081",
        BENCH_SLOW="http://127.0.0.1:18082",
        BENCH_RUN=tmp.name,
        BENCH_KEY=KEY,
        BENCH_LOG_LEVEL="warning",
    )
    config = load(ROOT / "bench" / "configs" / "full.yaml", env=env)
    assert tuple(e.type for e in config.chain) == ORDER, config.chain
    store = await open_store(config.store)
    ctx = BuildContext(config=config, store=store)
    chain = build_chain(ctx)
    built = [(name, feature.middleware) for name, feature in chain.entries]
    for hook in chain.startup:
        await hook()
    # the session middleware's writer, to flush it at the end of each run
    writers = [
        obj
        for hook in chain.shutdown
        for cell in (hook.__closure__ or ())
        if type(obj := cell.cell_contents).__name__ == "Writer"
    ]

    request = make_mocked_request(
        "POST",
        "/v1/chat/completions",
        headers={
            "Host": "127.0.0.1:18080",
            "Authorization": f"Bearer {KEY}",
            "Content-Type": "application/json",
            "Content-Length": str(len(REQUEST)),
            "User-Agent": "wrk",
        },
    )
    # the identity auth sets, for the middlewares measured alone
    seen: list[Identity | None] = []

    async def grab(ex: Exchange) -> web.StreamResponse:
        seen.append(ex.identity)
        return web.Response()

    probe = Exchange(request=request, route=CHAT, scope="chat", request_id="probe")
    await compose([built[0][1]], grab)(probe)
    identity = seen[0]
    assert identity is not None

    rows = [Row("empty", terminal, None)]
    for name, mw in built:
        rows.append(Row(name, compose([mw], terminal), None if name == "auth" else identity))
    rows.append(Row("full", compose([mw for _, mw in built], terminal), None))
    if args.only:
        rows = [r for r in rows if r.name in args.only.split(",")]

    # warm up every path (first labels of the metrics, SQLite statements, caches)
    for row in rows:
        await run_requests(row, request, 200, writers)

    if args.profile:
        row = next(r for r in rows if r.name == args.profile)
        prof = cProfile.Profile()
        prof.enable()
        await run_requests(row, request, args.n, writers, args.rate)
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats(args.sort).print_stats(args.top)
    else:
        for r in range(args.rounds):
            for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
                t0, c0 = time.process_time(), time.thread_time()
                await run_requests(row, request, args.n, writers, args.rate)
                t1, c1 = time.process_time(), time.thread_time()
                row.total.append((t1 - t0) / args.n * 1e6)
                row.threads.append(((t1 - t0) - (c1 - c0)) / args.n * 1e6)
        empty = rows[0] if rows[0].name == "empty" else None
        base = statistics.median(empty.total) if empty else 0.0
        least = min(empty.total) if empty else 0.0
        print(
            f"CPU µs per request, {args.rounds} runs of {args.n} requests per row: median (least)"
        )
        print(f"{'chain':<16}{'total':>16}{'threads':>9}{'over empty':>18}")
        for row in rows:
            total = statistics.median(row.total)
            low = min(row.total)
            threads = max(0.0, statistics.median(row.threads))
            over = (
                f"{total - base:10.1f} ({low - least:5.1f})" if row.name != "empty" else f"{'':18}"
            )
            print(f"{row.name:<16}{total:9.1f} ({low:5.1f}){threads:9.1f}{over}")
        if all(any(r.name == n for r in rows) for n in ORDER):
            parts = sum(statistics.median(r.total) - base for r in rows if r.name in ORDER)
            print(f"{'sum of alone':<16}{'':25}{parts:10.1f}")

    for hook in reversed(chain.shutdown):
        await hook()
    await store.close()
    tmp.cleanup()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=500, help="requests per run (default 500)")
    p.add_argument("--rounds", type=int, default=9, help="runs of each row (default 9)")
    p.add_argument("--only", help="comma-separated rows (empty,auth,...,full)")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="requests per second to pace to (default: as fast as they go); the session "
        "writer's batches are as large as the turns of a few milliseconds, so a rate like "
        "the benchmark's gives its batch sizes",
    )
    p.add_argument(
        "--dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where the SQLite file goes (default /dev/shm: memory, so that the disk's "
        "own delays, which vary from run to run, stay out of the figures)",
    )
    p.add_argument(
        "--cpu",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="the CPU to run on, writer thread included (default the last one, where the "
        "benchmark pins the proxy; -1: any). Left free to use two CPUs, the writer thread's "
        "work costs about twice as much, in cache misses and wake-ups",
    )
    p.add_argument("--profile", metavar="ROW", help="cProfile one run of this row instead")
    p.add_argument("--sort", default="tottime", help="cProfile sort key (default tottime)")
    p.add_argument("--top", type=int, default=30, help="cProfile lines shown (default 30)")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
