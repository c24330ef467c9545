"""The load client: picows + uvloop connections in child processes, one job per process.

The parent (scenarios.py) starts each job with `start_job(spec)`. A job process sets up its
connections, says "ready", waits for "go", runs, reports one result dict, then waits for
"stop" before it closes its sockets, so that teardown never overlaps another job's timing.
Control messages travel over a multiprocessing Pipe that the child's event loop watches with
add_reader; progress (events received so far, per process) is an int64 in shared memory
written from a 1 ms timer, never per frame, so the receive path stays one Python call and one
increment per frame.

Jobs:
  subscribers  N connections, each subscribed to one channel; counts events; a few "probe"
               connections parse every event for publish-to-receive latency and order checks.
  publisher    publishes P events over its WebSocket (`publish`) or through hub.Publisher,
               either keeping a window of publishes in flight (not yet received by every
               subscriber, read from the shared progress counters) or at a fixed rate.
  connect      N handshakes, each with its own JWT, `concurrency` at a time.
  ping         N connections in a closed ping -> pong loop for a fixed time.
  chat         N connections in pairs, one channel per pair; one member of each pair publishes
               over its own socket (`publish`), round-robin over the channels, windowed on the
               `published` replies or at a fixed rate; both members count every event. Self-
               contained: it knows its own expected count and needs no shared progress.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import resource
import time
from multiprocessing.connection import Connection
from typing import Any

import jwt
import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

EVENT_TYPE = "bench"
TICK = 0.001  # s: progress/deadline timer; libuv timers have 1 ms resolution anyway
MAX_SAMPLES = 200_000  # latency samples kept per process (a random subset beyond that)
READ_BUFFER = 4096  # picows client read buffer: 10k idle client sockets must stay cheap
CONNECT_TIMEOUT = 30.0  # s per connection attempt (TCP + upgrade), then it counts as failed
PORTS_PER_SOURCE_IP = 16_000  # below the ~28k ephemeral ports per (src, dst) with headroom
_CTX = mp.get_context("spawn")  # no inherited event loop, zmq context or sockets


# -- helpers shared with the parent -----------------------------------------------------------
def mint(secret: str, sub: str, channels: list[str], publish: list[str], ttl: int = 3600) -> str:
    now = int(time.time())
    claims = {"sub": sub, "exp": now + ttl, "iat": now, "channels": channels, "publish": publish}
    return jwt.encode(claims, secret, algorithm="HS256")


def source_ip(index: int, total: int) -> str | None:
    """Spread connections over 127.0.0.x source addresses once one address runs out of ports."""
    if total <= PORTS_PER_SOURCE_IP:
        return None
    n_ips = -(-total // PORTS_PER_SOURCE_IP)
    return f"127.0.0.{1 + index % n_ips}"


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def sample(values: array.array[float], k: int = MAX_SAMPLES) -> list[float]:
    if len(values) <= k:
        return values.tolist()
    return random.sample(values.tolist(), k)


def probe_totals(listeners: list[Any], probe: type) -> tuple[array.array[float], int, int, int]:
    """(latencies, order errors, payload bytes, frames) summed over the listeners that are probes."""
    lat = array.array("d")
    order_errors = frame_bytes = frames = 0
    for lst in listeners:
        if isinstance(lst, probe):
            lat.extend(lst.lat)
            order_errors += lst.errors
            frame_bytes += lst.bytes
            frames += lst.n
    return lat, order_errors, frame_bytes, frames


class Job:
    """Parent-side handle of one job process."""

    def __init__(self, spec: dict[str, Any], progress: Any = None) -> None:
        self.spec = spec
        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=child_main, args=(spec, child, progress), daemon=True)
        self.proc.start()
        child.close()

    def recv(self, timeout: float) -> tuple[Any, ...]:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"job {self.spec['kind']} #{self.spec.get('index')} silent for {timeout}s")
        msg: tuple[Any, ...] = self.conn.recv()
        if msg[0] == "failed":
            raise RuntimeError(f"job {self.spec['kind']} failed: {msg[1]}")
        return msg

    def send(self, *msg: Any) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(msg)

    def close(self, timeout: float = 20.0) -> None:
        self.send("stop")
        self.proc.join(timeout)
        if self.proc.is_alive():  # our own child, by its handle (= by PID)
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


# -- child side ------------------------------------------------------------------------------
class Control:
    """The child's end of the control pipe, read from the event loop."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self.queue.put_nowait(self.conn.recv())
        except (EOFError, OSError):  # parent gone: stop
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            self.queue.put_nowait(("stop",))

    async def wait_for(self, what: str) -> tuple[Any, ...]:
        while True:
            msg = await self.queue.get()
            if msg[0] == what or msg[0] == "stop":
                return msg

    def send(self, *msg: Any) -> None:
        # the loop's add_reader made the fd non-blocking; a result of 200k samples needs
        # a blocking write (the parent is reading it)
        os.set_blocking(self.conn.fileno(), True)
        self.conn.send(msg)


