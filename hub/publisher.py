"""The backend's way in: `Publisher(endpoint).publish(channel, type, data)`.

    from hub import Publisher
    with Publisher("ipc:///run/tidings/ingress") as pub:
        pub.publish("conversation:conv-123", "chat_message", {"content": "Hello there!"})
        position = pub.publish("user:42", "notification", {...}, confirm=True)  # Position(channel, offset, epoch)
        found = pub.history("conversation:conv-123", since=(17, "3f2a...."), limit=100)

    # hub shards on other hosts, CURVE keys: the same settings the workers read
    with Publisher.from_config(Config.load()) as pub: ...

Blocking and thread-confined (one Publisher per thread), as a ZeroMQ socket is.
- `publish(...)` (no confirm) is at most once and the fastest: it returns once the hub's socket
  took the event, and an event lost in a hub crash after that is not reported. Measured: a
  Publisher closed right after a burst, while the hub is pushing back (its ingress queue at the
  HWM), can lose the burst's tail: ZeroMQ drops what the hub had not read when the connection
  ends. Keep one Publisher open per thread, or confirm what must arrive.
- `publish(..., confirm=True)` returns only once the hub has stamped the event (and, with
  persistence on, written it), with its offset and epoch; HubUnavailable otherwise. A timeout is
  ambiguous (the hub may have stamped it just before going away): the message says so.
Confirmed publishes and history reads use the hub's request endpoint (TIDINGS_HUB_REQUESTS),
derived from an ipc:// ingress endpoint when not given. So the order holds among unconfirmed
publishes and among confirmed ones, not across the two: a confirmed publish can be stamped before
an unconfirmed one sent just before it. Confirm both (or neither) when their order matters.

Several endpoints (one per hub shard, in shard order) make it route each channel to its shard
(hub/shards.py); a broadcast sends one message per shard, each taken whole or not at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import zmq

from hub.envelope import HISTORY_REQUEST, PUBLISH_REQUEST, check_channel, encode_event, ingress_record, split_egress
from hub.shards import shard_of, split_by_shard

if TYPE_CHECKING:
    from tidings.config import Config
    from tidings.links import CurveKeys

SEND_TIMEOUT_MS = 2000  # how long publish() waits for a hub that is down before raising
LINGER_MS = 2000  # what close() waits to flush queued events before giving up on them


REPLY_TIMEOUT_MS = 5000  # how long a confirmed publish or a history read waits for the hub's answer


class HubUnavailable(Exception):
    """The hub did not take the event within the send timeout (not running, or overloaded)."""


class Position(NamedTuple):
    """Where a confirmed event landed: clients that resume from it get every later event."""

    channel: str
    offset: int
    epoch: str


@dataclass(frozen=True)
class History:
    """A history read: the channel's position now, whether the kept events reach back to
    `since` + 1 (always True without `since`), and those events (decoded), oldest first."""

    channel: str
    offset: int
    epoch: str
    covered: bool
    events: list[dict[str, Any]]


def requests_endpoint_for(ingress: str) -> str | None:
    """ipc:///dir/ingress -> ipc:///dir/requests, the layout `tidings run` uses."""
    if ingress.startswith("ipc://") and ingress.endswith("/ingress"):
        return ingress[: -len("ingress")] + "requests"
    return None


