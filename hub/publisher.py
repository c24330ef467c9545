"""The backend's way in: `Publisher(endpoint).publish(channel, type, data)`.

    from hub import Publisher
    with Publisher("ipc:///run/tidings/ingress") as pub:
        pub.publish("conversation:conv-123", "chat_message", {"content": "Hello there!"})
        position = pub.publish("user:42", "notification", {...}, confirm=True)  # Position(channel, offset, epoch)
        found = pub.history("conversation:conv-123", since=(17, "3f2a...."), limit=100)

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
derived from an ipc:// ingress endpoint when not given.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import zmq

from hub.envelope import HISTORY_REQUEST, PUBLISH_REQUEST, check_channel, encode_event, ingress_record, split_egress

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


class Publisher:
    def __init__(self, endpoint: str, send_timeout_ms: int = SEND_TIMEOUT_MS,
                 context: zmq.Context[Any] | None = None, requests: str | None = None,
                 reply_timeout_ms: int = REPLY_TIMEOUT_MS) -> None:
        self.endpoint = endpoint
        self.requests_endpoint = requests or requests_endpoint_for(endpoint)
        self.send_timeout_ms = send_timeout_ms
        self.reply_timeout_ms = reply_timeout_ms
        self._ids = itertools.count(1)
        self._dealer: zmq.Socket[Any] | None = None  # made at the first confirmed publish or read
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        # IMMEDIATE: queue only on a live connection, so a hub that is down surfaces as an error
        # instead of events piling up unseen.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        self._sock.setsockopt(zmq.LINGER, LINGER_MS)
        self._sock.connect(endpoint)

    def publish(self, channel: str, type_: str, data: Mapping[str, Any], confirm: bool = False) -> Position | None:
        """Encode once and hand to the hub; with confirm, wait until the hub stamped it and return
        its Position. Raises EnvelopeError (bad input) or HubUnavailable."""
        record = ingress_record(*encode_event(channel, type_, data))
        if confirm:
            return self._confirmed(record, [channel])[0]
        self._send(record)
        return None

    def broadcast(self, channels: Iterable[str], type_: str, data: Mapping[str, Any]) -> int:
        """The same event on several channels, in one message: all are checked before any is
        sent, and the hub takes them all or none. At most once; returns the channel count."""
        records = [ingress_record(*encode_event(ch, type_, data)) for ch in dict.fromkeys(channels)]
        if records:
            self._send(b"".join(records))
        return len(records)

    def broadcast_confirmed(self, channels: Iterable[str], type_: str, data: Mapping[str, Any]) -> list[Position]:
        """`broadcast`, answered once the hub stamped every channel's event: their positions."""
        names = list(dict.fromkeys(channels))
        records = [ingress_record(*encode_event(ch, type_, data)) for ch in names]
        return self._confirmed(b"".join(records), names) if records else []

    def history(self, channel: str, since: tuple[int, str] | None = None, limit: int | None = None) -> History:
        """The channel's kept events after `since` (offset, epoch), or its last `limit` (100 by
        default), with its position now. `covered` False: the history does not reach back to
        since + 1 (or the epoch changed): refetch from your own store."""
        check_channel(channel)
        query: dict[str, Any] = {"channel": channel, "limit": 100 if limit is None else limit, "since": None}
        if since is not None:
            query["since"] = {"offset": since[0], "epoch": since[1]}
        frames = self._request(HISTORY_REQUEST, orjson.dumps(query))
        header = orjson.loads(frames[0])
        if not header.get("ok"):
            raise ValueError(f"hub refused the history read: {header.get('error')}")
        events = [orjson.loads(split_egress(m)[4]) for m in frames[1:]]
        return History(channel, header["offset"], header["epoch"], header["covered"], events)

    def _confirmed(self, message: bytes, channels: list[str]) -> list[Position]:
        header = orjson.loads(self._request(PUBLISH_REQUEST, message)[0])
        if not header.get("ok"):
            raise HubUnavailable(f"hub refused the event: {header.get('error')}")
        return [Position(ch, offset, epoch) for ch, (offset, epoch) in zip(channels, header["positions"], strict=True)]

    def _request(self, op: bytes, body: bytes) -> list[bytes]:
        """One request to the hub's ROUTER and its reply (frames after op and id)."""
        dealer = self._dealer
        if dealer is None:
            if self.requests_endpoint is None:
                raise ValueError("confirmed publishes and history reads need the hub's request endpoint: "
                                 "Publisher(..., requests='tcp://hub:5557')")
            dealer = self._dealer = self._ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IMMEDIATE, 1)
            dealer.setsockopt(zmq.SNDTIMEO, self.send_timeout_ms)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(self.requests_endpoint)
        request_id = b"%d" % next(self._ids)
        try:
            dealer.send_multipart([op, request_id, body])
        except zmq.Again:
            raise HubUnavailable(f"hub at {self.requests_endpoint} did not take the request in time") from None
        while dealer.poll(self.reply_timeout_ms, zmq.POLLIN):
            frames = dealer.recv_multipart()
            if len(frames) >= 3 and frames[1] == request_id:
                return frames[2:]
            # else a late answer to an earlier request that timed out: skip it
        raise HubUnavailable(f"hub at {self.requests_endpoint} did not answer within {self.reply_timeout_ms} ms"
                             + ("; the event may or may not have been published" if op == PUBLISH_REQUEST else ""))

    def _send(self, message: bytes) -> None:
        try:
            self._sock.send(message)
        except zmq.Again:
            raise HubUnavailable(f"hub at {self.endpoint} did not take the event in time") from None

    def close(self) -> None:
        self._sock.close()
        if self._dealer is not None:
            self._dealer.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
