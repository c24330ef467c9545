"""The hub process: PULL ingress -> stamp offset and epoch -> XPUB egress. All of the hub's I/O.

One thread, one zmq.Poller. Each pass drains the ingress socket without blocking (bounded, so
subscription traffic and housekeeping are never starved), stamps each event with the next
offset of its channel (`HistoryStore`, which also keeps the channel's recent events), and
forwards it. ZeroMQ's XPUB filters by topic, so an event reaches only the workers that
subscribed to its channel. A ROUTER answers history reads and confirmed publishes between
passes. With persistence on, a pass's events are written to the journal before they are sent,
so no subscriber ever holds an offset a restarted hub does not know.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import orjson
import zmq
from zmq.utils.monitor import parse_monitor_message

from hub.envelope import (
    ANSWERED,
    HISTORY_REQUEST,
    MAX_CHANNEL_BYTES,
    PUBLISH_REQUEST,
    REPLY_HWM,
    REQUEST_HWM,
    STAMP,
    answer_message,
    check_channel,
    egress_position,
    read_ingress,
    split_confirmed,
    topic_for,
)
from hub.history import HistoryStore, parse_history_spec
from hub.persist import HistoryLog
from tidings.config import Config, ConfigError
from tidings.links import KeyGate, LinkWatch, keys_for, set_heartbeat, warn_if_insecure
from tidings.logs import RateLimitedLog
from tidings.metrics import Stats, StatsExporter, mark_process_dead
from tidings.sdnotify import Notifier

NOBLOCK = int(zmq.NOBLOCK)  # plain ints: the enum members cost a lookup per use
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
EVENTS_CHECKS = 4  # receives per pass preceded by a ZMQ_EVENTS look; a busy socket reads until Again
DRAIN_BATCH = 2000  # messages per pass: large enough to amortise poll(), small enough to stay responsive
ANSWERED_TOPIC = bytes((ANSWERED,))
REQUEST_BATCH = 256  # requests answered per pass, so reads never starve the forwarding loop
MAX_REQUEST_LIMIT = 10_000  # events one history read may return
TICK_SECONDS = 1.0  # metrics flush, status line, watchdog floor
# How often the hub re-sends the position of every channel published to since the last time. A
# worker whose last events of a channel were dropped at the high-water mark learns of it from
# this within that time (otherwise only the channel's next event would show the jump); at most
# one extra message per active channel per period.
POSITION_CHECK_SECONDS = 5.0
REFUSAL_LOG_SECONDS = 10.0  # per socket and peer host
REBIND_SECONDS = 2.0  # a key rotation binds the endpoints anew: how long the old listeners may keep a port
MAX_REFUSAL_LOGS = 1000  # peer hosts remembered for that; past it the memory starts over
# What the hub watches on its sockets: links coming and going, and handshakes it refused.
LINK_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED
               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _ipc_dir(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]).parent if endpoint.startswith("ipc://") else None


class Broker:
    def __init__(self, config: Config, shard: int, log: logging.Logger, notifier: Notifier, stats: Stats) -> None:
        if not 0 <= shard < config.hubs:
            raise ConfigError(f"hub shard {shard} does not exist: TIDINGS_HUBS is {config.hubs} "
                              f"(shards 0 to {config.hubs - 1})")
        self.config = config
        self.shard = shard
        self.ingress_endpoint = config.ingress_endpoints[shard]
        self.egress_endpoint = config.egress_endpoints[shard]
        self.requests_endpoint = config.requests_endpoints[shard]
        self.keys = keys_for(config)
        self.log = log
        self.notifier = notifier
        self.stats = stats
        self.store = HistoryStore(parse_history_spec(config.history), config.history_max_bytes,
                                  config.history_meta_ttl)
        self.journal: HistoryLog | None = None
        if config.history_persist:
            self.journal = HistoryLog(config.journal_path(shard), config.history_persist_max_bytes,
                                      config.history_fsync_seconds, log)
            self.store.journal = []
        self.subscribers: dict[bytes, int] = {}  # topic -> worker subscriptions the XPUB reported
        self.published: set[bytes] = set()  # channels stamped since the last position check
        self.stopping = False
        self.max_body = config.max_message_bytes + MAX_CHANNEL_BYTES + 256  # event JSON around `data`
        self.drop_log = RateLimitedLog(log)
        self.refusal_logs: dict[tuple[str, str], RateLimitedLog] = {}
        self.ctx = zmq.Context()
        self.gate: KeyGate | None = None
        self.reload_requested = False
        self.exit_code = 0
        self._open_sockets()

    # -- lifecycle ---------------------------------------------------------------------------
    def _open_sockets(self) -> None:
        self.ingress = self.ctx.socket(zmq.PULL)
        self.egress = self.ctx.socket(zmq.XPUB)
        self.requests = self.ctx.socket(zmq.ROUTER)
        # Links on every socket: worker links on the XPUB (counted, logged), and refused
        # handshakes anywhere (a plain or unknown publisher knocks on the ingress or requests).
        self.watches = {name: (sock.get_monitor_socket(LINK_EVENTS), LinkWatch())
                        for name, sock in (("egress", self.egress), ("ingress", self.ingress),
                                           ("requests", self.requests))}

    def _close_sockets(self) -> None:
        for sock, (monitor, _) in zip((self.egress, self.ingress, self.requests), self.watches.values(), strict=True):
            sock.disable_monitor()
            monitor.close(0)
        self.ingress.close(0)
        self.egress.close(0)
        self.requests.close(0)

    def _poller(self) -> tuple[zmq.Poller, dict[zmq.Socket[bytes], str]]:
        """What the loop waits on: the three sockets and their monitors (name by monitor)."""
        poller = zmq.Poller()
        for sock in (self.ingress, self.egress, self.requests):
            poller.register(sock, zmq.POLLIN)
        monitors = {monitor: name for name, (monitor, _) in self.watches.items()}
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        return poller, monitors

    def bind(self) -> None:
        for endpoint in (self.ingress_endpoint, self.egress_endpoint, self.requests_endpoint):
            d = _ipc_dir(endpoint)
            if d is not None:
                d.mkdir(parents=True, exist_ok=True)
        for sock in (self.ingress, self.egress, self.requests):
            set_heartbeat(sock, self.config.hub_heartbeat)
            if self.keys is not None:
                self.keys.make_server(sock)
        if self.keys is not None and self.gate is None:
            self.gate = KeyGate(self.ctx, self.keys, self.log)
        self.ingress.setsockopt(zmq.RCVHWM, self.config.hub_hwm)
        self.ingress.setsockopt(zmq.LINGER, 0)
        self.egress.setsockopt(zmq.SNDHWM, self.config.hub_hwm)
        self.egress.setsockopt(zmq.LINGER, 0)
        # Every (un)subscribe reaches us, so subscriber counts are exact and each new
        # subscription gets its confirmation message.
        self.egress.setsockopt(zmq.XPUB_VERBOSER, 1)
        self.requests.setsockopt(zmq.LINGER, 0)
        self.requests.setsockopt(zmq.RCVHWM, REQUEST_HWM)
        self.requests.setsockopt(zmq.SNDHWM, REPLY_HWM)
        self.requests.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a requester that left: drop its reply
        self.ingress.bind(self.ingress_endpoint)
        self.egress.bind(self.egress_endpoint)
        self.requests.bind(self.requests_endpoint)

    def reload_keys(self) -> bool:
        """SIGHUP: re-read authorized/; and when TIDINGS_HUB_KEYS holds a new hub key pair (a
        rotation), serve with it. True when the sockets were replaced for that.

        Every link is cut and made again with the new pair by whoever has the new hub.key (the
        sockets are closed and opened again: unbinding would leave links made with the old pair
        half alive, their messages discarded); history, epochs and offsets stay, so workers heal
        what they missed from history as after any short outage (a restart would lose
        unpersisted history)."""
        if self.gate is None or self.keys is None:
            return False
        self.log.info("hub %d reloaded the authorized keys: %d admitted", self.shard, self.gate.reload())
        try:
            fresh = self.keys.reread(server=True)
        except ConfigError as exc:
            self.log.error("hub %d keeps its key pair: %s", self.shard, exc)
            return False
        if fresh is None:
            return False
        self._close_sockets()
        self.keys = self.gate.keys = fresh
        self.subscribers.clear()  # the workers subscribe again on their new links
        self._open_sockets()
        deadline = time.monotonic() + REBIND_SECONDS
        while True:
            try:
                self.bind()
                break
            except zmq.ZMQError as exc:  # the old listeners close in ZeroMQ's I/O thread: a port can stay busy
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    self.log.error("hub %d cannot bind again after its key changed: %s; stopping (a restart binds "
                                   "with the new key)", self.shard, exc)
                    self.exit_code, self.stopping = 1, True
                    return True
                self._close_sockets()
                self._open_sockets()
                time.sleep(0.02)
        self.log.info("hub %d serves with a new key pair (hub.key %s): every link was cut; workers and publishers "
                      "link again once they have the new hub.key (SIGHUP the workers)", self.shard,
                      fresh.hub_public.decode())
        return True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        warn_if_insecure(self.config, self.log)
        try:
            self.bind()
        except zmq.ZMQError as exc:
            self.log.error("hub %d cannot bind %s / %s / %s: %s", self.shard, self.ingress_endpoint,
                           self.egress_endpoint, self.requests_endpoint, exc)
            self._close()
            return 1
        if self.journal is not None:
            try:
                report = self.journal.load(self.store, time.time())
            except OSError as exc:
                self.log.error("cannot open the history journal %s: %s", self.journal.path, exc)
                self._close()
                return 1
            self.log.info("history journal %s: %d channels, %d events restored", self.journal.path,
                          report.streams, report.events)
        exporter = StatsExporter(self.stats)
        epoch = self.store.epoch_prefix.decode()
        self.log.info("hub serving shard %d of %d: ingress %s, egress %s, requests %s, epochs %s*, history %s%s, %s",
                      self.shard, self.config.hubs, self.ingress_endpoint, self.egress_endpoint,
                      self.requests_endpoint, epoch, self.config.history or "off",
                      ", persisted" if self.journal else "",
                      f"CURVE ({self.gate.reload()} authorized keys)" if self.gate else "no CURVE")
        self.notifier.ready(f"epochs {epoch}*")
        poller, monitors = self._poller()
        # The watchdog ping rides on the poll loop: a hub stuck anywhere stops sending it.
        tick_every = min(TICK_SECONDS, self.notifier.watchdog_interval or TICK_SECONDS)
        next_tick = time.monotonic() + tick_every
        next_check = time.monotonic() + POSITION_CHECK_SECONDS
        while not self.stopping:
            timeout_ms = max(0, int((min(next_tick, next_check) - time.monotonic()) * 1000))
            ready = dict(poller.poll(timeout_ms))
            if self.egress in ready:
                self.drain_subscriptions()
            if self.ingress in ready:
                self.drain_ingress()
            if self.requests in ready:
                self.drain_requests()
            for monitor, name in monitors.items():
                if monitor in ready:
                    self.drain_link_events(name)
            if self.reload_requested:
                self.reload_requested = False
                if self.reload_keys():
                    poller, monitors = self._poller()
                    continue
            now = time.monotonic()
            if now >= next_check:
                next_check = now + POSITION_CHECK_SECONDS
                self.send_positions()
            if now >= next_tick:
                next_tick = now + tick_every
                self.notifier.watchdog()
                self.housekeeping()
                exporter.flush()
        self.notifier.stopping("hub stopping")
        if self.journal is not None:
            self.journal.close()
        exporter.flush()
        mark_process_dead(os.getpid())
        self.log.info("hub %d stopped: %d events forwarded since it started", self.shard, self.stats.hub_events_in)
        self._close()
        return self.exit_code

    def _close(self) -> None:
        self._close_sockets()
        if self.gate is not None:
            self.gate.stop()
        self.ctx.term()

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _on_reload_signal(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True  # acted on in the loop, not inside a signal handler

    def drain_link_events(self, name: str) -> None:
        """Links on one socket: logged and counted, so an operator sees a host come and go (a
        heartbeat timeout shows up here within ~3 heartbeats of the host going silent) and who
        was refused."""
        monitor, watch = self.watches[name]
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            kind = event["event"]
            outcome = watch.on_event(kind, event["value"], _peer_of)
            if outcome is None:
                continue
            what, peer = outcome
            if what == "refused":
                self.stats.hub_links["refused"] += 1
                why = _HANDSHAKE_FAILURES.get(kind, "handshake failed (a peer without CURVE, or the wrong hub key)")
                self._refusal_log(name, peer).warning(
                    time.monotonic(), "hub %d refused a link from %s on %s (%s): %s", self.shard,
                    peer, event["endpoint"].decode(errors="replace"), name, why)
            elif name != "egress":
                self.log.debug("hub %d: %s link from %s %s", self.shard, name, peer, what)
            elif what == "up":
                self.stats.hub_links["up"] += 1
                self.log.info("hub %d: worker link from %s up", self.shard, peer)
            else:
                self.stats.hub_links["lost"] += 1
                self.log.warning("hub %d: worker link from %s lost (closed, or silent for %.0fs of heartbeats); "
                                 "its subscriptions are dropped until it reconnects",
                                 self.shard, peer, self.config.hub_heartbeat * 3)
            self.stats.hub_peers = len(self.watches["egress"][1].linked)

    def _refusal_log(self, socket_name: str, peer: str) -> RateLimitedLog:
        """A line per socket and peer host every REFUSAL_LOG_SECONDS: a refused peer redials every
        second, and one host must not hide another."""
        key = (socket_name, peer.rsplit(":", 1)[0])
        found = self.refusal_logs.get(key)
        if found is None:
            if len(self.refusal_logs) > MAX_REFUSAL_LOGS:
                self.refusal_logs.clear()
            found = self.refusal_logs[key] = RateLimitedLog(self.log, REFUSAL_LOG_SECONDS)
        return found

    # -- the forwarding path -------------------------------------------------------------------
    def send_positions(self) -> None:
        """Each channel published to since the last call, to the workers subscribed to it: where
        it stands (the same message a new subscription gets)."""
        published, self.published = self.published, set()
        now = time.time()
        streams, subscribers, send = self.store.streams, self.subscribers, self.egress.send
        for topic in published:
            stream = streams.get(topic)
            if stream is not None and topic in subscribers:
                send(egress_position(topic, stream.top, now, stream.epoch))

    def housekeeping(self) -> None:
        """Once a tick: expire history, flush and compact the journal, update the gauges."""
        now = time.time()
        store = self.store
        store.expire(now, self.subscribers.__contains__)
        if self.journal is not None:
            try:
                self._write_journal(now)
                if self.journal is not None:
                    self.journal.flush(now)
                    self.journal.maybe_compact(store, now)
            except OSError:
                pass  # logged; the hub keeps forwarding from memory
        s, c = self.stats, store.counters
        s.history_evicted, s.history_expired, s.history_dropped = c.evicted_streams, c.expired_events, c.dropped_streams
        s.history_bytes = store.nbytes
        s.history_channels = len(store.streams)

    def _write_journal(self, now: float) -> None:
        """Write what the store stamped since the last call. If that fails the journal no longer
        matches what subscribers hold, and a restart from it would hand out their offsets again
        under the same epoch: it is moved aside and persistence stops, so a restart starts new
        epochs (clients get recovered: false, never a wrong event)."""
        journal = self.journal
        assert journal is not None
        records = self.store.take_journal()
        if not records:
            return
        try:
            journal.write(records, now)
        except OSError:
            self.journal = None
            self.store.journal = None
            journal.close()
            aside = journal.path.with_name(journal.path.name + ".failed")
            try:
                journal.path.replace(aside)
            except OSError as exc:
                self.log.error("cannot move the journal aside (%s): remove %s before restarting", exc, journal.path)
            self.log.error("history persistence is OFF until restart: a journal write failed; the journal was "
                           "moved to %s, and a restart starts every channel with a new epoch", aside)
            raise

    def drain_ingress(self) -> None:
        """Up to DRAIN_BATCH messages: check, stamp, forward. One recv per message (a message may
        carry several events) and one send per event: XPUB filters whole messages by topic."""
        recv = self.ingress.recv
        events = self.ingress.getsockopt
        # With a journal, a pass's events leave only after they were written (see the docstring).
        held: list[bytes] | None = None if self.journal is None else []
        send = self.egress.send if held is None else held.append
        stamp = self.store.stamp
        mark = self.published.add
        max_body = self.max_body
        now = time.time()
        forwarded = 0
        for n in range(DRAIN_BATCH):
            # A ZMQ_EVENTS look before the first receives rather than one that fails: pyzmq's
            # zmq.Again costs ~5 us, and at a low rate each pass brings a single message.
            if 0 < n < EVENTS_CHECKS and not events(EVENTS) & POLLIN:
                break
            try:
                message = recv(NOBLOCK)
            except zmq.Again:
                break
            if message[0] == ANSWERED:  # a worker's publishes, answered on its reply topic
                forwarded += self._confirmed(message, now, send)
                continue
            records, problem = read_ingress(message, max_body)
            if problem is not None:
                self.stats.hub_events_dropped[problem] += 1
                self.drop_log.warning(time.monotonic(), "dropped an ingress message: bad %s", problem)
                continue
            for topic, body in records:
                send(stamp(topic, body, now))
                mark(topic)
            forwarded += len(records)
        if held:
            self._send_written(held, now)
        self.stats.hub_events_in += forwarded
        self.stats.hub_ingress_queue = forwarded

    def _confirmed(self, message: bytes, now: float, send: Callable[[bytes], object]) -> int:
        """Stamp and send a confirmed ingress message's events, then its answer (after them, on
        the same XPUB: the worker gets both in one wake-up). Returns the events stamped."""
        parts = split_confirmed(message)
        if parts is None:
            self.stats.hub_events_dropped["confirmed"] += 1
            self.drop_log.warning(time.monotonic(), "dropped an ingress message: bad confirmed header")
            return 0
        reply_topic, request_id, body = parts
        records, problem = read_ingress(body, self.max_body)
        if problem is not None:
            self.stats.hub_events_dropped[problem] += 1
            send(answer_message(reply_topic, request_id, orjson.dumps({"ok": False, "error": f"bad {problem}"})))
            return 0
        positions = self._stamp_confirmed(records, now, send)
        send(answer_message(reply_topic, request_id, orjson.dumps({"ok": True, "positions": positions})))
        return len(records)

    def _stamp_confirmed(self, records: list[tuple[bytes, bytes]], now: float,
                         send: Callable[[bytes], object]) -> list[tuple[int, str]]:
        """Stamp and send records whose publisher waits for their positions; returns them."""
        stamp = self.store.stamp
        positions = []
        for topic, event in records:
            stamped = stamp(topic, event, now)
            send(stamped)
            self.published.add(topic)
            # from the message, not the stream: two records of one channel get two offsets
            offset, _, epoch = STAMP.unpack_from(stamped, len(topic))
            positions.append((offset, epoch.decode()))
        self.stats.confirmed_publishes += len(records)
        return positions

    def _send_written(self, messages: list[bytes], now: float) -> None:
        """Send messages once the journal (when there is one) has what they carry."""
        if self.journal is not None:
            try:
                self._write_journal(now)
            except OSError:
                pass  # logged; the events still go out (live delivery beats the journal)
        send = self.egress.send
        for message in messages:
            send(message)

    def drain_requests(self) -> None:
        """Answer up to REQUEST_BATCH history reads and confirmed publishes."""
        events = self.requests.getsockopt
        for _ in range(REQUEST_BATCH):
            if not events(EVENTS) & POLLIN:  # a look, not a receive that fails (zmq.Again costs ~5 us)
                return
            frames = self.requests.recv_multipart(NOBLOCK)
            if len(frames) != 4:  # identity, op, request id, body
                self.drop_log.warning(time.monotonic(), "dropped a request of %d frames", len(frames))
                continue
            identity, op, request_id, body = frames
            try:
                answer = self.answer(op, body)
            except Exception:
                self.log.exception("request %r failed", op[:16])
                answer = [orjson.dumps({"ok": False, "error": "internal error"})]
            self.requests.send_multipart([identity, op, request_id, *answer])

    def answer(self, op: bytes, body: bytes) -> list[bytes]:
        now = time.time()
        if op == PUBLISH_REQUEST:
            records, problem = read_ingress(body, self.max_body)
            if problem is not None:
                self.stats.hub_events_dropped[problem] += 1
                return [orjson.dumps({"ok": False, "error": f"bad {problem}"})]
            held: list[bytes] = []
            positions = self._stamp_confirmed(records, now, held.append)
            self._send_written(held, now)
            self.stats.hub_events_in += len(records)
            return [orjson.dumps({"ok": True, "positions": positions})]
        if op == HISTORY_REQUEST:
            try:
                query = orjson.loads(body)
                topic, since, limit = _history_query(query)
            except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
                return [orjson.dumps({"ok": False, "error": f"bad history request: {exc}"})]
            found = self.store.read(topic, since, limit, now)
            source = "worker" if query.get("source") == "worker" else "backend"
            self.stats.history_reads[(source, "covered" if found.covered else "not_covered")] += 1
            header = {"ok": True, "offset": found.top, "epoch": found.epoch.decode(), "covered": found.covered}
            return [orjson.dumps(header), *found.items]
        return [orjson.dumps({"ok": False, "error": "unknown request"})]

    def drain_subscriptions(self) -> None:
        """XPUB hands us b'\\x01'+topic / b'\\x00'+topic for each worker (un)subscribe."""
        while True:
            try:
                msg = self.egress.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not msg:
                continue
            topic = msg[1:]
            if topic[:1] == ANSWERED_TOPIC:
                continue  # a worker's reply topic: not a channel (no position, not counted)
            if msg[0] == 1:
                self.subscribers[topic] = self.subscribers.get(topic, 0) + 1
                self.stats.hub_subscribes["subscribe"] += 1
                # Sent after the XPUB registered the subscription: the new subscriber sees it,
                # and every event it gets from now on, in order.
                now = time.time()
                top, epoch = self.store.position(topic, now)
                self.egress.send(egress_position(topic, top, now, epoch))
            elif msg[0] == 0:
                left = self.subscribers.get(topic, 0) - 1
                if left > 0:
                    self.subscribers[topic] = left
                else:
                    self.subscribers.pop(topic, None)
                self.stats.hub_subscribes["unsubscribe"] += 1
            self.stats.hub_channels = len(self.subscribers)


_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "CURVE key not authorized",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "not a CURVE peer (plain tcp://, or the wrong hub key)",
}


def _peer_of(fd: int) -> str:
    """host:port of the peer on an accepted descriptor ZeroMQ reported (ours to read, not close)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            peer = sock.getpeername()
    except OSError:
        return "?"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (peer or "local")


def _history_query(query: object) -> tuple[bytes, tuple[int, bytes] | None, int]:
    """(topic, since, limit) of a history request body, or ValueError."""
    if not isinstance(query, dict):
        raise ValueError("not an object")
    topic = topic_for(check_channel(query["channel"]))
    limit = query.get("limit")
    if type(limit) is not int or not 0 <= limit <= MAX_REQUEST_LIMIT:
        raise ValueError(f"limit must be an integer from 0 to {MAX_REQUEST_LIMIT}")
    since = query.get("since")
    if since is None:
        return topic, None, limit
    offset, epoch = since.get("offset"), since.get("epoch")
    if type(offset) is not int or offset < 0 or not isinstance(epoch, str):
        raise ValueError("since must be {offset: integer >= 0, epoch: string}")
    return topic, (offset, epoch.encode()), limit
