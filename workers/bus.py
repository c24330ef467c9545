"""A worker's ZeroMQ side: for each hub shard, SUB from its XPUB, PUSH to its ingress, DEALER
to its ROUTER for history reads. Only moves bytes.

`HubShards` holds one `HubBus` per shard and routes by channel (hub/shards.py): a channel is
subscribed, published and read at its owner only. All buses share one ZeroMQ context (one I/O
thread). Every socket heartbeats its hub (tidings/links.py) and, with TIDINGS_HUB_KEYS, speaks
CURVE as this host.

The SUB socket is read with `loop.add_reader` on its edge-triggered ZMQ_FD: each wake-up drains
up to DRAIN_BATCH messages without blocking, then re-checks ZMQ_EVENTS (reading it can consume
the edge) and reschedules itself if more is waiting. A monitor socket per socket reports whether
the hub connection is up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from hub.envelope import REPLY_HWM, REQUEST_HWM
from hub.shards import shard_of, shard_of_topic
from tidings.config import Config
from tidings.links import CurveKeys, set_heartbeat

NOBLOCK = int(zmq.NOBLOCK)
EVENTS = int(zmq.EVENTS)  # plain ints: the enum members cost a lookup per use
POLLIN = int(zmq.POLLIN)
EVENTS_CHECKS = 4  # receives per drain preceded by a ZMQ_EVENTS look; a busy socket reads until Again
DRAIN_BATCH = 128  # hub messages per pass: enough to coalesce writes; a bigger batch delays first deliveries
DRAIN_BYTES = 1 << 20  # ... and at most about this many payload bytes, so a batch stays small
PUSH_HWM = 10_000  # publishes queued towards the hub before `publish` replies internal_error
RECONNECT_MAX_MS = 1000  # cap on ZeroMQ's reconnect backoff: the hub is back within a second
# ZeroMQ does not redial a hub that refused the handshake (unknown CURVE key): we do, this often,
# so admitting the host's key at the hub (authorized/ + SIGHUP) is enough to bring it in.
REDIAL_AFTER_REFUSAL_SECONDS = 5.0
LINK_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
REFUSALS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the hub refused this host's CURVE key (add its host.key to the hub's "
                                     "authorized/ and reload the hub)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the handshake failed: the hub speaks CURVE and this host does not, "
                                         "or hub.key is not the hub's",
}

class HubBus:
    """The sockets to one hub shard."""

    def __init__(self, ctx: zmq.Context[Any], shard: int, ingress: str, egress: str, requests: str, hwm: int,
                 on_messages: Callable[[list[bytes]], None],
                 on_hub_state: Callable[[int, bool], None],
                 on_reply: Callable[[list[bytes]], None]) -> None:
        self.shard = shard
        self.ingress = ingress
        self.egress = egress
        self.requests = requests
        self.on_messages = on_messages
        self.on_hub_state = on_hub_state
        self.on_reply = on_reply
        self.ctx = ctx
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, hwm)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.IMMEDIATE, 1)  # no queueing into a hub that is not there
        self.push.setsockopt(zmq.SNDHWM, PUSH_HWM)
        self.push.setsockopt(zmq.LINGER, 500)
        self.push.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
        # Reads are answered out of band from the fan-out: a slow read never delays an event.
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)  # a hub that is not there fails the read at once
        self.dealer.setsockopt(zmq.SNDHWM, REQUEST_HWM)  # see hub/envelope.py
        self.dealer.setsockopt(zmq.RCVHWM, REPLY_HWM)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
        # "Up" is a finished ZMTP handshake (with CURVE: the hub proved its key and admitted ours),
        # not a TCP connect, on all three sockets: their handshakes end a few ms apart, and a
        # publish or a history read in between would fail.
        self.sockets = (self.sub, self.push, self.dealer)
        self.monitors = [sock.get_monitor_socket(LINK_EVENTS) for sock in self.sockets]
        self.up = [False] * len(self.sockets)
        self.connected = False
        self.refused: Callable[[int, str], None] | None = None  # told when the hub refuses the handshake
        # Told when the events (SUB) link drops: its subscriptions are re-sent when it is back, and
        # the hub answers each with the channel's position (the other two links carry no state).
        self.events_lost: Callable[[int], None] | None = None
        self._redial: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False
        self._replies_scheduled = False

    def secure(self, keys: CurveKeys | None, heartbeat: float) -> None:
        """Before start: heartbeats on every socket, CURVE as this host when there are keys."""
        for sock in (self.sub, self.push, self.dealer):
            set_heartbeat(sock, heartbeat)
            if keys is not None:
                keys.make_client(sock)

    @property
    def reachable(self) -> bool:
        """Some socket is linked: the hub is there, the others' handshakes are about to end."""
        return any(self.up)

    def rekey(self, keys: CurveKeys) -> None:
        """New CURVE keys (a rotation): they apply to the next connection, so re-dial now. Not
        linked until that handshake succeeds (an explicit disconnect raises no monitor event)."""
        for sock in self.sockets:
            keys.make_client(sock)
        self.up = [False] * len(self.sockets)
        self.connected = False
        if self._redial is not None:
            self._redial.cancel()
        self._dial_again()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sub.connect(self.egress)
        self.push.connect(self.ingress)
        self.dealer.connect(self.requests)
        loop.add_reader(self.sub.getsockopt(zmq.FD), self._drain)
        for n, monitor in enumerate(self.monitors):
            loop.add_reader(monitor.getsockopt(zmq.FD), self._drain_monitor, n)
        loop.add_reader(self.dealer.getsockopt(zmq.FD), self.drain_replies)
        # Edge-triggered: anything that arrived before add_reader would never wake us.
        loop.call_soon(self._drain)
        for n in range(len(self.monitors)):
            loop.call_soon(self._drain_monitor, n)
        loop.call_soon(self.drain_replies)

    def close(self) -> None:
        if self._redial is not None:
            self._redial.cancel()
        if self.loop is not None and not self.sub.closed:
            self.loop.remove_reader(self.sub.getsockopt(zmq.FD))
            for monitor in self.monitors:
                self.loop.remove_reader(monitor.getsockopt(zmq.FD))
            self.loop.remove_reader(self.dealer.getsockopt(zmq.FD))
        for sock, monitor in zip(self.sockets, self.monitors, strict=True):
            sock.disable_monitor()
            monitor.close(0)
        self.dealer.close(0)
        self.sub.close(0)
        self.push.close()

    # -- hub -> worker -------------------------------------------------------------------------------
    def subscribe(self, topic: bytes) -> None:
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._recheck()

    def unsubscribe(self, topic: bytes) -> None:
        self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)
        self._recheck()

    def poke(self) -> None:
        """Look at the sockets again (from the worker's 1 s tick). Their FDs are edge-triggered and
        many calls can consume an edge; each known one re-checks, and this bounds the cost of one
        that was missed to a second instead of a socket nobody reads again."""
        self._recheck()
        self._recheck_replies()
        if self.loop is not None:
            for n in range(len(self.monitors)):
                self.loop.call_soon(self._drain_monitor, n)

    def _recheck(self) -> None:
        """Any call on the SUB socket may consume the edge of its FD (libzmq processes pending
        commands and input then), so a message that arrived meanwhile would wake nobody: look again."""
        if not self._drain_scheduled and self.loop is not None:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        sub = self.sub
        recv = sub.recv
        events = sub.getsockopt
        batch: list[bytes] = []
        append = batch.append
        size = 0
        settled = False  # ZMQ_EVENTS said "nothing waiting" after the last receive
        try:
            for n in range(DRAIN_BATCH):
                # A few ZMQ_EVENTS checks rather than one failed receive: pyzmq builds zmq.Again
                # (~5 us) and at a low rate every wake-up brings a single message.
                if n < EVENTS_CHECKS and not events(EVENTS) & POLLIN:
                    settled = True
                    break
                message = recv(NOBLOCK)  # one frame per message (hub/envelope.py)
                append(message)
                size += len(message)
                if size > DRAIN_BYTES:
                    break
        except zmq.Again:
            pass
        if batch:
            self.on_messages(batch)
        # The FD is edge-triggered: unless the last look found nothing, look again or nobody wakes.
        if not settled and events(EVENTS) & POLLIN and not self._drain_scheduled:
            self._drain_scheduled = True
            assert self.loop is not None
            self.loop.call_soon(self._drain)

    def _drain_monitor(self, n: int) -> None:
        """Link events of socket n: the bus is connected while all three are."""
        monitor = self.monitors[n]
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            kind = event["event"]
            if kind not in (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED):
                if n == 0 and self.refused is not None:  # the three are refused alike: tell once
                    self.refused(self.shard, REFUSALS.get(kind, "the handshake failed"))
                self._schedule_redial()
                continue
            was, self.up[n] = self.up[n], kind == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if n == 0 and was and not self.up[n] and self.events_lost is not None:
                self.events_lost(self.shard)
            up = all(self.up)
            if up != self.connected:
                self.connected = up
                self.on_hub_state(self.shard, up)
        # Same edge rule as the SUB socket.
        if monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            assert self.loop is not None
            self.loop.call_soon(self._drain_monitor, n)

    def _schedule_redial(self) -> None:
        if self._redial is None and self.loop is not None:
            self._redial = self.loop.call_later(REDIAL_AFTER_REFUSAL_SECONDS, self._dial_again)

    def _dial_again(self) -> None:
        self._redial = None
        if self.sub.closed:
            return
        for sock, endpoint in ((self.sub, self.egress), (self.push, self.ingress), (self.dealer, self.requests)):
            with contextlib.suppress(zmq.ZMQError):
                sock.disconnect(endpoint)
            sock.connect(endpoint)  # the SUB re-sends its subscriptions on the new connection
        self._recheck()

    def drain_replies(self) -> None:
        self._replies_scheduled = False
        dealer = self.dealer
        events = dealer.getsockopt
        recv = dealer.recv_multipart
        # ZMQ_EVENTS before each receive, not a receive that fails: zmq.Again costs ~5 us, and
        # a confirmed publish brings one reply per loop pass.
        while events(EVENTS) & POLLIN:
            self.on_reply(recv(NOBLOCK))

    def _recheck_replies(self) -> None:
        if not self._replies_scheduled and self.loop is not None:
            self._replies_scheduled = True
            self.loop.call_soon(self.drain_replies)

    def request(self, op: bytes, request_id: bytes, body: bytes) -> bool:
        """Send a request to the hub's ROUTER without blocking; False if it cannot go now."""
        try:
            self.dealer.send_multipart([op, request_id, body], NOBLOCK)
        except zmq.Again:
            return False
        self._recheck_replies()  # a send may consume the FD's edge (see _recheck)
        return True

    # -- worker -> hub -------------------------------------------------------------------------------
    def push_message(self, message: bytes) -> bool:
        """Hand an ingress message (one or more records) to the hub without blocking."""
        try:
            self.push.send(message, NOBLOCK)
            return True
        except zmq.Again:
            return False


