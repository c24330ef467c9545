"""T8 connection flood: N connections with valid tokens opened at once, then idle.

This process raises its RLIMIT_NOFILE to the hard limit and spreads source addresses over
127.0.0.x when one address would run out of ephemeral ports. Reported: how many connected, how
long it took, the server's CPU seconds while connecting, RSS per connection (hub + workers,
after minus before), and the round trip of a protocol `ping` on a few connections while all of
them stay open.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loadtest.reliability import common
from loadtest.reliability.common import Service

PORTS_PER_SOURCE = 20_000  # of the 28k ephemeral ports, leave room for everything else


async def _run(svc: Service, args: Any) -> dict[str, Any]:
    pids = list(svc.pids().values())
    tokens = [svc.token(f"flood-{i}", channels=["conversation:*"]) for i in range(args.connections)]
    rss_before = common.rss_kib(pids)
    fds_before = common.fd_count(pids)
    cpu_before = common.cpu_seconds(pids)
    sem = asyncio.Semaphore(args.concurrency)
    clients: list[common.WSClient] = []
    failures: dict[str, int] = {}

    async def one(i: int) -> None:
        source = f"127.0.0.{1 + i // PORTS_PER_SOURCE}" if args.connections > PORTS_PER_SOURCE else None
        async with sem:
            try:
                client, hello = await common.open_client(svc.port, "/ws?token=" + tokens[i],
                                                         local_host=source, timeout=args.timeout)
            except (OSError, TimeoutError) as exc:
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                return
            if hello is None:
                failures["refused"] = failures.get("refused", 0) + 1
                client.close()
                return
            client.keep_messages = False
            clients.append(client)

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(args.connections)))
    connect_s = time.monotonic() - started
    cpu_connect = common.cpu_seconds(pids) - cpu_before
    await asyncio.sleep(1.0)  # let the workers settle (metrics tick, allocator)
    rss_after = common.rss_kib(pids)
    fds_after = common.fd_count(pids)

    # Ping round trips on a few connections while all stay open.
    rtts: list[float] = []
    probes = clients[: args.ping_clients]
    for p in probes:
        p.keep_messages = True
    for k in range(args.pings):
        p = probes[k % len(probes)] if probes else None
        if p is None:
            break
        t0 = time.monotonic()
        p.send(common.command("ping", f"p{k}"))
        reply = await p.reply_to(f"p{k}", timeout=10)
        if reply.get("type") == "pong":
            rtts.append(time.monotonic() - t0)
        await asyncio.sleep(args.ping_interval)
    still_open = sum(1 for c in clients if not c.lost.done())
    for c in clients:
        c.close()
    n = len(clients)
    return {
        "requested": args.connections,
        "connected": n,
        "success_rate": round(n / args.connections, 4) if args.connections else None,
        "failures": failures,
        "connect_s": round(connect_s, 2),
        "connects_per_s": round(n / connect_s, 1) if connect_s else None,
        "server_cpu_s_connecting": round(cpu_connect, 2),
        "rss_kib": {"before": rss_before, "after": rss_after},
        "rss_per_connection_kib": round((rss_after - rss_before) / n, 2) if n else None,
        "server_fds": {"before": fds_before, "after": fds_after},
        "still_open_after_pings": still_open,
        "ping_rtt_ms": {"n": len(rtts), "p50": common.ms(common.percentile(rtts, 50)),
                        "p99": common.ms(common.percentile(rtts, 99)), "max": common.ms(max(rtts, default=None))},
        "workers": args.workers,
    }


def run(args: Any) -> dict[str, Any]:
    limit = common.raise_nofile()
    if args.connections + 100 > limit:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {limit} is too low for {args.connections} connections")
    with Service(workers=args.workers, env={"TIDINGS_MAX_CONNECTIONS_PER_USER": "100000"}) as svc:
        result = asyncio.run(_run(svc, args))
    result["client_nofile"] = limit
    result["pass"] = result["connected"] == args.connections and result["still_open_after_pings"] == result["connected"]
    return result


def add_arguments(p: Any) -> None:
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=1000, help="handshakes in flight at once")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for one connect + handshake")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pings", type=int, default=200, help="protocol pings measured while loaded")
    p.add_argument("--ping-clients", type=int, default=20)
    p.add_argument("--ping-interval", type=float, default=0.01)
