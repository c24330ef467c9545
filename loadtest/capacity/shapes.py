"""Load shapes: fixed, a step ramp that finds the knee, a reconnect spike, and a soak.

Locust uses the first LoadTestShape it finds in a locustfile and offers no headless flag to
pick another, so there is one shape class, `CapacityShape`, and `--load-shape` selects the
behaviour. Every profile cuts the run into windows and records, per window, what a planner
reads: users, p50/p99 of `event` and `connect`, events/s delivered, the failure ratio and the
load generator's CPU (a generator above ~90% measures itself, not the server). The windows
and the knee go into the tally JSON (see tally.py).

The shape runs on the master in distributed mode, where `runner.stats` is the sum of the
workers' reports (sent every 3 s): windows are therefore kept well above 3 s.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from locust import LoadTestShape

from loadtest.capacity.tally import TALLY, cpu_seconds

log = logging.getLogger("loadtest.shape")

WS = "WS"  # request_type of every WebSocket metric the locustfile fires


def percentile(hist: dict[int, int], q: float) -> float:
    """q-quantile of Locust's {rounded ms: count} histogram (the same rounding as its CSVs)."""
    n = sum(hist.values())
    if n == 0:
        return 0.0
    rank = max(1, math.ceil(n * q))
    seen = 0
    for ms in sorted(hist):
        seen += hist[ms]
        if seen >= rank:
            return float(ms)
    return float(max(hist))


class Window:
    """Stats between two instants, as the difference of two cumulative snapshots."""

    def __init__(self, runner: Any, label: str, target_users: int) -> None:
        self.runner = runner
        self.label = label
        self.target_users = target_users
        self.t0 = time.time()
        self.base = self._snap()
        self.cpu0 = _generator_cpu_seconds(runner)

    def _snap(self) -> dict[str, Any]:
        stats = self.runner.stats
        snap: dict[str, Any] = {"total": (stats.total.num_requests, stats.total.num_failures)}
        for name in ("event", "connect", "ping", "subscribe", "publish"):
            e = stats.entries.get((name, WS))
            snap[name] = (e.num_requests, e.num_failures, dict(e.response_times)) if e else (0, 0, {})
        return snap

    def _cpu_percent(self, dt: float) -> float:
        """The busiest generator process's CPU over the window (100 = one core saturated)."""
        now = _generator_cpu_seconds(self.runner)
        busy = [(now[k] - self.cpu0.get(k, now[k])) / dt * 100 for k in now]
        return round(max(busy, default=0.0), 1)

    def close(self) -> dict[str, Any]:
        now = self._snap()
        dt = max(time.time() - self.t0, 1e-6)
        row: dict[str, Any] = {
            "label": self.label, "t_start": round(self.t0, 3), "t_end": round(time.time(), 3),
            "target_users": self.target_users, "users": self.runner.user_count,
            "connected": _connected(self.runner), "generator_cpu": self._cpu_percent(dt),
            "classes": _classes(self.runner),
        }
        reqs = now["total"][0] - self.base["total"][0]
        fails = now["total"][1] - self.base["total"][1]
        row["requests"] = reqs
        row["failures"] = fails
        row["fail_ratio"] = round(fails / reqs, 5) if reqs else 0.0
        for name in ("event", "connect", "ping", "subscribe", "publish"):
            n1, f1, h1 = now[name]
            n0, f0, h0 = self.base[name]
            hist = {ms: c - h0.get(ms, 0) for ms, c in h1.items() if c - h0.get(ms, 0) > 0}
            row[name] = {
                "count": n1 - n0, "failures": f1 - f0, "per_s": round((n1 - n0) / dt, 1),
                "p50": percentile(hist, 0.50), "p99": percentile(hist, 0.99),
                "max": float(max(hist)) if hist else 0.0,
            }
        return row


def _connected(runner: Any) -> int:
    from locust.runners import MasterRunner

    if isinstance(runner, MasterRunner):
        return sum(w.get("connected", 0) for w in TALLY._workers.values())
    return TALLY.connected


def _classes(runner: Any) -> dict[str, int]:
    """Running users per class: the workers' reports on a master, the greenlets elsewhere."""
    from locust.runners import MasterRunner

    if isinstance(runner, MasterRunner):
        return dict(runner.reported_user_classes_count)
    return dict(runner.user_classes_count)


def _generator_cpu_seconds(runner: Any) -> dict[str, float]:
    """CPU seconds per load-generating process: the workers' last reports, or this process."""
    from locust.runners import MasterRunner

    if isinstance(runner, MasterRunner):
        return {cid: w.get("cpu_seconds", 0.0) for cid, w in TALLY._workers.items()}
    return {"local": cpu_seconds()}


class _Profile:
    def __init__(self, shape: CapacityShape, opts: Any) -> None:
        self.shape = shape
        self.opts = opts
        self.runner = shape.runner
        self.windows: list[dict[str, Any]] = TALLY.shape.setdefault("windows", [])
        TALLY.shape["profile"] = type(self).__name__.lower().lstrip("_")
        self.window: Window | None = None

    def open(self, label: str, target: int) -> None:
        self.window = Window(self.runner, label, target)

    def close(self) -> dict[str, Any] | None:
        if self.window is None:
            return None
        row = self.window.close()
        self.window = None
        self.windows.append(row)
        log.info("window %s: users=%s connected=%s event p99=%.0f ms events/s=%.0f fail=%.4f cpu=%.0f%%",
                 row["label"], row["users"], row["connected"], row["event"]["p99"],
                 row["event"]["per_s"], row["fail_ratio"], row["generator_cpu"])
        return row

    def tick(self, t: float) -> tuple[int, float] | None:
        raise NotImplementedError


