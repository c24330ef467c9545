"""The scenarios: each one runs once against a started server and returns flat metrics.

A scenario starts its load-client job processes (client.py), waits until every connection is
set up, samples the server's CPU time from /proc, says "go", collects the results, samples the
CPU time again, and stops its jobs. Nothing here knows how the server works inside: the server
is a process tree, a WebSocket URL, a JWT secret and (for tidings) a hub ingress endpoint
(hub_alone hands over to hub_alone.py, which starts and drives a hub of its own).

Scenarios: fanout (and latency and hub, the same machinery), connect, idle, ping, chat (and
chat_paced: the same at a fixed rate), notify, hub_alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import client, procs
from .client import Job
from .servers import Server

SETUP_TIMEOUT = 120.0  # s: 10k handshakes + subscribes on a loaded 2-core box
RESULT_GRACE = 30.0  # s beyond a job's own deadline before the parent gives up on it
SETTLE = 0.5  # s between runs: let the server finish closing the previous run's sockets
EVENT_BYTES = 180  # the target event size; `pad` brings the baseline's frame to about this
_ENVELOPE_BYTES = 160  # a bench event's frame without pad, in the baseline's format
NOTIFY_TYPE = "notification"  # what a backend sends to one user (a documented event type)
PACED_MAX_IN_FLIGHT = 100_000  # paced runs: the rate sets the pace; this cap only stops a runaway


@dataclass
class Run:
    """One scenario run: the metrics (numbers) and notes (anything else worth printing)."""

    metrics: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total)) if total else 1
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _apportion(total: int, weights: list[int]) -> list[int]:
    """total in proportion to weights, in whole units that add up to total."""
    out = [total * w // sum(weights) for w in weights]
    for i in range(total - sum(out)):
        out[i % len(out)] += 1
    return out


def _pad(channel: str, type_: str = client.EVENT_TYPE) -> int:
    """Pad characters that bring an event on `channel` to about EVENT_BYTES on the wire."""
    return max(0, EVENT_BYTES - _ENVELOPE_BYTES - len(channel) - (len(type_) - len(client.EVENT_TYPE)))


class _CpuMeter:
    """The server tree's CPU time over a timed phase: total, user/kernel split, per process."""

    def __init__(self, server: Server) -> None:
        self.pids = server.pids()
        self.user0, self.sys0 = procs.cpu_split(self.pids)
        self.per_pid0 = {pid: procs.cpu_seconds([pid]) for pid in self.pids}
        self.per_thread0 = {pid: procs.cpu_by_thread(pid) for pid in self.pids}
        self.user = self.sys = 0.0
        self.by_process: dict[str, float] = {}
        self.by_thread: dict[str, dict[str, float]] = {}

    def stop(self) -> None:
        user1, sys1 = procs.cpu_split(self.pids)
        self.user, self.sys = user1 - self.user0, sys1 - self.sys0
        # which process spent it (hub vs each worker): the scaling model needs the split
        self.by_process = {procs.cmdline(pid)[-40:]: round(procs.cpu_seconds([pid]) - c, 3)
                           for pid, c in self.per_pid0.items()}
        # ... and which thread: Python's loop, or ZeroMQ's I/O thread (the wake-up chain)
        for pid, before in self.per_thread0.items():
            after = procs.cpu_by_thread(pid)
            spent = {name.split(":", 1)[1]: round(t - before.get(name, 0.0), 3) for name, t in after.items()}
            self.by_thread[procs.cmdline(pid)[-40:]] = {k: v for k, v in spent.items() if v > 0}

    @property
    def total(self) -> float:
        return self.user + self.sys

    @property
    def sys_share(self) -> float:
        return self.sys / self.total if self.total > 0 else math.nan


