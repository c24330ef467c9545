"""Prometheus metrics, aggregated across processes with prometheus_client's multiprocess mode.

The hot path never touches prometheus_client: hub and workers count into plain ints and dicts
(`Stats`), and `StatsExporter.flush()` moves the deltas into the shared metric files once per
second. Each process writes its own files under the metrics directory; GET /metrics on any
worker's API port sums them.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

# stats attribute -> (metric name, help, label names). Counters only ever grow.
COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "connections_opened": ("tidings_connections_opened_total", "WebSocket connections accepted", ()),
    "connections_closed": ("tidings_connections_closed_total", "connections ended, by close code", ("code",)),
    "auth_failures": ("tidings_auth_failures_total", "refused tokens, by reason", ("reason",)),
    "commands": ("tidings_commands_total", "client commands, by type and result", ("type", "result")),
    "rate_limited": ("tidings_rate_limited_total", "commands refused with rate_limited", ()),
    "events_in": ("tidings_worker_events_in_total", "events a worker received from the hub", ()),
    "deliveries": ("tidings_deliveries_total", "event frames handed to client connections", ()),
    "slow_consumer_drops": ("tidings_slow_consumer_drops_total", "connections aborted over the pending cap", ()),
    "gaps": ("tidings_offset_gaps_total", "events missed between hub and worker (offset jumps)", ()),
    "publishes_failed": ("tidings_publishes_failed_total", "publishes the hub could not take", ()),
    "hub_events_in": ("tidings_hub_events_in_total", "events the hub accepted", ()),
    "hub_events_dropped": ("tidings_hub_events_dropped_total", "ingress messages the hub refused", ("reason",)),
    "hub_subscribes": ("tidings_hub_subscribe_messages_total", "worker subscribe/unsubscribe messages",
                       ("op",)),
    "history_evicted": ("tidings_history_evicted_channels_total",
                        "channels whose kept events the history byte budget dropped (oldest first)", ()),
    "history_expired": ("tidings_history_expired_events_total", "kept events dropped by their namespace's TTL", ()),
    "history_dropped": ("tidings_history_dropped_channels_total",
                        "channels whose position (top offset, epoch) passed the metadata TTL", ()),
    "history_reads": ("tidings_history_reads_total", "history reads at the hub, by who asked and result",
                      ("source", "result")),
    "recoveries": ("tidings_recoveries_total", "subscribes with `since`, by result", ("result",)),
    "heals": ("tidings_gap_heals_total", "worker offset gaps, by how they ended (healed from history or signalled)",
              ("result",)),
    "confirmed_publishes": ("tidings_confirmed_publishes_total", "publishes the hub stamped and answered", ()),
    "hub_links": ("tidings_hub_link_events_total", "worker links at the hubs: up, lost (closed or heartbeat "
                  "timeout), refused (handshake: unknown key, not CURVE)", ("event",)),
    "worker_hub_links": ("tidings_worker_hub_link_events_total", "a worker's links to each hub shard going up, "
                         "lost, or refused (handshake)", ("shard", "event")),
}
# stats attribute -> (metric name, help). Gauges are summed over live processes.
GAUGES: dict[str, tuple[str, str]] = {
    "connections": ("tidings_connections", "open client connections"),
    "subscriptions": ("tidings_subscriptions", "client subscriptions (connection x channel)"),
    "channels": ("tidings_worker_channels", "channels with local subscribers, summed over workers"),
    "hub_topics": ("tidings_worker_hub_topics", "channels workers hold subscribed at the hub"),
    "hub_channels": ("tidings_hub_channels", "channels at least one worker subscribes to (hub view)"),
    "hub_ingress_queue": ("tidings_hub_ingress_queued", "messages read in the hub's last drain pass"),
    "history_bytes": ("tidings_history_bytes", "bytes of kept events at the hub (against TIDINGS_HISTORY_MAX_BYTES)"),
    "history_channels": ("tidings_history_channels", "channels with a position (top offset, epoch) at the hub"),
    "hub_peers": ("tidings_hub_worker_links", "worker links up at the hubs, summed over shards"),
    "hubs_down": ("tidings_worker_hubs_down", "hub shards workers have no link to, summed over workers: above 0, "
                  "those shards' channels cannot be published or newly subscribed"),
    "process_resident_bytes": ("tidings_process_resident_bytes", "resident memory, summed over processes"),
    "process_cpu_seconds": ("tidings_process_cpu_seconds", "CPU time used, summed over live processes"),
}
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def prepare_metrics_dir(path: Path, *, wipe: bool) -> None:
    """Point prometheus_client at the shared directory; must run before it is imported.
    Live gauges of processes that died without cleaning up (SIGKILL, watchdog) are removed, so
    `tidings_connections` never counts a dead worker's clients."""
    if wipe and path.exists():
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    for f in path.glob("gauge_live*_*.db"):
        pid = f.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            f.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


