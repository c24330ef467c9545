"""The tidings under test: start one locally, and sample what it costs while Locust runs.

`LocalTidings` runs `python -m tidings run` on free loopback ports with a fresh secret and API
key, in its own process group, and stops it by PID. `Sampler` writes one CSV row per second:
the server's RSS and CPU seconds (summed over the supervisor, the hub and the workers, when the
server is local) and the counters of GET /metrics (local or remote), so memory can be plotted
against connections and deliveries per second against CPU.
"""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

import psutil

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "tidings is ready"
# Prometheus series the sampler keeps (summed over labels); names from tidings/metrics.py.
SERIES = {
    "tidings_connections": "connections",
    "tidings_subscriptions": "subscriptions",
    "tidings_deliveries_total": "deliveries",
    "tidings_hub_events_in_total": "hub_events_in",
    "tidings_slow_consumer_drops_total": "slow_consumer_drops",
    "tidings_offset_gaps_total": "server_gaps",
    "tidings_rate_limited_total": "rate_limited",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalTidings:
    """`tidings run` on loopback for the duration of a capacity run."""

    def __init__(self, workers: int, log_path: Path, runtime_dir: Path) -> None:
        self.port, self.api_port = free_port(), free_port()
        self.secret = secrets.token_hex(32)
        self.api_key = secrets.token_hex(16)
        self.workers = workers
        self.log_path = log_path
        self.runtime_dir = runtime_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, timeout: float = 30.0) -> None:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "TIDINGS_HOST": "127.0.0.1", "TIDINGS_PORT": str(self.port),
            "TIDINGS_API_PORT": str(self.api_port), "TIDINGS_WORKERS": str(self.workers),
            "TIDINGS_RUNTIME_DIR": str(self.runtime_dir), "TIDINGS_JWT_SECRET": self.secret,
            "TIDINGS_API_KEY": self.api_key, "PYTHONUNBUFFERED": "1",
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidings", "run"], env=env, cwd=REPO,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tidings exited with {self.proc.returncode}: see {self.log_path}")
            if READY_LINE in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tidings not ready after {timeout:.0f}s: see {self.log_path}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the supervisor (it drains its children); SIGKILL its group if it is late."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
            with contextlib.suppress(ProcessLookupError):  # a child that outlived the supervisor
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None


def scrape(api_url: str) -> dict[str, float]:
    """The SERIES values from GET /metrics, summed over label sets; {} when unreachable."""
    try:
        with urllib.request.urlopen(f"{api_url}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in SERIES:
            with contextlib.suppress(ValueError):
                out[SERIES[name]] = out.get(SERIES[name], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Sampler(threading.Thread):
    """Once per second: RSS and CPU of the server's process tree, and its /metrics counters."""

    # loadavg: the box's 1-minute load, because a shared machine's other work skews latency.
    FIELDS = ("time", "rss_bytes", "cpu_seconds", "processes", "loadavg", *SERIES.values())

    def __init__(self, csv_path: Path, api_url: str, pid: int | None, interval: float = 1.0) -> None:
        super().__init__(name="tidings-sampler", daemon=True)
        self.csv_path, self.api_url, self.pid, self.interval = csv_path, api_url, pid, interval
        self._stop_event = threading.Event()
        self.rows: list[dict[str, float]] = []

    def _tree(self) -> tuple[float, float, int]:
        if self.pid is None:
            return 0.0, 0.0, 0
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0, 0.0, 0
        rss = cpu = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system
        return rss, cpu, len(procs)

    def run(self) -> None:
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS, extrasaction="ignore")
            w.writeheader()
            while not self._stop_event.is_set():
                rss, cpu, n = self._tree()
                row: dict[str, float] = {"time": round(time.time(), 3), "rss_bytes": rss,
                                         "cpu_seconds": round(cpu, 3), "processes": n,
                                         "loadavg": os.getloadavg()[0]}
                row.update(scrape(self.api_url))
                self.rows.append(row)
                w.writerow(row)
                f.flush()
                self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