def _delivery_metrics(delivered: int, expected: int, order_errors: int, lat: list[float], cpu: _CpuMeter,
                      elapsed: float) -> dict[str, float]:
    """What every delivery scenario reports: loss, order, latency and the server's CPU."""
    return {
        "delivered": delivered,
        "expected": expected,
        "loss": max(0, expected - delivered),  # a stalled publisher's unsent events count too
        "extra": max(0, delivered - expected),
        "order_errors": order_errors,
        "lat_p50_ms": percentile(lat, 50) / 1e3,
        "lat_p99_ms": percentile(lat, 99) / 1e3,
        "lat_max_ms": max(lat, default=math.nan) / 1e3,
        "cpu_us_per_delivery": cpu.total / max(1, delivered) * 1e6,
        "server_cpu_s": cpu.total,
        "server_sys_share": cpu.sys_share,
        "elapsed_s": elapsed,
    }


@contextlib.contextmanager
def _jobs() -> Iterator[list[Job]]:
    jobs: list[Job] = []
    try:
        yield jobs
    finally:
        for job in jobs:
            job.close()


def _ready(jobs: list[Job]) -> list[dict[str, Any]]:
    return [job.recv(SETUP_TIMEOUT)[1] for job in jobs]


def _done(jobs: list[Job], timeout: float) -> list[dict[str, Any]]:
    return [job.recv(timeout + RESULT_GRACE)[1] for job in jobs]


# -- fanout (and latency, and hub: the same machinery) ------------------------------------------
def fanout(
    server: Server, *, subscribers: int, channels: int = 1, events: int = 1000, window: int = 64,
    via: str = "socket", clients: int = 2, rate: float = 0.0, probe_every: int = 50,
    timeout: float = 120.0, distinct_workers: bool = False,
    on_go: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None,
) -> Run:
    """S subscribers on C channels, P events from one publisher; deliveries/s, loss, latency."""
    if via == "hub" and not server.has_hub:
        raise ValueError("the hub publisher path needs tidings")
    chans = [f"bench:fan-{i}" for i in range(channels)]
    events -= events % channels  # whole rounds, so every subscriber expects the same count
    per_sub = events // channels
    sizes = _split(subscribers, clients)
    progress = client._CTX.Array("q", len(sizes), lock=False)
    url = f"ws://{server.host}:{server.port}/ws?token="
    base = {"url": url, "secret": server.jwt_secret, "channels": chans, "timeout": timeout,
            "total": subscribers + 1, "idle_timeout": 5.0}
    with _jobs() as jobs:
        offset = 0
        for i, n in enumerate(sizes):
            jobs.append(Job({**base, "kind": "subscribers", "index": i, "n": n, "offset": offset,
                             "expected_per_sub": per_sub, "probe_every": probe_every}, progress))
            offset += n
        infos = _ready(jobs)
        failed = sum(info["failed"] for info in infos)
        if failed:
            raise RuntimeError(f"{failed} subscriber connections failed: {infos[0]['errors']}")
        if distinct_workers:
            _check_distinct_workers(server, infos)
        pub = Job({**base, "kind": "publisher", "index": 0, "via": via, "count": events,
                   "window": window, "rate": rate, "max_in_flight": max(window, 100_000),
                   "pad": max(0, EVENT_BYTES - _ENVELOPE_BYTES - len(chans[0])),
                   "ingress": getattr(server, "ingress", None),
                   "hub_keys": getattr(server, "hub_keys", None), "offset": offset,
                   "progress_slots": [(i, n) for i, n in enumerate(sizes) if n]}, progress)
        jobs.append(pub)
        _ready([pub])
        res, cpu = _go_and_time(server, jobs, timeout, on_go, on_done, first=[pub])
        subs, p = res[:-1], res[-1]
    delivered = sum(s["received"] for s in subs)
    expected = sum(s["expected"] for s in subs)
    # events over the publisher's real send count: a stalled publisher is loss too
    end = max(s["last_change"] for s in subs)
    elapsed = max(1e-9, end - p["start"])
    lat = [x for s in subs for x in s["latency_us"]]
    frame_bytes = [s["frame_bytes"] for s in subs if s["frame_bytes"]]
    m = {
        "deliveries_per_s": delivered / elapsed,
        "events_per_s": p["sent"] / elapsed,
        **_delivery_metrics(delivered, expected, sum(s["order_errors"] for s in subs), lat, cpu, elapsed),
        "frame_bytes": sum(frame_bytes) / len(frame_bytes) if frame_bytes else math.nan,
    }
    if rate:
        m["rate_events_per_s"] = rate
    notes = {"subscribers": subscribers, "channels": channels, "events": events, "window": window,
             "via": via, "clients": len(sizes), "stalled": p["stalled"], "replies": p["replies"],
             "latency_samples": len(lat), "cpu_s_by_process": cpu.by_process, "cpu_s_by_thread": cpu.by_thread}
    return Run(m, notes)


