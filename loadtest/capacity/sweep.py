"""Parameter sweeps behind CAPACITY.md: p99 vs fan-out, and p99 vs publish rate.

    python -m loadtest.capacity.sweep fanout   # 400 subscribers, 20 publishes/s, 1..200 per channel
    python -m loadtest.capacity.sweep rate     # 200 subscribers, 10 per channel, 10..400 publishes/s

Each point is a fixed run of `python -m loadtest` against a fresh local tidings. A run lasts
--seconds; its first window (ramp-up, connection storm) is discarded and the second one,
in steady state, is reported. Results: loadtest/results/sweep-<kind>.json, which
`python -m loadtest.capacity.plots --sweep ...` turns into a PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from loadtest.capacity.run import RESULTS
from loadtest.capacity.run import main as run_main
from loadtest.capacity.summary import read_server, read_tally

# kind -> (title, points); a point is (subscribers, channels, publishers, rate per publisher).
SWEEPS: dict[str, tuple[str, list[tuple[int, int, int, float]]]] = {
    "fanout": ("p99 vs subscribers per channel, 20 publishes/s",
               [(400, 400, 20, 1.0), (400, 40, 20, 1.0), (400, 8, 20, 1.0), (400, 2, 20, 1.0)]),
    "rate": ("p99 vs publish rate, 10 subscribers per channel",
             [(200, 20, 40, 0.25), (200, 20, 40, 1.0), (200, 20, 40, 2.5), (200, 20, 40, 5.0),
              (200, 20, 40, 10.0)]),
}


def server_cpu(prefix: Path, t0: float, t1: float) -> float:
    """Server CPU (percent of one core) between two instants, from the 1 s samples."""
    rows = [r for r in read_server(prefix) if t0 <= r["time"] <= t1 and "cpu_seconds" in r]
    if len(rows) < 2:
        return 0.0
    return round((rows[-1]["cpu_seconds"] - rows[0]["cpu_seconds"]) / (rows[-1]["time"] - rows[0]["time"]) * 100, 1)


def point(kind: str, subs: int, channels: int, pubs: int, rate: float, seconds: int,
          results: Path) -> dict[str, Any]:
    name = f"sweep-{kind}-{subs}s-{channels}c-{pubs}x{rate:g}"
    window = seconds // 2 - 1
    run_main([
        "--shape", "fixed", "-u", str(subs + pubs), "-r", "100", "-t", f"{seconds}s", "--window", str(window),
        "--results", str(results), "--name", name,
        "--mix", f"Subscriber={subs},ChatPublisher={pubs},BackendPublisher=0,Churn=0",
        "--channels", str(channels), "--channels-per-user", "1", "--channel-skew", "0",
        "--chat-rate", str(rate), "--ping-interval", "10",
    ])
    tally = read_tally(results / name)
    w = tally["shape"]["windows"][1]  # steady state: the window after the ramp
    return {
        "subscribers": subs, "channels": channels, "subscribers_per_channel": subs / channels,
        "publish_rate": w["publish"]["per_s"], "events_per_s": w["event"]["per_s"],
        "p50": w["event"]["p50"], "p99": w["event"]["p99"], "max": w["event"]["max"],
        "fail_ratio": w["fail_ratio"], "generator_cpu": w["generator_cpu"],
        "server_cpu": server_cpu(results / name, w["t_start"], w["t_end"]),
        "gaps": tally["counts"].get("gaps", 0),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.capacity.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=sorted(SWEEPS))
    p.add_argument("--seconds", type=int, default=26, help="seconds per point (two windows and a bit)")
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    title, points = SWEEPS[a.kind]
    rows = [point(a.kind, *pt, a.seconds, a.results) for pt in points]
    out = a.results / f"sweep-{a.kind}.json"
    out.write_text(json.dumps({"kind": a.kind, "title": title, "rows": rows}, indent=2) + "\n")
    print(f"\n{title}")
    print(f"{'subs/chan':>9} {'pub/s':>7} {'events/s':>9} {'p50':>6} {'p99':>6} {'fail':>7} {'srv cpu':>8} "
          f"{'gen cpu':>8}")
    for r in rows:
        print(f"{r['subscribers_per_channel']:>9.0f} {r['publish_rate']:>7.0f} {r['events_per_s']:>9.0f} "
              f"{r['p50']:>6.0f} {r['p99']:>6.0f} {r['fail_ratio']:>7.4f} {r['server_cpu']:>7.0f}% "
              f"{r['generator_cpu']:>7.0f}%")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
