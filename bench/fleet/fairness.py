"""Admission fairness of the real proxy: two API keys of equal weight share a full fleet.

Starts a stand-in backend (two replicas, each answering every chat request after a fixed
delay) and `chat-proxy serve` in front of it with a fleet whose admission is full:
`max_in_flight: 2` per replica, so the fleet serves 2 x 2 / delay requests a second and
the rest wait in the admission queue. Then, open loop for `--duration` seconds, key
"heavy" sends at 10x the rate of key "light". Measured: each key's served rate, its
fair share of the fleet's capacity, Jain's index over the normalised throughputs, the
queue waits (the proxy's `x-queue-ms` header) and the 429 and 503 answers.

Definitions (in the output too):
  - demand d_k: the requests key k sent a second, over the sending period;
  - capacity C: the answers (HTTP 200) the fleet gave a second, both keys together,
    over the measured span (from --warmup seconds after the start to the end of
    sending, when both keys have requests waiting);
  - fair share f_k: weighted max-min (water-filling) of C: f_k = min(d_k, w_k x L),
    with the level L such that the f_k sum to C (every f_k = d_k when the demands fit);
  - served s_k: key k's answers a second over the measured span;
  - normalised throughput x_k = s_k / f_k; Jain's index J = (sum x_k)^2 / (n sum x_k^2),
    1 when every key gets the same fraction of its fair share.

    .venv/bin/python bench/fleet/fairness.py [--duration 20 --heavy-rate 200 --light-rate 20]
    .venv/bin/python bench/fleet/fairness.py backend --ports P1,P2 --delay-ms 100   # (used by the above)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
SELF = Path(__file__).resolve()
VENV_BIN = REPO / ".venv" / "bin"
KEYS = {"heavy": "sk-heavy", "light": "sk-light"}
MODEL = "bench-slow"

# --- the stand-in backend -----------------------------------------------------------


def answer_doc() -> dict[str, Any]:
    return {
        "id": "chatcmpl-fair",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A slow answer."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
    }


@dataclass
class ReplicaStats:
    served: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


def backend_app(stats: ReplicaStats, delay: float) -> web.Application:
    body = json.dumps(answer_doc()).encode()

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            await asyncio.sleep(delay)
        finally:
            stats.in_flight -= 1
        stats.served += 1
        return web.Response(body=body, content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(asdict(stats))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", get_stats)
    return app


async def run_backend(ports: list[int], delay: float) -> None:
    runners: list[web.AppRunner] = []
    for port in ports:
        runner = web.AppRunner(backend_app(ReplicaStats(), delay), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        runners.append(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


# --- processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fleet_config(proxy_port: int, backend_ports: list[int], max_waiting: int, wait_s: float) -> str:
    replicas = ", ".join(f"http://127.0.0.1:{p}/v1" for p in backend_ports)
    return f"""\
server:
  host: 127.0.0.1
  port: {proxy_port}
  log_level: warning
upstreams:
  - name: slow
    replicas: [{replicas}]
    models: ["*"]
    balance: least_busy
    max_in_flight: 2          # per replica: beyond it, requests wait in the admission queue
queue: {{max_waiting: {max_waiting}, max_wait_seconds: {wait_s:g}}}
middleware:
  - type: auth
    keys:
      - {{id: heavy, key: {KEYS["heavy"]}, weight: 1}}
      - {{id: light, key: {KEYS["light"]}, weight: 1}}
