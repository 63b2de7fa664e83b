"""The benchmark of chat-proxy: every scenario in one run, on one machine, as ratios.

Run it through `bench/run` (or `make bench`), which installs what it needs first.
Starts a fast backend (nginx serving canned answers) and a slow streaming backend,
then, one after the other, each thing measured in front of that backend: nothing (the
backend directly), a bare aiohttp relay, nginx as a reverse proxy, chat-proxy with an
empty chain, with the full default chain, with tool_keywords, and the LiteLLM proxy.
Prints markdown tables, writes bench/results/latest.json and (through chart.py)
bench/results/latest.png. Every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PROJECT_PY = REPO / ".venv" / "bin" / "python"
LITELLM = BENCH / ".venv-litellm" / "bin" / "litellm"
TOOLS_PY = BENCH / ".venv-tools" / "bin" / "python"
RESULTS = BENCH / "results"
KEY = "sk-bench-0123456789abcdef"
LITELLM_KEY = "sk-bench-litellm-master-0123456789abcdef"  # LiteLLM refuses to start without one

# --- canned backend answers ---------------------------------------------------------

WORDS = [
    "The",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "the",
    "proxy",
    "relays",
    "every",
    "token",
]


def completion_doc() -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-json",
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! This is a canned answer from the benchmark backend, "
                    "about as long as a short reply from a chat model.",
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 24, "completion_tokens": 22, "total_tokens": 46},
    }


def chunk_event(i: int, model: str, last: bool = False) -> bytes:
    doc: dict[str, Any] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "delta": {} if last else {"content": " " + WORDS[i % len(WORDS)]},
                "logprobs": None,
                "finish_reason": "stop" if last else None,
            }
        ],
    }
    if i == 0:
        doc["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def stream_body(n: int, model: str) -> bytes:
    """n events in all: n-2 content chunks, the final chunk, and [DONE]."""
    parts = [chunk_event(i, model) for i in range(n - 2)]
    parts.append(chunk_event(n - 2, model, last=True))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def request_body(model: str, stream: bool = False, tools: bool = False) -> bytes:
    doc: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": "Say hello in one short sentence, please."},
        ],
        "max_tokens": 64,
        "temperature": 0.7,
    }
    if stream:
        doc["stream"] = True
    if tools:
        doc["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": "end_call",
                    "description": "End the call.",
                    "parameters": {
                        "type": "object",
                        "properties": {"reason": {"type": "string"}},
                    },
                },
            }
        ]
    return json.dumps(doc).encode()


# --- processes ----------------------------------------------------------------------


@dataclass
class Procs:
    run: Path
    cpus: dict[str, str | None]
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], role: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        cpu = self.cpus.get(role)
        if cpu is not None:
            argv = ["taskset", "-c", cpu, *argv]
        log = (self.run / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=clean_env(env),
            cwd=REPO,
        )
        log.close()
        self.started.append(proc)
        with (self.run / "pids").open("a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            with contextlib.suppress(Exception):
                self.stop(proc)

    def run_tool(
        self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 600
    ) -> str:
        """A load generator, pinned to the load CPU; its stdout."""
        cpu = self.cpus.get("load")
        if cpu is not None:
            argv = ["taskset", "-c", cpu, *argv]
        out = subprocess.run(
            argv,
            capture_output=True,
            env={**os.environ, **(env or {})},
            cwd=REPO,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"{argv[0:4]} exited {out.returncode}: {out.stderr.decode(errors='replace')[-800:]}"
            )
        return out.stdout.decode()


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a started process: no database or master key for LiteLLM,
    no CHAT_PROXY_* settings from the caller's shell."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY") and not k.startswith("CHAT_PROXY_")
    }
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_ready(
    proc: subprocess.Popen[bytes],
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeout: float,
    log: Path,
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}; log {log}:\n{tail(log)}")
        try:
            status, data = post(url, body, headers, timeout=10)
            if status == 200:
                return
            last = f"HTTP {status}: {data[:300]!r}"
        except (OSError, urllib.error.URLError) as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise RuntimeError(f"not ready after {timeout:g}s ({last}); log {log}:\n{tail(log)}")


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])  # kB
    except OSError:
        pass
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its children (nginx's worker)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += proc_cpu_seconds(int(child))
    return total


# --- the measured things ------------------------------------------------------------


@dataclass
class Target:
    name: str
    kind: str  # backend | bare | nginx | chat-proxy | litellm
    config: str | None = None  # chat-proxy: bench/configs/<config>.yaml
    headers: dict[str, str] = field(default_factory=dict)
    json_c: bool = True  # the non-streamed scenarios
    streams: bool = True  # time to first byte and events per second
    tools: bool = False  # the stream requests declare the tool_keywords tool
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    gc_log: Path | None = None  # chat-proxy: its collections, one line each (CHAT_PROXY_GC_LOG)

    def url(self, what: str, backend_port: int) -> str:
        if self.kind in ("chat-proxy", "litellm"):
            return f"http://127.0.0.1:{self.port}/v1/chat/completions"
        port = backend_port if self.kind == "backend" else self.port
        return f"http://127.0.0.1:{port}/{what}/v1/chat/completions"


def targets(selected: set[str] | None) -> list[Target]:
    all_targets = [
        Target("backend", "backend"),
        Target("bare_relay", "bare"),
        Target("bare_relay uvloop", "bare", "uvloop"),
        Target("nginx", "nginx"),
        Target("chat-proxy empty", "chat-proxy", "empty"),
        Target("chat-proxy full", "chat-proxy", "full", headers={"X-API-Key": KEY}),
        Target("chat-proxy full memory", "chat-proxy", "full_memory", headers={"X-API-Key": KEY}),
        Target("chat-proxy tool_keywords", "chat-proxy", "tool_keywords", json_c=False, tools=True),
        Target(
            "litellm", "litellm", streams=False, headers={"Authorization": f"Bearer {LITELLM_KEY}"}
        ),
    ]
    if selected:
        return [t for t in all_targets if t.name in selected or t.kind in selected]
    return all_targets


@dataclass
class Bench:
    args: argparse.Namespace
    procs: Procs
    run: Path
    ports: dict[str, int] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # environment for chat-proxy's ${VAR}s
    def proxy_env(self, port: int) -> dict[str, str]:
        return {
            "BENCH_PORT": str(port),
            "BENCH_BACKEND": f"http://127.0.0.1:{self.ports['backend']}",
            "BENCH_SLOW": f"http://127.0.0.1:{self.ports['slow']}",
            "BENCH_RUN": str(self.run),
            "BENCH_KEY": KEY,
            "BENCH_LOG_LEVEL": self.args.log_level,
        }

    def write_files(self) -> None:
        www = self.run / "www" / "long" / "v1" / "chat"
        www.mkdir(parents=True)
        long = stream_body(self.args.long_events, "bench-long")
        (www / "completions").write_bytes(long)
        short = stream_body(self.args.short_events, "bench-sse").decode()
        event_bytes = len(chunk_event(5, "bench-long"))
        for side in ("backend", "proxy"):
            for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (self.run / f"nginx-{side}-tmp" / sub).mkdir(parents=True)
        subst = {
            "@RUN@": str(self.run),
            "@PORT@": str(self.ports["backend"]),
            "@COMPLETION@": json.dumps(completion_doc(), separators=(",", ":")),
            "@SHORT_STREAM@": short,
            "@EVENT_BYTES@": str(event_bytes),
        }
        text = (BENCH / "configs" / "nginx-backend.conf").read_text()
        for k, v in subst.items():
            text = text.replace(k, v)
        (self.run / "nginx-backend.conf").write_text(text)
        text = (BENCH / "configs" / "nginx-proxy.conf").read_text()
        for k, v in {
            "@RUN@": str(self.run),
            "@PORT@": str(self.ports["nginx"]),
            "@BACKEND_PORT@": str(self.ports["backend"]),
        }.items():
            text = text.replace(k, v)
        (self.run / "nginx-proxy.conf").write_text(text)
        text = (BENCH / "configs" / "litellm.yaml").read_text()
        text = text.replace("@BACKEND@", f"http://127.0.0.1:{self.ports['backend']}")
        (self.run / "litellm.yaml").write_text(text)
        bodies = {
            "json": request_body("bench-json"),
            "sse": request_body("bench-sse", stream=True),
            "long": request_body("bench-long", stream=True),
            "sse_tools": request_body("bench-sse", stream=True, tools=True),
            "long_tools": request_body("bench-long", stream=True, tools=True),
            "slow": request_body("bench-slow", stream=True),
        }
        for name, data in bodies.items():
            path = self.run / f"body-{name}.json"
            path.write_bytes(data)
            self.files[name] = path

    def start_backends(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = self.run / "nginx-backend.conf"
        proc = self.procs.start(
            "nginx-backend", [nginx, "-c", str(conf), "-p", str(self.run)], "backend"
        )
        url = f"http://127.0.0.1:{self.ports['backend']}/json/v1/chat/completions"
        wait_ready(proc, url, b"{}", {}, 15, self.run / "nginx-backend.log")
        status, data = post(
            f"http://127.0.0.1:{self.ports['backend']}/long/v1/chat/completions", b"{}", {}
        )
        if status != 200 or data.count(b"\n\n") != self.args.long_events:
            raise RuntimeError(
                f"the backend's long stream is wrong: HTTP {status}, {len(data)} bytes"
            )
        slow = self.procs.start(
            "slow-backend",
            [
                str(PROJECT_PY),
                str(BENCH / "slow_backend.py"),
                "--port",
                str(self.ports["slow"]),
                "--events",
                str(self.args.slow_events),
                "--interval",
                str(self.args.slow_interval),
            ],
            "backend",
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.ports["slow"]), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or slow.poll() is not None:
                    raise RuntimeError("the slow backend did not start") from None
                time.sleep(0.1)

    def start_target(
        self,
        t: Target,
        workers: int = 1,
        role: str = "server",
        extra_env: dict[str, str] | None = None,
    ) -> str | None:
        """Start what is measured; None when started, or the reason it is skipped.
        chat-proxy: `workers` processes (serve --workers), `extra_env` over the bench's
        variables; `role` the CPUs it is pinned to (one not in the map: none)."""
        if t.kind == "backend":
            return None
        t.port = free_port()
        name = t.name.replace(" ", "-")
        log = self.run / f"{name}.log"
        if t.kind == "bare":
            argv = [
                str(PROJECT_PY),
                str(BENCH / "bare_relay.py"),
                "--port",
                str(t.port),
                "--backend",
                f"http://127.0.0.1:{self.ports['backend']}",
                "--loop",
                t.config or "asyncio",
            ]
            env: dict[str, str] = {}
            ready_timeout = 20.0
        elif t.kind == "nginx":
            t.port = self.ports["nginx"]
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            argv = [nginx, "-c", str(self.run / "nginx-proxy.conf"), "-p", str(self.run)]
            env = {}
            ready_timeout = 15.0
        elif t.kind == "chat-proxy":
            assert t.config is not None
            env = self.proxy_env(t.port) | (extra_env or {})
            config = BENCH / "configs" / f"{t.config}.yaml"
            check = subprocess.run(
                [str(PROJECT_PY), "-m", "proxy", "check", "--config", str(config)],
                capture_output=True,
                env={**os.environ, **env},
                cwd=REPO,
                check=False,
            )
            if check.returncode != 0:
                why = check.stderr.decode(errors="replace").strip().replace("\n", " ")
                return f"skipped: `chat-proxy check` refused {config.name}: {why}"
            argv = [str(PROJECT_PY), "-m", "proxy", "serve", "--config", str(config)]
            if workers > 1:
                argv += ["--workers", str(workers)]
            t.gc_log = self.run / f"gc-{name}.log"
            t.gc_log.write_bytes(b"")
            env["CHAT_PROXY_GC_LOG"] = str(t.gc_log)
            env.update(dict(kv.split("=", 1) for kv in self.args.proxy_env))
            ready_timeout = 30.0
        elif t.kind == "litellm":
            if not LITELLM.exists():
                return "skipped: the LiteLLM proxy is not installed (bench/.venv-litellm)"
            argv = [
                str(LITELLM),
                "--config",
                str(self.run / "litellm.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(t.port),
                "--num_workers",
                "1",
            ]
            env = {
                "LITELLM_LOG": "ERROR",
                "LITELLM_MASTER_KEY": LITELLM_KEY,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_TELEMETRY": "False",
                "DISABLE_SCHEMA_UPDATE": "true",
                "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
                "USE_PRISMA_MIGRATE": "False",
                "HOME": str(self.run),
            }
            ready_timeout = 180.0
        else:
            raise ValueError(t.kind)
        t.proc = self.procs.start(name, argv, role, env)
        probe_headers = dict(t.headers)
        wait_ready(
            t.proc, t.url("json", 0), request_body("bench-json"), probe_headers, ready_timeout, log
        )
        return None

    def stop_target(self, t: Target) -> None:
        if t.proc is not None:
            self.procs.stop(t.proc)
            t.proc = None

    def wrk(self, url: str, conns: int, duration: float, headers: dict[str, str]) -> dict[str, Any]:
        out = self.procs.run_tool(
            [
                "wrk",
                "-t1",
                f"-c{conns}",
                f"-d{max(1, round(duration))}s",
                "--timeout",
                "10s",
                "-s",
                str(BENCH / "wrk.lua"),
                url,
            ],
            env={
                "BENCH_BODY": str(self.files["json"]),
                "BENCH_HEADERS": "|".join(f"{k}: {v}" for k, v in headers.items()),
            },
            timeout=duration + 60,
        )
        m = re.search(r"^BENCH_JSON (.*)$", out, re.M)
        if m is None:
            raise RuntimeError(f"wrk printed no result:\n{out[-800:]}")
        res: dict[str, Any] = json.loads(m.group(1))
        secs = res["duration_us"] / 1e6
        errs = sum(res["errors"].values())
        res["rps"] = (res["requests"] - res["errors"]["status"]) / secs if secs else 0.0
        res["error_count"] = errs
        res["latency_ms"] = {k: v / 1000 for k, v in res.pop("latency_us").items()}
        return res

    def loadgen(
        self, mode: str, url: str, body: str, headers: dict[str, str], **opts: Any
    ) -> dict[str, Any]:
        argv = [
            str(PROJECT_PY),
            str(BENCH / "loadgen.py"),
            mode,
            "--url",
            url,
            "--body",
            str(self.files[body]),
        ]
        for k, v in headers.items():
            argv += ["--header", f"{k}: {v}"]
        for k, v in opts.items():
            argv += [f"--{k}", str(v)]
        out = self.procs.run_tool(argv, timeout=float(opts.get("duration", 30)) + 120)
        res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return res

    def one(self, t: Target, scenario: str, seconds: float) -> dict[str, Any]:
        """One measurement of one scenario on one target, with the CPU time the
        target spent on it (a figure that other work on the machine hardly moves)."""
        cpu0 = proc_cpu_seconds(t.proc.pid) if t.proc is not None else None
        gc0 = gc_offset(t.gc_log)
        res = self._one(t, scenario, seconds)
        if t.gc_log is not None:
            res["gc"] = gc_since(t.gc_log, gc0)
        if cpu0 is not None and t.proc is not None:
            cpu = proc_cpu_seconds(t.proc.pid) - cpu0
            if scenario.startswith("json") and res["requests"]:
                res["cpu_us_per_request"] = cpu / res["requests"] * 1e6
            elif scenario == "events" and res.get("all_events"):
                res["cpu_us_per_event"] = cpu / res["all_events"] * 1e6
        return res

    def _one(self, t: Target, scenario: str, seconds: float) -> dict[str, Any]:
        bp = self.ports["backend"]
        if scenario in ("json_c1", "json_c64"):
            return self.wrk(t.url("json", bp), int(scenario[6:]), seconds, t.headers)
        if scenario == "ttfb":
            return self.loadgen(
                "ttfb",
                t.url("sse", bp),
                "sse_tools" if t.tools else "sse",
                t.headers,
                duration=seconds,
                concurrency=1,
                expect=self.args.short_events,
            )
        if scenario == "events":
            return self.loadgen(
                "events",
                t.url("long", bp),
                "long_tools" if t.tools else "long",
                t.headers,
                duration=seconds,
                concurrency=self.args.stream_clients,
                expect=self.args.long_events,
            )
        raise ValueError(scenario)

    def measure_all(self, ts: list[Target]) -> dict[str, dict[str, Any]]:
        """Every scenario on every running target, in interleaved rounds: each round
        measures every target for duration/rounds seconds, in a rotating order, so
        that a burst of other work on the machine hits all of them alike; the figures
        are the medians over the rounds."""
        rounds = max(1, self.args.rounds)
        seconds = max(1.0, round(self.args.duration / rounds))
        for t in ts:
            if t.json_c:
                self.wrk(t.url("json", self.ports["backend"]), 16, 1, t.headers)  # warm-up
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {t.name: {} for t in ts}
        for scenario in self.args.scenarios:
            runs = [t for t in ts if (t.json_c if scenario.startswith("json") else t.streams)]
            for r in range(rounds):
                k = r % len(runs) if runs else 0
                for t in runs[k:] + runs[:k]:
                    try:
                        res = self.one(t, scenario, seconds)
                    except Exception as exc:
                        say(f"  {t.name}: {scenario} failed: {exc}")
                        continue
                    raw[t.name].setdefault(scenario, []).append(res)
            for t in runs:
                got = raw[t.name].get(scenario)
                if got:
                    say(describe(t.name, scenario, merge(scenario, got)))
        return {name: {sc: merge(sc, got) for sc, got in per.items()} for name, per in raw.items()}

    def profile(self, t: Target) -> None:
        """py-spy on the server under the c=64 load (and under long streams), not
        counted: the collapsed stacks go to results/profile-<name>-<what>.txt."""
        pyspy = BENCH / ".venv-tools" / "bin" / "py-spy"
        if t.proc is None or not pyspy.exists() or t.kind not in ("chat-proxy", "bare"):
            return
        name = t.name.replace(" ", "-")
        bp = self.ports["backend"]
        jobs: list[tuple[str, list[str], dict[str, str]]] = []
        if t.json_c:
            jobs.append(
                (
                    "json",
                    [
                        "wrk",
                        "-t1",
                        "-c64",
                        f"-d{round(self.args.profile_seconds) + 1}s",
                        "-s",
                        str(BENCH / "wrk.lua"),
                        t.url("json", bp),
                    ],
                    {
                        "BENCH_BODY": str(self.files["json"]),
                        "BENCH_HEADERS": "|".join(f"{k}: {v}" for k, v in t.headers.items()),
                    },
                )
            )
        if t.streams:
            body = self.files["long_tools" if t.tools else "long"]
            argv = [
                str(PROJECT_PY),
                str(BENCH / "loadgen.py"),
                "events",
                "--url",
                t.url("long", bp),
                "--body",
                str(body),
                "--duration",
                str(self.args.profile_seconds + 1),
                "--concurrency",
                str(self.args.stream_clients),
            ]
            for k, v in t.headers.items():
                argv += ["--header", f"{k}: {v}"]
            jobs.append(("stream", argv, {}))
        for what, argv, env in jobs:
            out = RESULTS / f"profile-{name}-{what}.txt"
            cpu = self.procs.cpus.get("load")
            load = subprocess.Popen(
                (["taskset", "-c", cpu] if cpu else []) + argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, **env},
                cwd=REPO,
            )
            time.sleep(0.5)
            subprocess.run(
                [
                    str(pyspy),
                    "record",
                    "--pid",
                    str(t.proc.pid),
                    "--duration",
                    str(max(1, round(self.args.profile_seconds))),
                    "--rate",
                    "250",
                    "--function",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--nonblocking",
                ],
                capture_output=True,
                check=False,
            )
            load.wait(self.args.profile_seconds + 60)
            if out.exists():
                summary = summarise_profile(out)
                out.with_suffix(".summary.txt").write_text(summary + "\n")
                say(f"{t.name}, profile under the {what} load: {out.relative_to(REPO)}")
                say(summary)

    def streams1000(self, config: str, headers: dict[str, str]) -> dict[str, Any]:
        t = Target(f"chat-proxy {config}", "chat-proxy", config, headers=headers)
        why = self.start_target(t)
        if why is not None:
            return {"skipped": why}
        assert t.proc is not None
        try:
            pid = t.proc.pid
            base = proc_status(pid)
            cpu0 = proc_cpu_seconds(pid)
            cpu = self.procs.cpus.get("load")
            argv = [
                str(PROJECT_PY),
                str(BENCH / "loadgen.py"),
                "streams",
                "--url",
                t.url("slow", 0),
                "--body",
                str(self.files["slow"]),
                "--n",
                str(self.args.streams),
                "--ramp",
                "1.0",
                "--expect",
                str(self.args.slow_events + 1),
                "--timeout",
                "120",
            ]
            for k, v in headers.items():
                argv += ["--header", f"{k}: {v}"]
            load = subprocess.Popen(
                (["taskset", "-c", cpu] if cpu else []) + argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=REPO,
            )
            peak = 0
            samples: list[tuple[float, int]] = []
            t0 = time.monotonic()
            while load.poll() is None:
                rss = proc_status(pid).get("VmRSS", 0)
                peak = max(peak, rss)
                samples.append((round(time.monotonic() - t0, 2), rss))
                time.sleep(0.1)
            out, err = load.communicate()
            if load.returncode != 0:
                raise RuntimeError(f"loadgen streams failed: {err.decode()[-800:]}")
            res: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
            end = proc_status(pid)
            res.update(
                {
                    "rss_start_mb": base.get("VmRSS", 0) / 1024,
                    "rss_peak_sampled_mb": peak / 1024,
                    "vmhwm_mb": end.get("VmHWM", 0) / 1024,
                    "cpu_seconds": proc_cpu_seconds(pid) - cpu0,
                    "rss_samples": samples[:: max(1, len(samples) // 100)],
                }
            )
            return res
        finally:
            self.stop_target(t)

    def streams10k(self, config: str, headers: dict[str, str]) -> dict[str, Any]:
        """`--streams10k` slow streams at once through chat-proxy with two workers, from
        a slow backend of their own that stamps each event with the time it writes it
        (bench/slow_backend.py --stamp) and a load generator of several processes
        (bench/slow_streams.py): how many complete with every event, the most open at
        once, each event's delay from the backend's write to the client's read, and
        the workers' resident memory, summed, sampled every 100 ms. Nothing is pinned:
        the two workers share both cores with the backend and the load generator."""
        a = self.args
        n = a.streams10k
        port = free_port()
        backend = self.procs.start(
            "slow-backend-10k",
            [
                str(PROJECT_PY),
                str(BENCH / "slow_backend.py"),
                "--port",
                str(port),
                "--events",
                str(a.streams10k_events),
                "--interval",
                str(a.streams10k_interval),
                "--stamp",
            ],
            "none",
        )
        t = Target(f"chat-proxy {config}", "chat-proxy", config, headers=headers)
        try:
            wait_port(port, backend)
            why = self.start_target(
                t,
                workers=2,
                role="none",
                extra_env={
                    "BENCH_SLOW": f"http://127.0.0.1:{port}",
                    # each worker's pool holds every stream it could be given
                    "BENCH_SLOW_CONNECTIONS": str(n),
                },
            )
            if why is not None:
                return {"skipped": why}
            assert t.proc is not None and t.gc_log is not None
            log = self.run / f"chat-proxy-{config}.log"
            pids = wait_workers(t.proc.pid, log, 2, 30.0)
            for _ in range(20):  # a few requests, to each worker most likely
                post(t.url("json", 0), request_body("bench-json"), headers)
            time.sleep(0.5)
            base = {pid: proc_status(pid) for pid in pids}
            cpu0 = sum(proc_cpu_seconds(pid) for pid in pids)
            gc0 = gc_offset(t.gc_log)
            argv = [
                str(PROJECT_PY),
                str(BENCH / "slow_streams.py"),
                "--url",
                t.url("slow", 0),
                "--body",
                str(self.files["slow"]),
                "--n",
                str(n),
                "--procs",
                str(a.streams10k_procs),
                "--ramp",
                str(a.streams10k_ramp),
                "--expect",
                str(a.streams10k_events + 1),
                "--timeout",
                str(a.streams10k_events * a.streams10k_interval + 60),
            ]
            for k, v in headers.items():
                argv += ["--header", f"{k}: {v}"]
            errlog = self.run / f"slow-streams-{config}.log"
            with errlog.open("wb") as errf:  # a file: a pipe left unread could fill and block it
                load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, cwd=REPO)
            with (self.run / "pids").open("a") as f:
                f.write(f"{load.pid}\n")
            peak = 0
            peak_each: dict[int, int] = {}
            samples: list[tuple[float, int]] = []
            t0 = time.monotonic()
            give_up = t0 + a.streams10k_ramp + a.streams10k_events * a.streams10k_interval + 180
            while load.poll() is None:
                if time.monotonic() > give_up:  # bounded, whatever happens
                    load.kill()
                    break
                now = {pid: proc_status(pid).get("VmRSS", 0) for pid in pids}
                total = sum(now.values())
                if total > peak:
                    peak, peak_each = total, now
                samples.append((round(time.monotonic() - t0, 2), total))
                time.sleep(0.1)
            out, _ = load.communicate()
            if load.returncode != 0:
                raise RuntimeError(f"slow_streams failed: {tail(errlog)[-800:]}")
            res: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
            end = {pid: proc_status(pid) for pid in pids}
            start_rss = sum(b.get("VmRSS", 0) for b in base.values())
            res.update(
                {
                    "workers": len(pids),
                    "events_per_stream": a.streams10k_events,
                    "interval": a.streams10k_interval,
                    "ramp": a.streams10k_ramp,
                    "rss_start_mb": start_rss / 1024,
                    "rss_peak_mb": peak / 1024,  # the sum over the workers at its highest
                    "rss_peak_each_mb": [v / 1024 for v in peak_each.values()],
                    "vmhwm_sum_mb": sum(e.get("VmHWM", 0) for e in end.values()) / 1024,
                    "bytes_per_stream": (peak - start_rss) * 1024 / n if n else 0,
                    "cpu_seconds": sum(proc_cpu_seconds(pid) for pid in pids) - cpu0,
                    "gc": gc_since(t.gc_log, gc0),
                    "rss_samples": samples[:: max(1, len(samples) // 100)],
                }
            )
            return res
        finally:
            self.stop_target(t)
            self.procs.stop(backend)

    def stores(self) -> dict[str, Any]:
        """bench/stores.py: the full chain on SQLite, Redis and PostgreSQL, and two
        workers against one on Redis."""
        out = BENCH / "results" / "stores.json"  # and stores.md beside it
        self.procs.run_tool(
            [str(PROJECT_PY), str(BENCH / "stores.py"), "--output", str(out)], timeout=900
        )
        res: dict[str, Any] = json.loads(out.read_text())
        return res

    def limits(self) -> dict[str, Any]:
        """bench/limits.py: a full backend pool and the open-file limit reached."""
        out = self.run / "limits.json"
        self.procs.run_tool(
            [str(PROJECT_PY), str(BENCH / "limits.py"), "--output", str(out)], timeout=180
        )
        res: dict[str, Any] = json.loads(out.read_text())
        return res


def scenario(
    wanted: bool,
    title: str,
    run: Callable[[], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """A scenario run by another script: its report, or why it was not had."""
    if not wanted:
        return {}
    say(title)
    try:
        result = run()
    except Exception as exc:
        result = {"skipped": f"failed: {str(exc).splitlines()[0][:200]}"}
    say("  " + (result["skipped"] if "skipped" in result else summary(result)))
    return result


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.1)


def wait_workers(pid: int, log: Path, n: int, timeout: float) -> list[int]:
    """The pids of a `serve --workers n` supervisor's workers, once each listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                kids += [int(k) for k in (task / "children").read_text().split()]
        listening = tail(log, 400).count('"chat-proxy listening"')
        if len(kids) >= n and listening >= n:
            return kids
        time.sleep(0.2)
    raise RuntimeError(f"{n} workers did not start; log {log}:\n{tail(log)}")