def child_main(spec: dict[str, Any], conn: Connection, progress: Any) -> None:
    raise_nofile()
    try:
        uvloop.run(_child(spec, conn, progress))
    except Exception as exc:  # report, so the parent fails with the reason instead of a timeout
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise


async def _child(spec: dict[str, Any], conn: Connection, progress: Any) -> None:
    ctl = Control(conn)
    kind = spec["kind"]
    runner = {"subscribers": SubscribersJob, "publisher": PublisherJob,
              "connect": ConnectJob, "ping": PingJob, "chat": ChatJob}[kind](spec, progress)
    try:
        await runner.setup()
        ctl.send("ready", runner.ready_info())
        msg = await ctl.wait_for("go")
        if msg[0] == "go":
            result = await runner.run()
            ctl.send("done", result)
            await ctl.wait_for("stop")
    finally:
        runner.close()


async def _connect_many(
    factory: Any, urls: list[str], spec: dict[str, Any], concurrency: int,
) -> tuple[list[tuple[WSTransport, Any]], list[str], array.array[float]]:
    """Open len(urls) connections, `concurrency` at a time, each waiting for `connected`."""
    sem = asyncio.Semaphore(concurrency)
    opened: list[tuple[WSTransport, Any]] = []
    errors: list[str] = []
    times = array.array("d")
    offset, total = spec.get("offset", 0), spec.get("total", len(urls))

    async def one(i: int, url: str) -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                ip = source_ip(offset + i, total)
                kwargs: dict[str, Any] = {"local_addr": (ip, 0)} if ip else {}
                # bounded: a SYN dropped by a full accept queue is retried by the kernel for ~2 min
                transport, listener = await asyncio.wait_for(ws_connect(
                    factory, url, read_buffer_init_size=READ_BUFFER,
                    websocket_handshake_timeout=30, **kwargs), CONNECT_TIMEOUT)
                first = await asyncio.wait_for(listener.first, 30)
                if orjson.loads(first).get("type") != "connected":
                    transport.disconnect(False)
                    errors.append(f"first frame {first[:120]!r}")
                    return
                times.append(time.perf_counter() - t0)
                opened.append((transport, listener))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))
    return opened, errors, times


