"""Draw the latency distributions of a results JSON side by side.

bench/.venv-tools/bin/python bench/chart.py bench/results/latest.json bench/results/latest.png
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {
    "backend": "#444444",
    "bare_relay": "#1f77b4",
    "bare_relay uvloop": "#17becf",
    "nginx": "#2ca02c",
    "chat-proxy empty": "#ff7f0e",
    "chat-proxy full": "#d62728",
    "chat-proxy tool_keywords": "#9467bd",
    "litellm": "#8c564b",
}


def nines(p: float) -> float:
    return -math.log10(1 - min(p, 99.95) / 100)


def curve(ax: Any, dist: dict[str, float], name: str) -> None:
    points = sorted((float(k), v) for k, v in dist.items())
    ax.plot(
        [nines(p) for p, _ in points],
        [max(v, 1e-3) for _, v in points],
        label=name,
        color=COLORS.get(name),
        linewidth=1.6,
    )


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        report = json.load(f)
    results: dict[str, Any] = report["results"]
    panels = [
        ("json_c1", "latency_ms", "not streamed, concurrency 1"),
        ("json_c64", "latency_ms", "not streamed, concurrency 64"),
        ("ttfb", "ttfb_ms", "stream: time to first byte, concurrency 1"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6))
    for ax, (scenario, key, title) in zip(axes, panels, strict=True):
        for name, res in results.items():
            dist = res.get(scenario, {}).get(key) if isinstance(res, dict) else None
            if dist:
                curve(ax, dist, name)
        ax.set_yscale("log")
        ticks = [50, 90, 99, 99.9]
        ax.set_xticks([nines(p) for p in ticks], [f"p{p:g}" for p in ticks])
        ax.set_xlim(nines(1), nines(99.9))
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("percentile")
        ax.set_ylabel("ms (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    m = report["machine"]
    fig.suptitle(
        f"chat-proxy latency distributions, {report['date']} — {m['nproc']} cores, {m['cpu']}"
        + (" (shared machine)" if report.get("shared") else ""),
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=90)


if __name__ == "__main__":
    main()
