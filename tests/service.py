"""A real tidings instance for tests: `tidings run` on free loopback ports, cleaned up on exit.

    with TidingsService(workers=2) as svc:
        token = svc.token("u1", channels=["conversation:*"])
        url = svc.ws_url(token)            # ws://127.0.0.1:PORT/ws?token=...
        svc.publish_http("conversation:c1", "chat_message", {...})

Every process it starts is stopped by PID when the block ends, even on failure.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt
import orjson

REPO = Path(__file__).resolve().parent.parent
READY_LINE = "tidings is ready"  # printed by `tidings run` once the hub and every worker reported READY=1
STARTUP_TIMEOUT = 20.0  # seconds: a cold start of hub + workers on a loaded 2-core CI box


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tidings_command() -> list[str]:
    return [sys.executable, "-m", "tidings"]


def until_stamped(pub: Any, channel: str, offset: int, timeout: float = 10.0) -> None:
    """Wait until the hub has stamped `channel` up to `offset` (a `hub.Publisher`'s unconfirmed
    publishes return before that, and its confirmed ones take another socket that can overtake
    them); returns after `timeout` regardless, for the test's own assertions to report."""
    deadline = time.monotonic() + timeout
    while pub.history(channel, limit=0).offset < offset and time.monotonic() < deadline:
        time.sleep(0.01)


class TidingsService:
    """Runs `tidings run` (or any subcommand) as a child process group with test settings."""

    def __init__(
        self,
        workers: int = 2,
        env: Mapping[str, str] | None = None,
        command: Iterable[str] = ("run",),
        wait_ready: bool = True,
    ) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="tidings-test-")
        self.runtime_dir = Path(self.tmp.name)
        self.port = free_port()
        self.api_port = free_port()
        self.secret = secrets.token_hex(32)
        self.api_key = secrets.token_hex(16)
        self.env = {
            **os.environ,
            "TIDINGS_HOST": "127.0.0.1",
            "TIDINGS_PORT": str(self.port),
            "TIDINGS_API_PORT": str(self.api_port),
            "TIDINGS_WORKERS": str(workers),
            "TIDINGS_RUNTIME_DIR": str(self.runtime_dir),
            "TIDINGS_JWT_SECRET": self.secret,
            "TIDINGS_API_KEY": self.api_key,
            "TIDINGS_DRAIN_WINDOW": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.command = [*tidings_command(), *command]
        self.wait_ready = wait_ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.runtime_dir / "service.log"

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> TidingsService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=REPO,
        )
        if self.wait_ready:
            self.wait_until_ready()

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"tidings exited early ({self.proc.returncode}):\n{self.logs()}")
            if READY_LINE in self.logs():
                return
            time.sleep(0.05)
        raise RuntimeError(f"tidings not ready after {timeout}s:\n{self.logs()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/healthz", timeout=1) as r:
                return bool(r.status == 200 and orjson.loads(r.read()).get("ready"))
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the supervisor (it drains and stops its children); SIGKILL the group if late."""
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                rc = self.proc.wait(5)
        elif self.proc is not None:
            rc = self.proc.returncode
        if self.proc is not None:
            try:  # anything left in the group (a child that outlived the supervisor) goes too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None):
            self._log.close()
        self.tmp.cleanup()
        return rc

    def children(self) -> dict[str, int]:
        """Role -> pid of the supervisor's live children: {"hub": 123, "hub 0": 123, "hub 1": 125,
        "worker 0": 124, ...} ("hub" is shard 0)."""
        assert self.proc is not None
        found: dict[str, int] = {}
        try:
            pids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return found
        for pid in map(int, pids):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"hub" in argv:
                shard = argv[argv.index(b"--shard") + 1].decode() if b"--shard" in argv else "0"
                found[f"hub {shard}"] = pid
                if shard == "0":
                    found["hub"] = pid  # the only one, unless TIDINGS_HUBS > 1
            elif b"worker" in argv:
                found[f"worker {argv[argv.index(b'--index') + 1].decode()}"] = pid
        return found

    def wait_for_log(self, text: str, timeout: float = 10.0, after: int = 0) -> bool:
        """True once `text` appears in the log past offset `after` (use len(svc.logs()))."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs()[after:]:
                return True
            time.sleep(0.05)
        return False

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- helpers ---------------------------------------------------------------------------
    def token(
        self,
        sub: str,
        channels: Iterable[str] = (),
        publish: Iterable[str] = (),
        ttl: float = 3600,
        **extra: Any,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": sub, "exp": now + ttl, "iat": now,
            "channels": list(channels), "publish": list(publish), **extra,
        }
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def ws_url(self, token: str | None = None, path: str = "/ws") -> str:
        q = f"?token={token}" if token is not None else ""
        return f"ws://127.0.0.1:{self.port}{path}{q}"

    def api(self, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", data=data,
            method="GET" if data is None else "POST",
            headers={"Authorization": f"Bearer {key if key is not None else self.api_key}",
                     "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, _maybe_json(r.read())
        except urllib.error.HTTPError as e:
            return e.code, _maybe_json(e.read())

    def publish_http(self, channel: str, type_: str, data: Any) -> tuple[int, Any]:
        return self.api("/api/publish", {"channel": channel, "type": type_, "data": data})

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def cli(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*tidings_command(), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, cwd=REPO,
        )


def _maybe_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")
