"""Plots a capacity planner reads instead of tables, generated from the CSV/JSON results.

    python -m loadtest.capacity.plots --step loadtest/results/capacity-step \\
        --memory loadtest/results/capacity-idle \\
        --sweep loadtest/results/sweep-fanout.json --sweep loadtest/results/sweep-rate.json \\
        --out loadtest/plots/capacity

From a step run (its _tidings.json windows and _server.csv samples):
  users-vs-p99.png       sockets held vs p50/p99 `event` latency, with the limit and the knee
  users-vs-events.png    sockets held vs events delivered per second
  memory-vs-connections.png   server RSS vs open connections, with the least-squares line
From the sweeps (loadtest.capacity.sweep):
  p99-vs-fanout.png      p99 vs subscribers per channel at a fixed publish rate
  p99-vs-publish-rate.png     p99 vs publishes per second at a fixed fan-out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt

from loadtest.capacity.summary import memory_per_connection, read_server, read_tally

NOTE = "loopback, 2 shared cores: server and Locust on one box"


def _save(fig: Any, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_plots(prefix: str, out: Path, memory_prefix: str | None = None) -> list[Path]:
    tally = read_tally(prefix)
    shape = tally.get("shape", {})
    rows = [w for w in shape.get("windows", []) if w["label"].startswith("step")]
    if not rows:
        raise SystemExit(f"{prefix}: no step windows in {prefix}_tidings.json")
    x = [w["connected"] for w in rows]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, [w["event"]["p99"] for w in rows], "o-", label="p99 event latency")
    ax.plot(x, [w["event"]["p50"] for w in rows], "s--", label="p50 event latency")
    limit = shape.get("limits", {}).get("p99_event_ms")
    if limit:
        ax.axhline(limit, color="red", lw=0.8, ls=":", label=f"limit {limit:.0f} ms")
    if shape.get("knee") and shape.get("knee_window"):
        kw = shape["knee_window"]
        ax.axvline(kw["connected"], color="green", lw=0.8, ls="--",
                   label=f"knee: {shape['knee']} users ({kw['connected']} sockets)")
    ax.set_yscale("log")
    ax.set_xlabel("open WebSocket connections")
    ax.set_ylabel("publish-to-receive latency (ms, log)")
    ax.set_title(f"Connections vs event latency (step ramp; {NOTE})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out, "users-vs-p99.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, [w["event"]["per_s"] for w in rows], "o-", label="events delivered/s")
    ax.plot(x, [w["publish"]["per_s"] for w in rows], "^--", label="socket publishes/s")
    ax.set_xlabel("open WebSocket connections")
    ax.set_ylabel("per second")
    ax.set_title(f"Connections vs events delivered (step ramp; {NOTE})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out, "users-vs-events.png"))

    server = [r for r in read_server(memory_prefix or prefix) if r.get("rss_bytes") and "connections" in r]
    if server:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        top = max(range(len(server)), key=lambda i: server[i]["connections"])
        ramp, after = server[: top + 1], server[top + 1:]
        cx = [r["connections"] for r in ramp]
        ax.plot(cx, [r["rss_bytes"] / 2**20 for r in ramp], ".", alpha=0.6, label="1 s samples, ramp up")
        if after:
            ax.plot([r["connections"] for r in after], [r["rss_bytes"] / 2**20 for r in after], "x",
                    color="grey", alpha=0.5, label="after the peak (freed memory stays in the heap)")
        fit = memory_per_connection(server)
        if fit:
            lo, hi = min(cx), max(cx)
            ax.plot([lo, hi], [(fit[0] + fit[1] * lo) / 2**20, (fit[0] + fit[1] * hi) / 2**20], "r-",
                    label=f"{fit[0] / 2**20:.0f} MiB + {fit[1] / 1024:.1f} KiB per connection")
        ax.set_xlabel("open WebSocket connections (tidings_connections)")
        ax.set_ylabel("server RSS, hub + workers + supervisor (MiB)")
        ax.set_title(f"Memory vs connections ({NOTE})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out, "memory-vs-connections.png"))
    return paths


def sweep_plot(path: str, out: Path) -> Path:
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    key, label, name = {
        "fanout": ("subscribers_per_channel", "subscribers per channel", "p99-vs-fanout.png"),
        "rate": ("publish_rate", "publishes per second (socket)", "p99-vs-publish-rate.png"),
    }[data["kind"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [r[key] for r in rows]
    ax.plot(xs, [r["p99"] for r in rows], "o-", label="p99 event latency")
    ax.plot(xs, [r["p50"] for r in rows], "s--", label="p50 event latency")
    for r in rows:
        ax.annotate(f"{r['events_per_s']:.0f} ev/s", (r[key], r["p99"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(label + " (log)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title(f"{data['title']} ({NOTE})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out, name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.capacity.plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", help="result prefix of a step run")
    p.add_argument("--memory", help="result prefix for the memory plot (default: the step run; an idle"
                   " Subscriber-only step run isolates the cost of a connection)")
    p.add_argument("--sweep", action="append", default=[], help="sweep JSON (repeatable)")
    p.add_argument("--out", type=Path, default=Path("loadtest/plots/capacity"))
    a = p.parse_args(argv)
    made = step_plots(a.step, a.out, a.memory) if a.step else []
    made += [sweep_plot(s, a.out) for s in a.sweep]
    for m in made:
        print(m)


if __name__ == "__main__":
    main()
