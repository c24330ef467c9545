"""The hub process: PULL ingress -> stamp offset and epoch -> XPUB egress. All of the hub's I/O.

One thread, one zmq.Poller. Each pass drains the ingress socket without blocking (bounded, so
subscription traffic and housekeeping are never starved), stamps each event with the next
offset of its channel, and forwards the frames untouched otherwise. ZeroMQ's XPUB filters by
topic, so an event reaches only the workers that subscribed to its channel.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from pathlib import Path
from types import FrameType

import zmq

from hub.envelope import EPOCH_BYTES, MAX_CHANNEL_BYTES, egress_event, read_ingress
from tidings.config import Config
from tidings.logs import RateLimitedLog
from tidings.metrics import Stats, StatsExporter, mark_process_dead
from tidings.sdnotify import Notifier

NOBLOCK = int(zmq.NOBLOCK)  # plain ints: the enum members cost a lookup per use
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
EVENTS_CHECKS = 4  # receives per pass preceded by a ZMQ_EVENTS look; a busy socket reads until Again
DRAIN_BATCH = 2000  # messages per pass: large enough to amortise poll(), small enough to stay responsive
TICK_SECONDS = 1.0  # metrics flush, status line, watchdog floor


def _ipc_dir(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]).parent if endpoint.startswith("ipc://") else None


class Broker:
    def __init__(self, config: Config, log: logging.Logger, notifier: Notifier, stats: Stats) -> None:
        self.config = config
        self.log = log
        self.notifier = notifier
        self.stats = stats
        self.epoch = secrets.token_hex(EPOCH_BYTES // 2).encode()
        self.offsets: dict[bytes, int] = {}
        self.subscribers: dict[bytes, int] = {}  # topic -> worker subscriptions the XPUB reported
        self.stopping = False
        self.max_body = config.max_message_bytes + MAX_CHANNEL_BYTES + 256  # event JSON around `data`
        self.drop_log = RateLimitedLog(log)
        self.ctx = zmq.Context()
        self.ingress = self.ctx.socket(zmq.PULL)
        self.egress = self.ctx.socket(zmq.XPUB)

    # -- lifecycle ---------------------------------------------------------------------------
    def bind(self) -> None:
        for endpoint in (self.config.ingress_endpoint, self.config.egress_endpoint):
            d = _ipc_dir(endpoint)
            if d is not None:
                d.mkdir(parents=True, exist_ok=True)
        self.ingress.setsockopt(zmq.RCVHWM, self.config.hub_hwm)
        self.ingress.setsockopt(zmq.LINGER, 0)
        self.egress.setsockopt(zmq.SNDHWM, self.config.hub_hwm)
        self.egress.setsockopt(zmq.LINGER, 0)
        # Every (un)subscribe reaches us, so subscriber counts are exact and each new
        # subscription gets its confirmation message.
        self.egress.setsockopt(zmq.XPUB_VERBOSER, 1)
        self.ingress.bind(self.config.ingress_endpoint)
        self.egress.bind(self.config.egress_endpoint)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the hub holds no keys: nothing to reload
        try:
            self.bind()
        except zmq.ZMQError as exc:
            self.log.error("cannot bind %s / %s: %s", self.config.ingress_endpoint,
                           self.config.egress_endpoint, exc)
            return 1
        exporter = StatsExporter(self.stats)
        self.log.info("hub serving: ingress %s, egress %s, epoch %s", self.config.ingress_endpoint,
                      self.config.egress_endpoint, self.epoch.decode())
        self.notifier.ready(f"epoch {self.epoch.decode()}")
        poller = zmq.Poller()
        poller.register(self.ingress, zmq.POLLIN)
        poller.register(self.egress, zmq.POLLIN)
        # The watchdog ping rides on the poll loop: a hub stuck anywhere stops sending it.
        tick_every = min(TICK_SECONDS, self.notifier.watchdog_interval or TICK_SECONDS)
        next_tick = time.monotonic() + tick_every
        while not self.stopping:
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            ready = dict(poller.poll(timeout_ms))
            if self.egress in ready:
                self.drain_subscriptions()
            if self.ingress in ready:
                self.drain_ingress()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + tick_every
                self.notifier.watchdog()
                exporter.flush()
        self.notifier.stopping("hub stopping")
        exporter.flush()
        mark_process_dead(os.getpid())
        self.log.info("hub stopped: %d events forwarded in this epoch", self.stats.hub_events_in)
        self.ingress.close(0)
        self.egress.close(0)
        self.ctx.term()
        return 0

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    # -- the forwarding path -------------------------------------------------------------------
    def drain_ingress(self) -> None:
        """Up to DRAIN_BATCH messages: check, stamp, forward. One recv per message (a message may
        carry several events) and one send per event: XPUB filters whole messages by topic."""
        recv = self.ingress.recv
        events = self.ingress.getsockopt
        send = self.egress.send
        offsets = self.offsets
        epoch = self.epoch
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
            records, problem = read_ingress(message, max_body)
            if problem is not None:
                self.stats.hub_events_dropped[problem] += 1
                self.drop_log.warning(time.monotonic(), "dropped an ingress message: bad %s", problem)
                continue
            for topic, body in records:
                offset = offsets.get(topic, 0) + 1
                offsets[topic] = offset
                send(egress_event(topic, offset, now, epoch, body))
            forwarded += len(records)
        self.stats.hub_events_in += forwarded
        self.stats.hub_ingress_queue = forwarded

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
            if msg[0] == 1:
                self.subscribers[topic] = self.subscribers.get(topic, 0) + 1
                self.stats.hub_subscribes["subscribe"] += 1
                # Sent after the XPUB registered the subscription: the new subscriber sees it,
                # and every event it gets from now on, in order.
                self.egress.send(topic)
            elif msg[0] == 0:
                left = self.subscribers.get(topic, 0) - 1
                if left > 0:
                    self.subscribers[topic] = left
                else:
                    self.subscribers.pop(topic, None)
                self.stats.hub_subscribes["unsubscribe"] += 1
            self.stats.hub_channels = len(self.subscribers)
