"""T10 slowloris: N sockets each sending half an upgrade request, one byte every few seconds.

Reported: when the server closed them (seconds after connect: p50/max, how many were still
open at the end), the workers' fds at the peak and after, and whether normal clients, one
every 0.5 s during the attack, still connected.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loadtest.reliability import common
from loadtest.reliability.common import Service


class Loris(asyncio.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.sent = 0
        self.transport: asyncio.Transport | None = None
        self.opened = time.monotonic()
        self.closed_after: float | None = None
        self.got = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.opened = time.monotonic()
        self.drip()

    def drip(self) -> None:
        if self.transport is not None and self.closed_after is None and self.sent < len(self.request):
            self.transport.write(self.request[self.sent:self.sent + 1])
            self.sent += 1

    def data_received(self, data: bytes) -> None:
        self.got += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_after = time.monotonic() - self.opened


async def _run(svc: Service, args: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    workers = svc.worker_pids()
    fds_idle = common.fd_count(workers)
    full = common.upgrade_request("/ws?token=" + svc.token("loris"), svc.port)
    half = full[: len(full) // 2]
    sem = asyncio.Semaphore(500)
    lorises: list[Loris] = []

    async def one() -> None:
        async with sem:
            try:
                _, proto = await loop.create_connection(lambda: Loris(half), "127.0.0.1", svc.port)
                lorises.append(proto)
            except OSError:
                pass

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(args.sockets)))
    connect_s = time.monotonic() - started
    normal_ok, normal_fail, normal_times = 0, 0, []
    fds_peak = common.fd_count(workers)
    next_drip = time.monotonic() + args.interval
    next_normal = time.monotonic()
    deadline = started + args.max_wait
    while time.monotonic() < deadline and any(lo.closed_after is None for lo in lorises):
        now = time.monotonic()
        if now >= next_drip:
            for lo in lorises:
                lo.drip()
            next_drip = now + args.interval
        if now >= next_normal:
            next_normal = now + 0.5
            t0 = time.monotonic()
            try:
                client, hello = await common.open_client(svc.port, "/ws?token=" + svc.token("normal"), timeout=5)
                client.close()
                if hello is None:
                    normal_fail += 1
                else:
                    normal_ok += 1
                    normal_times.append(time.monotonic() - t0)
            except (OSError, TimeoutError):
                normal_fail += 1
        fds_peak = max(fds_peak, common.fd_count(workers))
        await asyncio.sleep(0.1)
    closed = [lo.closed_after for lo in lorises if lo.closed_after is not None]
    open_left = len(lorises) - len(closed)
    answered = sum(1 for lo in lorises if lo.got)
    for lo in lorises:
        if lo.transport is not None:
            lo.transport.abort()
    await asyncio.sleep(0.5)
    return {
        "sockets": args.sockets,
        "connected": len(lorises),
        "connect_s": round(connect_s, 2),
        "handshake_timeout_s": args.handshake_timeout,
        "byte_interval_s": args.interval,
        "closed_by_server": len(closed),
        "still_open_at_end": open_left,
        "got_a_response": answered,  # bytes from the server before the close (e.g. an HTTP error)
        "closed_after_s": {"min": _r(min(closed, default=None)), "p50": _r(common.percentile(closed, 50)),
                           "max": _r(max(closed, default=None))},
        "worker_fds": {"idle": fds_idle, "peak": fds_peak, "after": common.fd_count(workers)},
        "normal_clients": {"ok": normal_ok, "failed": normal_fail,
                           "connect_ms_p50": common.ms(common.percentile(normal_times, 50)),
                           "connect_ms_max": common.ms(max(normal_times, default=None))},
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run(args: Any) -> dict[str, Any]:
    common.raise_nofile()
    env = {"TIDINGS_HANDSHAKE_TIMEOUT": str(args.handshake_timeout)}
    with Service(workers=args.workers, env=env) as svc:
        result = asyncio.run(_run(svc, args))
    result["pass"] = (result["still_open_at_end"] == 0 and result["normal_clients"]["failed"] == 0
                      and result["normal_clients"]["ok"] > 0 and result["connected"] == args.sockets)
    return result


def add_arguments(p: Any) -> None:
    p.add_argument("--sockets", type=int, default=2000)
    p.add_argument("--interval", type=float, default=4.0, help="seconds between bytes")
    p.add_argument("--handshake-timeout", type=float, default=5.0, help="TIDINGS_HANDSHAKE_TIMEOUT")
    p.add_argument("--max-wait", type=float, default=30.0, help="give up waiting for closes after this")
    p.add_argument("--workers", type=int, default=2)
