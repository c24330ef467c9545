"""The hub by itself: one `tidings hub`, one raw PUSH publisher, two raw SUB subscribers.

    python -m loadtest.bench.hub_alone [--events 300000]
    python -m loadtest.bench hub_alone        # the same measure(), as a bench scenario
    python -m loadtest.bench.hub_alone --shards 2   # 2 shards side by side: events/s together

No workers and no WebSocket clients, so the figure is the hub's own ceiling: events/s each
subscriber received and the hub process's CPU time per event (from /proc, all its threads,
ZeroMQ's I/O thread included). Prints one JSON line. Loopback ipc:// only; everything it starts
is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from hub.envelope import encode_event, ingress_record

REPO = Path(__file__).resolve().parents[2]
HWM = 2_000_000  # nothing may drop: this measures speed, not loss
DEFAULT_EVENTS = 300_000  # a few seconds of hub time: long enough for /proc's 10 ms CPU ticks
RESULT_TIMEOUT = 120.0  # s for the subscribers to receive everything (nothing drops: a hang is a bug)
_CTX = mp.get_context("spawn")  # children make their own ZeroMQ context, never a forked copy


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _subscriber(egress: str, topic: bytes, events: int, out: Any) -> None:
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


def _stop(children: list[mp.process.BaseProcess], hubs: list[subprocess.Popen[bytes]], runtime: str) -> None:
    """Everything a measurement started, by handle: load processes killed, hubs asked to stop."""
    for p in children:
        if p.is_alive():
            p.kill()
        p.join(5)
    for hub in hubs:
        hub.terminate()
    for hub in hubs:
        try:
            hub.wait(10)
        except subprocess.TimeoutExpired:
            hub.kill()
            hub.wait(5)
    shutil.rmtree(runtime, ignore_errors=True)


def measure(events: int = DEFAULT_EVENTS, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start a hub, push `events` through it to 2 subscribers, stop it; rates and hub CPU time.
    extra_env: more TIDINGS_* settings (TIDINGS_HISTORY='bench=64/300s' keeps this channel's history)."""
    runtime = tempfile.mkdtemp(prefix="tidings-hub-alone-")
    env = {**os.environ, "TIDINGS_RUNTIME_DIR": runtime, "TIDINGS_JWT_SECRET": "h" * 40,
           "TIDINGS_HUB_HWM": str(HWM), **(extra_env or {})}
    hub = subprocess.Popen([sys.executable, "-m", "tidings", "hub"], env=env, cwd=REPO,
                           stderr=subprocess.DEVNULL)
    subs: list[mp.process.BaseProcess] = []
    pub = None
    try:
        time.sleep(1.0)
        topic, body = encode_event("bench:hub", "chat_message", {"content": "x" * 100})
        results = _CTX.Queue()
        subs = [_CTX.Process(target=_subscriber, args=(f"ipc://{runtime}/egress", topic, events, results))
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
        for _ in range(events):
            pub.send(message)
        publish_rate = events / (time.perf_counter() - t0)
        rates = [results.get(timeout=RESULT_TIMEOUT) for _ in subs]
        cpu = _cpu_seconds(hub.pid) - cpu0
    finally:
        if pub is not None:
            pub.close(0)
        _stop(subs, [hub], runtime)
    return {
        "events": events, "publisher_per_s": publish_rate, "subscriber_per_s": rates, "hub_cpu_s": cpu,
        "hub_cpu_us_per_event": cpu / events * 1e6,
        # nan, not infinity, when the run was too short for one clock tick of hub CPU
        "hub_events_per_cpu_s": events / cpu if cpu > 0 else math.nan,
    }


def _publisher(ingress: str, message: bytes, events: int, go: Any, out: Any) -> None:
    sock = zmq.Context().socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.connect(ingress)
    out.put("ready")
    go.wait()
    for _ in range(events):
        sock.send(message)
    sock.close(linger=-1)  # everything handed over before the process ends


def measure_shards(hubs: int, events: int = DEFAULT_EVENTS) -> dict[str, Any]:
    """`hubs` hub shards side by side, each fed by its own publisher process and read by its own
    subscriber process: events/s through all of them together (wall clock, first send to last
    receive) and each shard's CPU per event. On a machine with fewer free cores than
    hubs x 3 processes, the total shows where extra shards stop helping."""
    from hub.shards import shard_of

    runtime = tempfile.mkdtemp(prefix="tidings-hub-shards-")
    env = {**os.environ, "TIDINGS_RUNTIME_DIR": runtime, "TIDINGS_JWT_SECRET": "h" * 40,
           "TIDINGS_HUB_HWM": str(HWM), "TIDINGS_HUBS": str(hubs), "TIDINGS_HISTORY": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "tidings", "hub", "--shard", str(i)], env=env, cwd=REPO,
                              stderr=subprocess.DEVNULL) for i in range(hubs)]
    children: list[mp.process.BaseProcess] = []
    try:
        time.sleep(1.0)
        base = "ipc://" + runtime + ("" if hubs == 1 else "/hub-{}")
        channels: dict[int, str] = {}
        n = 0
        while len(channels) < hubs:  # one channel owned by each shard
            name = f"bench:shard-{n}"
            channels.setdefault(shard_of(name.encode(), hubs), name)
            n += 1
        results, ready, go = _CTX.Queue(), _CTX.Queue(), _CTX.Event()
        for shard, channel in channels.items():
            topic, body = encode_event(channel, "chat_message", {"content": "x" * 100})
            where = base.format(shard)
            children.append(_CTX.Process(target=_subscriber, args=(f"{where}/egress", topic, events, results)))
            children.append(_CTX.Process(target=_publisher, args=(f"{where}/ingress", ingress_record(topic, body),
                                                                   events, go, ready)))
        for p in children:
            p.start()
        for _ in range(hubs):
            results.get(timeout=30)  # subscribers confirmed
            ready.get(timeout=30)  # publishers connected
        cpu0 = [_cpu_seconds(p.pid) for p in procs]
        t0 = time.perf_counter()
        go.set()
        for _ in range(hubs):
            results.get(timeout=RESULT_TIMEOUT)
        wall = time.perf_counter() - t0
        cpu = [_cpu_seconds(p.pid) - c for p, c in zip(procs, cpu0, strict=True)]
    finally:
        _stop(children, procs, runtime)
    return {"hubs": hubs, "events": events * hubs, "events_per_s": events * hubs / wall,
            "hub_cpu_us_per_event": [c / events * 1e6 for c in cpu]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    parser.add_argument("--shards", type=int, default=0,
                        help="N > 0: N hub shards side by side, one publisher and one subscriber each")
    args = parser.parse_args()
    if args.shards:
        r = measure_shards(args.shards, args.events)
        print(json.dumps({"run": "hub_shards", "hubs": r["hubs"], "events": r["events"],
                          "events_per_s": round(r["events_per_s"]),
                          "hub_cpu_us_per_event": [round(x, 2) for x in r["hub_cpu_us_per_event"]]}))
        return
    r = measure(args.events)
    per_cpu_s = r["hub_events_per_cpu_s"]
    print(json.dumps({
        "run": "hub_alone", "events": r["events"], "publisher_per_s": round(r["publisher_per_s"]),
        "subscriber_per_s": [round(x) for x in r["subscriber_per_s"]],
        "hub_cpu_us_per_event": round(r["hub_cpu_us_per_event"], 2),
        "hub_events_per_cpu_second": None if math.isnan(per_cpu_s) else round(per_cpu_s),
    }))


if __name__ == "__main__":
    main()
