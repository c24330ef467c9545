"""sd_notify(3) over $NOTIFY_SOCKET, without libsystemd: READY, STATUS, WATCHDOG, STOPPING.

`tidings run` points its children's NOTIFY_SOCKET at its own socket, so the same messages tell
the supervisor when every process serves; under systemd they go to systemd.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends notify datagrams; a no-op when the process was not started with NOTIFY_SOCKET."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address: str | None = env.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]  # abstract namespace
        self.sock: socket.socket | None = None
        if self.address:
            # Non-blocking: a receiver that stops reading must never stall the event loop.
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        watched = usec is not None and (pid is None or pid == str(os.getpid()))
        # Ping twice per period: a late tick must not cost a restart.
        self.watchdog_interval: float | None = int(usec) / 2e6 if watched and usec else None

    def notify(self, *lines: str) -> None:
        if self.sock is None or self.address is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            pass  # the supervisor being gone must never take the service down

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", f"STATUS={status}" if status else "STATUS=ready")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self, status: str = "draining") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