"""


@dataclass
class Procs:
    logs: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env={k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")},
            )
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.started):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.started.clear()


def tail(log: Path, size: int) -> str:
    return log.read_text(errors="replace")[-size:] if log.exists() else ""


def dump_logs(logs: Path) -> None:
    for log in sorted(logs.glob("*.log")):
        print(f"--- {log.name}\n{tail(log, 3000)}", file=sys.stderr)


async def wait_ready(
    session: aiohttp.ClientSession,
    proc: subprocess.Popen[bytes],
    method: str,
    url: str,
    log: Path,
    timeout: float = 20,
    **kwargs: Any,
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited {proc.returncode}:\n{tail(log, 2000)}")
        try:
            async with session.request(method, url, **kwargs) as resp:
                await resp.read()
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except aiohttp.ClientError as exc:
            last = repr(exc)
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:g} s: {last}")


# --- the load -----------------------------------------------------------------------


@dataclass
class Sample:
    key: str
    sent: float  # seconds from the start of the load
    done: float
    status: int
    queue_ms: float | None  # the x-queue-ms header
    replica: str | None
    error: str | None = None


def request_body(key: str, i: int) -> bytes:
    doc = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Request {i} of key {key}: say something short."},
        ],
        "max_tokens": 16,
    }
    return json.dumps(doc).encode()


async def one(
    session: aiohttp.ClientSession, url: str, key: str, i: int, t0: float, out: list[Sample]
) -> None:
    sent = time.perf_counter() - t0
    headers = {"Authorization": f"Bearer {KEYS[key]}", "Content-Type": "application/json"}
    try:
        async with session.post(url, data=request_body(key, i), headers=headers) as resp:
            await resp.read()
            raw = resp.headers.get("x-queue-ms")
            out.append(
                Sample(
                    key,
                    sent,
                    time.perf_counter() - t0,
                    resp.status,
                    float(raw) if raw is not None else None,
                    resp.headers.get("x-upstream-replica"),
                )
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.append(Sample(key, sent, time.perf_counter() - t0, 0, None, None, repr(exc)))


async def sender(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    rate: float,
    duration: float,
    t0: float,
    out: list[Sample],
    tasks: set[asyncio.Task[None]],
) -> None:
    """Open loop: request i leaves at i / rate seconds, whatever the answers do."""
    count = math.floor(rate * duration)
    for i in range(count):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(session, url, key, i, t0, out))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def fair_shares(
    demand: dict[str, float], weight: dict[str, float], capacity: float
) -> dict[str, float]:
    """Weighted max-min shares of `capacity` (water-filling)."""
    if sum(demand.values()) <= capacity:
        return dict(demand)
    share: dict[str, float] = {}
    left = capacity
    open_keys = set(demand)
    while open_keys:
        level = left / sum(weight[k] for k in open_keys)
        capped = {k for k in open_keys if demand[k] <= weight[k] * level}
        if not capped:
            for k in open_keys:
                share[k] = weight[k] * level
            break
        for k in capped:
            share[k] = demand[k]
            left -= demand[k]
        open_keys -= capped
    return share


def jain(values: list[float]) -> float:
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 0.0


@dataclass
class Scenario:
    name: str
    max_waiting: int
    max_wait_seconds: float


async def run_scenario(args: argparse.Namespace, scenario: Scenario, logs: Path) -> dict[str, Any]:
    procs = Procs(logs)
    backend_ports = [free_port(), free_port()]
    proxy_port = free_port()
    config = logs / f"fleet-{scenario.name}.yaml"
    config.write_text(
        fleet_config(proxy_port, backend_ports, scenario.max_waiting, scenario.max_wait_seconds)
    )
    py = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=scenario.max_wait_seconds + 30)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            backend = procs.start(
                f"backend-{scenario.name}",
                [
                    py,
                    str(SELF),
                    "backend",
                    "--ports",
                    ",".join(map(str, backend_ports)),
                    "--delay-ms",
                    f"{args.delay_ms:g}",
                ],
            )
            for port in backend_ports:
                await wait_ready(
                    session,
                    backend,
                    "GET",
                    f"http://127.0.0.1:{port}/stats",
                    logs / f"backend-{scenario.name}.log",
                )
            proxy = procs.start(
                f"proxy-{scenario.name}",
                [str(VENV_BIN / "chat-proxy"), "serve", "--config", str(config)],
            )
            url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
            await wait_ready(
                session,
                proxy,
                "POST",
                url,
                logs / f"proxy-{scenario.name}.log",
                data=request_body("light", -1),
                headers={"Authorization": f"Bearer {KEYS['light']}"},
            )
            before = await backend_stats(session, backend_ports)
            samples: list[Sample] = []
            tasks: set[asyncio.Task[None]] = set()
            t0 = time.perf_counter() + 0.2
            rates = {"heavy": args.heavy_rate, "light": args.light_rate}
            await asyncio.gather(
                *(
                    sender(session, url, key, rate, args.duration, t0, samples, tasks)
                    for key, rate in rates.items()
                )
            )
            sending_ended = time.perf_counter() - t0
            while tasks:  # every request ends: answered, refused or timed out
                await asyncio.gather(*list(tasks))
            drained = time.perf_counter() - t0
            after = await backend_stats(session, backend_ports)
    finally:
        procs.stop_all()
    if args.samples:
        write_samples(Path(f"{args.samples}-{scenario.name}.jsonl"), samples)
    return analyse(args, scenario, samples, rates, sending_ended, drained, before, after)


def write_samples(path: Path, samples: list[Sample]) -> None:
    with path.open("w") as f:
        for s in sorted(samples, key=lambda x: x.sent):
            f.write(json.dumps(asdict(s)) + "\n")


async def backend_stats(session: aiohttp.ClientSession, ports: list[int]) -> list[dict[str, int]]:
    out: list[dict[str, int]] = []
    for port in ports:
        async with session.get(f"http://127.0.0.1:{port}/stats") as resp:
            out.append(await resp.json())
    return out


def analyse(
    args: argparse.Namespace,
    scenario: Scenario,
    samples: list[Sample],
    rates: dict[str, float],
    sending_ended: float,
    drained: float,
    before: list[dict[str, int]],
    after: list[dict[str, int]],
) -> dict[str, Any]:
    span = (args.warmup, args.duration)
    length = span[1] - span[0]
    weights = {"heavy": 1.0, "light": 1.0}
    per_key: dict[str, dict[str, Any]] = {}
    served_rate: dict[str, float] = {}
    demand: dict[str, float] = {}
    for key in rates:
        mine = [s for s in samples if s.key == key]
        ok = [s for s in mine if s.status == 200]
        demand[key] = len(mine) / args.duration
        served_rate[key] = sum(1 for s in ok if span[0] <= s.done < span[1]) / length
        waits = [s.queue_ms for s in ok if s.queue_ms is not None]
        latency = [(s.done - s.sent) * 1000 for s in ok]
        lateness = [
            s.sent - i / rates[key] for i, s in enumerate(sorted(mine, key=lambda x: x.sent))
        ]
        statuses: dict[str, int] = {}
        for s in mine:
            label = str(s.status) if s.status else "client error"
            statuses[label] = statuses.get(label, 0) + 1
        per_key[key] = {
            "sent": len(mine),
            "served": len(ok),
            "status_counts": statuses,
            "http_429": statuses.get("429", 0),
            "http_503": statuses.get("503", 0),
            "first_429_sent_s": min((s.sent for s in mine if s.status == 429), default=None),
            "first_503_sent_s": min((s.sent for s in mine if s.status == 503), default=None),
            "client_errors": [s.error for s in mine if s.error][:5],
            "all_served": len(ok) == len(mine),
            "x_queue_ms_present": len(waits),
            "queue_wait_ms_p50": quantile(waits, 0.5),
            "queue_wait_ms_p99": quantile(waits, 0.99),
            "queue_wait_ms_max": max(waits) if waits else None,
            "client_latency_ms_p50": quantile(latency, 0.5),
            "client_latency_ms_p99": quantile(latency, 0.99),
            "send_lateness_ms_p99": 1000 * (quantile(lateness, 0.99) or 0.0),
            "replicas": sorted({s.replica for s in ok if s.replica}),
        }
    capacity = sum(served_rate.values())
    theoretical = 2 * 2 / (args.delay_ms / 1000)
    fair = fair_shares(demand, weights, capacity)
    normalised = {k: served_rate[k] / fair[k] if fair[k] else 0.0 for k in rates}
    index = jain(list(normalised.values()))
    for key in rates:
        per_key[key].update(
            demand_per_s=demand[key],
            served_per_s=served_rate[key],
            share_of_capacity=served_rate[key] / capacity if capacity else 0.0,
            fair_share_per_s=fair[key],
            normalised_throughput=normalised[key],
        )
    backend_served = [a["served"] - b["served"] for a, b in zip(after, before, strict=True)]
    return {
        "scenario": asdict(scenario),
        "measured_span_s": list(span),
        "sending_ended_s": sending_ended,
        "drained_s": drained,
        "capacity_per_s": capacity,
        "theoretical_capacity_per_s": theoretical,
        "utilisation": capacity / theoretical,
        "jain_index": index,
        "keys": per_key,
        "backend": {
            "served_per_replica": backend_served,
            "max_in_flight_per_replica": [a["max_in_flight"] for a in after],
        },
        "targets": {
            "jain_index_ge_0.95": index >= 0.95,
            "light_all_served": per_key["light"]["all_served"],
        },
    }


# --- the report ---------------------------------------------------------------------


def utc_date() -> str:
    try:
        out = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


DEFINITIONS = [
    "- demand d_k: the requests key k sent a second over the sending period (open loop, "
    "evenly spaced)",
    "- capacity C: the answers (HTTP 200) the fleet gave a second, both keys together, over "
    "the measured span (from the warm-up to the end of sending, while both keys have "
    "requests waiting); theoretical: replicas x max_in_flight / backend delay",
    "- fair share f_k = min(d_k, w_k x L): weighted max-min (water-filling) of C, the level L "
    "such that the f_k sum to C (f_k = d_k for every key when the demands fit in C)",
    "- served s_k: key k's HTTP 200 answers a second over the measured span; share = s_k / C",
    "- normalised throughput x_k = s_k / f_k; Jain's index J = (x_heavy + x_light)^2 / "
    "(2 (x_heavy^2 + x_light^2)): 1 when both keys get the same fraction of their fair "
    "share, 0.5 when one gets all",
    "- queue wait: the proxy's `x-queue-ms` response header of each answered request "
    "(0 when a slot was free); client latency: from send to the end of the answer",
]


def scenario_md(result: dict[str, Any]) -> list[str]:
    sc = result["scenario"]
    keys = result["keys"]
    lines = [
        f"### queue: max_waiting {sc['max_waiting']}, max_wait_seconds {sc['max_wait_seconds']:g}",
        "",
        f"Capacity measured {result['capacity_per_s']:.1f} answers/s of "
        f"{result['theoretical_capacity_per_s']:.0f} theoretical "
        f"({100 * result['utilisation']:.0f}%); sending ended at "
        f"{result['sending_ended_s']:.1f} s, the last answer at {result['drained_s']:.1f} s; "
        f"backend answers per replica {result['backend']['served_per_replica']}, most in "
        f"flight at once per replica {result['backend']['max_in_flight_per_replica']}; "
        "the load generator sent late by at most (p99) "
        + ", ".join(f"{fmt(k['send_lateness_ms_p99'], 1)} ms ({key})" for key, k in keys.items())
        + ".",
        "",
        "| key | weight | demand /s | served /s | share of capacity | fair share /s "
        "| normalised | sent | served | 429 | 503 | other | queue wait p50 ms | p99 ms "
        "| max ms | client latency p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, k in keys.items():
        other = k["sent"] - k["served"] - k["http_429"] - k["http_503"]
        lines.append(
            f"| {key} | 1 | {k['demand_per_s']:.1f} | {k['served_per_s']:.1f} | "
            f"{100 * k['share_of_capacity']:.1f}% | {k['fair_share_per_s']:.1f} | "
            f"{k['normalised_throughput']:.3f} | {k['sent']:,} | {k['served']:,} | "
            f"{k['http_429']:,} | {k['http_503']:,} | {other:,} | "
            f"{fmt(k['queue_wait_ms_p50'])} | {fmt(k['queue_wait_ms_p99'])} | "
            f"{fmt(k['queue_wait_ms_max'])} | {fmt(k['client_latency_ms_p50'])} | "
            f"{fmt(k['client_latency_ms_p99'])} |"
        )
    missing = [
        key for key, k in keys.items() if k["served"] and k["x_queue_ms_present"] < k["served"]
    ]
    if missing:
        lines += [
            "",
            f"x-queue-ms was absent from some answers of {', '.join(missing)}: their "
            "waits are over the answers that had it; client latency covers them all.",
        ]
    lines += [
        "",
        "| target | measured | result |",
        "|---|---:|---|",
        f"| Jain's index >= 0.95 between the equal-weight keys | {result['jain_index']:.3f} | "
        f"{verdict(result['jain_index'] >= 0.95)} |",
        f"| every request of the light key served | {keys['light']['served']:,} of "
        f"{keys['light']['sent']:,} | {verdict(keys['light']['all_served'])} |",
        "",
    ]
    return lines


def report(args: argparse.Namespace, date: str, results: list[dict[str, Any]]) -> str:
    lines = [
        "# Fleet admission fairness: two equal-weight keys on a full fleet (real proxy)",
        "",
        f"Run: {date}. `.venv/bin/python bench/fleet/fairness.py --duration {args.duration:g} "
        f"--heavy-rate {args.heavy_rate:g} --light-rate {args.light_rate:g} --delay-ms "
        f"{args.delay_ms:g}`; machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        "proxy, backend and load generator on it together; load average before the run "
        f"{args.loadavg:.2f}.",
        "",
        "## Set-up",
        "",
        f"- backend: a stand-in (aiohttp, one process), two replicas that answer each chat "
        f"request after {args.delay_ms:g} ms with a short JSON completion",
        "- proxy: `chat-proxy serve --config FILE` (one worker, log_level warning), one "
        "upstream `slow` with both replicas, `balance: least_busy`, `max_in_flight: 2` per "
        "replica, the queue as in each heading, auth with keys heavy and light (weight 1 "
        "each, priority 0)",
        f"- load: open loop, evenly spaced, for {args.duration:g} s: heavy "
        f"{args.heavy_rate:g} req/s, light {args.light_rate:g} req/s; every request waits "
        "for its answer (client timeout max_wait_seconds + 30 s); measured span from "
        f"{args.warmup:g} s to {args.duration:g} s",
        "",
        "## Definitions",
        "",
        *DEFINITIONS,
        "",
        "## Results",
        "",
    ]
    for result in results:
        lines += scenario_md(result)
    lines += ["## Reading", "", *reading(results), ""]
    return "\n".join(lines)


def reading(results: list[dict[str, Any]]) -> list[str]:
    """What the numbers say, for each scenario."""
    out: list[str] = []
    for result in results:
        sc = result["scenario"]
        heavy, light = result["keys"]["heavy"], result["keys"]["light"]
        head = f"- max_waiting {sc['max_waiting']}: "
        excess = heavy["demand_per_s"] + light["demand_per_s"] - result["capacity_per_s"]
        if light["http_429"]:
            first = min(
                t for t in (heavy["first_429_sent_s"], light["first_429_sent_s"]) if t is not None
            )
            out.append(
                head + f"the requests beyond the fleet's capacity ({excess:.0f}/s, nearly all "
                f"the heavy key's) fill the {sc['max_waiting']:,} places of the queue, and "
                f"from {first:.1f} s on a request that finds it full is refused with 429 "
                "whatever its key: the light key had "
                f"{light['http_429']:,} of its {light['sent']:,} requests refused "
                f"({100 * light['http_429'] / light['sent']:.0f}%), so it was served "
                f"{light['served_per_s']:.1f}/s of a fair share of "
                f"{light['fair_share_per_s']:.1f}/s, and the heavy key took "
                f"{100 * heavy['share_of_capacity']:.0f}% of the capacity. The light "
                "requests that got a place were served ahead of the heavy backlog (queue "
                f"wait p50 {fmt(light['queue_wait_ms_p50'])} ms against "
                f"{fmt(heavy['queue_wait_ms_p50'])} ms): the order of service is fair, the "
                "limit on waiting places is not, being one count for every key."
            )
        else:
            out.append(
                head + "no request of the light key was refused; the order of service "
                f"gives each key half of the capacity ({light['served_per_s']:.1f} and "
                f"{heavy['served_per_s']:.1f}/s), Jain's index {result['jain_index']:.3f}. "
                f"The light key's demand ({light['demand_per_s']:.1f}/s) is "
                + ("above" if light["demand_per_s"] > light["fair_share_per_s"] else "within")
                + f" its fair share ({light['fair_share_per_s']:.1f}/s), and it waited "
                f"p50 {fmt(light['queue_wait_ms_p50'])} ms, p99 "
                f"{fmt(light['queue_wait_ms_p99'])} ms; the heavy key's backlog waits up to "
                f"max_wait_seconds and {heavy['http_503']:,} of its requests got 503."
            )
    return out


def parse_scenario(text: str) -> Scenario:
    waiting, _, wait = text.partition(":")
    return Scenario(f"w{waiting}", int(waiting), float(wait or 30))


async def bench(args: argparse.Namespace) -> int:
    scenarios = [parse_scenario(s) for s in args.queues.split(",") if s.strip()]
    args.loadavg = os.getloadavg()[0]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fleet-fairness-") as tmp:
        logs = Path(tmp)
        for scenario in scenarios:
            print(f"scenario {scenario}", file=sys.stderr)
            try:
                results.append(await run_scenario(args, scenario, logs))
            except Exception:
                dump_logs(logs)
                raise
    date = utc_date()
    md = report(args, date, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "kind": "benchmark of the real proxy",
        "title": "Fleet admission fairness: two equal-weight keys on a full fleet",
        "date": date,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "definitions": DEFINITIONS,
        "results": results,
    }
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    b = sub.add_parser("backend", help="the stand-in backend (started by the bench)")
    b.add_argument("--ports", required=True)
    b.add_argument("--delay-ms", type=float, default=100)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--heavy-rate", type=float, default=200)
    parser.add_argument("--light-rate", type=float, default=20)
    parser.add_argument("--delay-ms", type=float, default=100, help="the backend's answer time")
    parser.add_argument(
        "--queues",
        default="1000:30,100000:30",
        help="comma-separated max_waiting:max_wait_seconds, one run each (the first is "
        "the fleet config under test; a larger queue shows the order of service alone)",
    )
    parser.add_argument(
        "--out", default=str(RESULTS / "fleet-fairness"), help="path without suffix"
    )
    parser.add_argument(
        "--samples", help="also write every request as JSON lines to SAMPLES-<scenario>.jsonl"
    )
    args = parser.parse_args(argv)
    if args.command == "backend":
        ports = [int(p) for p in args.ports.split(",")]
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_backend(ports, args.delay_ms / 1000))
        return 0
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
