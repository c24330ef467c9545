"""The short report printed after a run, built from the files Locust and the run left behind.

    python -m loadtest.capacity.summary loadtest/results/step-20261127-235000

reads <prefix>_stats.csv, <prefix>_failures.csv, <prefix>_tidings.json and (if present)
<prefix>_server.csv.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

WS_METRICS = ("connect", "subscribe", "ping", "publish", "event")


def read_stats(prefix: str | Path) -> list[dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_failures(prefix: str | Path) -> list[dict[str, str]]:
    path = Path(f"{prefix}_failures.csv")
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_tally(prefix: str | Path) -> dict[str, Any]:
    path = Path(f"{prefix}_tidings.json")
    return json.loads(path.read_text()) if path.exists() else {}


def read_server(prefix: str | Path) -> list[dict[str, float]]:
    path = Path(f"{prefix}_server.csv")
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def memory_per_connection(server: list[dict[str, float]]) -> tuple[float, float] | None:
    """(baseline RSS bytes, bytes per connection) by least squares over the samples, or None.

    Only the samples up to the peak of connections count: after it, clients leave but the
    freed memory stays in the processes' heaps, which says nothing about the cost of one.
    """
    rows = [r for r in server if "connections" in r and r.get("rss_bytes")]
    if not rows:
        return None
    top = max(range(len(rows)), key=lambda i: rows[i]["connections"])
    pts = [(r["connections"], r["rss_bytes"]) for r in rows[: top + 1]]
    if len(pts) < 3 or max(p[0] for p in pts) - min(p[0] for p in pts) < 50:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return my - slope * mx, slope


def summarize(prefix: str | Path, target: str = "") -> str:
    stats = read_stats(prefix)
    tally = read_tally(prefix)
    server = read_server(prefix)
    shape = tally.get("shape", {})
    counts = tally.get("counts", {})
    windows = shape.get("windows", [])
    out: list[str] = []
    add = out.append
    add(f"tidings capacity run: shape={shape.get('profile', '?')}"
        + (f" target={target}" if target else "") + f" duration={tally.get('duration', 0):.0f}s"
        + (f" locust workers={tally['workers']}" if tally.get("workers") else ""))
    peak_users = max((w.get("users", 0) for w in windows), default=0)
    add(f"peak users held: {tally.get('peak_connected', 0)} sockets open"
        f" ({peak_users} Locust users at the busiest window)")

    by_name = {(r["Type"], r["Name"]): r for r in stats}
    ev = by_name.get(("WS", "event"))
    best = max((w["event"]["per_s"] for w in windows if "event" in w), default=0.0)
    rate = float(ev["Requests/s"]) if ev else 0.0
    add(f"events delivered: {counts.get('events', 0)} ({rate:.0f}/s over the run,"
        f" {best:.0f}/s in the best window); gaps: {counts.get('gaps', 0)}"
        f" (events missed: {counts.get('missed', 0)}), duplicates: {counts.get('duplicates', 0)}")

    add("")
    add(f"{'metric':<30} {'count':>9} {'fails':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'per s':>8}")
    for r in stats:
        if r["Name"] == "Aggregated":
            continue
        label = r["Name"] if r["Type"] == "WS" else f"{r['Type']} {r['Name']}"
        add(f"{label:<30} {int(r['Request Count']):>9} {int(r['Failure Count']):>7} {r['50%']:>8} "
            f"{r['99%']:>8} {float(r['Max Response Time']):>8.0f} {float(r['Requests/s']):>8.1f}")
    missing = [m for m in WS_METRICS if ("WS", m) not in by_name]
    if missing:
        add(f"(no samples for: {', '.join(missing)})")
    add("`event` latency compares the publisher's and the subscriber's clocks: valid only with both on one")
    add("host or on synced (NTP/PTP) hosts.")

    add("")
    fails: Counter[str] = Counter()
    for f in read_failures(prefix):
        fails[f"{f['Name']}: {f['Error']}"] += int(f["Occurrences"])
    if fails:
        add("failures by code: " + "; ".join(f"{k} x{v}" for k, v in fails.most_common(8)))
    else:
        add("failures by code: none")
    if tally.get("closes"):
        add("unexpected closes: " + ", ".join(f"{c} x{n}" for c, n in sorted(tally["closes"].items())))
    if tally.get("errors"):
        add("protocol errors: " + ", ".join(f"{c} x{n}" for c, n in sorted(tally["errors"].items())))

    if shape.get("profile") == "step":
        limits = shape.get("limits", {})
        knee = shape.get("knee")
        kw = shape.get("knee_window") or {}
        if knee:
            add(f"knee: {knee} users held (p99 event {kw.get('event', {}).get('p99', 0):.0f} ms,"
                f" {kw.get('event', {}).get('per_s', 0):.0f} events/s, {kw.get('connected', 0)} sockets);"
                f" next step: {shape.get('knee_reason')}")
        elif knee == 0:
            add(f"knee: below the first step ({shape.get('knee_reason')})")
        else:
            add(f"knee: {shape.get('knee_reason', 'not reached')}"
                f" (limits: p99 event {limits.get('p99_event_ms')} ms,"
                f" failure ratio {limits.get('fail_ratio')})")
        if windows:
            add(f"{'step users':>10} {'sockets':>8} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
                f"{'fail':>7} {'gen cpu':>8}")
            for w in windows:
                add(f"{w['target_users']:>10} {w['connected']:>8} {w['event']['per_s']:>9.0f} "
                    f"{w['event']['p50']:>7.0f} {w['event']['p99']:>7.0f} {w['fail_ratio']:>7.4f} "
                    f"{w['generator_cpu']:>7.0f}%")
    elif shape.get("profile") == "spike":
        spike = next((w for w in windows if w["label"] == "spike"), None)
        if spike:
            c = spike["connect"]
            add(f"spike: {shape.get('spike_users')} users at once: {c['count']} connects,"
                f" {c['failures']} failed,"
                f" p50 {c['p50']:.0f} ms, p99 {c['p99']:.0f} ms, slowest {c['max']:.0f} ms"
                f" (~{c['count'] / max(c['max'] / 1000, 0.001):.0f} connects/s while the storm lasted)")

    if server:
        # RSS at the most connections, not the RSS peak: freed memory is not returned to the
        # OS at once, so the highest RSS often comes after the clients have gone.
        peak = max(server, key=lambda r: (r.get("connections", 0), r.get("rss_bytes", 0)))
        if peak.get("rss_bytes"):
            add(f"server: {peak['rss_bytes'] / 2**20:.0f} MiB RSS over {int(peak.get('processes', 0))}"
                f" processes at the peak of {int(peak.get('connections', 0))} connections")
        fit = memory_per_connection(server)
        if fit:
            add(f"server memory: {fit[0] / 2**20:.0f} MiB baseline + {fit[1] / 1024:.1f} KiB per connection")
        loads = [r["loadavg"] for r in server if "loadavg" in r]
        if loads:
            add(f"box load average (1 min) during the run: {sum(loads) / len(loads):.1f} mean,"
                f" {max(loads):.1f} max, on {os.cpu_count()} CPUs")
        busy = [r for r in server if r.get("cpu_seconds")]
        if len(busy) > 2 and busy[-1].get("deliveries"):
            cpu = busy[-1]["cpu_seconds"] - busy[0]["cpu_seconds"]
            dl = busy[-1]["deliveries"] - busy[0].get("deliveries", 0)
            if cpu > 0:
                add(f"server: {dl:.0f} deliveries on {cpu:.1f} CPU-seconds = {dl / cpu:.0f} deliveries/s per"
                    " busy core (whole run, hub included)")
    add("")
    add(f"reports: {prefix}_stats.csv, {prefix}_stats_history.csv, {prefix}_failures.csv, "
        f"{prefix}_tidings.json, {prefix}.html")
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
