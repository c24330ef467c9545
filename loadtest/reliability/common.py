"""Shared pieces of the reliability runs: the service, /proc readings, a raw WebSocket client.

The raw client is a sans-I/O frame parser (`FrameParser`) plus an asyncio Protocol (`WSClient`)
so that each run can do what a well-behaved library would not: stop reading, send half a
request, keep a socket with a 4 KiB receive buffer. Client frames are masked with a zero key
(valid per RFC 6455; the server cannot tell) so a payload goes out unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import resource
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from tests.service import REPO, TidingsService

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
TCP_ESTABLISHED = 1
OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA
LOG_TIME = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", re.M)


# == the service ==================================================================================
class Service(TidingsService):
    """TidingsService, optionally with RLIMIT_NOFILE lowered for `tidings run` and its children."""

    def __init__(self, workers: int = 2, env: Mapping[str, str] | None = None, nofile: int | None = None) -> None:
        super().__init__(workers=workers, env=env)
        self.nofile = nofile

    def start(self) -> None:
        if self.nofile is None:
            return super().start()
        limit = self.nofile

        def lower_nofile() -> None:  # runs in the child before exec; hub and workers inherit it
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=REPO, preexec_fn=lower_nofile,
        )
        self.wait_until_ready()
        return None

    def pids(self) -> dict[str, int]:
        """hub and workers (what `RSS` sums over)."""
        return self.children()

    def worker_pids(self) -> list[int]:
        return [pid for role, pid in self.children().items() if role.startswith("worker")]

    def ingress(self) -> str:
        return f"ipc://{self.runtime_dir / 'ingress'}"


# == /proc =======================================================================================
def rss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
        except (OSError, IndexError, ValueError):
            pass
    return total


def fd_count(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / CLK_TCK


def sockstat() -> dict[str, int]:
    """TCP line of /proc/net/sockstat: inuse, orphan, tw, alloc, mem (pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            parts = line.split()[1:]
            return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts), 2)}
    return {}


def metric(text: str, name: str) -> float:
    """Sum of every sample of `name` (any labels) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def log_times(log: bytes, needle: bytes) -> list[float]:
    """Wall-clock times (s) of the log lines containing `needle` (text log format, ms precision)."""
    out = []
    for line in log.splitlines():
        if needle in line:
            m = LOG_TIME.match(line)
            if m:
                t = time.mktime(time.strptime(m.group(1).decode(), "%Y-%m-%d %H:%M:%S"))
                out.append(t + int(m.group(2)) / 1000)
    return out


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit in this (client) process; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def summary_line(summary: dict[str, Any]) -> str:
    return orjson.dumps(summary).decode()


# == WebSocket wire =================================================================================
def upgrade_request(path: str, port: int, extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def client_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload  # zero mask key: payload unchanged


def command(type_: str, id_: str, data: dict[str, Any] | None = None) -> bytes:
    return client_frame(OP_TEXT, orjson.dumps({"type": type_, "id": id_, "data": data or {}}))


class FrameParser:
    """Bytes in -> (status, headers) once, then (opcode, payload) frames. Server frames are unmasked."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status: int | None = None
        self.head = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        if self.status is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return []
            self.head = bytes(buf[:end])
            try:
                self.status = int(self.head.split(b" ", 2)[1])
            except (IndexError, ValueError):
                self.status = 0
            del buf[: end + 4]
            if self.status != 101:
                return []
        frames = []
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b1 = buf[pos + 1]
            length, hl = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, hl = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, hl = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if n - pos < hl + length:
                break
            frames.append((buf[pos] & 0x0F, bytes(buf[pos + hl:pos + hl + length])))
            pos += hl + length
        if pos:
            del buf[:pos]
        return frames


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


class WSClient(asyncio.Protocol):
    """One raw connection. `on_text(payload, now)` gets each text frame after the handshake."""

    def __init__(self, path: str, port: int, on_text: Callable[[bytes, float], None] | None = None,
                 extra_headers: str = "") -> None:
        self.request = upgrade_request(path, port, extra_headers)
        self.parser = FrameParser()
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.upgraded: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[float] = loop.create_future()
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.close_code: int | None = None
        self.close_reason = b""
        self.keep_messages = True
        self.first: dict[str, Any] | None = None  # the first message after the upgrade

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        frames = self.parser.feed(data)
        if self.parser.status is not None and not self.upgraded.done():
            self.upgraded.set_result(self.parser.status)
        now = time.time()
        for opcode, payload in frames:
            if opcode == OP_TEXT:
                if self.on_text is not None:
                    self.on_text(payload, now)
                if self.keep_messages:
                    self.messages.put_nowait(orjson.loads(payload))
            elif opcode == OP_PING:
                self.send(client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self.close_code = close_code(payload)
                self.close_reason = payload[2:]
                self.send(client_frame(OP_CLOSE, payload[:2]))
                assert self.transport is not None
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_result(self.parser.status or 0)
        if not self.lost.done():
            self.lost.set_result(time.time())
        self.messages.put_nowait({"type": "_lost"})

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def reply_to(self, id_: str, timeout: float = 10.0) -> dict[str, Any]:
        """Next message carrying `id_` (events before it are dropped); `_lost` if the socket ended."""
        while True:
            msg = await self.recv(timeout)
            if msg.get("id") == id_ or msg["type"] in ("_lost", "error"):
                return msg

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_client(port: int, path: str, *, on_text: Callable[[bytes, float], None] | None = None,
                      local_host: str | None = None, timeout: float = 10.0,
                      extra_headers: str = "") -> tuple[WSClient, dict[str, Any] | None]:
    """Connect and upgrade; returns (client, the `connected` message or None if refused)."""
    loop = asyncio.get_running_loop()
    local = (local_host, 0) if local_host else None
    _, client = await asyncio.wait_for(loop.create_connection(
        lambda: WSClient(path, port, on_text, extra_headers), "127.0.0.1", port, local_addr=local), timeout)
    status = await asyncio.wait_for(client.upgraded, timeout)
    if status != 101:
        return client, None
    first = await client.recv(timeout)
    client.first = first
    return client, first if first.get("type") == "connected" else None


def tcp_state(sock: socket.socket) -> int:
    """Kernel TCP state of a socket (1 = ESTABLISHED, 7 = CLOSE after a reset, 8 = CLOSE_WAIT)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return 0


async def raw_subscribe(port: int, path: str, channel: str, rcvbuf: int, timeout: float = 15.0) -> socket.socket:
    """A plain non-blocking socket with a small receive buffer, upgraded and subscribed to `channel`.
    From here on nobody reads it."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), timeout)
        await loop.sock_sendall(sock, upgrade_request(path, port))
        parser = FrameParser()
        subscribed = False
        deadline = time.monotonic() + timeout
        while not subscribed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no subscribe reply")
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
            if not data:
                raise ConnectionError(f"closed during setup (HTTP {parser.status})")
            for opcode, payload in parser.feed(data):
                if opcode != OP_TEXT:
                    raise ConnectionError(f"opcode {opcode} during setup")
                msg = orjson.loads(payload)
                if msg["type"] == "connected":
                    await loop.sock_sendall(sock, command("subscribe", "s", {"channel": channel}))
                elif msg.get("id") == "s":
                    if msg["type"] != "subscribed":
                        raise ConnectionError(f"subscribe refused: {msg}")
                    subscribed = True
    except BaseException:
        sock.close()
        raise
    return sock
