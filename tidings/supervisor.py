"""`tidings run`: the hub shards and N workers as child processes, for a laptop or one box of a
multi-host setup (TIDINGS_ROLE=hubs or workers starts one side only).

The supervisor only moves signals and restarts children. Children report READY/STOPPING over
sd_notify to the supervisor's own datagram socket (the same messages systemd receives in
production), so the supervisor knows when the whole service serves.

Signals: INT/TERM stop everything (workers drain first, then the hub), HUP is passed on to the
children (key reload). A child that dies is restarted with a backoff that starts small (a
worker is back well within 2 s) and doubles while it keeps dying.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from tidings.config import Config
from tidings.metrics import mark_process_dead, prepare_metrics_dir

RESTART_BACKOFF_MIN = 0.2  # seconds before the first restart of a dead child
RESTART_BACKOFF_MAX = 10.0  # cap for a child that keeps crashing
STABLE_AFTER = 30.0  # a child up this long gets its backoff reset
HUB_STOP_TIMEOUT = 5.0  # the hub has nothing to drain; SIGKILL if it lingers
UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = RESTART_BACKOFF_MIN
    restart_at: float | None = None
    ready: bool = False
    restarts: int = 0


class Supervisor:
    def __init__(self, config: Config, log: logging.Logger, dev_keys: bool) -> None:
        self.config = config
        self.log = log
        self.dev_keys = dev_keys
        self.runtime = Path(config.runtime_dir)
        self.stopping = False
        self.reload_requested = False
        base = [sys.executable, "-m", "tidings"]
        self.hubs = [Child("hub" if config.hubs == 1 else f"hub {i}", [*base, "hub", "--shard", str(i)])
                     for i in range(config.hubs)] if config.role in ("all", "hubs") else []
        self.workers = [Child(f"worker {i}", [*base, "worker", "--index", str(i)])
                        for i in range(config.workers)] if config.role in ("all", "workers") else []
        self.children = self.hubs + self.workers
        self.announced = False

    # -- lifecycle -----------------------------------------------------------------------------------
    def run(self) -> int:
        busy = self._ports_in_use() if self.workers else ""
        if busy:
            self.log.error("%s already in use by another process: stop it or choose another port "
                           "(workers share ports through SO_REUSEPORT, so a second instance would "
                           "silently take half of the first one's connections)", busy)
            return 1
        self.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        prepare_metrics_dir(self.config.metrics_path, wipe=True)
        notify_path = self.runtime / "notify.sock"
        notify_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(str(notify_path))
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.env = {**os.environ, **self.config.to_env(), "NOTIFY_SOCKET": str(notify_path),
                    "PROMETHEUS_MULTIPROC_DIR": str(self.config.metrics_path)}
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        from tidings.cli import topology

        for line in topology(self.config):
            self.log.info("%s", line.strip())
        self.log.info("starting %d hub shard(s) and %d worker(s) (runtime dir %s)", len(self.hubs),
                      len(self.workers), self.runtime)
        for hub in self.hubs:
            self._spawn(hub)
        for hub in self.hubs:
            self._wait_ready(hub, 10.0)  # workers connect faster to hubs that are there
        for child in self.workers:
            self._spawn(child)
        while not self.stopping:
            self._read_notifications(0.2)
            if self.reload_requested:
                self.reload_requested = False
                self._signal_all(signal.SIGHUP)
            self._reap_and_restart()
        self._stop_all()
        self.notify.close()
        notify_path.unlink(missing_ok=True)
        return 0

    def _ports_in_use(self) -> str:
        """The first of our TCP ports that something else listens on. A bind without SO_REUSEPORT
        fails on a listening port, reuseport group or not; SO_REUSEADDR keeps connections left in
        TIME_WAIT by a previous run from counting."""
        c = self.config
        for host, port in ((c.host, c.port), (c.api_host, c.api_port)):
            if not port:
                continue
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, port))
                except OSError:
                    return f"{host}:{port}"
        return ""

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(child.argv, env=self.env)
        child.started = time.monotonic()
        child.ready = False
        child.restart_at = None

    def _wait_ready(self, child: Child, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not child.ready and time.monotonic() < deadline and not self.stopping:
            self._read_notifications(0.05)
            if child.proc is not None and child.proc.poll() is not None:
                return

    # -- notifications ------------------------------------------------------------------------------
    def _read_notifications(self, timeout: float) -> None:
        readable, _, _ = select.select([self.notify], [], [], timeout)
        if not readable:
            return
        while True:
            try:
                data, ancdata, _, _ = self.notify.recvmsg(4096, socket.CMSG_SPACE(UCRED.size), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = UCRED.unpack(payload[:UCRED.size])[0]
            child = next((c for c in self.children if c.proc is not None and c.proc.pid == pid), None)
            if child is None:
                continue
            for line in data.decode(errors="replace").splitlines():
                if line == "READY=1":
                    child.ready = True
            if not self.announced and all(c.ready for c in self.children):
                self.announced = True
                self._announce()

    def _announce(self) -> None:
        c = self.config
        if not self.workers:
            print(f"tidings hubs are ready: {len(self.hubs)} shard(s), ingress "
                  f"{', '.join(c.ingress_endpoints)}; workers elsewhere connect to egress "
                  f"{', '.join(c.egress_endpoints)}", flush=True)
            return
        hubs = "hub at" if c.hubs == 1 else f"{c.hubs} hub shards at"
        lines = [
            f"tidings is ready: {c.workers} workers on ws://{c.host}:{c.port}/ws, "
            f"{hubs} {', '.join(c.ingress_endpoints)}",
            f"  HTTP publish API: http://{c.api_host}:{c.api_port}/api/publish" if c.api_port else
            "  HTTP publish API: off (TIDINGS_API_PORT=0)",
            "  mint a token:     TOKEN=$(tidings token --sub u1 --channels 'conversation:*')",
            f"  connect:          ws://{c.host}:{c.port}/ws?token=$TOKEN",
        ]
        if self.dev_keys:
            lines.append(f"  dev keys in {self.runtime} (API key: {c.api_key})")
        print("\n".join(lines), flush=True)

    # -- children ----------------------------------------------------------------------------------
    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                mark_process_dead(proc.pid)
                if now - child.started > STABLE_AFTER:
                    child.backoff = RESTART_BACKOFF_MIN
                rc = proc.returncode
                how = f"signal {-rc}" if rc < 0 else f"code {rc}"
                self.log.error("%s (pid %d) exited with %s; restarting in %.1fs",
                               child.name, proc.pid, how, child.backoff)
                child.proc = None
                child.restart_at = now + child.backoff
                child.backoff = min(child.backoff * 2, RESTART_BACKOFF_MAX)
            if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)
                self.log.info("%s restarted (pid %d, restart %d since start)", child.name,
                              child.proc.pid if child.proc else -1, child.restarts)

    def _signal_all(self, sig: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(sig)

    def _stop_all(self) -> None:
        """Workers first (they drain their clients), then the hubs; SIGKILL whoever is late."""
        workers = [c for c in self.workers if c.proc is not None]
        self.log.info("stopping: draining %d workers over %.1fs", len(workers), self.config.drain_window)
        for child in workers:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        self._wait_exit(workers, self.config.drain_window + 5.0)
        for hub in self.hubs:
            if hub.proc is not None and hub.proc.poll() is None:
                hub.proc.send_signal(signal.SIGTERM)
        self._wait_exit(self.hubs, HUB_STOP_TIMEOUT)
        self.log.info("stopped")

    def _wait_exit(self, children: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.error("%s (pid %d) did not stop in time; killing it", child.name, child.proc.pid)
                child.proc.kill()
                child.proc.wait()