def _check_distinct_workers(server: Server, infos: list[dict[str, Any]]) -> None:
    """The hub scenario needs its subscribers on different workers; fail loudly if not."""
    pids = server.pids()
    owners = {procs.owner_of_connection(pids, server.port, port) for info in infos for port in info["ports"]}
    if None in owners or len(owners) < 2:
        raise _SameWorker()


class _SameWorker(Exception):
    pass


def latency(server: Server, *, subscribers: int, max_events_per_s: float, loads: list[float],
            duration: float = 3.0, clients: int = 2, probe_every: int = 10, via: str = "socket",
            ) -> list[Run]:
    """fanout at fixed publish rates (fractions of the measured maximum); p50/p99/max per load."""
    runs = []
    for load in loads:
        rate = max(1.0, load * max_events_per_s)
        run = fanout(server, subscribers=subscribers, events=max(10, int(rate * duration)), rate=rate,
                     clients=clients, probe_every=probe_every, via=via, timeout=duration * 4 + 30)
        run.notes["load"] = load
        run.metrics["load"] = load
        runs.append(run)
    return runs


def hub(server: Server, *, events: int = 300_000, window: int = 4096, tries: int = 12,
        on_go: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None) -> Run:
    """events/s through the hub to 2 workers (one subscriber on each), offsets checked in order.

    Each subscriber is in its own job, so that /proc can tell which worker holds it; SO_REUSEPORT
    picks the worker by hash, so the setup is retried until there is one on each. Against the
    baseline (no hub) it is the same fan-out to 2 subscribers over the socket."""
    if not server.has_hub:
        return fanout(server, subscribers=2, events=events, window=window, clients=1, probe_every=1)
    for _ in range(tries):  # SO_REUSEPORT picks the worker by hash: retry until 1 + 1
        try:
            return fanout(server, subscribers=2, events=events, window=window, clients=2, probe_every=1,
                          via="hub", distinct_workers=True, on_go=on_go, on_done=on_done)
        except _SameWorker:
            continue
    raise RuntimeError(f"could not place 2 subscribers on 2 different workers in {tries} tries")


def _go_and_time(server: Server, jobs: list[Job], timeout: float, on_go: Callable[[], None] | None,
                 on_done: Callable[[], None] | None, first: list[Job] | None = None,
                 ) -> tuple[list[dict[str, Any]], _CpuMeter]:
    """Start every ready job at once; their results (in job order; the `first` ones are waited
    for first: publishers, whose end bounds the others') and the server tree's CPU meanwhile."""
    cpu = _CpuMeter(server)
    if on_go is not None:  # e.g. the profiler starts cProfile in the server's processes
        on_go()
    for job in jobs:
        job.send("go")
    lead = first or []
    got = dict(zip(map(id, lead), _done(lead, timeout), strict=True))
    rest = [job for job in jobs if id(job) not in got]
    got.update(zip(map(id, rest), _done(rest, timeout), strict=True))
    cpu.stop()
    if on_done is not None:
        on_done()
    return [got[id(job)] for job in jobs], cpu


