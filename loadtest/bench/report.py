"""Aggregation (median of the runs), console tables, loadtest/RESULTS.md and the PNG plots."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .scenarios import Run


@dataclass
class Case:
    """One scenario at one size against one server: its runs and their medians."""

    scenario: str
    case: str  # e.g. "subscribers=1000 via=socket"
    server: str
    params: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    def median(self, metric: str) -> float:
        values = [r.metrics[metric] for r in self.runs if metric in r.metrics
                  and not math.isnan(r.metrics[metric])]
        return statistics.median(values) if values else math.nan

    def values(self, metric: str) -> list[float]:
        return [r.metrics.get(metric, math.nan) for r in self.runs]

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "case": self.case, "server": self.server, "params": self.params,
                "error": self.error, "runs": [{"metrics": r.metrics, "notes": r.notes} for r in self.runs]}


# the headline metric of each scenario, and whether bigger is better
HEADLINE = {
    "fanout": ("deliveries_per_s", True),
    "latency": ("lat_p99_ms", False),
    "connect": ("handshakes_per_s", True),
    "idle": ("kib_per_connection", False),
    "ping": ("replies_per_s", True),
    "hub": ("events_per_s", True),
    "chat": ("deliveries_per_s", True),
    "chat_paced": ("cpu_us_per_event", False),
    "notify": ("events_per_s", True),
    "hub_alone": ("hub_events_per_cpu_s", True),
}
# the extra columns printed per scenario
COLUMNS = {
    "fanout": ["deliveries_per_s", "loss", "lat_p50_ms", "lat_p99_ms", "lat_max_ms", "cpu_us_per_delivery",
               "frame_bytes"],
    "latency": ["rate_events_per_s", "deliveries_per_s", "loss", "lat_p50_ms", "lat_p99_ms", "lat_max_ms",
                "cpu_us_per_delivery"],
    "connect": ["handshakes_per_s", "failed", "hs_p50_ms", "hs_p99_ms", "cpu_us_per_handshake"],
    "idle": ["kib_per_connection", "connected", "failed", "rss_before_mib", "rss_after_mib"],
    "ping": ["replies_per_s", "bad", "rtt_p50_ms", "rtt_p99_ms", "cpu_us_per_reply"],
    "hub": ["events_per_s", "loss", "order_errors", "lat_p50_ms", "lat_p99_ms", "cpu_us_per_delivery"],
    "chat": ["deliveries_per_s", "events_per_s", "loss", "extra", "order_errors", "lat_p50_ms", "lat_p99_ms",
             "cpu_us_per_event", "cpu_us_per_delivery"],
    "chat_paced": ["events_per_s", "cpu_us_per_event", "cpu_us_per_delivery", "lat_p50_ms", "lat_p99_ms",
                   "lat_max_ms", "loss", "order_errors"],
    "notify": ["events_per_s", "loss", "order_errors", "lat_p50_ms", "lat_p99_ms", "cpu_us_per_event"],
    "hub_alone": ["hub_events_per_cpu_s", "hub_cpu_us_per_event", "publisher_per_s", "subscriber_per_s"],
}


def fmt(x: float) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if isinstance(x, int) and abs(x) < 10_000:  # counts (loss, failures) read as counts
        return str(x)
    if abs(x) >= 10_000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def ratio(cases: list[Case], case: Case) -> float:
    """tidings / baseline for the headline metric of the same scenario and case."""
    metric, _ = HEADLINE[case.scenario]
    base = [c for c in cases if c.server == "baseline" and c.scenario == case.scenario and c.case == case.case]
    if not base or case.server == "baseline":
        return math.nan
    b = base[0].median(metric)
    return case.median(metric) / b if b else math.nan


def table(cases: list[Case]) -> str:
    """A markdown table per scenario: medians, the runs of the headline metric, the ratio."""
    out: list[str] = []
    for scenario in dict.fromkeys(c.scenario for c in cases):
        cols = COLUMNS[scenario]
        metric, higher = HEADLINE[scenario]
        out.append(f"\n**{scenario}** (medians; runs = every run's {metric}; ratio = tidings/baseline of "
                   f"{metric}, {'higher' if higher else 'lower'} is better)\n")
        out.append("| case | server | " + " | ".join(cols) + " | runs | ratio |")
        out.append("|" + "---|" * (len(cols) + 4))
        for c in (c for c in cases if c.scenario == scenario):
            if c.error:
                out.append(f"| {c.case} | {c.server} | failed: {c.error[:200]} |" + " |" * (len(cols) + 1))
                continue
            runs = ", ".join(fmt(v) for v in c.values(metric))
            out.append(f"| {c.case} | {c.server} | " + " | ".join(fmt(c.median(k)) for k in cols)
                       + f" | {runs} | {fmt(ratio(cases, c))} |")
    return "\n".join(out)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    except (OSError, ValueError, IndexError):
        mem = 0
    versions = ", ".join(f"{p} {_version(p)}" for p in ("picows", "uvloop", "pyzmq", "orjson"))
    return (f"{model}, {os.cpu_count()} cores, {mem} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {versions}")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- plots -------------------------------------------------------------------------------------
COLORS = {"baseline": "tab:blue", "tidings": "tab:orange"}

def plot_fanout(cases: list[Case], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[Case]] = {}
    for c in cases:
        if c.scenario == "fanout" and not c.error:
            series.setdefault(f"{c.server} (publish via {c.params.get('via', 'socket')})", []).append(c)
    for label, cs in series.items():
        cs.sort(key=lambda c: c.params["subscribers"])
        xs = [c.params["subscribers"] for c in cs]
        med = [c.median("deliveries_per_s") / 1e3 for c in cs]
        lo = [m - min(c.values("deliveries_per_s")) / 1e3 for m, c in zip(med, cs, strict=True)]
        hi = [max(c.values("deliveries_per_s")) / 1e3 - m for m, c in zip(med, cs, strict=True)]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=label,
                    color=COLORS.get(label.split()[0]), ls="--" if "hub" in label else "-")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("subscribers on one channel")
    ax.set_ylabel("deliveries/s (thousands), median of runs, bars = min..max")
    ax.set_title("Fan-out throughput, 64 publishes in flight, same machine, load client included")
    ax.title.set_fontsize(9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(cases: list[Case], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_server: dict[str, list[Case]] = {}
    for c in cases:
        if c.scenario == "latency" and not c.error:
            by_server.setdefault(c.server, []).append(c)
    for server, cs in by_server.items():
        cs.sort(key=lambda c: c.median("deliveries_per_s"))
        xs = [c.median("deliveries_per_s") / 1e3 for c in cs]
        for metric, style in (("lat_p50_ms", "--"), ("lat_p99_ms", "-"), ("lat_max_ms", ":")):
            ax.plot(xs, [c.median(metric) for c in cs], style, marker="o", color=COLORS.get(server),
                    label=f"{server} {metric.split('_')[1]}")
    ax.set_yscale("log")
    ax.set_xlabel("offered load, deliveries/s (thousands)")
    ax.set_ylabel("publish-to-receive latency, ms (median of runs)")
    subs = next((c.params.get("subscribers") for c in cases if c.scenario == "latency"), "?")
    ax.set_title(f"Latency vs load, {subs} subscribers, fixed publish rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
