"""The full chain's throughput with its store on SQLite, Redis and PostgreSQL, and the
two-process limit exactness on each, in one run: `.venv/bin/python bench/stores.py`.

The chain is bench/configs/full.yaml's (auth, rate_limit, validate, session,
model_override) in front of nginx serving a canned chat.completion; only `store:`
differs. The rate-limit counters go where the store says: in the proxy process with
SQLite (each process counts on its own), in Redis or PostgreSQL otherwise. Every
request is a new conversation, so each one looks its session up and writes a turn
(in batches, off the request path): the heaviest use a store gets from the chain.

The stores run as a production would: SQLite in WAL mode (the store's own settings),
a redis-server of the run's own with an append-only file synced every second, a
PostgreSQL cluster of the run's own (initdb into the run folder, fsync on). On a
machine with two CPUs or more the proxy runs on CPU 1 and everything else (nginx, the
load generator, the store servers) on CPU 0.

Measured, for each store: wrk at concurrency 1 and 64 (requests per second, latency
p50 and p99, rounds interleaved across the stores, medians), the CPU time the proxy
and the store server spent per request; then two fresh proxy processes on one store,
a key limited to 50 requests a minute, 200 requests at once split between them: how
many were admitted (exact: 50; counted per process: 100). Targets: Redis at least 0.8
of SQLite's requests a second at c=64, in the same run.

Two workers against one (`--no-scaling` leaves it out): the full chain on Redis served
by `serve --workers 1` and `--workers 2`, nothing pinned (the workers share the
machine's CPUs with wrk, nginx and Redis), interleaved rounds at c=64; target: two
workers at least 1.7 times one.

Results: bench/results/stores.json (every figure and round; `--output` elsewhere) and
stores.md beside it, with the date and the machine; bench/run runs it as its `stores`
scenario. Talks only to 127.0.0.1 and stops every process it started. About three
minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from tests.postgres.server import PostgresServer, find_bindir  # noqa: E402

sys.path.insert(0, str(BENCH))
from bench import Procs  # noqa: E402

PY = REPO / ".venv" / "bin" / "python"
RESULTS = BENCH / "results"
STORES = ("sqlite", "redis", "postgres")
KEY = "sk-bench-stores-0123456789abcdef"  # the load's key: limits too high to refuse
BURST_KEY = "sk-bench-stores-burst-0123456789"  # 50 requests a minute
WARM_KEY = "sk-bench-stores-warm-01234567890"
EXACT_LIMIT = 50
EXACT_REQUESTS = 200

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-json",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! This is a canned answer from the benchmark backend, "
                    "about as long as a short reply from a chat model.",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 24, "completion_tokens": 22, "total_tokens": 46},
    },
    separators=(",", ":"),
)

BODY = json.dumps(
    {
        "model": "bench-alias",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        "max_tokens": 64,
        "temperature": 0.7,
    }
).encode()

NGINX = """worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {run}/nginx-tmp/body;
    proxy_temp_path {run}/nginx-tmp/proxy;
    fastcgi_temp_path {run}/nginx-tmp/fastcgi;
    uwsgi_temp_path {run}/nginx-tmp/uwsgi;
    scgi_temp_path {run}/nginx-tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 '{completion}';
        }}
    }}
}}
"""

PROXY = """server:
  host: 127.0.0.1
  port: {port}
  log_level: info          # one JSON access-log line per request, as in production
upstreams:
  - name: json
    url: http://127.0.0.1:{backend}/v1
    models: ["bench-json"]
    max_connections: 256
store:
{store}
middleware:
  - type: auth
    keys:
      - id: bench
        key: {key}
        scopes: [chat, models, sessions:read, sessions:write]
      - id: warm
        key: {warm_key}
        scopes: [chat]
      - id: burst
        key: {burst_key}
        scopes: [chat]
        limits: {{requests_per_minute: {limit}}}
  - type: rate_limit
    requests_per_minute: 100000000
    tokens_per_minute: 1000000000000
    max_concurrent: 100000
  - type: validate
  - type: session
  - type: model_override
    default: bench-json
    aliases: {{bench-alias: bench-json}}
