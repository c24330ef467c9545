"""Run-wide counters that Locust's request stats cannot hold: events, offset gaps, close codes.

Each Locust process counts into its own `TALLY`. Workers attach a cumulative snapshot to
every stats report (`report_to_master`); the master keeps the latest snapshot per worker and
sums them, so a lost or late report never double-counts. The master (or the only process in
local mode) writes the merged result, plus what the load shape recorded (steps, the knee),
to a JSON file next to the CSV reports when Locust quits.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger("loadtest.tally")


class Tally:
    def __init__(self) -> None:
        # Present even when zero, so a report can say "gaps: 0" rather than omit the line.
        self.counts: Counter[str] = Counter(dict.fromkeys(
            ("events", "gaps", "missed", "duplicates", "epoch_changes", "connects"), 0))
        self.closes: Counter[str] = Counter()  # unexpected close code -> how many
        self.errors: Counter[str] = Counter()  # protocol error code -> how many
        self.connected = 0  # gauge: sockets open right now in this process
        self.peak_connected = 0
        self.shape: dict[str, Any] = {}  # filled by the load shape on the master
        self.started = time.time()
        self._workers: dict[str, dict[str, Any]] = {}
        self._peak_sum = 0

    # -- counting (called from user greenlets; gevent never preempts between bytecodes that matter)
    def opened(self) -> None:
        self.connected += 1
        self.peak_connected = max(self.peak_connected, self.connected)

    def closed(self) -> None:
        self.connected -= 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts), "closes": dict(self.closes), "errors": dict(self.errors),
            "connected": self.connected, "peak_connected": self.peak_connected,
            "cpu_seconds": cpu_seconds(),
        }

    # -- the master side ------------------------------------------------------------------
    def worker_report(self, client_id: str, data: dict[str, Any]) -> None:
        snap = data.get("tidings")
        if snap is None:
            return
        self._workers[client_id] = snap
        # The sum of the workers' current gauges is the run's connection count right now.
        self._peak_sum = max(self._peak_sum, sum(w["connected"] for w in self._workers.values()))

    def merged(self) -> dict[str, Any]:
        snaps = list(self._workers.values()) or [self.snapshot()]
        out: dict[str, Any] = {"counts": Counter(), "closes": Counter(), "errors": Counter()}
        for s in snaps:
            for key in ("counts", "closes", "errors"):
                out[key].update(s[key])
        peak = self._peak_sum if self._workers else self.peak_connected
        return {
            "counts": dict(out["counts"]), "closes": dict(out["closes"]), "errors": dict(out["errors"]),
            "peak_connected": peak, "workers": len(self._workers),
            "duration": round(time.time() - self.started, 1), "shape": self.shape,
        }

    def write(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.merged(), indent=2, sort_keys=True) + "\n")
        log.info("tidings tally written to %s", p)


def cpu_seconds() -> float:
    """CPU time of this process; Locust's own cpu_percent sample is too coarse for short windows."""
    t = os.times()
    return t.user + t.system


TALLY = Tally()


def install(environment: Any) -> None:
    """Hook TALLY into Locust's events for this process's role."""
    from locust.runners import MasterRunner, WorkerRunner

    events = environment.events
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        events.report_to_master.add_listener(
            lambda client_id, data: data.__setitem__("tidings", TALLY.snapshot()))
        return
    if isinstance(runner, MasterRunner):
        events.worker_report.add_listener(TALLY.worker_report)
    opts = environment.parsed_options
    target = getattr(opts, "tally_file", "") or (
        f"{opts.csv_prefix}_tidings.json" if getattr(opts, "csv_prefix", None) else "")
    if target:
        # quitting comes after the workers' final reports, so the file holds the complete run.
        events.quitting.add_listener(lambda environment, **_: TALLY.write(target))