class _ShardLink:
    """The sockets to one hub shard: PUSH for events, DEALER (made when first needed) for requests."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, requests: str | None, send_timeout_ms: int,
                 keys: CurveKeys | None, heartbeat: float | None) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.requests_endpoint = requests
        self.send_timeout_ms = send_timeout_ms
        self.keys = keys
        self.heartbeat = heartbeat
        self.dealer: zmq.Socket[Any] | None = None
        self.push = self._socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, LINGER_MS)
        self.push.connect(endpoint)

    def _socket(self, kind: int) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        # IMMEDIATE: queue only on a live connection, so a hub that is down surfaces as an error
        # instead of events piling up unseen.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDTIMEO, self.send_timeout_ms)
        if self.heartbeat:
            from tidings.links import set_heartbeat

            set_heartbeat(sock, self.heartbeat)
        if self.keys is not None:
            self.keys.make_client(sock)
        return sock

    def send(self, message: bytes) -> None:
        try:
            self.push.send(message)
        except zmq.Again:
            raise HubUnavailable(f"hub at {self.endpoint} did not take the event in time") from None

    def request(self, op: bytes, request_id: bytes, body: bytes) -> zmq.Socket[Any]:
        dealer = self.dealer
        if dealer is None:
            if self.requests_endpoint is None:
                raise ValueError("confirmed publishes and history reads need the hub's request endpoint: "
                                 "Publisher(..., requests='tcp://hub:5557')")
            dealer = self.dealer = self._socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(self.requests_endpoint)
        try:
            dealer.send_multipart([op, request_id, body])
        except zmq.Again:
            raise HubUnavailable(f"hub at {self.requests_endpoint} did not take the request in time") from None
        return dealer

    def close(self) -> None:
        self.push.close()
        if self.dealer is not None:
            self.dealer.close()


class Publisher:
    def __init__(self, endpoint: str | Sequence[str], send_timeout_ms: int = SEND_TIMEOUT_MS,
                 context: zmq.Context[Any] | None = None, requests: str | Sequence[str] | None = None,
                 reply_timeout_ms: int = REPLY_TIMEOUT_MS, keys: CurveKeys | None = None,
                 heartbeat: float | None = None) -> None:
        """`endpoint`: the hub's ingress, or one per shard in shard order (with `requests` the
        same length); `keys`: this host's CURVE keys (tidings.links.CurveKeys) for tcp:// hubs."""
        endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if not endpoints:
            raise ValueError("Publisher needs at least one hub endpoint")
        if requests is None:
            asked: list[str | None] = [requests_endpoint_for(e) for e in endpoints]
        else:
            asked = [requests] if isinstance(requests, str) else list(requests)
        if len(asked) != len(endpoints):
            raise ValueError(f"{len(endpoints)} ingress endpoint(s) but {len(asked)} request endpoint(s): "
                             "one of each per hub shard")
        self.endpoint = endpoints[0]
        self.reply_timeout_ms = reply_timeout_ms
        self._ids = itertools.count(1)
        self._ctx = context or zmq.Context.instance()
        self._shards = [_ShardLink(self._ctx, e, r, send_timeout_ms, keys, heartbeat)
                        for e, r in zip(endpoints, asked, strict=True)]

    @classmethod
    def from_config(cls, config: Config, **options: Any) -> Publisher:
        """A Publisher for the hubs a tidings configuration names (endpoints, shards, keys)."""
        from tidings.links import keys_for

        return cls(config.ingress_endpoints, requests=config.requests_endpoints, keys=keys_for(config),
                   heartbeat=config.hub_heartbeat, **options)

    def _shard(self, channel: str) -> _ShardLink:
        return self._shards[shard_of(channel.encode(), len(self._shards))]

    def publish(self, channel: str, type_: str, data: Mapping[str, Any], confirm: bool = False) -> Position | None:
        """Encode once and hand to the channel's hub; with confirm, wait until the hub stamped it
        and return its Position. Raises EnvelopeError (bad input) or HubUnavailable."""
        topic, body = encode_event(channel, type_, data)
        record = ingress_record(topic, body)
        if confirm:
            shard = shard_of(channel.encode(), len(self._shards))
            return self._confirmed({shard: [(topic, (channel, record))]})[0]
        self._shard(channel).send(record)
        return None

    def broadcast(self, channels: Iterable[str], type_: str, data: Mapping[str, Any]) -> int:
        """The same event on several channels: all are checked before any is sent, and each hub
        shard takes its part whole or none of it. At most once; returns the channel count."""
        groups = self._encode(channels, type_, data)
        for shard, group in groups.items():
            self._shards[shard].send(b"".join(record for _, (_, record) in group))
        return sum(len(g) for g in groups.values())

    def broadcast_confirmed(self, channels: Iterable[str], type_: str, data: Mapping[str, Any]) -> list[Position]:
        """`broadcast`, answered once each channel's hub stamped its event: their positions, in
        the order of `channels` (HubUnavailable names the shard that failed)."""
        names = list(dict.fromkeys(channels))
        found = {p.channel: p for p in self._confirmed(self._encode(names, type_, data))}
        return [found[ch] for ch in names]

    def _encode(self, channels: Iterable[str], type_: str,
                data: Mapping[str, Any]) -> dict[int, list[tuple[bytes, tuple[str, bytes]]]]:
        encoded = []
        for ch in dict.fromkeys(channels):
            topic, body = encode_event(ch, type_, data)
            encoded.append((topic, (ch, ingress_record(topic, body))))
        return split_by_shard(encoded, len(self._shards))

    def history(self, channel: str, since: tuple[int, str] | None = None, limit: int | None = None) -> History:
        """The channel's kept events after `since` (offset, epoch), or its last `limit` (100 by
        default), with its position now. `covered` False: the history does not reach back to
        since + 1 (or the epoch changed): refetch from your own store."""
        check_channel(channel)
        query: dict[str, Any] = {"channel": channel, "limit": 100 if limit is None else limit, "since": None}
        if since is not None:
            query["since"] = {"offset": since[0], "epoch": since[1]}
        link = self._shard(channel)
        request_id = b"%d" % next(self._ids)
        frames = self._reply(link, link.request(HISTORY_REQUEST, request_id, orjson.dumps(query)), request_id)
        header = orjson.loads(frames[0])
        if not header.get("ok"):
            raise ValueError(f"hub refused the history read: {header.get('error')}")
        events = [orjson.loads(split_egress(m)[4]) for m in frames[1:]]
        return History(channel, header["offset"], header["epoch"], header["covered"], events)

    def _confirmed(self, groups: dict[int, list[tuple[bytes, tuple[str, bytes]]]]) -> list[Position]:
        """Each shard's records as one publish request, all sent before any answer is awaited."""
        asked = []
        for shard, group in groups.items():
            link = self._shards[shard]
            request_id = b"%d" % next(self._ids)
            dealer = link.request(PUBLISH_REQUEST, request_id, b"".join(record for _, (_, record) in group))
            asked.append((link, dealer, request_id, group))
        found: dict[str, Position] = {}
        for link, dealer, request_id, group in asked:
            header = orjson.loads(self._reply(link, dealer, request_id, publish=True)[0])
            if not header.get("ok"):
                raise HubUnavailable(f"hub at {link.endpoint} refused the event: {header.get('error')}")
            for (_, (channel, _)), (offset, epoch) in zip(group, header["positions"], strict=True):
                found[channel] = Position(channel, offset, epoch)
        return list(found.values())

    def _reply(self, link: _ShardLink, dealer: zmq.Socket[Any], request_id: bytes,
               publish: bool = False) -> list[bytes]:
        """The reply to one request (frames after op and id)."""
        while dealer.poll(self.reply_timeout_ms, zmq.POLLIN):
            frames = dealer.recv_multipart()
            if len(frames) >= 3 and frames[1] == request_id:
                return frames[2:]
            # else a late answer to an earlier request that timed out: skip it
        raise HubUnavailable(f"hub at {link.requests_endpoint} did not answer within {self.reply_timeout_ms} ms"
                             + ("; the event may or may not have been published" if publish else ""))

    def close(self) -> None:
        for link in self._shards:
            link.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
