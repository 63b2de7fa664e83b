"""The cyclic collector's settings compared under the bench's c=64 load.

For each variant (thresholds, what is frozen) runs bench/bench.py's
not-streamed scenarios on the bare relay and the full chain (SQLite store and memory
store), every chat-proxy process logging its collections (CHAT_PROXY_GC_LOG), and
tabulates the longest pause, p99 and throughput at c=64 side by side:

    .venv/bin/python bench/gc_thresholds.py --duration 24    # every variant, ~25 min
    .venv/bin/python bench/gc_thresholds.py --variants default,50000/20/100 --repeat 2

Writes bench/results/gc-thresholds.{json,md}. The choice made from it is in
proxy/gcwatch.py (its docstring cites the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = REPO / ".venv" / "bin" / "python"

# the variants compared by default: thresholds `gen0/gen1/gen2`, what survives a full
# collection frozen too (proxy/gcwatch.py's default), or with a suffix: "startup only"
# (CHAT_PROXY_GC_FREEZE=startup: the start-up objects alone frozen) or "not frozen"
# (CHAT_PROXY_GC_FREEZE=0); "default" is whatever proxy/gcwatch.py sets, "disabled"
# no automatic collection at all (the floor)
VARIANTS = (
    "700/10/10 not frozen",
    "700/10/10 startup only",
    "700/10/10",
    "700/10/2",
    "10000/5/100",
    "10000/50/100",
    "50000/20/100",
    "disabled",
)


def variant_env(name: str) -> dict[str, str]:
    """The environment of the proxy processes for a variant's name."""
    if name == "default":
        return {}
    if name == "disabled":
        return {"CHAT_PROXY_GC_THRESHOLD": "0"}
    head, _, rest = name.partition(" ")
    env = {"CHAT_PROXY_GC_THRESHOLD": head.replace("/", ",")}
    modes = {"": "survivors", "not frozen": "0", "startup only": "startup"}
    if rest not in modes:
        raise SystemExit(f"unknown variant {name!r}")
    env["CHAT_PROXY_GC_FREEZE"] = modes[rest]
    return env


TARGETS = ("bare_relay", "chat-proxy full", "chat-proxy full memory")


def run_one(name: str, env: dict[str, str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    argv = [
        str(PY),
        str(BENCH / "bench.py"),
        "--only",
        ",".join(TARGETS),
        "--no-streams1000",
        "--no-streams10k",
        "--scenarios",
        args.scenarios,
        "--duration",
        str(args.duration),
        "--output",
        str(out),
    ]
    for k, v in env.items():
        argv += ["--proxy-env", f"{k}={v}"]
    print(f"== {name}", flush=True)
    subprocess.run(argv, check=True, cwd=REPO, stdout=subprocess.DEVNULL, timeout=1200)
    report: dict[str, Any] = json.loads(out.with_suffix(".json").read_text())
    return report


def row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    res = report["results"]
    bare = res.get("bare_relay", {}).get("json_c64", {})
    out: dict[str, Any] = {
        "variant": name,
        "other_cpu_share": report["other_work"]["other_cpu_share"],
        "bare_p99_ms": bare.get("latency_ms", {}).get("99"),
        "bare_rps": bare.get("rps"),
    }
    for key, target in (("sqlite", "chat-proxy full"), ("memory", "chat-proxy full memory")):
        r = res.get(target, {}).get("json_c64", {})
        gc = r.get("gc", {})
        out[key] = {
            "rps": r.get("rps"),
            "p50_ms": r.get("latency_ms", {}).get("50"),
            "p99_ms": r.get("latency_ms", {}).get("99"),
            "cpu_us": r.get("cpu_us_per_request"),
            "gc_count": gc.get("count"),
            "gc_max_ms": gc.get("max_ms"),
            "gc_max_cpu_ms": gc.get("max_cpu_ms"),
            "gc_total_ms": gc.get("total_ms"),
        }
    return out


def fmt(v: Any, d: int = 1) -> str:
    return "-" if v is None else f"{v:,.{d}f}"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"### The collector's settings at c=64, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"bench/bench.py --scenarios {args.scenarios} --duration {args.duration:g} per variant "
        "(3 interleaved rounds; p99 and req/s the medians, collections over every round); "
        "the full chain on SQLite and on the memory store. Collections: gen0/gen1/gen2 "
        "count, longest pause (wall; the collector's CPU time in brackets).",
        "",
        "| variant | other work | bare p99 ms | SQLite: req/s | p99 ms | p99 / bare | collections | longest ms | memory: req/s | p99 ms | p99 / bare | collections | longest ms |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        cells = [r["variant"], f"{100 * r['other_cpu_share']:.0f}%", fmt(r["bare_p99_ms"])]
        for key in ("sqlite", "memory"):
            s = r[key]
            ratio = s["p99_ms"] / r["bare_p99_ms"] if s["p99_ms"] and r["bare_p99_ms"] else None
            n = s["gc_count"] or [0, 0, 0]
            cells += [
                fmt(s["rps"], 0),
                fmt(s["p99_ms"]),
                fmt(ratio, 2),
                "/".join(str(x) for x in n),
                f"{max(s['gc_max_ms'] or [0]):.2f} ({max(s['gc_max_cpu_ms'] or [0]):.2f})",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated variant names"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--scenarios", default="json_c64")
    parser.add_argument("--output", default=str(BENCH / "results" / "gc-thresholds"))
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    rows: list[dict[str, Any]] = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"gc-thresholds-{os.getpid()}"
    for i in range(args.repeat):
        for name in names:
            report = run_one(name, variant_env(name), args, tmp)
            rows.append(row(name, report) | {"repeat": i})
            print(markdown(rows[-1:], args).splitlines()[-1], flush=True)
    text = markdown(rows, args)
    out = Path(args.output)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