# -- connect -----------------------------------------------------------------------------------
def connect(server: Server, *, connections: int = 5000, concurrency: int = 128, clients: int = 2,
            on_go: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None) -> Run:
    url = f"ws://{server.host}:{server.port}/ws?token="
    sizes = _split(connections, clients)
    with _jobs() as jobs:
        offset = 0
        for i, n in enumerate(sizes):
            jobs.append(Job({"kind": "connect", "index": i, "n": n, "url": url, "offset": offset,
                             "total": connections, "secret": server.jwt_secret,
                             "concurrency": max(1, concurrency // len(sizes))}))
            offset += n
        _ready(jobs)
        res, cpu = _go_and_time(server, jobs, SETUP_TIMEOUT, on_go, on_done)
    ok = sum(r["ok"] for r in res)
    elapsed = max(r["end"] for r in res) - min(r["start"] for r in res)
    lat = [x for r in res for x in r["latency_us"]]
    m = {"handshakes_per_s": ok / elapsed, "ok": ok, "failed": sum(r["failed"] for r in res),
         "hs_p50_ms": percentile(lat, 50) / 1e3, "hs_p99_ms": percentile(lat, 99) / 1e3,
         "cpu_us_per_handshake": cpu.total / max(1, ok) * 1e6, "elapsed_s": elapsed}
    return Run(m, {"connections": connections, "concurrency": concurrency, "cpu_s_by_thread": cpu.by_thread,
                   "errors": [e for r in res for e in r["errors"]][:5]})


# -- idle --------------------------------------------------------------------------------------
def idle(server: Server, *, connections: int = 10_000, channels: int = 100, clients: int = 2,
         settle: float = 2.0) -> Run:
    """N idle subscribed connections; the server tree's RSS growth per connection in KiB."""
    url = f"ws://{server.host}:{server.port}/ws?token="
    chans = [f"bench:idle-{i}" for i in range(channels)]
    time.sleep(settle)
    pids = server.pids()
    rss0 = procs.rss_kib(pids)
    sizes = _split(connections, clients)
    with _jobs() as jobs:
        offset = 0
        for i, n in enumerate(sizes):
            jobs.append(Job({"kind": "subscribers", "index": i, "n": n, "url": url, "offset": offset,
                             "total": connections, "secret": server.jwt_secret, "channels": chans,
                             "expected_per_sub": 0, "probe_every": 10**9, "timeout": 0,
                             "concurrency": 200}))
            offset += n
        infos = _ready(jobs)
        time.sleep(settle)  # let the server's allocations and the hub's subscriptions settle
        pids = server.pids()
        rss1 = procs.rss_kib(pids)
        per_process = {procs.cmdline(pid)[-60:]: procs.rss_kib([pid]) for pid in pids}
    ok = sum(info["connected"] for info in infos)
    m = {"kib_per_connection": (rss1 - rss0) / max(1, ok), "connected": ok,
         "failed": sum(info["failed"] for info in infos), "rss_before_mib": rss0 / 1024,
         "rss_after_mib": rss1 / 1024}
    return Run(m, {"connections": connections, "channels": channels, "rss_by_process_kib": per_process})


# -- ping --------------------------------------------------------------------------------------
def ping(server: Server, *, connections: int = 100, duration: float = 5.0, clients: int = 2,
         on_go: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None) -> Run:
    url = f"ws://{server.host}:{server.port}/ws?token="
    sizes = _split(connections, clients)
    with _jobs() as jobs:
        offset = 0
        for i, n in enumerate(sizes):
            jobs.append(Job({"kind": "ping", "index": i, "n": n, "url": url, "offset": offset,
                             "total": connections, "secret": server.jwt_secret, "duration": duration}))
            offset += n
        _ready(jobs)
        res, cpu = _go_and_time(server, jobs, duration, on_go, on_done)
    replies = sum(r["replies"] for r in res)
    elapsed = max(r["elapsed"] for r in res)
    lat = [x for r in res for x in r["latency_us"]]
    m = {"replies_per_s": replies / elapsed, "replies": replies, "bad": sum(r["bad"] for r in res),
         "rtt_p50_ms": percentile(lat, 50) / 1e3, "rtt_p99_ms": percentile(lat, 99) / 1e3,
         "cpu_us_per_reply": cpu.total / max(1, replies) * 1e6}
    return Run(m, {"connections": connections, "duration": duration, "cpu_s_by_thread": cpu.by_thread})


# -- chat and chat_paced -----------------------------------------------------------------------
def chat(server: Server, *, connections: int = 2000, events: int = 100_000, window: int = 128,
         rate: float = 0.0, duration: float = 5.0, clients: int = 2, probe_every: int = 10,
         timeout: float = 120.0, on_go: Callable[[], None] | None = None,
         on_done: Callable[[], None] | None = None) -> Run:
    """N connections on N/2 channels of 2 members; one member of each publishes over its socket.

    Windowed: at most `window` publishes (over all jobs) without their `published` reply yet.
    With `rate` (chat_paced): rate events/s in total for `duration` s, and `events` is unused.
    Both members of a pair live in the same job process, so each job knows what it must receive."""
    pairs = connections // 2
    if pairs < 1:
        raise ValueError("chat needs at least 2 connections")
    if rate:
        events = max(1, round(rate * duration))
    pair_sizes = _split(pairs, clients)
    counts = _apportion(events, pair_sizes)
    windows = _apportion(window, pair_sizes)
    url = f"ws://{server.host}:{server.port}/ws?token="
    base = {"kind": "chat", "url": url, "secret": server.jwt_secret, "total": 2 * pairs,
            "timeout": timeout, "idle_timeout": 5.0, "probe_every": probe_every,
            "pad": _pad(f"bench:chat-{pairs - 1}")}
    with _jobs() as jobs:
        offset = 0
        for i, (n, count, win) in enumerate(zip(pair_sizes, counts, windows, strict=True)):
            jobs.append(Job({**base, "index": i, "n": 2 * n, "pair_offset": offset, "offset": 2 * offset,
                             "count": count, "window": PACED_MAX_IN_FLIGHT if rate else max(1, win),
                             "rate": rate * n / pairs}))
            offset += n
        _ready(jobs)
        res, cpu = _go_and_time(server, jobs, timeout, on_go, on_done)
    sent = sum(r["sent"] for r in res)
    delivered = sum(r["received"] for r in res)
    expected = sum(r["expected"] for r in res)  # 2 per event sent: both members, publisher included
    elapsed = max(1e-9, max(r["end"] for r in res) - min(r["start"] for r in res))
    lat = [x for r in res for x in r["latency_us"]]
    frame_bytes = [r["frame_bytes"] for r in res if r["frame_bytes"]]
    m = {
        "deliveries_per_s": delivered / elapsed,
        "events_per_s": sent / elapsed,
        "events": sent,
        **_delivery_metrics(delivered, expected, sum(r["order_errors"] for r in res), lat, cpu, elapsed),
        "unacked": sent - sum(r["acks"] for r in res),  # publishes whose `published` never came
        "other_frames": sum(r["other_frames"] for r in res),  # neither event nor reply: errors
        "cpu_us_per_event": cpu.total / max(1, sent) * 1e6,
        "frame_bytes": sum(frame_bytes) / len(frame_bytes) if frame_bytes else math.nan,
    }
    if rate:
        m["rate_events_per_s"] = rate
    notes = {"connections": 2 * pairs, "channels": pairs, "events": events, "clients": len(pair_sizes),
             "stalled": any(r["stalled"] for r in res), "latency_samples": len(lat),
             "cpu_s_by_process": cpu.by_process, "cpu_s_by_thread": cpu.by_thread}
    notes.update({"rate": rate, "duration": duration} if rate else {"window": window})
    return Run(m, notes)


# -- notify ------------------------------------------------------------------------------------
def notify(server: Server, *, connections: int = 5000, events: int = 200_000, window: int = 256,
           publishers: int = 2, probe_every: int = 10, timeout: float = 120.0,
           on_go: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None) -> Run:
    """N connections holding only their personal channel user:<sub>; a backend notifies each in turn.

    `publishers` subscriber processes, each with its own hub.Publisher process that notifies only
    that process's users, round-robin, with `window` notifications not yet received (read from
    the subscriber process's shared progress slot)."""
    if not server.has_hub or server.ingress is None:
        raise ValueError("notify publishes through hub.Publisher: it needs tidings")
    sizes = _split(connections, publishers)
    per_user = max(1, events // connections)  # whole rounds: every user expects the same count
    progress = client._CTX.Array("q", len(sizes), lock=False)
    url = f"ws://{server.host}:{server.port}/ws?token="
    base = {"url": url, "secret": server.jwt_secret, "timeout": timeout, "total": connections,
            "idle_timeout": 5.0, "event_type": NOTIFY_TYPE}
    prefixes = [f"bench-n{i}-" for i in range(len(sizes))]
    with _jobs() as jobs:
        offset = 0
        for i, n in enumerate(sizes):
            # no channels: the job subscribes nothing, tidings joins user:<sub> at connect
            jobs.append(Job({**base, "kind": "subscribers", "index": i, "n": n, "offset": offset,
                             "channels": [], "sub_prefix": prefixes[i], "expected_per_sub": per_user,
                             "probe_every": probe_every, "concurrency": 200}, progress))
            offset += n
        infos = _ready(jobs)
        failed = sum(info["failed"] for info in infos)
        if failed:
            raise RuntimeError(f"{failed} notify connections failed: {infos[0]['errors']}")
        subs = list(jobs)
        for i, n in enumerate(sizes):
            users = [f"user:{prefixes[i]}{k}" for k in range(n)]
            jobs.append(Job({**base, "kind": "publisher", "index": i, "via": "hub", "ingress": server.ingress,
                             "hub_keys": server.hub_keys, "channels": users, "count": per_user * n, "window": window,
                             "pad": _pad(users[-1], NOTIFY_TYPE), "progress_slots": [(i, n)]}, progress))
        pubs = jobs[len(subs):]
        _ready(pubs)
        res, cpu = _go_and_time(server, jobs, timeout, on_go, on_done, first=pubs)
        s_res, p_res = res[:len(subs)], res[len(subs):]
    sent = sum(p["sent"] for p in p_res)
    delivered = sum(s["received"] for s in s_res)
    expected = sum(s["expected"] for s in s_res)
    elapsed = max(1e-9, max(s["last_change"] for s in s_res) - min(p["start"] for p in p_res))
    lat = [x for s in s_res for x in s["latency_us"]]
    m = {
        "events_per_s": delivered / elapsed,
        "events": sent,
        **_delivery_metrics(delivered, expected, sum(s["order_errors"] for s in s_res), lat, cpu, elapsed),
        "cpu_us_per_event": cpu.total / max(1, sent) * 1e6,
    }
    notes = {"connections": connections, "events": per_user * connections, "window": window,
             "publishers": len(sizes), "stalled": any(p["stalled"] for p in p_res),
             "latency_samples": len(lat), "cpu_s_by_process": cpu.by_process, "cpu_s_by_thread": cpu.by_thread}
    return Run(m, notes)


# -- hub_alone ---------------------------------------------------------------------------------
def hub_alone(*, events: int = 300_000, env: dict[str, str] | None = None) -> Run:
    """The hub by itself (hub_alone.py starts its own `tidings hub`): hub events per hub CPU-second."""
    from . import hub_alone as alone  # raw ZeroMQ and the hub's envelope: this scenario only

    r = alone.measure(events, env)
    m = {"hub_events_per_cpu_s": r["hub_events_per_cpu_s"], "hub_cpu_us_per_event": r["hub_cpu_us_per_event"],
         "hub_cpu_s": r["hub_cpu_s"], "publisher_per_s": r["publisher_per_s"],
         "subscriber_per_s": min(r["subscriber_per_s"]), "events": r["events"]}
    return Run(m, {"events": events, "subscriber_per_s": r["subscriber_per_s"]})