class Setup(WSListener):
    """Setup phase: resolves `first` with the first frame, then `reply` for each later one."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.first: asyncio.Future[bytes] = loop.create_future()
        self.reply: asyncio.Future[bytes] | None = None
        self.transport: WSTransport | None = None
        self.n = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        payload = frame.get_payload_as_bytes()
        if not self.first.done():
            self.first.set_result(payload)
        elif self.reply is not None and not self.reply.done():
            self.reply.set_result(payload)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.first.done():
            self.first.set_exception(ConnectionError("closed before connected"))
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionError("closed before reply"))

    async def request(self, msg: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        assert self.transport is not None
        self.reply = asyncio.get_running_loop().create_future()
        self.transport.send(WSMsgType.TEXT, orjson.dumps(msg))
        out: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.reply, timeout))
        return out


class Counter(Setup):
    """The hot path of a plain subscriber: one increment per frame, nothing else."""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.n += 1


class Probe(Setup):
    """A subscriber that also parses each event: latency, type/channel check, order check."""

    lat: array.array[float]
    last_seq: int
    last_offset: int
    errors: int
    bytes: int
    event_type: str

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.monotonic_ns()
        self.n += 1
        if frame.msg_type != WSMsgType.TEXT:
            self.errors += 1
            return
        self.bytes += frame.payload_size
        ev = orjson.loads(frame.get_payload_as_memoryview())
        data = ev.get("data")
        if ev.get("type") != self.event_type or not isinstance(data, dict):
            self.errors += 1
            return
        self.lat.append((now - data["ts"]) / 1e3)  # µs
        seq, offset = data["seq"], ev.get("offset", 0)
        # one publisher per channel in every scenario: seq and offset must both grow
        if seq <= self.last_seq or (isinstance(offset, int) and offset <= self.last_offset):
            self.errors += 1
        self.last_seq = seq
        self.last_offset = offset if isinstance(offset, int) else self.last_offset


class SubscribersJob:
    def __init__(self, spec: dict[str, Any], progress: Any) -> None:
        self.spec = spec
        self.progress = progress
        self.conns: list[tuple[WSTransport, Setup]] = []
        self.setup_errors: list[str] = []
        self.connect_times = array.array("d")

    async def setup(self) -> None:
        s = self.spec
        channels: list[str] = s["channels"]
        # the user is `sub_prefix + i`: a backend addresses connection i as user:<that>
        prefix = s.get("sub_prefix", f"bench-s{s['index']}-")
        urls = [s["url"] + mint(s["secret"], f"{prefix}{i}", ["bench:*"] if channels else [], [])
                for i in range(s["n"])]
        opened, self.setup_errors, self.connect_times = await _connect_many(
            Setup, urls, s, s.get("concurrency", 100))
        sem = asyncio.Semaphore(s.get("concurrency", 100))

        async def subscribe(i: int, listener: Setup) -> None:
            async with sem:
                channel = channels[(s.get("offset", 0) + i) % len(channels)]
                reply = await listener.request(
                    {"type": "subscribe", "id": "s", "data": {"channel": channel}})
                if reply.get("type") != "subscribed":
                    raise RuntimeError(f"subscribe {channel}: {reply}")

        # no channels: only the personal channel user:<sub>, which tidings joins at connect
        if channels:
            await asyncio.gather(*(subscribe(i, lst) for i, (_, lst) in enumerate(opened)))
        probe_every = max(1, s.get("probe_every", 50))
        for i, (t, lst) in enumerate(opened):
            lst.n = 0
            if i % probe_every == 0:
                lst.__class__ = Probe  # same layout, new hot path (no per-frame mode check)
                assert isinstance(lst, Probe)
                lst.lat, lst.last_seq, lst.last_offset, lst.errors, lst.bytes = array.array("d"), -1, 0, 0, 0
                lst.event_type = s.get("event_type", EVENT_TYPE)
            else:
                lst.__class__ = Counter
            self.conns.append((t, lst))

    def ready_info(self) -> dict[str, Any]:
        # client ports let the parent find, via /proc, which worker holds each connection
        ports = [t.underlying_transport.get_extra_info("sockname")[1] for t, _ in self.conns[:16]]
        return {"connected": len(self.conns), "errors": self.setup_errors[:5],
                "failed": len(self.setup_errors), "ports": ports}

    async def run(self) -> dict[str, Any]:
        s = self.spec
        target = len(self.conns) * s["expected_per_sub"]
        deadline = time.monotonic() + s["timeout"]
        listeners = [lst for _, lst in self.conns]
        slot = s["index"]
        last_total, last_change = -1, time.monotonic()
        # summing n over all connections costs ~30 ns each: poll less often for many connections
        # (5000 subscribers: every 5 ms, ~3% of a core) - still far finer than any window
        interval = max(TICK, len(listeners) * 1e-6)
        while True:
            total = sum(lst.n for lst in listeners)
            now = time.monotonic()
            if total != last_total:
                last_total, last_change = total, now
                if self.progress is not None:
                    self.progress[slot] = total
            if total >= target and s.get("stop_when_complete", True):
                break
            if now > deadline or (s.get("idle_timeout") and now - last_change > s["idle_timeout"]):
                break
            await asyncio.sleep(interval)
        per_sub = [lst.n for lst in listeners]
        lat, order_errors, frame_bytes, frames = probe_totals(listeners, Probe)
        return {
            "received": sum(per_sub), "expected": target, "last_change": last_change,
            "min_per_sub": min(per_sub, default=0), "max_per_sub": max(per_sub, default=0),
            "latency_us": sample(lat), "order_errors": order_errors,
            "frame_bytes": frame_bytes / frames if frames else 0.0, "probes": frames and len(lat),
        }

    def close(self) -> None:
        for t, _ in self.conns:
            t.disconnect(False)  # RST: no TIME_WAIT left behind on the client's ports


class PublisherJob:
    """Publishes P events round-robin over the channels, windowed or at a fixed rate."""

    def __init__(self, spec: dict[str, Any], progress: Any) -> None:
        self.spec = spec
        self.progress = progress
        self.transport: WSTransport | None = None
        self.listener: Setup | None = None
        self.publisher: Any = None
        self.replies = 0

    async def setup(self) -> None:
        s = self.spec
        if s["via"] == "hub":
            from hub import Publisher  # the backend API; the only server code the bench uses

            keys = None
            if s.get("hub_keys"):
                from tidings.links import CurveKeys

                keys = CurveKeys.load(s["hub_keys"])
            self.publisher = Publisher(s["ingress"].split(","), keys=keys)
        else:
            url = s["url"] + mint(s["secret"], f"bench-p{s['index']}", [], ["bench:*"])
            opened, errors, _ = await _connect_many(Setup, [url], s, 1)
            if not opened:
                raise RuntimeError(f"publisher cannot connect: {errors}")
            self.transport, self.listener = opened[0]
            self.listener.__class__ = Counter  # replies (`published`) are only counted

    def ready_info(self) -> dict[str, Any]:
        return {"via": self.spec["via"]}

    def _completed(self) -> float:
        """Publishes received by every subscriber so far (per subscriber process, then min)."""
        s = self.spec
        done = float("inf")
        for slot, subs in s["progress_slots"]:
            done = min(done, self.progress[slot] * len(s["channels"]) / subs)
        return done

    async def run(self) -> dict[str, Any]:
        s = self.spec
        channels: list[str] = s["channels"]
        count, window, rate = s["count"], s["window"], s.get("rate", 0.0)
        event_type = s.get("event_type", EVENT_TYPE)
        pad = "x" * s.get("pad", 0)
        via_hub = s["via"] == "hub"
        loop_deadline = time.monotonic() + s["timeout"]
        sent = 0
        start = time.monotonic()
        stalled = False
        idle_timeout = s.get("idle_timeout", 3.0)
        last_done, last_change = 0.0, start
        while sent < count:
            now = time.monotonic()
            done = self._completed()
            if done != last_done:
                last_done, last_change = done, now
            # a full window that stops draining means lost events: stop, the loss is reported
            if now > loop_deadline or (now - last_change > idle_timeout and sent > done):
                stalled = True
                break
            in_flight_cap = s.get("max_in_flight", window) if rate else window
            budget = min(count - sent, in_flight_cap - (sent - int(done)))
            if rate:
                budget = min(budget, int(rate * (now - start)) + 1 - sent)
            for _ in range(max(0, budget)):
                channel = channels[sent % len(channels)]
                data = {"seq": sent // len(channels), "ts": time.monotonic_ns(), "pad": pad}
                if via_hub:
                    self.publisher.publish(channel, event_type, data)
                else:
                    assert self.transport is not None
                    self.transport.send(WSMsgType.TEXT, orjson.dumps({
                        "type": "publish", "id": "p",
                        "data": {"channel": channel, "type": event_type, "data": data}}))
                sent += 1
            await asyncio.sleep(TICK)
        published_at = time.monotonic()
        # wait for the in-flight tail so that `done` means everything was delivered or lost
        # (lost events never complete: give up once progress stops for idle_timeout)
        last, last_change = self._completed(), time.monotonic()
        while time.monotonic() < loop_deadline and last < count:
            await asyncio.sleep(TICK)
            now_done = self._completed()
            if now_done != last:
                last, last_change = now_done, time.monotonic()
            elif time.monotonic() - last_change > s.get("idle_timeout", 3.0):
                break
        return {"sent": sent, "start": start, "published_at": published_at, "stalled": stalled,
                "replies": self.listener.n if self.listener else None}

    def close(self) -> None:
        if self.transport is not None:
            self.transport.disconnect(False)
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                self.publisher.close()


class ConnectJob:
    def __init__(self, spec: dict[str, Any], progress: Any) -> None:
        self.spec = spec
        self.conns: list[tuple[WSTransport, Any]] = []

    async def setup(self) -> None:
        s = self.spec
        # tokens are minted before the clock starts: the bench measures the server, not PyJWT
        self.urls = [s["url"] + mint(s["secret"], f"bench-c{s['index']}-{i}", ["bench:*"], [])
                     for i in range(s["n"])]

    def ready_info(self) -> dict[str, Any]:
        return {"tokens": len(self.urls)}

    async def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.conns, errors, times = await _connect_many(Setup, self.urls, self.spec, self.spec["concurrency"])
        t1 = time.monotonic()
        return {"ok": len(self.conns), "failed": len(errors), "errors": errors[:5],
                "start": t0, "end": t1, "latency_us": [x * 1e6 for x in sample(times)]}

    def close(self) -> None:
        for t, _ in self.conns:
            t.disconnect(False)


class Pinger(Setup):
    """Closed loop: each pong (or any reply) is timed and immediately answered by a ping."""

    PING = orjson.dumps({"type": "ping", "id": "1", "data": {}})
    rtt: array.array[float]
    sent_at: float
    stop_at: float
    bad: int

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.perf_counter()
        if frame.msg_type != WSMsgType.TEXT:
            return
        if b"pong" not in frame.get_payload_as_bytes():
            self.bad += 1
        self.n += 1
        self.rtt.append(now - self.sent_at)
        if now < self.stop_at:
            self.sent_at = now
            transport.send(WSMsgType.TEXT, self.PING)


class PingJob:
    def __init__(self, spec: dict[str, Any], progress: Any) -> None:
        self.spec = spec
        self.conns: list[tuple[WSTransport, Any]] = []

    async def setup(self) -> None:
        s = self.spec
        urls = [s["url"] + mint(s["secret"], f"bench-g{s['index']}-{i}", ["bench:*"], [])
                for i in range(s["n"])]
        self.conns, errors, _ = await _connect_many(Setup, urls, s, 100)
        if errors:
            raise RuntimeError(f"{len(errors)} ping connections failed: {errors[:3]}")

    def ready_info(self) -> dict[str, Any]:
        return {"connected": len(self.conns)}

    async def run(self) -> dict[str, Any]:
        duration = self.spec["duration"]
        start = time.perf_counter()
        listeners = []
        for t, lst in self.conns:
            lst.__class__ = Pinger
            lst.rtt, lst.bad, lst.n = array.array("d"), 0, 0
            lst.stop_at, lst.sent_at = start + duration, start
            t.send(WSMsgType.TEXT, Pinger.PING)
            listeners.append(lst)
        await asyncio.sleep(duration)
        end = time.perf_counter()
        # a last round trip may still be on the way; it is not counted (it left after stop_at)
        rtt = array.array("d")
        for lst in listeners:
            rtt.extend(lst.rtt)
        return {"replies": sum(lst.n for lst in listeners), "bad": sum(lst.bad for lst in listeners),
                "elapsed": end - start, "latency_us": [x * 1e6 for x in sample(rtt)]}

    def close(self) -> None:
        for t, _ in self.conns:
            t.disconnect(False)


# -- chat: pairs of connections that publish to each other ------------------------------------
# Both servers put "type" first in every frame (`{"type":"published",...` vs `{"type":"bench",...`),
# so one byte tells an event from a publish reply without parsing.
_TYPE_AT = len(b'{"type":"')
_EVENT = ord(EVENT_TYPE[0])
_PUBLISHED = ord("p")


class ChatTally:
    """Per job, shared by its connections: `published` replies (the window) and stray frames."""

    __slots__ = ("acks", "other")

    def __init__(self) -> None:
        self.acks = 0
        self.other = 0


class ChatMember(Setup):
    """A chat member's hot path: one byte read, one increment (events per connection, acks per job)."""

    tally: ChatTally

    # the constants ride in as defaults: local lookups are cheaper than globals on this path
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame, _at: int = _TYPE_AT, _event: int = _EVENT,
                    _published: int = _PUBLISHED) -> None:
        try:
            kind = frame.get_payload_as_memoryview()[_at]
        except IndexError:  # a close frame or anything too short to be ours
            kind = 0
        if kind == _event:
            self.n += 1
        elif kind == _published:
            self.tally.acks += 1
        else:
            self.tally.other += 1


