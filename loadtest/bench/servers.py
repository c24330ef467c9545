"""Start and stop the servers under test, and read their processes from /proc.

`TidingsServer` runs `python -m tidings run` (hub + N workers) on free loopback ports with its
own runtime dir and secrets; `BaselineServer` runs `python -m loadtest.bench.baseline`. Both
expose the same small surface the scenarios need: ws_url(), the JWT secret, pids(), cpu(),
rss_kib(). Every process is stopped by PID: SIGTERM to the root, then SIGKILL to each PID of
the tree recorded while it ran.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import procs

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0  # seconds: a cold start of hub + workers on a busy 2-core box
STOP_TIMEOUT = 15.0  # the supervisor drains its workers first; TIDINGS_DRAIN_WINDOW keeps it short


BENCH_LIMITS = {
    "TIDINGS_RATE_LIMIT": "1000000000",
    "TIDINGS_RATE_BURST": "1000000000",
    "TIDINGS_PUBLISH_RATE_LIMIT": "1000000000",
    "TIDINGS_PUBLISH_BURST": "1000000000",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Server:
    """A server process tree started by the bench."""

    name = "server"
    ready_line = ""
    has_hub = False
    ingress: str | None = None  # the hubs' PULL endpoints, comma-separated, for hub.Publisher (tidings only)
    hub_keys: str | None = None  # CURVE key directory for hub.Publisher when the hub links are encrypted

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.tmp = tempfile.TemporaryDirectory(prefix=f"bench-{self.name}-")
        self.runtime_dir = Path(self.tmp.name)
        self.log_path = self.runtime_dir / "server.log"
        self.jwt_secret = secrets.token_hex(32)
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, str] = {}  # pid -> cmdline, seen while the tree ran

    # -- what subclasses define ------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(), env=self.env(), stdout=self._log, stderr=subprocess.STDOUT,
            cwd=REPO, start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited early ({self.proc.returncode}):\n{self.logs()}")
            if self.ready_line in self.logs():
                self.pids()  # record the tree now, so stop() can reap it by PID
                return
            time.sleep(0.05)
        logs = self.logs()
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {STARTUP_TIMEOUT}s:\n{logs}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # anything of the tree that outlived its parent: by PID, only the ones we saw
        # (the cmdline must still match: a recycled PID is somebody else's process)
        for pid, cmd in sorted(self._known.items()):
            if pid != self.proc.pid and cmd and procs.cmdline(pid) == cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()
        self.proc = None
        self.tmp.cleanup()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- measurement -----------------------------------------------------------------------
    def pids(self) -> list[int]:
        """The root process and all its descendants (the hub and every worker for tidings)."""
        if self.proc is None:
            return []
        pids = procs.descendants(self.proc.pid)
        for pid in pids:
            if pid not in self._known:
                self._known[pid] = procs.cmdline(pid)
        return pids

    def cpu(self) -> float:
        return procs.cpu_seconds(self.pids())

    def rss_kib(self) -> int:
        return procs.rss_kib(self.pids())

    def ws_url(self, token: str) -> str:
        return f"ws://{self.host}:{self.port}/ws?token={token}"

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "port": self.port, "pids": self.pids()}


class BaselineServer(Server):
    name = "baseline"
    ready_line = "baseline is ready"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "loadtest.bench.baseline",
                "--host", self.host, "--port", str(self.port)]


class TidingsServer(Server):
    name = "tidings"
    ready_line = "tidings is ready"
    has_hub = True

    def __init__(
        self, host: str = "127.0.0.1", workers: int = 2, extra_env: dict[str, str] | None = None,
        hubs: int = 1, link: str = "ipc",
    ) -> None:
        super().__init__(host)
        self.workers = workers
        self.hubs = hubs
        self.link = link
        self.api_port = free_port(host)
        self.api_key = secrets.token_hex(16)
        # explicit endpoints so the bench's hub.Publisher knows where the hubs listen
        if link == "ipc":
            ends = [(f"ipc://{self.runtime_dir}/bench-ingress-{i}.sock", f"ipc://{self.runtime_dir}/bench-egress-{i}.sock",
                     f"ipc://{self.runtime_dir}/bench-requests-{i}.sock") for i in range(hubs)]
        elif link in ("tcp", "curve"):  # loopback TCP: the cost of the network hop minus the wire
            ends = [tuple(f"tcp://127.0.0.1:{free_port()}" for _ in range(3)) for _ in range(hubs)]
        else:
            raise ValueError(f"hub link must be ipc, tcp or curve, not {link!r}")
        self.ingress: str | None = ",".join(e[0] for e in ends)
        self.egress = ",".join(e[1] for e in ends)
        self.requests = ",".join(e[2] for e in ends)
        if link == "curve":
            self.hub_keys = str(self.runtime_dir / "keys")
            subprocess.run([sys.executable, "-m", "tidings", "keys", "generate", "--hub", "--dir", self.hub_keys],
                           check=True, capture_output=True)
        self.extra_env = extra_env or {}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tidings", "run"]

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "TIDINGS_HOST": self.host,
            "TIDINGS_PORT": str(self.port),
            "TIDINGS_API_PORT": str(self.api_port),
            "TIDINGS_WORKERS": str(self.workers),
            "TIDINGS_RUNTIME_DIR": str(self.runtime_dir),
            "TIDINGS_JWT_SECRET": self.jwt_secret,
            "TIDINGS_API_KEY": self.api_key,
            "TIDINGS_HUBS": str(self.hubs),
            "TIDINGS_HUB_INGRESS": self.ingress or "",
            "TIDINGS_HUB_EGRESS": self.egress,
            "TIDINGS_HUB_REQUESTS": self.requests,
            "TIDINGS_HUB_KEYS": self.hub_keys or "",
            "TIDINGS_HUB_INSECURE": "1" if self.link == "tcp" else "0",
            "TIDINGS_DRAIN_WINDOW": "1",
            # per-connection abuse limits (100 commands/s, 20 publishes/s) would cap one bench
            # publisher or pinger far below the server's speed; the checks still run, they just
            # never refuse
            **BENCH_LIMITS,
            **self.extra_env,
        }


def make_server(kind: str, workers: int = 2, extra_env: dict[str, str] | None = None,
                hubs: int = 1, link: str = "ipc") -> Server:
    if kind == "baseline":
        return BaselineServer()
    if kind == "tidings":
        return TidingsServer(workers=workers, extra_env=extra_env, hubs=hubs, link=link)
    raise ValueError(f"unknown server {kind!r}")


class _NotOurs(Server):
    """A server the bench does not start or stop (nothing to do on either)."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def logs(self) -> str:
        return ""


class AttachedServer(_NotOurs):
    """A server somebody else started (e.g. the tests' TidingsService): measured, never stopped."""

    def __init__(self, name: str, root_pid: int, port: int, jwt_secret: str, host: str = "127.0.0.1",
                 ingress: str | None = None) -> None:
        self.name = name
        self.host, self.port, self.jwt_secret = host, port, jwt_secret
        self.root_pid = root_pid
        self.has_hub = ingress is not None
        self.ingress = ingress
        self._known: dict[int, str] = {}

    def pids(self) -> list[int]:
        return procs.descendants(self.root_pid)


class NoServer(_NotOurs):
    """For a scenario that starts what it measures itself (hub_alone): nothing to start or stop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.host, self.port, self.jwt_secret = "127.0.0.1", 0, ""
        self._known = {}

    def pids(self) -> list[int]:
        return []
