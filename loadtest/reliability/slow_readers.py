"""T7 slow readers: N stalled subscribers and M healthy ones on one channel under 16 KiB events.

Each slow reader completes the handshake on a socket with SO_RCVBUF=4096, subscribes and never
reads again. A publisher thread pushes `size`-byte events through the hub's ingress at `rate`/s
for `duration` s. Reported: RSS of hub + workers at t=0/10/end (and the peak), the slow-consumer
drop counter, when each drop happened (server log) and when each stalled socket saw it (TCP state
leaving ESTABLISHED, polled every 100 ms), and what the healthy subscribers lost and their latency.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from typing import Any

from hub.publisher import Publisher
from loadtest.reliability import common
from loadtest.reliability.common import Service

CHANNEL = "conversation:flood"
EVENT = re.compile(rb'"n":(\d+),"t":([0-9.eE+-]+)')


class Healthy:
    """Per healthy client: which event numbers arrived, and their latencies."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.latencies: list[float] = []
        self.out_of_order = 0
        self.last = -1

    def on_text(self, payload: bytes, now: float) -> None:
        m = EVENT.search(payload, 0, 400)
        if m is None:
            return
        n = int(m.group(1))
        self.latencies.append(now - float(m.group(2)))
        if n <= self.last:
            self.out_of_order += 1
        self.last = n
        self.seen.add(n)


def publish_loop(endpoint: str, rate: float, duration: float, size: int, sent: list[int],
                 stop: threading.Event) -> None:
    pad = "x" * max(0, size - 200)
    with_pub = Publisher(endpoint)
    start = time.monotonic()
    n = 0
    try:
        while not stop.is_set():
            due = start + n / rate
            now = time.monotonic()
            if due - start >= duration:
                break
            if due > now:
                time.sleep(due - now)
            with_pub.publish(CHANNEL, "chat_message", {"n": n, "t": time.time(), "pad": pad})
            n += 1
            sent[0] = n
    finally:
        with_pub.close()