class ChatProbe(ChatMember):
    """A member that also parses its events: latency from data.ts, offsets growing per channel."""

    lat: array.array[float]
    last_offset: int
    errors: int
    bytes: int

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame, _at: int = _TYPE_AT, _event: int = _EVENT,
                    _published: int = _PUBLISHED) -> None:
        now = time.monotonic_ns()
        payload = frame.get_payload_as_bytes()
        if len(payload) <= _at or payload[_at] != _event:
            ChatMember.on_ws_frame(self, transport, frame)
            return
        self.n += 1
        self.bytes += len(payload)
        ev = orjson.loads(payload)
        data, offset = ev.get("data"), ev.get("offset")
        if ev.get("type") != EVENT_TYPE or not isinstance(data, dict) or not isinstance(offset, int):
            self.errors += 1
            return
        self.lat.append((now - data["ts"]) / 1e3)  # µs
        # the offset is the order a client can rely on: stamped once per channel, by the server
        if offset <= self.last_offset:
            self.errors += 1
        self.last_offset = offset


class ChatJob:
    """N connections as N/2 channels of 2 members; publishes over the members' own sockets.

    Connections 2j and 2j+1 are the members of channel `pair_offset + j`; the publisher of
    channel j is member j % 2, so that the probes (every probe_every-th connection) include
    publishers and pure listeners. Each publish is a template with only seq and ts filled in:
    the client shares the cores with the server."""

    def __init__(self, spec: dict[str, Any], progress: Any) -> None:
        self.spec = spec
        self.conns: list[tuple[WSTransport, ChatMember]] = []
        self.tally = ChatTally()
        self.senders: list[WSTransport] = []  # per channel, the member that publishes to it
        self.templates: list[bytes] = []  # per channel, the publish frame with %d for seq and ts

    async def setup(self) -> None:
        s = self.spec
        if s["n"] % 2:
            raise ValueError("chat connections come in pairs")
        urls = [s["url"] + mint(s["secret"], f"bench-chat{s['index']}-{i}", ["bench:*"], ["bench:*"])
                for i in range(s["n"])]
        opened, errors, _ = await _connect_many(Setup, urls, s, s.get("concurrency", 100))
        if errors:  # a missing member would shift every pair after it: fail, do not guess
            raise RuntimeError(f"{len(errors)} chat connections failed: {errors[:3]}")
        channels = [f"bench:chat-{s['pair_offset'] + j}" for j in range(len(opened) // 2)]
        sem = asyncio.Semaphore(s.get("concurrency", 100))

        async def subscribe(listener: Setup, channel: str) -> None:
            async with sem:
                reply = await listener.request({"type": "subscribe", "id": "s", "data": {"channel": channel}})
                if reply.get("type") != "subscribed":
                    raise RuntimeError(f"subscribe {channel}: {reply}")

        await asyncio.gather(*(subscribe(lst, channels[i // 2]) for i, (_, lst) in enumerate(opened)))
        pad = "x" * s.get("pad", 0)
        for j, channel in enumerate(channels):
            self.senders.append(opened[2 * j + j % 2][0])
            # no "id": the reply stays short, and the client never needs to match it
            self.templates.append(b'{"type":"publish","data":{"channel":"%s","type":"%s","data":{"pad":"%s",'
                                  b'"seq":%%d,"ts":%%d}}}' % (channel.encode(), EVENT_TYPE.encode(), pad.encode()))
        probe_every = max(1, s.get("probe_every", 10))
        for i, (t, lst) in enumerate(opened):
            lst.n = 0
            if i % probe_every == 0:
                lst.__class__ = ChatProbe  # same layout, new hot path
                assert isinstance(lst, ChatProbe)
                lst.lat, lst.last_offset, lst.errors, lst.bytes = array.array("d"), 0, 0, 0
            else:
                lst.__class__ = ChatMember
            assert isinstance(lst, ChatMember)
            lst.tally = self.tally
            self.conns.append((t, lst))

    def ready_info(self) -> dict[str, Any]:
        return {"connected": len(self.conns), "channels": len(self.senders)}

    async def run(self) -> dict[str, Any]:
        s = self.spec
        count, window, rate = s["count"], s["window"], s.get("rate", 0.0)
        idle_timeout = s.get("idle_timeout", 5.0)
        senders, templates, tally = self.senders, self.templates, self.tally
        n_channels = len(templates)
        listeners = [lst for _, lst in self.conns]
        text = WSMsgType.TEXT
        start = time.monotonic()
        deadline = start + s["timeout"]
        sent, stalled = 0, False
        last_acks, last_change = 0, start
        while sent < count:
            now = time.monotonic()
            acks = tally.acks
            if acks != last_acks:
                last_acks, last_change = acks, now
            # a full window whose replies stop coming back: stop, the shortfall is reported
            if now > deadline or (sent > acks and now - last_change > idle_timeout):
                stalled = True
                break
            budget = min(count - sent, window - (sent - acks))
            if rate:
                budget = min(budget, int(rate * (now - start)) + 1 - sent)
            for _ in range(budget):
                j = sent % n_channels
                senders[j].send(text, templates[j] % (sent // n_channels, time.monotonic_ns()))
                sent += 1
            await asyncio.sleep(TICK)
        # the tail: until both members got every event and every publish was answered, or until
        # nothing moves for idle_timeout (lost events never arrive)
        target = 2 * sent
        # summing n over the connections costs ~30 ns each: poll less often for many of them
        interval = max(TICK, len(listeners) * 1e-6)
        last_total, last_change = -1, time.monotonic()
        while True:
            total = sum(lst.n for lst in listeners)
            now = time.monotonic()
            if total != last_total or tally.acks != last_acks:
                last_total, last_acks, last_change = total, tally.acks, now
            if (total >= target and tally.acks >= sent) or now > deadline or now - last_change > idle_timeout:
                break
            await asyncio.sleep(interval)
        per_conn = [lst.n for lst in listeners]
        lat, order_errors, frame_bytes, frames = probe_totals(listeners, ChatProbe)
        return {
            "sent": sent, "acks": tally.acks, "received": sum(per_conn), "expected": target,
            "start": start, "end": last_change, "stalled": stalled, "other_frames": tally.other,
            "min_per_conn": min(per_conn, default=0), "max_per_conn": max(per_conn, default=0),
            "latency_us": sample(lat), "order_errors": order_errors,
            "frame_bytes": frame_bytes / frames if frames else 0.0,
        }

    def close(self) -> None:
        for t, _ in self.conns:
            t.disconnect(False)  # RST: no TIME_WAIT left behind on the client's ports