SCENARIOS = ("json_c1", "json_c64", "ttfb", "events")


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def gc_offset(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def gc_since(path: Path, offset: int) -> dict[str, Any]:
    """The collections a chat-proxy process logged since `offset` of its GC log
    (proxy/gcwatch.py: `generation pause_seconds` a line): count, longest and total
    pause by generation."""
    count = [0, 0, 0]
    longest = [0.0, 0.0, 0.0]
    longest_cpu = [0.0, 0.0, 0.0]
    total = [0.0, 0.0, 0.0]
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(offset)
        for line in f.read().splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue
            gen, pause = int(parts[0]), float(parts[1]) * 1000
            cpu = float(parts[2]) * 1000 if len(parts) > 2 else pause
            if 0 <= gen <= 2:
                count[gen] += 1
                longest[gen] = max(longest[gen], pause)
                longest_cpu[gen] = max(longest_cpu[gen], cpu)
                total[gen] += pause
    return {"count": count, "max_ms": longest, "max_cpu_ms": longest_cpu, "total_ms": total}


def merge_gc(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    got = [r["gc"] for r in runs if "gc" in r]
    if not got:
        return None
    return {
        "count": [sum(g["count"][i] for g in got) for i in range(3)],
        "max_ms": [max(g["max_ms"][i] for g in got) for i in range(3)],
        "max_cpu_ms": [max(g["max_cpu_ms"][i] for g in got) for i in range(3)],
        "total_ms": [sum(g["total_ms"][i] for g in got) for i in range(3)],
    }


def merge(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one scenario on one target: counts added, rates and each
    percentile the median over the rounds; the collections of every round."""
    out: dict[str, Any] = {"rounds": len(runs)}
    gcs = merge_gc(runs)
    if gcs is not None:
        out["gc"] = gcs
    if scenario.startswith("json"):
        out["rps"] = median([r["rps"] for r in runs])
        out["rps_rounds"] = [round(r["rps"], 1) for r in runs]
        out["requests"] = sum(r["requests"] for r in runs)
        out["errors"] = {k: sum(r["errors"][k] for r in runs) for k in runs[0]["errors"]}
        out["error_count"] = sum(r["error_count"] for r in runs)
        out["latency_ms"] = {
            p: median([r["latency_ms"][p] for r in runs]) for p in runs[0]["latency_ms"]
        }
        cpu = [r["cpu_us_per_request"] for r in runs if "cpu_us_per_request" in r]
        if cpu:
            out["cpu_us_per_request"] = median(cpu)
    elif scenario == "ttfb":
        ok = [r for r in runs if r["ttfb_ms"]]
        out["requests"] = sum(r["requests"] for r in runs)
        out["incomplete"] = sum(r["incomplete"] for r in runs)
        out["error_count"] = sum(r["error_count"] for r in runs)
        out["errors"] = [e for r in runs for e in r["errors"]][:5]
        for key in ("ttfb_ms", "total_ms"):
            out[key] = {p: median([r[key][p] for r in ok]) for p in ok[0][key]} if ok else {}
    else:
        out["events_per_second"] = median([r["events_per_second"] for r in runs])
        out["eps_rounds"] = [round(r["events_per_second"]) for r in runs]
        cpu = [r["cpu_us_per_event"] for r in runs if "cpu_us_per_event" in r]
        if cpu:
            out["cpu_us_per_event"] = median(cpu)
        out["events"] = sum(r["events"] for r in runs)
        out["streams"] = sum(r["streams"] for r in runs)
        out["incomplete"] = sum(r["incomplete"] for r in runs)
        out["error_count"] = sum(r["error_count"] for r in runs)
        out["errors"] = [e for r in runs for e in r["errors"]][:5]
    return out


def describe(name: str, scenario: str, r: dict[str, Any]) -> str:
    head = f"  {name:26} "
    if scenario.startswith("json"):
        text = (
            f"{scenario:9} {r['rps']:9.0f} req/s  p50 {r['latency_ms']['50']:.3f} ms  "
            f"p99 {r['latency_ms']['99']:.3f} ms  (rounds: {', '.join(f'{x:.0f}' for x in r['rps_rounds'])})"
        )
        if "cpu_us_per_request" in r:
            text += f"  cpu {r['cpu_us_per_request']:.0f} us/req"
        if r["error_count"]:
            text += f"  ERRORS {r['errors']}"
    elif scenario == "ttfb":
        text = (
            f"ttfb      p50 {r['ttfb_ms'].get('50', 0):.3f} ms  p99 {r['ttfb_ms'].get('99', 0):.3f} ms  "
            f"({r['requests']} streams)"
        )
        if r["incomplete"] or r["error_count"]:
            text += f"  INCOMPLETE {r['incomplete']} ERRORS {r['error_count']} {r['errors']}"
    else:
        text = (
            f"events/s  {r['events_per_second']:9.0f}  ({r['streams']} streams; rounds: "
            f"{', '.join(str(x) for x in r['eps_rounds'])})"
        )
        if "cpu_us_per_event" in r:
            text += f"  cpu {r['cpu_us_per_event']:.2f} us/event"
        if r["incomplete"] or r["error_count"]:
            text += f"  INCOMPLETE {r['incomplete']} ERRORS {r['error_count']} {r['errors']}"
    if "gc" in r:
        text += "  " + describe_gc(r["gc"])
    return head + text


def describe_10k(s: dict[str, Any]) -> str:
    d = s.get("delay_ms", {})
    return (
        f"{s['completed']}/{s['streams']} completed (at most {s['most_open']} open at once); "
        f"event delay p50 {fmt(d.get('50'), 1)} p99 {fmt(d.get('99'), 1)} max {fmt(d.get('max'), 1)} ms; "
        f"workers' RSS {s['rss_start_mb']:.0f} MB at start, peak {s['rss_peak_mb']:.0f} MB "
        f"({s['bytes_per_stream'] / 1024:.1f} KiB a stream); {describe_gc(s['gc'])}"
        + (f"; errors {s['errors']}" if s["errors"] else "")
    )


def describe_gc(gc: dict[str, Any]) -> str:
    n, m = gc["count"], gc["max_ms"]
    return (
        f"gc {n[0]}/{n[1]}/{n[2]} longest {max(m):.2f} ms (gen2 {m[2]:.2f}; "
        f"CPU {max(gc['max_cpu_ms']):.2f})"
    )


_IDLE = ("_worker (concurrent/futures/thread.py", "EpollSelector.select", "Condition.wait")


def summarise_profile(path: Path, top: int = 20) -> str:
    """Where the server's CPU went, from py-spy's collapsed stacks (--function):
    each sample is charged to the innermost function of proxy/ (or bench/) on its
    stack, so that library time (aiohttp, json, logging) counts against the proxy
    code that asked for it; samples with no such frame are the server's own
    machinery (aiohttp's HTTP parsing and writing, the event loop)."""
    owners: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [
            re.sub(r"\(/.*?/(?:site-packages|lib/python3\.\d+|main)/", "(", f)
            for f in stack.split(";")
        ]
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]
        if frames and frames[-1].startswith(_IDLE):
            idle += count
            continue
        total += count
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + count
        owner = "(aiohttp server and event loop, outside proxy code)"
        for f in frames:
            if ("(proxy/" in f or "bare_relay.py" in f) and not re.search(
                r"\((proxy/(cli|server|__main__|chain)\.py|<frozen)", f
            ):
                owner = f
        owners[owner] = owners.get(owner, 0) + count
    if not total:
        return "  (no samples)"
    lines = [
        f"  {total} busy samples ({idle} idle left out); charged to the innermost proxy function:"
    ]
    for f, c in sorted(owners.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * c / total:5.1f}%  {f}")
    lines.append("  leaf functions (self time):")
    for f, c in sorted(leaves.items(), key=lambda kv: -kv[1])[: top // 2]:
        lines.append(f"    {100 * c / total:5.1f}%  {f}")
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, flush=True)


# --- the report ---------------------------------------------------------------------


def cpu_stat() -> list[int]:
    """The machine's CPU time so far (/proc/stat, in ticks): user, nice, system,
    idle, iowait, irq, softirq, steal."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return [0] * 8


def other_work(stat0: list[int], times0: os.times_result) -> dict[str, float]:
    """How much of the machine other work took during the run: the busy CPU time of
    the whole machine less that of this run (this process and every process it
    started and waited for, load generators included)."""
    tick = os.sysconf("SC_CLK_TCK")
    stat1, times1 = cpu_stat(), os.times()
    d = [(b - a) / tick for a, b in zip(stat0, stat1, strict=True)]
    # irq and softirq time is left out: loopback traffic (ours) is mostly counted there
    busy = d[0] + d[1] + d[2]
    wall = sum(d)
    ours = sum(
        getattr(times1, k) - getattr(times0, k)
        for k in ("user", "system", "children_user", "children_system")
    )
    other = max(0.0, busy - ours)
    return {
        "machine_cpu_seconds": round(wall, 1),
        "busy_cpu_seconds": round(busy, 1),
        "bench_cpu_seconds": round(ours, 1),
        "other_cpu_seconds": round(other, 1),
        "other_cpu_share": round(other / wall, 3) if wall else 0.0,
        "steal_cpu_seconds": round(d[7], 1),
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
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    out: dict[str, str] = {}

    def run(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, timeout=30, check=False)
            return (p.stdout + p.stderr).decode(errors="replace").strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    out["aiohttp"] = run([str(PROJECT_PY), "-c", "import aiohttp; print(aiohttp.__version__)"])
    m = re.search(r"nginx/(\S+)", run(["nginx", "-v"]))
    out["nginx"] = m.group(1) if m else "?"
    m = re.search(r"wrk (\S+)", run(["wrk", "-v"]))
    out["wrk"] = m.group(1) if m else "?"
    lp = BENCH / ".venv-litellm" / "bin" / "python"
    if lp.exists():
        out["litellm"] = run(
            [str(lp), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
        )
    out["chat-proxy"] = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return out


def g(d: dict[str, Any] | None, *path: str) -> Any:
    cur: Any = d
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def checks(
    results: dict[str, Any],
    streams: dict[str, Any],
    args: argparse.Namespace,
    streams10k: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    stores: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    T = results
    out: list[dict[str, Any]] = []

    def add(
        what: str, value: float | None, op: str, limit: float, unit: str = "", note: str = ""
    ) -> None:
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append(
            {
                "target": what,
                "value": value,
                "op": op,
                "limit": limit,
                "unit": unit,
                "pass": ok,
                "note": note,
            }
        )

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None

    def diff(a: Any, b: Any) -> float | None:
        return a - b if isinstance(a, int | float) and isinstance(b, int | float) else None

    bare64 = g(T, "bare_relay", "json_c64", "rps")
    bare_cpu = g(T, "bare_relay", "json_c64", "cpu_us_per_request")
    uv64 = g(T, "bare_relay uvloop", "json_c64", "rps")
    for name, limit in (("full", 0.8), ("empty", 0.9)):
        cpu = g(T, f"chat-proxy {name}", "json_c64", "cpu_us_per_request")
        rps = g(T, f"chat-proxy {name}", "json_c64", "rps")
        add(
            f"{name} chain / bare relay, req/s at c=64",
            ratio(rps, bare64),
            ">=",
            limit,
            "x",
            f"by CPU time per request: {fmt(ratio(bare_cpu, cpu), 2)} x "
            f"({fmt(cpu, 0)} vs {fmt(bare_cpu, 0)} µs)"
            + (f"; vs the bare relay on uvloop: {fmt(ratio(rps, uv64), 2)} x" if uv64 else ""),
        )
    b50 = g(T, "backend", "json_c1", "latency_ms", "50")
    for name in ("chat-proxy empty", "chat-proxy full"):
        add(
            f"p50 latency added at c=1, {name.split()[-1]} chain (vs backend directly)",
            diff(g(T, name, "json_c1", "latency_ms", "50"), b50),
            "<=",
            0.3,
            "ms",
            f"bare relay adds {fmt(diff(g(T, 'bare_relay', 'json_c1', 'latency_ms', '50'), b50), 3)} ms",
        )
    t50 = g(T, "backend", "ttfb", "ttfb_ms", "50")
    for name in ("chat-proxy empty", "chat-proxy full"):
        add(
            f"stream time to first byte added, p50, {name.split()[-1]} chain",
            diff(g(T, name, "ttfb", "ttfb_ms", "50"), t50),
            "<=",
            0.5,
            "ms",
            f"bare relay adds {fmt(diff(g(T, 'bare_relay', 'ttfb', 'ttfb_ms', '50'), t50), 3)} ms",
        )
    add(
        "SSE events/s relayed, pass-through (empty chain)",
        g(T, "chat-proxy empty", "events", "events_per_second"),
        ">=",
        50000,
        "/s",
    )
    add(
        "SSE events/s relayed, tool_keywords active",
        g(T, "chat-proxy tool_keywords", "events", "events_per_second"),
        ">=",
        20000,
        "/s",
    )
    for config, s in streams.items():
        if "skipped" in s:
            add(
                f"{args.streams} streams, {config} chain: peak RSS",
                None,
                "<=",
                150,
                "MB",
                s["skipped"],
            )
            continue
        complete = s["completed"] == s["streams"]
        add(
            f"{args.streams} streams, {config} chain: peak RSS (all complete: {'yes' if complete else 'NO'})",
            max(s["vmhwm_mb"], s["rss_peak_sampled_mb"]) if complete else None,
            "<=",
            150,
            "MB",
            f"{s['completed']}/{s['streams']} completed"
            + (f"; {s['errors']}" if s["errors"] else ""),
        )
    bare99 = g(T, "bare_relay", "json_c64", "latency_ms", "99")
    for name, store in (("chat-proxy full", "SQLite"), ("chat-proxy full memory", "memory")):
        if name not in T or "skipped" in T[name]:
            continue
        p99 = g(T, name, "json_c64", "latency_ms", "99")
        gcs = g(T, name, "json_c64", "gc")
        add(
            f"full chain ({store} store) p99 / bare relay p99, c=64",
            ratio(p99, bare99),
            "<=",
            2,
            "x",
            f"{fmt(p99, 1)} vs {fmt(bare99, 1)} ms",
        )
        add(
            f"full chain ({store} store): longest collector pause during c=64",
            max(gcs["max_ms"]) if gcs else None,
            "<=",
            5,
            "ms",
            (
                f"collections {'/'.join(str(x) for x in gcs['count'])} (gen0/1/2); the "
                f"longest's CPU time {max(gcs['max_cpu_ms']):.2f} ms"
            )
            if gcs
            else "",
        )
    for config, s in (streams10k or {}).items():
        n = args.streams10k
        if "skipped" in s:
            add(f"{n} streams, {config} chain, two workers", None, "<=", 300, "MB", s["skipped"])
            continue
        complete = s["completed"] == s["streams"]
        add(
            f"{n} streams, {config} chain, two workers: all complete with every event",
            s["completed"],
            ">=",
            s["streams"],
            "",
            f"at most {s['most_open']} open at once" + (f"; {s['errors']}" if s["errors"] else ""),
        )
        add(
            f"{n} streams, {config} chain: the workers' RSS summed, at its peak",
            s["rss_peak_mb"] if complete else None,
            "<=",
            300,
            "MB",
            f"{s['rss_start_mb']:.0f} MB at start; {s['bytes_per_stream'] / 1024:.1f} KiB a stream",
        )
        add(
            f"{n} streams, {config} chain: event delay p99 (backend write to client read)",
            g(s, "delay_ms", "99"),
            "<=",
            100,
            "ms",
            f"p50 {fmt(g(s, 'delay_ms', '50'), 1)}, max {fmt(g(s, 'delay_ms', 'max'), 1)} ms; "
            f"{s['events_measured']:,} events; {describe_gc(s['gc'])}",
        )
    if stores and "skipped" not in stores:
        tp = stores["throughput"]
        add(
            "full chain on Redis / on SQLite, req/s at c=64",
            stores["ratio_redis_sqlite"],
            ">=",
            0.8,
            "x",
            f"{fmt(tp['redis']['c64_median']['rps'], 0)} vs {fmt(tp['sqlite']['c64_median']['rps'], 0)} "
            f"req/s (bench/stores.py; proxy CPU {fmt(tp['redis']['c64_median']['proxy_cpu_ms_per_request'], 3)} "
            f"vs {fmt(tp['sqlite']['c64_median']['proxy_cpu_ms_per_request'], 3)} ms a request)",
        )
        sc = stores.get("scaling")
        if sc:
            add(
                "two workers / one, full chain on Redis, req/s at c=64",
                sc["ratio"],
                ">=",
                1.7,
                "x",
                f"{fmt(sc['2']['rps'], 0)} vs {fmt(sc['1']['rps'], 0)} req/s, nothing pinned",
            )
    pool = g(limits, "pool_full")
    if pool:
        # clear: the answer names the limit, and a metric tells it from a backend down
        named = "max_connections" in pool["body"] or "pool" in pool["body"].lower()
        counted = [m for m in pool["metrics"] if "upstream_errors_total" in m]
        apart = any('kind="connect_timeout"' not in m for m in counted)
        add(
            "backend pool full: an error that names the limit, and a metric of its own",
            1.0 if named and apart else 0.0,
            ">=",
            1,
            "yes/no",
            f"HTTP {pool['status']} after {pool['waited_seconds']} s: "
            f"{pool['body'][:160]}; counted: {', '.join(counted) or 'nothing'}",
        )
    fds = g(limits, "descriptors")
    if fds:
        dropped = {k: v for k, v in fds["outcomes"].items() if not k.startswith("HTTP/")}
        logged = bool(fds["log"])
        counted = any(m.startswith("chat_proxy_connections_refused_total") for m in fds["metrics"])
        add(
            "open-file limit reached: every client answered, a log line and a metric",
            1.0 if logged and counted and not dropped else 0.0,
            ">=",
            1,
            "yes/no",
            f"limit {fds['open_file_limit']}: {fds['clients']} clients, {fds['outcomes']}; "
            f"log: {len(fds['log'])} lines; served again after: {fds.get('after')}",
        )
    full = g(T, "chat-proxy full", "json_c64", "rps")
    add(
        "full chain / LiteLLM, req/s at c=64",
        ratio(full, g(T, "litellm", "json_c64", "rps")),
        ">=",
        50,
        "x",
        "by CPU time per request: "
        + fmt(
            ratio(
                g(T, "litellm", "json_c64", "cpu_us_per_request"),
                g(T, "chat-proxy full", "json_c64", "cpu_us_per_request"),
            ),
            1,
        )
        + " x",
    )
    return out


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(report: dict[str, Any]) -> str:
    T = report["results"]
    m = report["machine"]
    lines = [
        f"### chat-proxy benchmark, {report['date']}",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu']}, {m['memory_mb'] // 1024} GiB; Linux {m['kernel']}, "
        f"Python {m['python']}; {report['pinning']}. Load average before the run: {report['load_before']}; "
        f"other work took about {100 * report['other_work']['other_cpu_share']:.0f}% of the machine's CPU time during the run"
        + (" — **the machine was shared; expect noise.**" if report["shared"] else "."),
        f"Each scenario {report['duration']:g} s. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| | req/s c=1 | p50 ms | p99 ms | req/s c=64 | p50 ms | p99 ms | CPU µs/req c=64 | stream TTFB p50 ms | p99 ms | TTFB added p50 / p99 ms | SSE events/s | CPU µs/event |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    t50 = g(T, "backend", "ttfb", "ttfb_ms", "50")
    t99 = g(T, "backend", "ttfb", "ttfb_ms", "99")
    for name, r in T.items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} |" + " |" * 11)
            continue
        c1 = r.get("json_c1", {})
        c64 = r.get("json_c64", {})
        tt = g(r, "ttfb", "ttfb_ms") or {}
        added = ""
        if tt and name != "backend" and t50 is not None:
            added = f"{tt['50'] - t50:+.3f} / {tt['99'] - t99:+.3f}"
        lines.append(
            f"| {name} | {fmt(c1.get('rps'), 0)} | {fmt(g(c1, 'latency_ms', '50'), 3)} | {fmt(g(c1, 'latency_ms', '99'), 3)} "
            f"| {fmt(c64.get('rps'), 0)} | {fmt(g(c64, 'latency_ms', '50'), 3)} | {fmt(g(c64, 'latency_ms', '99'), 3)} "
            f"| {fmt(c64.get('cpu_us_per_request'), 0)} "
            f"| {fmt(tt.get('50'), 3) if tt else '-'} | {fmt(tt.get('99'), 3) if tt else '-'} | {added or '-'} "
            f"| {fmt(g(r, 'events', 'events_per_second'), 0)} | {fmt(g(r, 'events', 'cpu_us_per_event'), 2)} |"
        )
    gc_rows = []
    for name, r in T.items():
        cells = []
        for sc in SCENARIOS:
            gcs = g(r, sc, "gc")
            cells.append(
                "-"
                if gcs is None
                else f"{'/'.join(str(x) for x in gcs['count'])}, {max(gcs['max_ms']):.2f} ms"
                + (f" ({max(gcs['max_cpu_ms']):.2f})" if max(gcs["max_ms"]) >= 1 else "")
            )
        if any(c != "-" for c in cells):
            gc_rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if gc_rows:
        lines += [
            "",
            "Collector, per scenario (every round): collections gen0/gen1/gen2, the longest "
            "pause (wall time; its CPU time in brackets where 1 ms or more).",
            "",
            "| | c=1 | c=64 | stream TTFB | SSE events |",
            "|---|---|---|---|---|",
            *gc_rows,
        ]
    lines += ["", "| target | measured | limit | result | note |", "|---|---:|---:|---|---|"]
    for c in report["checks"]:
        res = "-" if c["pass"] is None else ("PASS" if c["pass"] else "**FAIL**")
        if c["pass"] is None:
            res = "not measured"
        digits = 3 if c["unit"] == "ms" else (0 if c["unit"] == "/s" else 2)
        val = fmt(c["value"], digits)
        if c["unit"] == "yes/no":
            val = "-" if c["value"] is None else ("yes" if c["value"] else "no")
            lines.append(f"| {c['target']} | {val} | yes | {res} | {c['note']} |")
            continue
        lines.append(
            f"| {c['target']} | {val} {c['unit']} | {c['op']} {fmt(c['limit'], 0 if c['limit'] >= 10 else 1)} {c['unit']} | {res} | {c['note']} |"
        )
    if report["streams"]:
        lines += [
            "",
            f"| {report['args']['streams']} concurrent streams ({report['args']['slow_events']} events, one every {report['args']['slow_interval'] * 1000:g} ms) | completed | RSS at start MB | peak RSS MB | proxy CPU s | stream seconds p50 / p99 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for config, s in report["streams"].items():
            if "skipped" in s:
                lines.append(f"| chat-proxy {config} | {s['skipped']} | | | | |")
                continue
            ss = s.get("stream_seconds", {})
            lines.append(
                f"| chat-proxy {config} | {s['completed']}/{s['streams']} | {s['rss_start_mb']:.1f} | {max(s['vmhwm_mb'], s['rss_peak_sampled_mb']):.1f} "
                f"| {s['cpu_seconds']:.1f} | {fmt(ss.get('50'), 2)} / {fmt(ss.get('99'), 2)} |"
            )
    if report.get("streams10k"):
        a = report["args"]
        lines += [
            "",
            f"| {a['streams10k']} concurrent streams, two workers ({a['streams10k_events']} events, "
            f"one every {a['streams10k_interval']:g} s, opened over {a['streams10k_ramp']:g} s) "
            "| completed | most open | event delay p50 / p99 / max ms | workers' RSS at start MB "
            "| peak MB (sum) | per stream KiB | workers' CPU s | collections, longest |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for config, s in report["streams10k"].items():
            if "skipped" in s:
                lines.append(f"| chat-proxy {config} | {s['skipped']} |" + " |" * 7)
                continue
            d = s["delay_ms"]
            gcs = s["gc"]
            lines.append(
                f"| chat-proxy {config} | {s['completed']}/{s['streams']} | {s['most_open']} "
                f"| {fmt(d.get('50'), 1)} / {fmt(d.get('99'), 1)} / {fmt(d.get('max'), 1)} "
                f"| {s['rss_start_mb']:.0f} | {s['rss_peak_mb']:.0f} | {s['bytes_per_stream'] / 1024:.1f} "
                f"| {s['cpu_seconds']:.1f} | {'/'.join(str(x) for x in gcs['count'])}, "
                f"{max(gcs['max_ms']):.2f} ms |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark chat-proxy against a bare relay, nginx and LiteLLM."
    )
    parser.add_argument(
        "--duration", type=float, default=6.0, help="seconds per scenario and target"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds the duration is split into"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated target names or kinds (backend is always measured)",
    )
    parser.add_argument(
        "--no-streams1000", action="store_true", help="skip the 1,000-stream memory scenario"
    )
    parser.add_argument(
        "--no-streams10k",
        action="store_true",
        help="skip the 10,000-stream scenario (two workers)",
    )
    parser.add_argument("--streams10k", type=int, default=10000, help="streams at once")
    parser.add_argument(
        "--no-stores",
        action="store_true",
        help="skip the stores scenario (the full chain on each store, two workers on Redis)",
    )
    parser.add_argument(
        "--no-limits",
        action="store_true",
        help="skip the limits scenario (a full backend pool, the open-file limit)",
    )
    parser.add_argument("--streams10k-events", type=int, default=30)
    parser.add_argument("--streams10k-interval", type=float, default=1.0)
    parser.add_argument(
        "--streams10k-ramp", type=float, default=10.0, help="seconds over which they open"
    )
    parser.add_argument(
        "--streams10k-procs", type=int, default=4, help="processes of the load generator"
    )
    parser.add_argument(
        "--streams10k-chains",
        default="empty,full",
        help="comma-separated chat-proxy configs the scenario runs (empty, full)",
    )
    parser.add_argument(
        "--scenarios",
        type=lambda v: [s for s in v.split(",") if s],
        default=list(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--slow-events", type=int, default=50)
    parser.add_argument("--slow-interval", type=float, default=0.1)
    parser.add_argument("--short-events", type=int, default=12)
    parser.add_argument("--long-events", type=int, default=2000)
    parser.add_argument("--stream-clients", type=int, default=4)
    parser.add_argument("--log-level", default="info", help="chat-proxy's server.log_level")
    parser.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for every chat-proxy process (e.g. "
        "CHAT_PROXY_GC_THRESHOLD=700,10,10); repeatable",
    )
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also record py-spy profiles of chat-proxy under load",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--output",
        default=str(RESULTS / "latest"),
        help="path prefix of the .json/.png/.md results",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the run directory (logs, configs)"
    )
    args = parser.parse_args()

    ncpu = os.cpu_count() or 1
    pin = not args.no_pin and ncpu >= 2 and shutil.which("taskset") is not None
    cpus: dict[str, str | None] = (
        {"server": str(ncpu - 1), "load": "0", "backend": "0"} if pin else {}
    )
    pinning = (
        f"proxy under test pinned to CPU {ncpu - 1}; load generators and backends to CPU 0 (taskset)"
        if pin
        else "no CPU pinning"
    )
    run = Path(tempfile.mkdtemp(prefix="chat-proxy-bench-"))
    run.chmod(0o755)  # nginx workers run as another user and read the canned files here
    procs = Procs(run, cpus)
    pidfile = os.environ.get("BENCH_PIDFILE")
    if pidfile:
        Path(pidfile).write_text(str(run / "pids"))

    def on_signal(signum: int, _frame: Any) -> None:
        procs.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    RESULTS.mkdir(exist_ok=True)
    bench = Bench(args, procs, run)
    selected = {s.strip() for s in args.only.split(",") if s.strip()} or None
    if selected:
        selected.add("backend")
    load_before = os.getloadavg()[0]
    stat0, times0 = cpu_stat(), os.times()
    say(f"run directory: {run}; {pinning}; load average {load_before:.2f}")
    try:
        for name in ("backend", "slow", "nginx"):
            bench.ports[name] = free_port()
        bench.write_files()
        bench.start_backends()
        results: dict[str, Any] = {}
        running: list[Target] = []
        for t in targets(selected):
            try:
                why = bench.start_target(t)
            except Exception as exc:
                why = f"failed to start: {str(exc).splitlines()[0][:300]}"
                bench.stop_target(t)
            if why is not None:
                say(f"{t.name}: {why}")
                results[t.name] = {"skipped": why}
            else:
                say(f"{t.name}: started" + (f" (pid {t.proc.pid})" if t.proc else ""))
                running.append(t)
        measured = bench.measure_all(running)
        for t in targets(selected):
            if t.name in measured:
                results[t.name] = measured[t.name]
            else:
                results[t.name] = results.pop(t.name)
        if args.profile:
            for t in running:
                bench.profile(t)
        for t in running:
            bench.stop_target(t)
        streams: dict[str, Any] = {}
        if not args.no_streams1000 and (
            not selected or selected & {"chat-proxy", "chat-proxy empty", "chat-proxy full"}
        ):
            for config, headers in (("empty", {}), ("full", {"X-API-Key": KEY})):
                if selected and not selected & {"chat-proxy", f"chat-proxy {config}"}:
                    continue
                say(f"{args.streams} streams, chat-proxy {config}:")
                try:
                    s = bench.streams1000(config, headers)
                except Exception as exc:
                    s = {"skipped": f"failed: {str(exc).splitlines()[0][:200]}"}
                streams[config] = s
                if "skipped" in s:
                    say(f"  {s['skipped']}")
                else:
                    say(
                        f"  {s['completed']}/{s['streams']} completed in {s['seconds']:.1f} s; RSS "
                        f"{s['rss_start_mb']:.1f} MB at start, peak {max(s['vmhwm_mb'], s['rss_peak_sampled_mb']):.1f} MB"
                        + (f"; {s['errors']}" if s["errors"] else "")
                    )
        streams10k: dict[str, Any] = {}
        if not args.no_streams10k:
            for config in [c for c in args.streams10k_chains.split(",") if c]:
                if selected and not selected & {"chat-proxy", f"chat-proxy {config}"}:
                    continue
                headers = {"X-API-Key": KEY} if config.startswith("full") else {}
                say(f"{args.streams10k} streams, chat-proxy {config}, two workers:")
                try:
                    s = bench.streams10k(config, headers)
                except Exception as exc:
                    s = {"skipped": f"failed: {str(exc).splitlines()[0][:200]}"}
                streams10k[config] = s
                say("  " + (s["skipped"] if "skipped" in s else describe_10k(s)))
        ours = not selected or "chat-proxy" in selected
        stores = scenario(
            ours and not args.no_stores,
            "stores: the full chain on SQLite, Redis and PostgreSQL; two workers on Redis",
            bench.stores,
            lambda r: (
                f"Redis / SQLite {r['ratio_redis_sqlite']:.2f}; two workers / one "
                f"{(r.get('scaling') or {}).get('ratio') or 0:.2f}"
            ),
        )
        limits = scenario(
            ours and not args.no_limits,
            "limits: a full backend pool, the open-file limit",
            bench.limits,
            lambda r: json.dumps(r)[:600],
        )
        procs.stop_all()  # the backends too: what is left running now is not ours
        load_after = os.getloadavg()[0]
        other = other_work(stat0, times0)
        report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "versions": versions(),
            "pinning": pinning,
            "load_before": round(load_before, 2),
            "load_after": round(load_after, 2),
            "other_work": other,
            "shared": other["other_cpu_share"] > 0.10,
            "duration": args.duration,
            "args": vars(args),
            "results": results,
            "streams": streams,
            "streams10k": streams10k,
            "limits": limits,
            "stores": stores,
        }
        report["checks"] = checks(results, streams, args, streams10k, limits, stores)
        text = markdown(report)
        report["markdown"] = text
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)
        say("")
        say(text)
        if TOOLS_PY.exists():
            chart = subprocess.run(
                [
                    str(TOOLS_PY),
                    str(BENCH / "chart.py"),
                    str(out.with_suffix(".json")),
                    str(out.with_suffix(".png")),
                ],
                capture_output=True,
                check=False,
            )
            if chart.returncode == 0:
                say(
                    f"results: {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}"
                )
            else:
                say(f"chart failed: {chart.stderr.decode()[-500:]}")
        else:
            say(
                f"results: {out.with_suffix('.json')}, {out.with_suffix('.md')} (no chart: bench/.venv-tools missing)"
            )
        return 0
    finally:
        procs.stop_all()
        if args.keep:
            say(f"kept {run}")
        else:
            shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
