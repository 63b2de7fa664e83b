"""What session affinity does on a fleet of real engines: the same multi-turn chat
trace through chat-proxy with `balance: round_robin`, `least_busy` and `affinity`, in
front of llama.cpp's own `llama-server` replicas.

llama-server keeps a prompt cache per slot (`-np N`): a request whose prompt starts
with what a slot already holds evaluates only the rest. A conversation's next turn is
its previous prompt plus the answer and a new user message, so on the replica that
served the previous turn it costs a few hundred tokens; anywhere else, the whole
history. The proxy's affinity sends every turn of a conversation (same system prompt
and first user message) to one replica while that replica is under
`load_factor` x the mean load.

Steps (each bounded in time; every process started here is stopped on exit):
  1. the model: bench/fleet/model.py writes a random-weight llama GGUF (~60 MB);
  2. prefill speed: one llama-server, a ~1,900-token history cold, then the same
     history plus an answer and a new user message (the prefix cached), with all
     cores and with the threads of one replica;
  3. per mode: fresh replicas (caches cold), a fresh proxy, the trace
     (bench/fleet/trace.py) replayed by `--concurrency` clients, streamed; time to
     first token at the client; the engines' `timings` (prompt_n: tokens evaluated,
     cache_n: tokens reused) from each stream's last chunk.

Results: bench/results/fleet-engines.json and .md.

    .venv/bin/python bench/fleet/engines.py [--server PATH] [--modes round_robin,affinity]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.fleet import model as fleet_model  # noqa: E402
from bench.fleet.trace import Conversation, Shape, build, describe  # noqa: E402
from proxy import jsonfast  # noqa: E402
from proxy.fleet.ring import Ring, key_hash  # noqa: E402

INSTALL_SCRIPT = ROOT / "scripts" / "install-llama-cpp-server.sh"
PROXY_BIN = ROOT / ".venv" / "bin" / "chat-proxy"
MODES = ("round_robin", "least_busy", "affinity")
# the three balance modes at the proxy's defaults, then affinity with a looser load
# bound: on two replicas the default bound moves a conversation whenever its replica
# has two requests in flight and the other none
DEFAULT_MODES = (*MODES, "affinity:2")
LOAD_FACTOR = 1.25  # the proxy's default
MODEL_ID = "fleet"


def log(message: str) -> None:
    print(f"[fleet-engines] {message}", file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------


def free_port(wanted: int = 0) -> int:
    """``wanted`` if it is free on 127.0.0.1 (0 or taken: any free port)."""
    for port in (wanted, 0) if wanted else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # as a server binds: a port whose last connections linger in TIME_WAIT is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                log(f"port {port} is taken: using another")
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log_file.close()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Procs:
    """Every process this run starts, stopped in reverse order on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Proc] = []

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("ab")
        process = subprocess.Popen(
            list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        proc = Proc(name, process, log_path, log_file)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        while self.running:
            self.stop(self.running[-1])


def wait_http(proc: Proc, url: str, timeout: float) -> None:
    """Until ``url`` answers 200 (llama-server: 503 while it loads the model)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.process.returncode}):\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name}: {url} not ready after {timeout:.0f}s:\n{proc.tail()}")


@dataclass(frozen=True)
class EngineSettings:
    binary: Path
    model: Path
    threads: int
    slots: int
    ctx_per_slot: int
    cache_ram_mib: int

    def argv(self, port: int) -> list[str]:
        return [
            str(self.binary),
            "-m", str(self.model),
            "--host", "127.0.0.1",
            "--port", str(port),
            "-t", str(self.threads),
            "-tb", str(self.threads),
            "-np", str(self.slots),
            "-c", str(self.slots * self.ctx_per_slot),
            "--cache-ram", str(self.cache_ram_mib),
            "--metrics",
            "--no-webui",
            "--alias", MODEL_ID,
        ]  # fmt: skip


def start_engine(
    procs: Procs, name: str, settings: EngineSettings, port: int = 0
) -> tuple[Proc, str]:
    port = free_port(port)
    proc = procs.start(name, settings.argv(port))
    root = f"http://127.0.0.1:{port}"
    wait_http(proc, root + "/health", timeout=60)
    return proc, root


def post_json(url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        result: dict[str, Any] = json.load(resp)
    return result


def engine_metrics(root: str) -> dict[str, float]:
    """The llamacpp:* counters of one engine's Prometheus /metrics."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(root + "/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("llamacpp:"):
                    name, _, value = line.partition(" ")
                    out[name.removeprefix("llamacpp:")] = float(value)
    return out


def cpu_busy_seconds() -> float:
    """CPU time spent by everything on the machine so far (all cores, not idle or iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU time of one process and its waited-for children (0 when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """How much of the machine's CPU went to processes other than ``pids`` (and this
    one) between start() and stop(): other work running beside the benchmark."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = [*pids, os.getpid()]
        self.t0 = time.monotonic()
        self.busy0 = cpu_busy_seconds()
        self.ours0 = sum(process_cpu_seconds(p) for p in self.pids)

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        busy = cpu_busy_seconds() - self.busy0
        ours = sum(process_cpu_seconds(p) for p in self.pids) - self.ours0
        cores = os.cpu_count() or 1
        return {
            "wall_seconds": round(wall, 2),
            "ours_cores": round(ours / wall, 2) if wall else 0.0,
            "others_cores": round(max(0.0, busy - ours) / wall, 2) if wall else 0.0,
            "cores": cores,
        }


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until other processes use under ``threshold`` of a
    core over one second; returns the last such reading (cores in use)."""
    deadline = time.monotonic() + max_wait
    while True:
        meter = CpuMeter([])
        time.sleep(1.0)
        used = meter.stop()["others_cores"]
        if used < threshold or time.monotonic() >= deadline:
            return used
        log(f"other processes use {used:.2f} cores: waiting for the machine to be quiet")


def find_server(explicit: str | None) -> Path:
    """The llama-server binary: --server, $LLAMA_SERVER_BIN, or built by the script."""
    given = explicit or os.environ.get("LLAMA_SERVER_BIN")
    if given:
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SystemExit(f"not an executable: {path}")
        return path
    log(f"building (or finding) llama-server with {INSTALL_SCRIPT.relative_to(ROOT)}")
    out = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], stdout=subprocess.PIPE, check=False, timeout=1800
    )
    if out.returncode != 0:
        raise SystemExit(f"{INSTALL_SCRIPT.name} failed ({out.returncode}); see its output above")
    return Path(out.stdout.decode().strip().splitlines()[-1])


# -- 2. prefill speed -------------------------------------------------------------


def _history(rng: random.Random, vocabulary: list[str], n_words: int) -> list[dict[str, str]]:
    def text(n: int) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(n))

    return [
        {"role": "system", "content": text(n_words - 190)},
        {"role": "user", "content": text(190)},
    ]


def measure_prefill(
    procs: Procs, settings: EngineSettings, history_words: int, repeats: int, quiet_wait: float
) -> dict[str, Any]:
    """Cold and cached prefill of a ~``history_words``-token history on one engine."""
    others_before = wait_quiet(quiet_wait)
    proc, root = start_engine(procs, f"prefill-t{settings.threads}", settings)
    url = root + "/v1/chat/completions"
    meter = CpuMeter([proc.process.pid])
    vocabulary = fleet_model.words()
    rng = random.Random(11)
    try:
        post_json(url, {"messages": _history(rng, vocabulary, 300), "max_tokens": 1})  # warm-up
        rows: list[dict[str, float]] = []
        for _ in range(repeats):
            messages = _history(rng, vocabulary, history_words)
            body: dict[str, Any] = {"messages": messages, "max_tokens": 8, "temperature": 0}
            t0 = time.perf_counter()
            cold = post_json(url, body)
            cold_s = time.perf_counter() - t0
            answer = cold["choices"][0]["message"]["content"]
            messages = [
                *messages,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": " ".join(rng.choice(vocabulary) for _ in range(190))},
            ]
            t0 = time.perf_counter()
            warm = post_json(url, {**body, "messages": messages, "max_tokens": 1})
            warm_s = time.perf_counter() - t0
            c, w = cold["timings"], warm["timings"]
            rows.append(
                {
                    "cold_prompt_n": c["prompt_n"],
                    "cold_prefill_ms": c["prompt_ms"],
                    "cold_tokens_per_s": c["prompt_per_second"],
                    "cold_request_ms": cold_s * 1000,
                    "cached_cache_n": w["cache_n"],
                    "cached_prompt_n": w["prompt_n"],
                    "cached_prefill_ms": w["prompt_ms"],
                    "cached_request_ms": warm_s * 1000,
                }
            )
        cpu = meter.stop()
    finally:
        procs.stop(proc)
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    cpu["others_cores_before"] = round(others_before, 2)
    return {"threads": settings.threads, "repeats": rows, "median": median, "cpu": cpu}


# -- 3. one mode -----------------------------------------------------------------


@dataclass
class TurnResult:
    conversation: int
    turn: int
    replica: int | None = None
    status: int = 0
    error: str = ""
    sent_at: float = 0.0  # seconds since the mode's start
    ttft_ms: float | None = None
    total_ms: float = 0.0
    queue_ms: float | None = None
    prompt_n: int | None = None  # tokens the engine evaluated
    cache_n: int | None = None  # tokens it took from its prompt cache
    prefill_ms: float | None = None
    completion_tokens: int = 0


async def one_turn(
    session: aiohttp.ClientSession,
    url: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    result: TurnResult,
) -> str:
    """Send one streamed turn; fill ``result``; return the answer's text."""
    body = {
        "model": MODEL_ID,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parts: list[str] = []
    t0 = time.perf_counter()
    async with session.post(url, json=body) as resp:
        result.status = resp.status
        replica = resp.headers.get("x-upstream-replica")
        result.replica = int(replica) if replica and replica.isdigit() else None
        queued = resp.headers.get("x-queue-ms")
        with contextlib.suppress(ValueError):
            result.queue_ms = float(queued) if queued is not None else None
        if resp.status != 200:
            result.error = (await resp.text())[:300]
            result.total_ms = (time.perf_counter() - t0) * 1000
            return ""
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            for choice in event.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if result.ttft_ms is None:
                        result.ttft_ms = (time.perf_counter() - t0) * 1000
                    parts.append(content)
            timings = event.get("timings")
            if timings:
                result.prompt_n = int(timings.get("prompt_n", 0))
                result.cache_n = int(timings.get("cache_n", 0))
                result.prefill_ms = float(timings.get("prompt_ms", 0.0))
            usage = event.get("usage")
            if usage:
                result.completion_tokens = int(usage.get("completion_tokens") or 0)
    result.total_ms = (time.perf_counter() - t0) * 1000
    if result.ttft_ms is None:
        result.error = "no content in the stream"
    return "".join(parts)


async def replay(
    url: str, conversations: list[Conversation], shape: Shape, concurrency: int, timeout: float
) -> tuple[list[TurnResult], float]:
    """``concurrency`` clients, each taking the next conversation and playing all its turns."""
    pending: asyncio.Queue[Conversation] = asyncio.Queue()
    for conversation in conversations:
        pending.put_nowait(conversation)
    results: list[TurnResult] = []
    start = time.perf_counter()

    async def client(session: aiohttp.ClientSession, delay: float) -> None:
        await asyncio.sleep(delay)  # users arrive spread out, not all at one instant
        while not pending.empty():
            conversation = pending.get_nowait()
            messages = [{"role": "system", "content": conversation.system}]
            for t, turn in enumerate(conversation.turns):
                if turn.think_seconds:
                    await asyncio.sleep(turn.think_seconds)
                messages.append({"role": "user", "content": turn.user})
                result = TurnResult(conversation.index, t, sent_at=time.perf_counter() - start)
                results.append(result)
                try:
                    answer = await one_turn(session, url, messages, shape.max_tokens, result)
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    result.error = f"{type(exc).__name__}: {exc}"[:300]
                    answer = ""
                if result.error:
                    break  # a conversation whose turn failed does not go on
                messages.append({"role": "assistant", "content": answer})

    client_timeout = aiohttp.ClientTimeout(total=180)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=client_timeout, connector=connector) as session:
        spread = statistics.fmean(shape.think_seconds)
        tasks = [
            asyncio.create_task(client(session, i * spread / concurrency))
            for i in range(concurrency)
        ]
        done, not_done = await asyncio.wait(tasks, timeout=timeout)
        for task in not_done:
            task.cancel()
        await asyncio.gather(*not_done, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if not_done:
            log(f"the trace did not finish within {timeout:.0f}s: stopped")
    return results, time.perf_counter() - start


def split_mode(mode: str) -> tuple[str, float]:
    """``affinity:2`` -> ("affinity", 2.0): a balance mode and its load_factor."""
    balance, _, factor = mode.partition(":")
    return balance, float(factor) if factor else LOAD_FACTOR


def proxy_config(path: Path, port: int, replicas: list[str], mode: str, in_flight: int) -> None:
    balance, load_factor = split_mode(mode)
    config = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning", "drain_seconds": 0},
        "upstreams": [
            {
                "name": "llama",
                "replicas": [root + "/v1" for root in replicas],
                "models": ["*"],
                "balance": balance,
                "affinity": {"load_factor": load_factor},
                "max_in_flight": in_flight,
                "timeouts": {"first_byte": 150, "idle": 150},
            }
        ],
        "queue": {"max_waiting": 1000, "max_wait_seconds": 120},
        "middleware": [],
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML


def ring_owners(conversations: list[Conversation], urls: list[str]) -> list[int]:
    """Each conversation's replica under `balance: affinity` with no load (the owner
    of its point on the proxy's ring): the hash of its leading messages, as
    proxy/fleet/affinity.py computes it."""
    ring = Ring(urls)
    owners = []
    for c in conversations:
        leading = [
            {"role": "system", "content": c.system},
            {"role": "user", "content": c.turns[0].user},
        ]
        owners.append(ring.owner(key_hash(jsonfast.dumps(leading))))
    return owners


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of ``values``, linear between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(results: list[TurnResult], wall_s: float, n_replicas: int) -> dict[str, Any]:
    ok = [r for r in results if not r.error and r.ttft_ms is not None]
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    later = [r.ttft_ms for r in ok if r.turn > 0 and r.ttft_ms is not None]
    first = [r.ttft_ms for r in ok if r.turn == 0 and r.ttft_ms is not None]
    evaluated = [r.prompt_n for r in ok if r.prompt_n is not None]
    cached = [r.cache_n for r in ok if r.cache_n is not None]
    later_eval = [r.prompt_n for r in ok if r.turn > 0 and r.prompt_n is not None]
    queue = [r.queue_ms for r in ok if r.queue_ms is not None]
    by_conv: dict[int, list[TurnResult]] = {}
    for r in sorted(ok, key=lambda r: (r.conversation, r.turn)):
        by_conv.setdefault(r.conversation, []).append(r)
    same = moves = 0
    for turns in by_conv.values():
        for prev, cur in itertools.pairwise(turns):
            if prev.replica is None or cur.replica is None:
                continue
            if prev.replica == cur.replica:
                same += 1
            else:
                moves += 1
    per_replica = [
        {
            "turns": sum(1 for r in ok if r.replica == i),
            "prompt_tokens_evaluated": sum(r.prompt_n or 0 for r in ok if r.replica == i),
        }
        for i in range(n_replicas)
    ]
    total_eval, total_cached = sum(evaluated), sum(cached)

    def r1(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        "turns_sent": len(results),
        "turns_ok": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:3],
        "wall_seconds": round(wall_s, 2),
        "turns_per_second": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "ttft_ms": {
            "p50": r1(pct(ttft, 0.5)),
            "p90": r1(pct(ttft, 0.9)),
            "p99": r1(pct(ttft, 0.99)),
            "mean": r1(statistics.fmean(ttft)) if ttft else None,
            "first_turn_p50": r1(pct(first, 0.5)),
            "later_turns_p50": r1(pct(later, 0.5)),
            "later_turns_p99": r1(pct(later, 0.99)),
        },
        "queue_ms": {"p50": r1(pct(queue, 0.5)), "p99": r1(pct(queue, 0.99))},
        "tokens_evaluated_per_turn": r1(statistics.fmean(evaluated)) if evaluated else None,
        "tokens_evaluated_per_later_turn": r1(statistics.fmean(later_eval)) if later_eval else None,
        "tokens_cached_per_turn": r1(statistics.fmean(cached)) if cached else None,
        "prompt_tokens_evaluated": total_eval,
        "prompt_tokens_cached": total_cached,
        "cache_hit_fraction": (
            round(total_cached / (total_cached + total_eval), 3)
            if total_cached + total_eval
            else None
        ),
        "prefill_ms_per_turn": (
            r1(statistics.fmean(r.prefill_ms for r in ok if r.prefill_ms is not None))
            if any(r.prefill_ms is not None for r in ok)
            else None
        ),
        "later_turns_on_previous_replica": round(same / (same + moves), 3)
        if same + moves
        else None,
        "per_replica": per_replica,
    }