class _Fixed(_Profile):
    """-u users at -r per second for -t (or until stopped), cut into --window windows."""

    def __init__(self, shape: CapacityShape, opts: Any) -> None:
        super().__init__(shape, opts)
        self.users = int(opts.num_users or 1)
        self.rate = float(opts.spawn_rate or self.users)
        self.next_cut = opts.window
        self.open("w0", self.users)

    def tick(self, t: float) -> tuple[int, float] | None:
        if self.opts.run_time and t >= self.opts.run_time:
            self.close()
            return None
        if t >= self.next_cut:
            self.close()
            self.open(f"w{len(self.windows)}", self.users)
            self.next_cut += self.opts.window
        return self.users, self.rate


class _Step(_Profile):
    """+step_users every step_time until p99 `event` or the failure ratio crosses its limit.

    Users spawn during the first 30% of a step; the window covers the last 60%, so the
    connect burst of a step does not pollute its steady-state latency.
    """

    def __init__(self, shape: CapacityShape, opts: Any) -> None:
        super().__init__(shape, opts)
        self.step = 0
        TALLY.shape.update(knee=None, knee_reason="", limits={
            "p99_event_ms": opts.p99_limit, "fail_ratio": opts.fail_limit,
            "step_users": opts.step_users, "step_time": opts.step_time, "step_max": opts.step_max})

    def target(self) -> int:
        return self.opts.step_users * (self.step + 1)

    def tick(self, t: float) -> tuple[int, float] | None:
        step_time = self.opts.step_time
        into = t - self.step * step_time
        if into >= step_time:
            row = self.close()
            if row is not None and self._verdict(row):
                return None
            self.step += 1
            into -= step_time
        if self.window is None and into >= 0.4 * step_time:
            self.open(f"step{self.step + 1}", self.target())
        rate = max(1.0, self.opts.step_users / (0.3 * step_time))
        return self.target(), rate

    def _verdict(self, row: dict[str, Any]) -> bool:
        """True when the ramp must stop; records the knee (the last step that held)."""
        p99, fail = row["event"]["p99"], row["fail_ratio"]
        held = [w for w in self.windows[:-1] if w["label"].startswith("step")]
        last_good = held[-1]["target_users"] if held else 0
        reason = ""
        if p99 > self.opts.p99_limit:
            reason = f"p99 event {p99:.0f} ms > {self.opts.p99_limit:.0f} ms at {row['target_users']} users"
        elif fail > self.opts.fail_limit:
            reason = f"failure ratio {fail:.4f} > {self.opts.fail_limit} at {row['target_users']} users"
        if reason:
            TALLY.shape.update(knee=last_good, knee_reason=reason, knee_window=held[-1] if held else None)
            log.warning("knee: %s users held; next step failed: %s", last_good, reason)
            return True
        if self.target() >= self.opts.step_max:
            TALLY.shape.update(knee=None, knee_reason=f"not reached up to {self.opts.step_max} users")
            return True
        return False


class _Spike(_Profile):
    """A reconnect storm: base users, then spike_users more at once, hold, back to base."""

    BASE, HOLD, AFTER = 10.0, 30.0, 10.0

    def __init__(self, shape: CapacityShape, opts: Any) -> None:
        super().__init__(shape, opts)
        self.phase = "base"
        TALLY.shape.update(spike_users=opts.spike_users, base_users=opts.spike_base)

    def tick(self, t: float) -> tuple[int, float] | None:
        base, spike = self.opts.spike_base, self.opts.spike_users
        if t < self.BASE:
            if self.window is None:
                self.open("base", base)
            return base, max(1.0, base / 5)
        if t < self.BASE + self.HOLD:
            if self.phase == "base":
                self.close()
                self.open("spike", base + spike)
                self.phase = "spike"
            # Spawn rate = spike size: Locust starts every user within about a second and each
            # one connects from on_start at once, which is the storm a hub restart produces.
            return base + spike, float(spike)
        if t < self.BASE + self.HOLD + self.AFTER:
            if self.phase == "spike":
                self.close()
                self.open("after", base)
                self.phase = "after"
            return base, float(spike)
        self.close()
        return None


class _Soak(_Profile):
    """soak_users for soak_time, one window per --window: watch p99 and memory drift."""

    def __init__(self, shape: CapacityShape, opts: Any) -> None:
        super().__init__(shape, opts)
        self.next_cut = opts.window

    def tick(self, t: float) -> tuple[int, float] | None:
        users = self.opts.soak_users
        if t >= self.opts.soak_time:
            self.close()
            return None
        if self.window is None:
            self.open(f"w{len(self.windows)}", users)
        if t >= self.next_cut:
            self.close()
            self.open(f"w{len(self.windows)}", users)
            self.next_cut += self.opts.window
        return users, max(1.0, users / 30)


PROFILE_CLASSES: dict[str, type[_Profile]] = {
    "fixed": _Fixed, "step": _Step, "spike": _Spike, "soak": _Soak}


class CapacityShape(LoadTestShape):
    """Dispatches to the profile named by --load-shape / LOADTEST_SHAPE."""

    use_common_options = True  # the fixed profile honours -u, -r and -t

    def __init__(self) -> None:
        super().__init__()
        self.profile: _Profile | None = None

    def tick(self) -> tuple[int, float] | None:
        if self.profile is None:
            opts = self.runner.environment.parsed_options
            self.profile = PROFILE_CLASSES[opts.load_shape](self, opts)
        return self.profile.tick(self.get_run_time())
