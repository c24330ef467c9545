"""What a hub link costs: latency of one hop over ipc://, plain tcp:// and CURVE tcp://, and the
bytes a hub sends per event to each worker link (what crosses the network per worker host).

    python -m loadtest.bench.links [--events 2000] [--rate 500] [--out loadtest/results]

Per link kind it starts `tidings run` with one worker, subscribes one `tidings_client` to a
channel, and publishes paced events of ~200 bytes through hub.Publisher, each carrying its send
time; latency is publisher -> hub -> worker -> client, measured at the client (same clock). The
bytes come from the kernel's own count (`ss -ti`, bytes_acked) on the hub's tcp:// sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from tidings_client import TidingsClient
from tidings_client.events import Event

from hub import Publisher

from .client import mint
from .servers import BENCH_LIMITS, TidingsServer

PAYLOAD_BYTES = 160  # data padding: the client payload lands near 200 bytes, as in the other scenarios


def _bytes(endpoint: str, field: str = "bytes_acked") -> int:
    """A byte count (sent and acknowledged, or received) summed over every established
    connection of a local tcp:// endpoint's port, as the kernel counts it."""
    port = endpoint.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(n) for n in re.findall(field + r":(\d+)", out))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(server: TidingsServer, events: int, rate: float) -> dict[str, Any]:
    channel = "bench:links"
    token = mint(server.jwt_secret, "links", [channel], [])
    keys = None
    if server.hub_keys:
        from tidings.links import CurveKeys

        keys = CurveKeys.load(server.hub_keys)
    latencies: list[float] = []
    async with TidingsClient(server.ws_url(""), get_token=lambda: token) as client:
        sub = await client.subscribe(channel)
        with Publisher((server.ingress or "").split(","), keys=keys) as pub:
            pub.publish(channel, "tick", {"sent": time.time(), "pad": ""})  # warm the path
            await asyncio.wait_for(sub.__anext__(), 10)
            egress = server.egress.split(",")[0]
            before = _bytes(egress) if egress.startswith("tcp://") else 0
            ingress_before = _bytes(server.ingress or "", "bytes_received") if server.link != "ipc" else 0
            pad = "x" * PAYLOAD_BYTES

            async def receive() -> None:
                while len(latencies) < events:
                    item = await sub.__anext__()
                    if isinstance(item, Event):
                        latencies.append(time.time() - item.data["sent"])

            reader = asyncio.create_task(receive())
            start = time.monotonic()
            for i in range(events):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                pub.publish(channel, "tick", {"sent": time.time(), "pad": pad})
            await asyncio.wait_for(reader, 30)
            result: dict[str, Any] = {
                "link": server.link, "events": events, "rate": rate,
                "latency_ms": {"p50": round(_percentile(latencies, 0.5) * 1000, 3),
                               "p90": round(_percentile(latencies, 0.9) * 1000, 3),
                               "p99": round(_percentile(latencies, 0.99) * 1000, 3),
                               "mean": round(statistics.fmean(latencies) * 1000, 3)},
            }
            if egress.startswith("tcp://"):
                await asyncio.sleep(0.3)  # let the last acks land
                result["egress_bytes_per_event_per_worker_link"] = round((_bytes(egress) - before) / events, 1)
                result["ingress_bytes_per_event"] = round(
                    (_bytes(server.ingress or "", "bytes_received") - ingress_before) / events, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=2000, help="events per link kind (2000)")
    p.add_argument("--rate", type=float, default=500.0, help="events per second, paced (500)")
    p.add_argument("--links", default="ipc,tcp,curve", help="link kinds to measure (ipc,tcp,curve)")
    p.add_argument("--out", default=None, help="directory for links.json")
    args = p.parse_args()
    results = []
    for link in args.links.split(","):
        with TidingsServer(workers=1, link=link, extra_env=dict(BENCH_LIMITS)) as server:
            results.append(asyncio.run(_measure(server, args.events, args.rate)))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "links.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