class HubShards:
    """One HubBus per hub shard; each channel goes to the shard that owns it."""

    def __init__(self, config: Config, keys: CurveKeys | None,
                 on_messages: Callable[[list[bytes]], None],
                 on_hub_state: Callable[[int, bool], None],
                 on_reply: Callable[[list[bytes]], None]) -> None:
        self.count = config.hubs
        self.ctx = zmq.Context()
        self.buses = [
            HubBus(self.ctx, shard, ingress, egress, requests, config.hub_hwm, on_messages, on_hub_state, on_reply)
            for shard, (ingress, egress, requests) in enumerate(zip(
                config.ingress_endpoints, config.egress_endpoints, config.requests_endpoints, strict=True))
        ]
        for bus in self.buses:
            bus.secure(keys, config.hub_heartbeat)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for bus in self.buses:
            bus.start(loop)

    def close(self) -> None:
        for bus in self.buses:
            bus.close()
        self.ctx.term()

    def for_topic(self, topic: bytes) -> HubBus:
        return self.buses[shard_of_topic(topic, self.count)]

    def for_channel(self, channel: str) -> HubBus:
        return self.buses[shard_of(channel.encode(), self.count)]

    def subscribe(self, topic: bytes) -> None:
        self.buses[shard_of_topic(topic, self.count)].subscribe(topic)

    def unsubscribe(self, topic: bytes) -> None:
        self.buses[shard_of_topic(topic, self.count)].unsubscribe(topic)

    def subscribe_everywhere(self, topic: bytes) -> None:
        """A topic every shard may send on (the worker's reply topic)."""
        for bus in self.buses:
            bus.subscribe(topic)

    @property
    def down(self) -> int:
        return sum(1 for bus in self.buses if not bus.connected)
