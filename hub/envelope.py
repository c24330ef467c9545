"""The hub <-> worker wire contract. Pure: bytes in, bytes out, no sockets.

Ingress (publisher -> hub, PUSH/PULL), two frames:
    [topic, body]
        topic = channel UTF-8 + b"\\0". The terminator makes ZeroMQ's prefix filter exact:
                a SUB to b"conversation:conv-1\\0" never matches b"conversation:conv-12\\0".
        body  = the event JSON the browser will receive, minus `offset` and `epoch`:
                {"type":..,"channel":..,"data":..,"timestamp":..}. Encoded once, by the publisher.

Egress (hub -> workers, XPUB/SUB):
    [topic + stamp, body]  an event; stamp = STAMP(offset, hub_time) + epoch (ASCII). The stamp
                           rides in the topic frame, after the terminator, so ZeroMQ's prefix
                           filter still matches and the body frame goes on untouched.
    [topic]                the hub saw a new subscription to topic (sent on the XPUB after the
                           subscription is in place, so events published later are not missed)

The hub never parses `body`; the worker splices offset and epoch onto it once per event
(`client_frame_payload`) and sends those same bytes to every local subscriber.
"""

from __future__ import annotations

import math
import re
import struct
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

TOPIC_END = b"\0"
STAMP = struct.Struct("!Qd")  # offset (per channel, from 1), hub time.time() when stamped
MAX_CHANNEL_BYTES = 255  # Centrifugo's max_channel_length
EVENT_TYPE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
CHANNEL = re.compile(r"[A-Za-z0-9_\-.@]+:[A-Za-z0-9_\-.@:]+")
# Types the server itself sends: an event named like one of them would confuse every client.
RESERVED_TYPES = frozenset({"connected", "subscribed", "unsubscribed", "pong", "published", "error"})
DOCUMENTED_TYPES = ("notification", "chat_message", "status_update")


class EnvelopeError(ValueError):
    """An event or channel that cannot be put on the wire; the message says why."""


def check_channel(channel: object) -> str:
    if not isinstance(channel, str) or not channel:
        raise EnvelopeError("channel must be a non-empty string")
    # The pattern first: it admits ASCII only, so encode() below cannot fail (lone surrogates).
    if not CHANNEL.fullmatch(channel) or len(channel) > MAX_CHANNEL_BYTES:
        raise EnvelopeError(
            f"channel must be namespace:name of [A-Za-z0-9_-.@:], at most {MAX_CHANNEL_BYTES} bytes"
        )
    return channel


def check_event_type(type_: object) -> str:
    if not isinstance(type_, str) or not EVENT_TYPE.fullmatch(type_):
        raise EnvelopeError("type must match [a-z][a-z0-9_.]{0,63}")
    if type_ in RESERVED_TYPES:
        raise EnvelopeError(f"type {type_!r} is reserved for server replies")
    return type_


def topic_for(channel: str) -> bytes:
    return channel.encode() + TOPIC_END


def channel_of(topic: bytes) -> str:
    return topic[:-1].decode()


def iso_timestamp(now: float) -> str:
    ms = int(now * 1000)  # one truncation for both parts, so .999 never pairs with the next second
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _non_finite(value: Any) -> bool:
    """NaN or ±Infinity anywhere: orjson would write them as null, changing the data silently."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is float:
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def encode_event(channel: str, type_: str, data: Mapping[str, Any], now: float | None = None) -> tuple[bytes, bytes]:
    """(topic, body) for one event, checked. Raises EnvelopeError on a bad channel, type or data."""
    check_channel(channel)
    check_event_type(type_)
    if not isinstance(data, Mapping):
        raise EnvelopeError("data must be a JSON object")
    if _non_finite(data):
        raise EnvelopeError("data holds NaN or Infinity, which JSON cannot carry")
    stamp_time = time.time() if now is None else now
    try:
        body = orjson.dumps({"type": type_, "channel": channel, "data": data,
                             "timestamp": iso_timestamp(stamp_time)})
    except TypeError as exc:  # orjson's error for values JSON cannot hold (NaN, huge ints, objects)
        raise EnvelopeError(f"data is not JSON: {exc}") from None
    return topic_for(channel), body


def check_ingress(topic: bytes, body: bytes | memoryview | None, max_body: int) -> str | None:
    """Why an ingress message must be dropped, or None. Cheap: no JSON parsing.
    `body` is None when the message did not have exactly two frames."""
    if body is None:
        return "frame count"
    if len(topic) < 2 or topic[-1] != 0 or topic.find(TOPIC_END) != len(topic) - 1:
        return "topic"
    if len(body) > max_body or len(body) < 2 or body[0] != 0x7B or body[-1] != 0x7D:  # {...}
        return "body"
    return None


def stamp_topic(topic: bytes, offset: int, hub_time: float, epoch: bytes) -> bytes:
    """The egress head frame: topic (with its terminator) + STAMP + epoch."""
    return topic + STAMP.pack(offset, hub_time) + epoch


def split_head(head: bytes) -> tuple[bytes, int, float, bytes]:
    """(topic, offset, hub_time, epoch) from an egress head frame."""
    end = head.index(TOPIC_END) + 1
    offset, hub_time = STAMP.unpack_from(head, end)
    return head[:end], offset, hub_time, head[end + STAMP.size:]


def client_frame_payload(body: bytes, offset: int, epoch: bytes) -> bytes:
    """The exact text frame every subscriber receives: body with offset and epoch spliced in."""
    return b"%s,\"offset\":%d,\"epoch\":\"%s\"}" % (body[:-1], offset, epoch)