async def _run(svc: Service, args: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    pids = list(svc.pids().values())
    rss_idle = common.rss_kib(pids)
    tcp_mem_idle = common.sockstat().get("mem", 0)

    healthy: list[Healthy] = []
    healthy_clients: list[common.WSClient] = []
    for i in range(args.healthy):
        h = Healthy()
        client, hello = await common.open_client(
            svc.port, "/ws?token=" + svc.token(f"healthy-{i}", channels=["conversation:*"]), on_text=h.on_text)
        assert hello is not None, "healthy client refused"
        client.send(common.command("subscribe", "s", {"channel": CHANNEL}))
        reply = await client.reply_to("s")
        assert reply["type"] == "subscribed", reply
        client.keep_messages = False
        healthy.append(h)
        healthy_clients.append(client)

    sem = asyncio.Semaphore(100)

    async def one_slow(i: int) -> socket.socket | None:
        async with sem:
            token = svc.token(f"slow-{i}", channels=["conversation:*"])
            try:
                return await common.raw_subscribe(svc.port, "/ws?token=" + token, CHANNEL, args.rcvbuf)
            except (OSError, TimeoutError, ConnectionError):
                return None

    setup_start = time.monotonic()
    got = await asyncio.gather(*(one_slow(i) for i in range(args.readers)))
    slow = [s for s in got if s is not None]
    setup_s = time.monotonic() - setup_start
    fds_connected = common.fd_count(svc.worker_pids())

    # -- publish, watching RSS and the stalled sockets -----------------------------------------
    sent = [0]
    stop = threading.Event()
    rss_samples: list[tuple[float, int]] = []
    drop_seen: dict[int, float] = {}
    pub_start_wall = time.time()
    pub_start = time.monotonic()
    rss_samples.append((0.0, common.rss_kib(pids)))
    publisher = threading.Thread(target=publish_loop, args=(svc.ingress(), args.rate, args.duration, args.size,
                                                            sent, stop), daemon=True)
    publisher.start()
    next_rss = 0.5
    orphans_peak = 0
    tcp_mem_peak = 0
    while publisher.is_alive() or time.monotonic() - pub_start < args.duration + 0.5:
        await asyncio.sleep(0.1)
        t = time.monotonic() - pub_start
        for k, s in enumerate(slow):
            if k not in drop_seen and common.tcp_state(s) != common.TCP_ESTABLISHED:
                drop_seen[k] = t
        if t >= next_rss:
            rss_samples.append((round(t, 2), common.rss_kib(pids)))
            st = common.sockstat()
            orphans_peak = max(orphans_peak, st.get("orphan", 0))
            tcp_mem_peak = max(tcp_mem_peak, st.get("mem", 0))
            next_rss += 0.5
        if t > args.duration + 30:
            break
    published = sent[0]
    # let the healthy clients catch up (bounded)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(len(h.seen) < published for h in healthy):
        await asyncio.sleep(0.1)
    rss_end = common.rss_kib(pids)
    fds_end = common.fd_count(svc.worker_pids())
    still_established = sum(1 for s in slow if common.tcp_state(s) == common.TCP_ESTABLISHED)

    metrics = await loop.run_in_executor(None, svc.metrics)
    drops = int(common.metric(metrics, "tidings_slow_consumer_drops_total"))
    server_open = int(common.metric(metrics, "tidings_connections"))
    log_drops = [t - pub_start_wall for t in common.log_times(svc.log_path.read_bytes(), b"slow consumer")]
    client_drops = sorted(drop_seen.values())
    # Pair the k-th drop the server logged with the k-th reset a client saw (approximate: the log
    # has ms resolution, the client polls every 100 ms).
    lags = [c - s for s, c in zip(sorted(log_drops), client_drops, strict=False)]

    orphans_end = common.sockstat().get("orphan", 0)
    drained = await _drain(slow, args.drain_timeout) if args.drain_timeout > 0 else {}
    lost = [published - len(h.seen) for h in healthy]
    latencies = [x for h in healthy for x in h.latencies]
    for c in healthy_clients:
        c.close()
    for s in slow:
        s.close()

    def rss_at(t: float) -> int | None:
        best = [kib for at, kib in rss_samples if at <= t]
        return best[-1] if best else None

    return {
        "setup_s": round(setup_s, 2),
        "slow_connected": len(slow),
        "healthy_connected": len(healthy),
        "published": published,
        "rss_kib": {
            "idle": rss_idle,
            "t0": rss_at(0.0),
            "t10": rss_at(10.0),
            "end": rss_at(args.duration),
            "peak": max(kib for _, kib in rss_samples),
            "after": rss_end,
        },
        "worker_fds": {"connected": fds_connected, "end": fds_end},
        "slow_consumer_drops": drops,
        "drop_time_s": {  # after the first publish
            "server_log_first": _r(min(log_drops, default=None)),
            "server_log_last": _r(max(log_drops, default=None)),
            "client_saw_p50": _r(common.percentile(client_drops, 50)),
            "client_saw_max": _r(max(client_drops, default=None)),
            "log_to_client_p50": _r(common.percentile(lags, 50)),
            "log_to_client_max": _r(max(lags, default=None)),
        },
        "slow_sockets_reset_seen": len(drop_seen),
        "slow_sockets_still_established": still_established,
        "tcp_orphans_peak": orphans_peak,  # system-wide /proc/net/sockstat
        "tcp_orphans_end": orphans_end,
        "tcp_mem_pages": {"idle": tcp_mem_idle, "peak": tcp_mem_peak, "end": common.sockstat().get("mem", 0)},
        "stalled_then_read": drained,
        "server_connections_end": server_open,
        "healthy_lost": sum(lost),
        "healthy_lost_max": max(lost, default=0),
        "healthy_out_of_order": sum(h.out_of_order for h in healthy),
        "latency_ms": {"p50": common.ms(common.percentile(latencies, 50)),
                       "p99": common.ms(common.percentile(latencies, 99)),
                       "max": common.ms(max(latencies, default=None))},
    }


async def _drain(socks: list[socket.socket], timeout: float) -> dict[str, Any]:
    """The stalled clients start reading again: what do they find (EOF, reset, or nothing)?"""
    loop = asyncio.get_running_loop()
    outcome = {"eof": 0, "reset": 0, "close_frame": 0, "still_open": 0, "bytes_read": 0}
    times: list[float] = []
    start = time.monotonic()

    async def drain(s: socket.socket) -> None:
        tail = b""
        try:
            while True:
                left = timeout - (time.monotonic() - start)
                if left <= 0:
                    outcome["still_open"] += 1
                    return
                data = await asyncio.wait_for(loop.sock_recv(s, 1 << 20), left)
                if not data:
                    outcome["eof"] += 1
                    break
                outcome["bytes_read"] += len(data)
                tail = (tail + data)[-256:]
        except TimeoutError:
            outcome["still_open"] += 1
            return
        except OSError:
            outcome["reset"] += 1
        times.append(time.monotonic() - start)
        if b"\x88" in tail[-130:]:  # a close frame opcode near the end (heuristic)
            outcome["close_frame"] += 1

    await asyncio.gather(*(drain(s) for s in socks))
    return {**outcome, "end_seen_after_s_max": _r(max(times, default=None))}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run(args: Any) -> dict[str, Any]:
    common.raise_nofile()
    env = {"TIDINGS_MAX_PENDING_BYTES": str(args.max_pending_bytes)} if args.max_pending_bytes else {}
    with Service(workers=args.workers, env=env) as svc:
        result = asyncio.run(_run(svc, args))
    result["pass"] = (result["healthy_lost"] == 0 and result["slow_consumer_drops"] >= result["slow_connected"]
                      and result["slow_connected"] == args.readers)
    return result


def add_arguments(p: Any) -> None:
    p.add_argument("--readers", type=int, default=500, help="stalled subscribers")
    p.add_argument("--healthy", type=int, default=50, help="subscribers that keep reading")
    p.add_argument("--rate", type=float, default=200.0, help="events per second")
    p.add_argument("--size", type=int, default=16384, help="event size in bytes")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of publishing")
    p.add_argument("--rcvbuf", type=int, default=4096, help="SO_RCVBUF of the stalled sockets")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--drain-timeout", type=float, default=5.0,
                   help="afterwards, the stalled sockets read again for this long (0: skip)")
    p.add_argument("--max-pending-bytes", type=int, default=0, help="TIDINGS_MAX_PENDING_BYTES (0: default)")
