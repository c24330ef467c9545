"""T20 soak: N clients over C channels, events at R/s for D seconds; RSS and fd drift.

RSS and fd counts of hub + workers are sampled every `--sample` s. Drift is the last sample
against the first one taken after the warm-up (`--warmup` s). After the clients leave, the fd
count must come back to what it was before they came. Every client also counts what it lost.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from hub.publisher import Publisher
from loadtest.reliability import common
from loadtest.reliability.common import Service
from loadtest.reliability.slow_readers import Healthy


def publish_loop(endpoint: str, rate: float, duration: float, channels: int, sent: list[int],
                 stop: threading.Event) -> None:
    pub = Publisher(endpoint)
    start = time.monotonic()
    n = 0
    try:
        while not stop.is_set():
            due = start + n / rate
            if due - start >= duration:
                break
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            ch = n % channels
            pub.publish(f"conversation:soak-{ch}", "chat_message", {"n": n // channels, "t": time.time()})
            n += 1
            sent[ch] += 1
    finally:
        pub.close()


async def _run(svc: Service, args: Any) -> dict[str, Any]:
    pids = list(svc.pids().values())
    fds_before = common.fd_count(pids)
    rss_before = common.rss_kib(pids)
    sem = asyncio.Semaphore(200)
    clients: list[tuple[int, Healthy, common.WSClient]] = []

    async def one(i: int) -> None:
        ch = i % args.channels
        async with sem:
            h = Healthy()
            client, hello = await common.open_client(
                svc.port, "/ws?token=" + svc.token(f"soak-{i}", channels=["conversation:*"]), on_text=h.on_text)
            assert hello is not None, "soak client refused"
            client.send(common.command("subscribe", "s", {"channel": f"conversation:soak-{ch}"}))
            reply = await client.reply_to("s")
            assert reply["type"] == "subscribed", reply
            client.keep_messages = False
            clients.append((ch, h, client))

    await asyncio.gather(*(one(i) for i in range(args.clients)))
    fds_connected = common.fd_count(pids)
    sent = [0] * args.channels
    stop = threading.Event()
    pub = threading.Thread(target=publish_loop, args=(svc.ingress(), args.rate, args.duration, args.channels,
                                                      sent, stop), daemon=True)
    start = time.monotonic()
    pub.start()
    samples: list[dict[str, float]] = []
    next_sample = 0.0
    while pub.is_alive():
        t = time.monotonic() - start
        if t >= next_sample:
            samples.append({"t": round(t, 1), "rss_kib": common.rss_kib(pids), "fds": common.fd_count(pids),
                            "cpu_s": round(common.cpu_seconds(pids), 2)})
            next_sample += args.sample
        await asyncio.sleep(0.2)
    samples.append({"t": round(time.monotonic() - start, 1), "rss_kib": common.rss_kib(pids),
                    "fds": common.fd_count(pids), "cpu_s": round(common.cpu_seconds(pids), 2)})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(len(h.seen) < sent[ch] for ch, h, _ in clients):
        await asyncio.sleep(0.1)
    lost = sum(sent[ch] - len(h.seen) for ch, h, _ in clients)
    latencies = [x for _, h, _ in clients for x in h.latencies]
    still_open = sum(1 for _, _, c in clients if not c.lost.done())
    for _, _, c in clients:
        c.close()
    fds_after = fds_connected
    for _ in range(50):  # the workers notice the closes
        await asyncio.sleep(0.2)
        fds_after = common.fd_count(pids)
        if fds_after <= fds_before:
            break
    warm = next((s for s in samples if s["t"] >= args.warmup), samples[0])
    last = samples[-1]
    return {
        "clients": len(clients),
        "channels": args.channels,
        "rate": args.rate,
        "duration_s": args.duration,
        "published": sum(sent),
        "deliveries_expected": sum(sent[ch] for ch, _, _ in clients),
        "lost": lost,
        "still_open": still_open,
        "latency_ms": {"p50": common.ms(common.percentile(latencies, 50)),
                       "p99": common.ms(common.percentile(latencies, 99))},
        "rss_kib": {"before": rss_before, "warm": warm["rss_kib"], "end": last["rss_kib"],
                    "max": max(s["rss_kib"] for s in samples)},
        "rss_drift_pct": round(100 * (last["rss_kib"] - warm["rss_kib"]) / warm["rss_kib"], 2),
        "fds": {"before": fds_before, "connected": fds_connected, "end": last["fds"], "after_leave": fds_after},
        "server_cpu_pct": round(100 * (last["cpu_s"] - samples[0]["cpu_s"]) / max(last["t"], 0.1), 1),
        "samples": samples if args.keep_samples else len(samples),
    }


def run(args: Any) -> dict[str, Any]:
    common.raise_nofile()
    with Service(workers=args.workers, env={"TIDINGS_MAX_CONNECTIONS_PER_USER": "100000"}) as svc:
        result = asyncio.run(_run(svc, args))
    result["pass"] = (result["lost"] == 0 and result["still_open"] == result["clients"]
                      and result["fds"]["after_leave"] <= result["fds"]["before"])
    return result


def add_arguments(p: Any) -> None:
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--channels", type=int, default=10, help="clients are spread over this many channels")
    p.add_argument("--rate", type=float, default=100.0, help="events per second (over all channels)")
    p.add_argument("--duration", type=float, default=1800.0, help="seconds")
    p.add_argument("--sample", type=float, default=10.0, help="seconds between RSS/fd samples")
    p.add_argument("--warmup", type=float, default=30.0, help="drift is measured from the first sample after this")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keep-samples", action="store_true", help="put every sample in the summary")