"""

STORE_SETTINGS = {
    "sqlite": "a file in WAL mode, synchronous NORMAL (the store's own settings); "
    "rate-limit counters in the proxy process",
    "redis": "redis-server, appendonly yes, appendfsync everysec, no RDB snapshots",
    "postgres": "initdb defaults, fsync on, synchronous_commit on, shared_buffers 64MB; "
    "counters in UNLOGGED tables",
}


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU time of a process and its children (PostgreSQL's backends)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    return total


def children_cpu() -> float:
    """CPU time of the finished children of this process (each wrk run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> float:
    """CPU seconds every CPU of the machine has been busy (not idle, not waiting)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def pin(pid: int | None, cpus: set[int] | None) -> None:
    """Pin a process and its children (those it has now; later ones inherit it)."""
    if pid is None or cpus is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setaffinity(pid, cpus)
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                pin(int(child), cpus)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="chat-proxy-bench-stores-"))
        # a role is the CPUs a process is pinned to, as taskset names them
        self.procs = Procs(self.dir, {str(c): str(c) for c in range(os.cpu_count() or 1)})
        self.pg: PostgresServer | None = None
        self.redis_pid: int | None = None
        self.nginx_pid: int | None = None
        two = (os.cpu_count() or 1) >= 2
        self.proxy_cpus = {1} if two else None
        self.other_cpus = {0} if two else None
        self.ports: dict[str, int] = {}
        self.stores: dict[str, str] = {}  # the YAML of each store

    # -- processes --

    def start(self, name: str, argv: list[str], cpus: set[int] | None) -> subprocess.Popen[bytes]:
        """A process of the run (bench/bench.py's Procs), on `cpus` (None: anywhere)."""
        role = ",".join(map(str, sorted(cpus))) if cpus else "anywhere"
        return self.procs.start(name, argv, role)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        self.procs.stop(proc)

    def cleanup(self) -> None:
        self.procs.stop_all()
        if self.pg is not None:
            self.pg.remove()
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def wait_port(self, port: int, proc: subprocess.Popen[bytes], what: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited {proc.returncode}; see {self.dir}")
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{what} did not listen on {port}")

    # -- the backend and the stores --

    def start_backend(self) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / "nginx-tmp" / sub).mkdir(parents=True)
        port = self.ports["backend"] = free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX.format(run=self.dir, port=port, completion=COMPLETION))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        proc = self.start("nginx", [nginx, "-c", str(conf), "-p", str(self.dir)], self.other_cpus)
        self.nginx_pid = proc.pid
        self.wait_port(port, proc, "nginx")

    def start_stores(self) -> None:
        self.stores["sqlite"] = f"  backend: sqlite\n  path: {self.dir}/sessions.db"
        port = self.ports["redis"] = free_port()
        redis = self.start(
            "redis-server",
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ],
            self.other_cpus,
        )
        self.wait_port(port, redis, "redis-server")
        self.redis_pid = redis.pid
        self.stores["redis"] = (
            f'  backend: redis\n  url: "redis://127.0.0.1:{port}/0"\n  prefix: "bench:"'
        )
        self.pg = PostgresServer(durable=True)
        self.pg.start()
        pin(self.pg.pid, self.other_cpus)
        self.stores["postgres"] = f'  backend: postgres\n  dsn: "{self.pg.new_database()}"'

    def store_pid(self, store: str) -> int | None:
        if store == "redis":
            return self.redis_pid
        if store == "postgres" and self.pg is not None:
            return self.pg.pid
        return None

    # -- the proxies --

    def start_proxy(
        self, store: str, name: str, cpus: set[int] | None, workers: int = 1
    ) -> tuple[Any, int]:
        port = free_port()
        conf = self.dir / f"{name}.yaml"
        conf.write_text(
            PROXY.format(
                port=port,
                backend=self.ports["backend"],
                store=self.stores[store],
                key=KEY,
                warm_key=WARM_KEY,
                burst_key=BURST_KEY,
                limit=EXACT_LIMIT,
            )
        )
        argv = [str(PY), "-m", "proxy", "serve", "--config", str(conf)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        proc = self.start(name, argv, cpus)
        self.wait_port(port, proc, name)
        if workers > 1:
            # every worker listening: the parent logs each one's start
            deadline = time.monotonic() + 30
            log = self.dir / f"{name}.log"
            while log.read_text(errors="replace").count('"chat-proxy listening"') < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: not every worker started; see {log}")
                time.sleep(0.1)
        return proc, port

    def warnings(self, name: str) -> dict[str, int]:
        """The warnings and errors a proxy logged, by message: a limiter that fell back
        to on_store_error would measure nothing of its store."""
        seen: Counter[str] = Counter()
        with contextlib.suppress(OSError):
            for line in (self.dir / f"{name}.log").read_text(errors="replace").splitlines():
                if '"level":"warning"' in line or '"level":"error"' in line:
                    try:
                        seen[str(json.loads(line).get("msg"))] += 1
                    except ValueError:
                        seen[line[:200]] += 1
        return dict(seen)

    def wrk(self, port: int, conns: int, seconds: float, pinned: bool = True) -> dict[str, Any]:
        body = self.dir / "body.json"
        if not body.exists():
            body.write_bytes(BODY)
        argv = [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(BENCH / "wrk.lua"),
            f"http://127.0.0.1:{port}/v1/chat/completions",
        ]
        if self.other_cpus is not None and pinned:
            argv = ["taskset", "-c", ",".join(map(str, self.other_cpus)), *argv]
        env = {
            **os.environ,
            "BENCH_BODY": str(body),
            "BENCH_HEADERS": f"Authorization: Bearer {KEY}",
        }
        out = subprocess.run(argv, capture_output=True, env=env, timeout=seconds + 60, check=False)
        text = out.stdout.decode(errors="replace")
        m = re.search(r"^BENCH_JSON (\{.*\})$", text, re.M)
        if m is None:
            raise RuntimeError(f"wrk printed no result: {text[-600:]} {out.stderr[-400:]!r}")
        raw: dict[str, Any] = json.loads(m.group(1))
        seconds_run = raw["duration_us"] / 1e6
        errors = raw["errors"]
        return {
            "requests": raw["requests"],
            "rps": raw["requests"] / seconds_run,
            "p50_ms": raw["latency_us"]["50"] / 1000,
            "p99_ms": raw["latency_us"]["99"] / 1000,
            "errors": sum(errors.values()),
            "non_2xx": errors["status"],
        }

    def measure(
        self, store: str, proc: Any, port: int, conns: int, seconds: float
    ) -> dict[str, Any]:
        spid = self.store_pid(store)
        p0, s0, n0 = cpu_seconds(proc.pid), cpu_seconds(spid), cpu_seconds(self.nginx_pid)
        w0, m0, t0 = children_cpu(), machine_busy(), time.monotonic()
        result = self.wrk(port, conns, seconds)
        p1, s1, n1 = cpu_seconds(proc.pid), cpu_seconds(spid), cpu_seconds(self.nginx_pid)
        w1, m1, t1 = children_cpu(), machine_busy(), time.monotonic()
        n = max(1, result["requests"])
        result["proxy_cpu_ms_per_request"] = (p1 - p0) * 1000 / n
        result["store_cpu_ms_per_request"] = (s1 - s0) * 1000 / n if spid else None
        # the CPU the rest of the machine took meanwhile (other work, not this run's),
        # as a share of all its CPUs: a run beside other load measures less
        ours = (p1 - p0) + (s1 - s0) + (n1 - n0) + (w1 - w0)
        result["other_load"] = max(0.0, (m1 - m0) - ours) / ((t1 - t0) * (os.cpu_count() or 1))
        return result

    def throughput(self) -> dict[str, Any]:
        running = {s: self.start_proxy(s, f"proxy-{s}", self.proxy_cpus) for s in STORES}
        out: dict[str, Any] = {s: {"c1": None, "c64": []} for s in STORES}
        try:
            for store, (_proc, port) in running.items():
                self.wrk(port, 16, 2)  # warm-up: connections, caches, the schema
                say(f"  {store}: warmed up")
            for store, (proc, port) in running.items():
                out[store]["c1"] = self.measure(store, proc, port, 1, self.args.c1_seconds)
                say(f"  {store} c=1: {out[store]['c1']['rps']:.0f} req/s")
            for r in range(self.args.rounds):
                # interleaved, so that a drift of the machine touches every store alike
                for store, (proc, port) in running.items():
                    res = self.measure(store, proc, port, 64, self.args.seconds)
                    out[store]["c64"].append(res)
                    say(f"  round {r + 1} {store} c=64: {res['rps']:.0f} req/s")
        finally:
            for proc, _ in running.values():
                self.stop(proc)
        for store in STORES:
            out[store]["warnings"] = self.warnings(f"proxy-{store}")
            rounds = out[store]["c64"]
            out[store]["c64_median"] = {
                k: median([x[k] for x in rounds])
                for k in ("rps", "p50_ms", "p99_ms", "proxy_cpu_ms_per_request", "other_load")
            }
            store_cpu = [x["store_cpu_ms_per_request"] for x in rounds]
            out[store]["c64_median"]["store_cpu_ms_per_request"] = (
                median(store_cpu) if all(v is not None for v in store_cpu) else None
            )
            out[store]["c64_median"]["errors"] = sum(x["errors"] for x in rounds)
        return out

    # -- two workers against one --

    def scaling(self) -> dict[str, Any]:
        """The full chain on Redis served by `--workers 1` and `--workers 2`, nothing
        pinned (the workers, wrk, nginx and Redis share the machine's CPUs), in
        interleaved rounds at c=64: the requests a second of each, their ratio, and
        where the machine's CPU time went (the workers, Redis, nginx, wrk)."""
        everywhere = set(range(os.cpu_count() or 1))
        for pid in (self.redis_pid, self.nginx_pid):
            pin(pid, everywhere)
        out: dict[str, Any] = {}
        running = {
            n: self.start_proxy("redis", f"proxy-workers-{n}", None, workers=n) for n in (1, 2)
        }
        try:
            rounds: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
            for port in (p for _, p in running.values()):
                self.wrk(port, 16, 2, pinned=False)
            for r in range(self.args.rounds):
                for n, (proc, port) in running.items():
                    before = self._cpu_sample(proc.pid)
                    res = self.wrk(port, 64, self.args.seconds, pinned=False)
                    after = self._cpu_sample(proc.pid)
                    wall = (after[5] - before[5]) * len(everywhere)
                    res["cpu_share"] = {
                        name: (after[i] - before[i]) / wall
                        for i, name in enumerate(("workers", "redis", "nginx", "wrk", "busy"))
                    }
                    res["workers_cpu_ms_per_request"] = (
                        (after[0] - before[0]) * 1000 / max(1, res["requests"])
                    )
                    rounds[n].append(res)
                    say(f"  round {r + 1} --workers {n}: {res['rps']:.0f} req/s")
        finally:
            for proc, _ in running.values():
                self.stop(proc)
            for pid in (self.redis_pid, self.nginx_pid):
                pin(pid, self.other_cpus)
        for n in (1, 2):
            rs = rounds[n]
            out[str(n)] = {
                "rps": median([x["rps"] for x in rs]),
                "p50_ms": median([x["p50_ms"] for x in rs]),
                "p99_ms": median([x["p99_ms"] for x in rs]),
                "workers_cpu_ms_per_request": median([x["workers_cpu_ms_per_request"] for x in rs]),
                "cpu_share": {
                    k: median([x["cpu_share"][k] for x in rs])
                    for k in ("workers", "redis", "nginx", "wrk", "busy")
                },
                "errors": sum(x["errors"] for x in rs),
                "warnings": self.warnings(f"proxy-workers-{n}"),
            }
        out["ratio"] = out["2"]["rps"] / out["1"]["rps"] if out["1"]["rps"] else None
        return out

    def _cpu_sample(self, proxy_pid: int) -> tuple[float, ...]:
        """CPU seconds so far of the proxy (its workers), Redis, nginx, the finished
        wrk runs, the whole machine; and the time."""
        return (
            cpu_seconds(proxy_pid),
            cpu_seconds(self.redis_pid),
            cpu_seconds(self.nginx_pid),
            children_cpu(),
            machine_busy(),
            time.monotonic(),
        )

    # -- the limit across two processes --

    async def burst(self, ports: list[int]) -> Counter[int]:
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(i: int, key: str) -> int:
                url = f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions"
                headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
                async with session.post(url, data=BODY, headers=headers) as resp:
                    await resp.read()
                    return resp.status

            # the connections (client to proxies, proxies to the store) opened under
            # another key, so that the burst takes well under the 1.2 s in which one
            # request comes back
            await asyncio.gather(*[one(i, WARM_KEY) for i in range(EXACT_REQUESTS)])
            started = time.monotonic()
            statuses = await asyncio.gather(*[one(i, BURST_KEY) for i in range(EXACT_REQUESTS)])
            self._burst_seconds = time.monotonic() - started
        return Counter(statuses)

    def exactness(self, store: str) -> dict[str, Any]:
        procs = [
            self.start_proxy(store, f"exact-{store}-{i}", self.proxy_cpus if i else self.other_cpus)
            for i in range(2)
        ]
        try:
            counts = asyncio.run(self.burst([port for _, port in procs]))
        finally:
            for proc, _ in procs:
                self.stop(proc)
        admitted = counts.get(200, 0)
        # one request comes back every 60/limit s: a burst that lasts longer may admit
        # that many more, rightly
        refill = int(self._burst_seconds * EXACT_LIMIT / 60)
        warnings: Counter[str] = Counter()
        for i in range(2):
            warnings.update(self.warnings(f"exact-{store}-{i}"))
        return {
            "warnings": dict(warnings),
            "requests": EXACT_REQUESTS,
            "limit": EXACT_LIMIT,
            "admitted": admitted,
            "refused_429": counts.get(429, 0),
            "other": {str(k): v for k, v in counts.items() if k not in (200, 429)},
            "burst_seconds": round(self._burst_seconds, 3),
            "refill_during_burst": refill,
            "exact": EXACT_LIMIT <= admitted <= EXACT_LIMIT + refill,
        }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions(bindir: Path | None) -> dict[str, str]:
    def run(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, timeout=30, check=False)
            return (p.stdout + p.stderr).decode(errors="replace").strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]):
        commit += " with uncommitted changes"
    out = {
        "chat-proxy": commit,
        "sqlite": run([str(PY), "-c", "import sqlite3; print(sqlite3.sqlite_version)"]),
        "asyncpg": run([str(PY), "-c", "import asyncpg; print(asyncpg.__version__)"]),
        "redis-py": run([str(PY), "-c", "import redis; print(redis.__version__)"]),
    }
    m = re.search(r"v=(\S+)", run(["redis-server", "--version"]))
    out["redis-server"] = m.group(1) if m else "?"
    if bindir is not None:
        m = re.search(r"(\d+\.\d+)", run([str(bindir / "postgres"), "--version"]))
        out["postgresql"] = m.group(1) if m else "?"
    m = re.search(r"wrk (\S+)", run(["wrk", "-v"]))
    out["wrk"] = m.group(1) if m else "?"
    return out


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# The full chain on each store",
        "",
        f"{report['date']}, {m['cpu']}, {m['nproc']} CPUs, {m['memory_mb']} MB, "
        f"Linux {m['kernel']}, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ".",
        "",
        "Chain: auth, rate_limit (limits too high to refuse), validate, session, "
        "model_override, in front of nginx serving a canned chat.completion; every "
        "request a new conversation (a session lookup and a turn written per request). "
        f"wrk, {report['rounds']} interleaved rounds of {report['seconds']:g} s at "
        "concurrency 64 (medians) and one of "
        f"{report['c1_seconds']:g} s at concurrency 1. {report['pinning']} Other load: the "
        "share of the machine's CPUs that other processes took during the c=64 rounds "
        "(median); figures from runs beside other load are lower than the machine can do.",
        "",
        "| store | req/s c=64 | p50 ms | p99 ms | req/s c=1 | p50 ms c=1 | proxy CPU ms/req | store CPU ms/req | errors | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for store in STORES:
        r = report["throughput"][store]
        c64, c1 = r["c64_median"], r["c1"]
        lines.append(
            f"| {store} | {fmt(c64['rps'], 0)} | {fmt(c64['p50_ms'], 2)} | {fmt(c64['p99_ms'], 2)} "
            f"| {fmt(c1['rps'], 0)} | {fmt(c1['p50_ms'], 2)} "
            f"| {fmt(c64['proxy_cpu_ms_per_request'], 3)} | {fmt(c64['store_cpu_ms_per_request'], 3)} "
            f"| {c64['errors'] + c1['errors']} | {c64['other_load']:.0%} |"
        )
    lines += [
        "",
        f"Redis / SQLite, req/s at c=64: {fmt(report['ratio_redis_sqlite'], 2)} (target 0.8).",
    ]
    sc = report.get("scaling")
    if sc:
        lines += [
            "",
            "The full chain on Redis, `serve --workers 1` and `--workers 2`, nothing pinned "
            "(the workers, wrk, nginx and Redis share the machine's CPUs), "
            f"{report['rounds']} interleaved rounds of {report['seconds']:g} s at c=64 (medians):",
            "",
            "| workers | req/s | p50 ms | p99 ms | workers' CPU ms/req | the machine's CPU: "
            "workers / Redis / nginx / wrk / busy in all | errors |",
            "|---|---:|---:|---:|---:|---|---:|",
        ]
        for n in ("1", "2"):
            w = sc[n]
            share = " / ".join(
                f"{w['cpu_share'][k]:.0%}" for k in ("workers", "redis", "nginx", "wrk", "busy")
            )
            lines.append(
                f"| {n} | {fmt(w['rps'], 0)} | {fmt(w['p50_ms'], 2)} | {fmt(w['p99_ms'], 2)} "
                f"| {fmt(w['workers_cpu_ms_per_request'], 3)} | {share} | {w['errors']} |"
            )
        lines += ["", f"Two workers / one: {fmt(sc['ratio'], 2)} (target 1.7)."]
    lines += [
        "",
        f"Two fresh proxy processes on one store, a key limited to {EXACT_LIMIT} requests a "
        f"minute, {EXACT_REQUESTS} requests at once split between them:",
        "",
        "| store | admitted | refused (429) | other | burst s | came back meanwhile | exact |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for store in STORES:
        e = report["exactness"][store]
        other = ", ".join(f"{k}: {v}" for k, v in e["other"].items()) or "-"
        note = "yes" if e["exact"] else "no (counted per process)" if store == "sqlite" else "NO"
        lines.append(
            f"| {store} | {e['admitted']} | {e['refused_429']} | {other} | {e['burst_seconds']} "
            f"| {e['refill_during_burst']} | {note} |"
        )
    logged = [
        f"- {what} {store}: {msg} ({n}x)"
        for store in STORES
        for what, part in (
            ("throughput", report["throughput"][store]),
            ("exactness", report["exactness"][store]),
        )
        for msg, n in part["warnings"].items()
    ]
    for n in ("1", "2") if sc else ():
        logged += [f"- --workers {n}: {msg} ({k}x)" for msg, k in sc[n]["warnings"].items()]
    lines += ["", "Warnings and errors the proxies logged:", ""]
    lines += logged or ["- none"]
    lines += ["", "Stores:", ""]
    lines += [f"- {store}: {STORE_SETTINGS[store]}" for store in STORES]
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="each round at c=64 (5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds at c=64 (3)")
    parser.add_argument("--c1-seconds", type=int, default=3, help="the round at c=1 (3)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--output", default=str(RESULTS / "stores.json"), help="the JSON report (its .md beside)"
    )
    parser.add_argument("--no-scaling", action="store_true", help="skip two workers against one")
    args = parser.parse_args()

    missing = [b for b in ("wrk", "redis-server") if shutil.which(b) is None]
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        missing.append("nginx")
    bindir = find_bindir()
    if bindir is None:
        missing.append("postgresql (initdb, pg_ctl)")
    if missing:
        say(
            f"missing: {', '.join(missing)} (apt-get install nginx-light wrk redis-server "
            "postgresql)"
        )
        return 2

    run = Run(args)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        say(f"run folder: {run.dir}")
        run.start_backend()
        run.start_stores()
        say("throughput (full chain):")
        throughput = run.throughput()
        scaling = None
        if not args.no_scaling:
            say("two workers against one (Redis, nothing pinned):")
            scaling = run.scaling()
        say("two-process limit exactness:")
        exactness = {}
        for store in STORES:
            exactness[store] = run.exactness(store)
            e = exactness[store]
            say(f"  {store}: {e['admitted']} admitted of {e['requests']} (limit {e['limit']})")
    finally:
        run.cleanup()
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(bindir),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "c1_seconds": args.c1_seconds,
        "pinning": (
            "The proxy on CPU 1; nginx, wrk and the store servers on CPU 0."
            if run.proxy_cpus is not None
            else "No pinning (one CPU)."
        ),
        "stores": STORE_SETTINGS,
        "throughput": throughput,
        "ratio_redis_sqlite": (
            throughput["redis"]["c64_median"]["rps"] / throughput["sqlite"]["c64_median"]["rps"]
        ),
        "scaling": scaling,
        "exactness": exactness,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    text = markdown(report)
    print(text)
    if not args.no_write:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
        say(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
