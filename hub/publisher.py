"""The backend's way in: `Publisher(endpoint).publish(channel, type, data)`.

    from hub import Publisher
    with Publisher("ipc:///run/tidings/ingress") as pub:
        pub.publish("conversation:conv-123", "chat_message", {"content": "Hello there!"})

Blocking and thread-confined (one Publisher per thread), as a ZeroMQ socket is. Delivery is
at-most-once: a returned publish has been handed to the hub's socket, not to any browser.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import zmq

from hub.envelope import encode_event, ingress_record

SEND_TIMEOUT_MS = 2000  # how long publish() waits for a hub that is down before raising
LINGER_MS = 2000  # what close() waits to flush queued events before giving up on them


class HubUnavailable(Exception):
    """The hub did not take the event within the send timeout (not running, or overloaded)."""


class Publisher:
    def __init__(self, endpoint: str, send_timeout_ms: int = SEND_TIMEOUT_MS,
                 context: zmq.Context[Any] | None = None) -> None:
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        # IMMEDIATE: queue only on a live connection, so a hub that is down surfaces as an error
        # instead of events piling up unseen.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        self._sock.setsockopt(zmq.LINGER, LINGER_MS)
        self._sock.connect(endpoint)

    def publish(self, channel: str, type_: str, data: Mapping[str, Any]) -> None:
        """Encode once and hand to the hub. Raises EnvelopeError (bad input) or HubUnavailable."""
        self._send(ingress_record(*encode_event(channel, type_, data)))

    def broadcast(self, channels: Iterable[str], type_: str, data: Mapping[str, Any]) -> int:
        """The same event on several channels, in one message: all are checked before any is
        sent, and the hub takes them all or none."""
        records = [ingress_record(*encode_event(ch, type_, data)) for ch in dict.fromkeys(channels)]
        if records:
            self._send(b"".join(records))
        return len(records)

    def _send(self, message: bytes) -> None:
        try:
            self._sock.send(message)
        except zmq.Again:
            raise HubUnavailable(f"hub at {self.endpoint} did not take the event in time") from None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
