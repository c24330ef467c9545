"""The hub by itself: one `tidings hub`, one raw PUSH publisher, two raw SUB subscribers.

    python -m loadtest.bench.hub_alone [--events 300000]

No workers and no WebSocket clients, so the figure is the hub's own ceiling: events/s each
subscriber received and the hub process's CPU time per event (from /proc, all its threads,
ZeroMQ's I/O thread included). Prints one JSON line. Loopback ipc:// only; everything it starts
is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from hub.envelope import encode_event, ingress_record

REPO = Path(__file__).resolve().parents[2]
HWM = 2_000_000  # nothing may drop: this measures speed, not loss


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _subscriber(egress: str, topic: bytes, events: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    sock = zmq.Context().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.connect(egress)
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.recv_multipart()  # the hub's confirmation: subscribed for real
    out.put("ready")
    first = None
    for _ in range(events):
        sock.recv_multipart()
        first = first or time.perf_counter()
    out.put(events / (time.perf_counter() - (first or time.perf_counter())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=300_000)
    args = parser.parse_args()
    runtime = tempfile.mkdtemp(prefix="tidings-hub-alone-")
    env = {**os.environ, "TIDINGS_RUNTIME_DIR": runtime, "TIDINGS_JWT_SECRET": "h" * 40,
           "TIDINGS_HUB_HWM": str(HWM)}
    hub = subprocess.Popen([sys.executable, "-m", "tidings", "hub"], env=env, cwd=REPO,
                           stderr=subprocess.DEVNULL)
    subs: list[mp.Process] = []
    try:
        time.sleep(1.0)
        topic, body = encode_event("bench:hub", "chat_message", {"content": "x" * 100})
        results: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        subs = [mp.Process(target=_subscriber, args=(f"ipc://{runtime}/egress", topic, args.events, results))
                for _ in range(2)]
        for p in subs:
            p.start()
        for _ in subs:
            results.get(timeout=30)
        pub = zmq.Context().socket(zmq.PUSH)
        pub.setsockopt(zmq.SNDHWM, HWM)
        pub.connect(f"ipc://{runtime}/ingress")
        cpu0 = _cpu_seconds(hub.pid)
        t0 = time.perf_counter()
        message = ingress_record(topic, body)
        for _ in range(args.events):
            pub.send(message)
        publish_rate = args.events / (time.perf_counter() - t0)
        rates = [results.get(timeout=120) for _ in subs]
        cpu = _cpu_seconds(hub.pid) - cpu0
        print(json.dumps({
            "run": "hub_alone", "events": args.events, "publisher_per_s": round(publish_rate),
            "subscriber_per_s": [round(r) for r in rates],
            "hub_cpu_us_per_event": round(cpu / args.events * 1e6, 2),
            "hub_events_per_cpu_second": round(args.events / cpu) if cpu else None,
        }))
    finally:
        for p in subs:
            if p.is_alive():
                p.kill()
        hub.terminate()
        hub.wait(10)


if __name__ == "__main__":
    main()
