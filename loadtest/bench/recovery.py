"""Recovery time and history memory, tidings only (the baseline keeps no history).

    python -m loadtest.bench.recovery [--missed 100] [--runs 20] [--channels 1000] [--events 50]

recovery  a client subscribes, goes away, `missed` events are published (the last one confirmed,
          so all are stamped), the client reconnects and sends `subscribe` with `since`: the time
          from that send until the last missed event arrived (the new connection's handshake is
          not included: it costs the same with or without history). Median and p90 over `runs`.
memory    `channels` channels x `events` events of a ~200-byte chat message, all kept: the hub's
          own count of kept bytes (tidings_history_bytes) and its RSS growth, per 1000 events.

Prints one JSON line. Loopback only; the server it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import orjson
import websocket

from hub import Publisher

from .servers import TidingsServer

CHAT_TEXT = "x" * 120  # with the envelope around it, a ~200-byte event: a typical chat line


def _token(server: TidingsServer, sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 3600, "channels": ["bench:*"]},
                      server.jwt_secret, algorithm="HS256")


def _connect(server: TidingsServer, sub: str) -> websocket.WebSocket:
    ws = websocket.create_connection(server.ws_url(_token(server, sub)), timeout=10,
                                     skip_utf8_validation=True)
    assert orjson.loads(ws.recv())["type"] == "connected"
    return ws


def _hub_pid(server: TidingsServer) -> int:
    for pid in server.pids():
        if b"hub" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            return pid
    raise RuntimeError("no hub process")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _gauge(server: TidingsServer, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.api_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def recovery_ms(server: TidingsServer, pub: Publisher, missed: int, runs: int) -> list[float]:
    times = []
    for run in range(runs):
        channel = f"bench:recover-{run}"
        ws = _connect(server, f"r{run}")
        ws.send(orjson.dumps({"type": "subscribe", "id": "1", "data": {"channel": channel}}))
        start = orjson.loads(ws.recv())["data"]
        ws.close()
        for i in range(missed - 1):
            pub.publish(channel, "chat_message", {"i": i, "text": CHAT_TEXT})
        pub.publish(channel, "chat_message", {"i": missed - 1, "text": CHAT_TEXT}, confirm=True)
        ws = _connect(server, f"r{run}")
        since = {"offset": start["offset"], "epoch": start["epoch"]}
        t0 = time.perf_counter()
        ws.send(orjson.dumps({"type": "subscribe", "id": "2", "data": {"channel": channel, "since": since}}))
        reply = orjson.loads(ws.recv())
        if not reply["data"].get("recovered"):
            raise RuntimeError(f"not recovered: {reply}")
        last = None
        for _ in range(missed):
            last = orjson.loads(ws.recv())
        times.append((time.perf_counter() - t0) * 1000)
        assert last is not None and last["offset"] == start["offset"] + missed
        ws.close()
    return times


def history_memory(server: TidingsServer, pub: Publisher, channels: int, events: int) -> dict[str, float]:
    hub = _hub_pid(server)
    time.sleep(1.5)
    rss0, bytes0 = _rss_kib(hub), _gauge(server, "tidings_history_bytes")
    for e in range(events):
        for c in range(channels):
            pub.publish(f"bench:mem-{c}", "chat_message", {"i": e, "text": CHAT_TEXT})
    pub.publish("bench:mem-0", "chat_message", {"last": True}, confirm=True)
    time.sleep(2.5)  # the gauge is flushed once a second
    kept = channels * events + 1
    rss1, bytes1 = _rss_kib(hub), _gauge(server, "tidings_history_bytes")
    return {"kept_events": kept, "history_bytes_per_1k_events": (bytes1 - bytes0) / kept * 1000,
            "hub_rss_kib_per_1k_events": (rss1 - rss0) / kept * 1000}


def measure(missed: int = 100, runs: int = 20, channels: int = 1000, events: int = 50) -> dict[str, Any]:
    env = {"TIDINGS_HISTORY": f"bench={max(missed, events) + 10}/600s", "TIDINGS_RECOVERY_MAX_EVENTS": str(missed),
           "TIDINGS_PUBLISH_RATE_LIMIT": "100000", "TIDINGS_PUBLISH_BURST": "100000"}
    with TidingsServer(workers=1, extra_env=env) as server, \
            Publisher((server.ingress or "").split(","), requests=server.requests.split(",")) as pub:
        times = recovery_ms(server, pub, missed, runs)
        memory = history_memory(server, pub, channels, events)
    times.sort()
    return {"missed": missed, "runs": runs, "recovery_ms_median": statistics.median(times),
            "recovery_ms_p90": times[int(0.9 * (len(times) - 1))], "recovery_ms_max": times[-1], **memory}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--missed", type=int, default=100, help="events missed per recovery (100)")
    parser.add_argument("--runs", type=int, default=20, help="recoveries measured (20)")
    parser.add_argument("--channels", type=int, default=1000, help="channels for the memory figure (1000)")
    parser.add_argument("--events", type=int, default=50, help="events kept per channel for it (50)")
    args = parser.parse_args()
    print(json.dumps(measure(args.missed, args.runs, args.channels, args.events)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