def disturbance(runs: list[dict[str, Any]]) -> float:
    """The CPU other processes used during the least disturbed of a mode's runs
    (0 when none ran to the end: nothing to run again)."""
    used = [r["summary"]["cpu"]["others_cores"] for r in runs if "summary" in r]
    return min(used) if used else 0.0


def least_disturbed(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of a mode to report, with the others' summaries beside it."""
    done = [r for r in runs if "summary" in r]
    if not done:
        return runs[-1]
    best = min(done, key=lambda r: r["summary"]["cpu"]["others_cores"])
    others = [r["summary"] for r in done if r is not best]
    return {**best, "runs": len(done), "other_runs": others}


def run_mode(
    procs: Procs,
    mode: str,
    settings: EngineSettings,
    n_replicas: int,
    conversations: list[Conversation],
    shape: Shape,
    concurrency: int,
    in_flight: int,
    timeout: float,
    quiet_wait: float,
    base_port: int,
) -> dict[str, Any]:
    others_before = wait_quiet(quiet_wait)
    log(f"{mode}: starting {n_replicas} fresh llama-server replicas and the proxy")
    # fixed ports: the affinity ring is placed by the replicas' URLs, so the same ports
    # give every mode and every run the same conversation-to-replica map
    engines = [
        start_engine(procs, f"{mode}-engine{i}", settings, base_port + 1 + i)
        for i in range(n_replicas)
    ]
    roots = [root for _, root in engines]
    for root in roots:  # the first request of a process pays one-off costs: not the trace's
        post_json(
            root + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        )
    port = free_port(base_port)
    config_path = procs.workdir / f"proxy-{mode.replace(':', '-')}.json"
    proxy_config(config_path, port, roots, mode, in_flight)
    proxy = procs.start(f"{mode}-proxy", [str(PROXY_BIN), "serve", "--config", str(config_path)])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(proxy, base + "/readyz", timeout=30)
        meter = CpuMeter([proc.process.pid for proc, _ in engines] + [proxy.process.pid])
        results, wall = asyncio.run(
            replay(base + "/v1/chat/completions", conversations, shape, concurrency, timeout)
        )
        cpu = meter.stop()
        metrics = [engine_metrics(root) for root in roots]
    finally:
        procs.stop(proxy)
        for proc, _ in reversed(engines):
            procs.stop(proc)
    summary = summarize(results, wall, n_replicas)
    summary["replica_urls"] = [root + "/v1" for root in roots]
    summary["ring_owners"] = ring_owners(conversations, summary["replica_urls"])
    summary["engine_metrics"] = [
        {
            k: m.get(k)
            for k in ("prompt_tokens_total", "prompt_tokens_cached_total", "prompt_seconds_total")
        }
        for m in metrics
    ]
    summary["cpu"] = {**cpu, "others_cores_before": round(others_before, 2)}
    busy = [m.get("prompt_seconds_total") or 0.0 for m in metrics]
    # the share of the wall time each engine spent evaluating prompts
    summary["engine_prefill_busy"] = [round(b / wall, 2) if wall else None for b in busy]
    t = summary["ttft_ms"]
    log(
        f"{mode}: {summary['turns_ok']}/{summary['turns_sent']} turns in {wall:.1f}s, "
        f"TTFT p50 {t['p50']} ms p99 {t['p99']} ms, "
        f"{summary['tokens_evaluated_per_turn']} tokens evaluated/turn, "
        f"{summary['tokens_cached_per_turn']} cached/turn"
    )
    return {"mode": mode, "summary": summary, "turns": [asdict(r) for r in results]}


# -- report ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": mem_gib, "kernel": platform.release()}


def git_commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    commit = out.stdout.strip() or "unknown"
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}{suffix}" if abs(value) >= 100 else f"{value:,.2f}{suffix}"
    return f"{value:,}{suffix}" if isinstance(value, int) else f"{value}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    m, e, tr = report["machine"], report["engine"], report["trace"]
    lines = [
        "# Session affinity on a fleet of llama.cpp engines",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem_gib']} GiB",
        f"- commit: {report['commit']}",
        f"- engine: llama.cpp `llama-server` {e['version']}, {report['replicas']} replicas, "
        f"each `-t {e['threads']} -np {e['slots']} -c {e['slots'] * e['ctx_per_slot']}"
        f" --cache-ram {e['cache_ram_mib']}`",
        f"- model: {report['model']['description']}",
        f"- proxy: `max_in_flight: {report['max_in_flight']}` per replica, "
        "`affinity: {load_factor: 1.25}`, no middleware",
        f"- trace: {tr['conversations']} conversations, {tr['turns']} turns "
        f"({tr['turns_per_conversation'][0]}-{tr['turns_per_conversation'][1]} each), "
        f"histories growing to {tr['final_history_words'][0]:,}-{tr['final_history_words'][1]:,} "
        f"words (≈ tokens), {report['concurrency']} conversations at once, "
        f"think time {tr['think_seconds'][0]}-{tr['think_seconds'][1]} s, "
        f"max_tokens {tr['max_tokens']}, temperature 0, streamed, seed {tr['seed']}",
    ]
    owners = next((r["summary"]["ring_owners"] for r in report["modes"] if "summary" in r), None)
    if owners:
        split = " / ".join(str(owners.count(i)) for i in range(report["replicas"]))
        lines.append(
            f"- affinity's map (each conversation's replica on the ring, before any "
            f"load bound): {split} conversations per replica"
        )
    lines.append("")
    pre = report.get("prefill") or []
    if pre:
        lines += [
            "## Prefill on one engine",
            "",
            "| threads | history tokens | cold prefill | cold tokens/s | "
            "cached: tokens reused / evaluated | cached prefill | other processes |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in pre:
            md = p["median"]
            lines.append(
                f"| {p['threads']} | {md['cold_prompt_n']:,.0f} | {md['cold_prefill_ms']:,.0f} ms "
                f"| {md['cold_tokens_per_s']:,.0f} | {md['cached_cache_n']:,.0f} / "
                f"{md['cached_prompt_n']:,.0f} | {md['cached_prefill_ms']:,.0f} ms "
                f"| {p['cpu']['others_cores']:.2f} cores |"
            )
        lines.append("")
    lines += [
        "## The trace through the proxy",
        "",
        "| balance | TTFT p50 | TTFT p99 | later turns p50 | turns/s | "
        "tokens evaluated / turn | tokens cached / turn | cache hits | "
        "turn on previous replica | engines busy prefilling | errors | other processes | runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["modes"]:
        if "summary" not in run:
            lines.append(f"| {run['mode']} | failed: {run['error'].splitlines()[0]} |")
            continue
        s = run["summary"]
        t = s["ttft_ms"]
        hit = s["cache_hit_fraction"]
        stay = s["later_turns_on_previous_replica"]
        lines.append(
            f"| {run['mode']} | {_fmt(t['p50'], ' ms')} | {_fmt(t['p99'], ' ms')} "
            f"| {_fmt(t['later_turns_p50'], ' ms')} | {_fmt(s['turns_per_second'])} "
            f"| {_fmt(s['tokens_evaluated_per_turn'])} | {_fmt(s['tokens_cached_per_turn'])} "
            f"| {'-' if hit is None else f'{hit:.0%}'} "
            f"| {'-' if stay is None else f'{stay:.0%}'} "
            f"| {' / '.join(f'{b:.0%}' for b in s['engine_prefill_busy'])} | {s['errors']} "
            f"| {s['cpu']['others_cores']:.2f} cores | {run.get('runs', 1)} |"
        )
    lines.append("")
    ratio = report.get("affinity_vs_round_robin_ttft_p50")
    if ratio:
        lines += [f"TTFT p50, round_robin / affinity: **{ratio:.2f}x**.", ""]
    lines += [
        "TTFT: from sending the request to the first content delta, at the client. "
        "Tokens evaluated and cached: the engine's own `timings.prompt_n` and "
        "`timings.cache_n` of each turn (the stream's last chunk). Turns/s: completed "
        "turns over the mode's wall time (think time included, the same in every mode). "
        "Turn on previous replica: of the turns after a conversation's first, the share "
        "served by the replica that served its previous turn (`x-upstream-replica`). "
        "Engines busy prefilling: each replica's `prompt_seconds_total` (its /metrics) "
        "over the wall time. `affinity:F`: affinity with `load_factor: F`. "
        "Other processes: CPU used on the machine by anything but the engines, the proxy "
        "and the client during the step (from /proc), in cores of "
        f"{report['machine']['nproc']}: work beside the benchmark that slows it down. "
        "Runs: a mode that other processes disturbed (over "
        f"{report['disturbed_cores']} cores) is run again while time is left; the table "
        "shows its least disturbed run, the JSON all of them.",
        "",
    ]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--server", help="llama-server binary (default: $LLAMA_SERVER_BIN, else built)")
    p.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="comma-separated balance modes; affinity:F runs affinity with load_factor F",
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="per replica (0: nproc / replicas)")
    p.add_argument(
        "--slots",
        type=int,
        default=8,
        help="llama-server -np per replica: room for every conversation at once",
    )
    p.add_argument("--ctx-per-slot", type=int, default=3072)
    p.add_argument(
        "--cache-ram", type=int, default=0,
        help="llama-server --cache-ram MiB (0: off, only the slots' own caches)",
    )  # fmt: skip
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=8,
        help="per replica, in the proxy (default: as many as the engine has slots)",
    )
    p.add_argument("--conversations", type=int, default=Shape.conversations)
    p.add_argument("--concurrency", type=int, default=8, help="conversations at once")
    p.add_argument("--seed", type=int, default=Shape.seed)
    p.add_argument("--mode-timeout", type=float, default=240, help="seconds per mode at most")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="run a mode again (while time is left) when other processes disturbed it",
    )
    p.add_argument(
        "--disturbed-cores",
        type=float,
        default=0.3,
        help="a mode is disturbed when other processes used more CPU than this meanwhile",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=540,
        help="seconds for the whole run: a mode that would start later is skipped",
    )
    p.add_argument("--prefill-repeats", type=int, default=3)
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20,
        help="before each step, wait up to this long for other processes to go quiet",
    )
    p.add_argument("--no-prefill", action="store_true", help="skip the one-engine prefill step")
    p.add_argument(
        "--base-port",
        type=int,
        default=18300,
        help="the proxy's port; the replicas' are the next ones (taken: any free port)",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet-engines"))
    p.add_argument("--keep-logs", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fleet-engines-"))
    try:
        yield path
    finally:
        if keep:
            log(f"logs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted({m for m in modes if split_mode(m)[0] not in MODES})
    if unknown:
        raise SystemExit(f"unknown modes: {', '.join(unknown)} (known: {', '.join(MODES)})")
    if not PROXY_BIN.exists():
        raise SystemExit(f"{PROXY_BIN} is missing: run `make install`")
    ncpu = os.cpu_count() or 1
    threads = args.threads or max(1, ncpu // args.replicas)
    binary = find_server(args.server)
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=False
    )
    version_text = (version.stdout + version.stderr).strip().splitlines()
    shape = Shape(conversations=args.conversations, seed=args.seed)
    conversations = build(shape)
    started = time.monotonic()
    deadline = started + args.time_limit

    with workdir(args.keep_logs) as work:
        procs = Procs(work)
        try:
            model_path = work / "fleet-llama.gguf"
            n_vocab = fleet_model.write_model(model_path)
            model_mb = model_path.stat().st_size / 1e6
            model_desc = (
                f"random-weight llama, {fleet_model.N_EMBD} wide, {fleet_model.N_LAYER} layers, "
                f"FFN {fleet_model.N_FF}, {fleet_model.N_HEAD}/{fleet_model.N_HEAD_KV} heads, "
                f"f16, vocabulary {n_vocab:,}, {model_mb:.0f} MB (bench/fleet/model.py)"
            )
            log(f"model: {model_desc}")
            settings = EngineSettings(
                binary, model_path, threads, args.slots, args.ctx_per_slot, args.cache_ram
            )
            prefill: list[dict[str, Any]] = []
            if not args.no_prefill:
                for t in sorted({ncpu, threads}, reverse=True):
                    one = EngineSettings(binary, model_path, t, 1, 8192, args.cache_ram)
                    p = measure_prefill(procs, one, 1900, args.prefill_repeats, args.quiet_wait)
                    md = p["median"]
                    log(
                        f"prefill, {t} thread(s): {md['cold_prompt_n']:.0f} tokens cold in "
                        f"{md['cold_prefill_ms']:.0f} ms ({md['cold_tokens_per_s']:.0f} tokens/s); "
                        f"with {md['cached_cache_n']:.0f} cached, {md['cached_prompt_n']:.0f} "
                        f"evaluated in {md['cached_prefill_ms']:.0f} ms"
                    )
                    prefill.append(p)
            attempts: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}

            def attempt(mode: str) -> None:
                left = deadline - time.monotonic()
                try:
                    attempts[mode].append(
                        run_mode(
                            procs,
                            mode,
                            settings,
                            args.replicas,
                            conversations,
                            shape,
                            args.concurrency,
                            args.max_in_flight,
                            min(args.mode_timeout, left - 60),
                            args.quiet_wait,
                            args.base_port,
                        )
                    )
                except RuntimeError as exc:  # an engine or the proxy did not start
                    log(f"{mode}: failed: {exc}")
                    attempts[mode].append({"mode": mode, "error": str(exc)[:2000]})

            for mode in modes:
                if deadline - time.monotonic() < 90:
                    log(f"{mode}: skipped, the --time-limit is near")
                    attempts[mode].append({"mode": mode, "error": "skipped: --time-limit"})
                    continue
                attempt(mode)
            # a mode that ran beside other work, once more while time is left: its
            # least disturbed run is the one reported
            for _ in range(args.retries):
                disturbed = sorted(
                    (disturbance(a), mode)
                    for mode, a in attempts.items()
                    if disturbance(a) > args.disturbed_cores
                )
                if not disturbed:
                    break
                for _, mode in reversed(disturbed):
                    needed = max(
                        r["summary"]["wall_seconds"] for r in attempts[mode] if "summary" in r
                    )
                    if deadline - time.monotonic() < needed + args.quiet_wait + 60:
                        continue
                    log(
                        f"{mode}: again, other processes used {disturbance(attempts[mode]):.2f} cores"
                    )
                    attempt(mode)
            runs = [least_disturbed(attempts[mode]) for mode in modes]
        finally:
            procs.stop_all()

    by_mode = {r["mode"]: r["summary"] for r in runs if "summary" in r}
    ratio = None
    if "affinity" in by_mode and "round_robin" in by_mode:
        a, rr = by_mode["affinity"]["ttft_ms"]["p50"], by_mode["round_robin"]["ttft_ms"]["p50"]
        ratio = round(rr / a, 2) if a and rr else None
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine(),
        "commit": git_commit(),
        "engine": {
            "version": version_text[0] if version_text else "unknown",
            "binary": str(binary),
            "threads": threads,
            "slots": args.slots,
            "ctx_per_slot": args.ctx_per_slot,
            "cache_ram_mib": args.cache_ram,
        },
        "model": {"description": model_desc},
        "replicas": args.replicas,
        "max_in_flight": args.max_in_flight,
        "concurrency": args.concurrency,
        "trace": describe(conversations, shape),
        "prefill": prefill,
        "modes": runs,
        "affinity_vs_round_robin_ttft_p50": ratio,
        "disturbed_cores": args.disturbed_cores,
        "seconds": round(time.monotonic() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {report['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