class Stats:
    """Plain counters the hot path increments; no locks, no I/O."""

    def __init__(self) -> None:
        self.connections_opened = 0
        self.connections_closed: Counter[str] = Counter()
        self.auth_failures: Counter[str] = Counter()
        self.commands: Counter[tuple[str, str]] = Counter()
        self.rate_limited = 0
        self.events_in = 0
        self.deliveries = 0
        self.slow_consumer_drops = 0
        self.gaps = 0
        self.publishes_failed = 0
        self.hub_events_in = 0
        self.hub_events_dropped: Counter[str] = Counter()
        self.hub_subscribes: Counter[str] = Counter()
        self.history_evicted = 0
        self.history_expired = 0
        self.history_dropped = 0
        self.history_reads: Counter[tuple[str, str]] = Counter()
        self.recoveries: Counter[str] = Counter()
        self.heals: Counter[str] = Counter()
        self.confirmed_publishes = 0
        self.hub_links: Counter[str] = Counter()
        self.worker_hub_links: Counter[tuple[str, str]] = Counter()
        self.hub_peers = 0
        self.hubs_down = 0
        self.history_bytes = 0
        self.history_channels = 0
        self.connections = 0
        self.subscriptions = 0
        self.channels = 0
        self.hub_topics = 0
        self.hub_channels = 0
        self.hub_ingress_queue = 0
        self.process_resident_bytes = 0
        self.process_cpu_seconds = 0.0
        self.latency_samples: list[float] = []


class StatsExporter:
    """Copies `Stats` into prometheus_client metrics; call `flush()` about once a second."""

    def __init__(self, stats: Stats) -> None:
        from prometheus_client import Counter as PCounter
        from prometheus_client import Gauge, Histogram

        self.stats = stats
        self._counters: dict[str, Any] = {
            attr: PCounter(name, doc, labels) for attr, (name, doc, labels) in COUNTERS.items()
        }
        self._gauges: dict[str, Any] = {
            attr: Gauge(name, doc, multiprocess_mode="livesum") for attr, (name, doc) in GAUGES.items()
        }
        self._latency = Histogram(
            "tidings_delivery_latency_seconds", "hub stamp to worker send, sampled once per drain pass",
            buckets=LATENCY_BUCKETS,
        )
        self._sent: dict[str, Any] = {attr: Counter() for attr in COUNTERS}

    def flush(self) -> None:
        s = self.stats
        # Memory and CPU in /metrics, so a remote load generator can size the box too.
        try:
            with open("/proc/self/statm") as fh:
                s.process_resident_bytes = int(fh.read().split()[1]) * PAGE_SIZE
        except OSError:
            pass
        times = os.times()
        s.process_cpu_seconds = times.user + times.system
        for attr, metric in self._counters.items():
            value = getattr(s, attr)
            sent = self._sent[attr]
            if isinstance(value, Counter):
                for key, total in value.items():
                    delta = total - sent[key]
                    if delta:
                        labels = key if isinstance(key, tuple) else (key,)
                        metric.labels(*labels).inc(delta)
                        sent[key] = total
            else:
                delta = value - sent[None]
                if delta:
                    metric.inc(delta)
                    sent[None] = value
        for attr, gauge in self._gauges.items():
            gauge.set(getattr(s, attr))
        for sample in s.latency_samples:
            self._latency.observe(sample)
        s.latency_samples.clear()


def mark_process_dead(pid: int) -> None:
    """Drop a dead child's live gauges (called by the supervisor)."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid)
    except OSError:
        pass


def render_metrics() -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
