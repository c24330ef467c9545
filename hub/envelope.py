"""The hub <-> worker wire contract. Pure: bytes in, bytes out, no sockets.

Every ZeroMQ message is a single frame: one `recv` and one `send` per message is the cheapest
pyzmq offers (each frame of a multipart message is another Python call on both ends).

Ingress (publisher -> hub, PUSH/PULL): one or more records, back to back
    record = topic + BODY_LEN(len(body)) + body
        topic = channel UTF-8 + b"\\0". The terminator makes ZeroMQ's prefix filter exact:
                a SUB to b"conversation:conv-1\\0" never matches b"conversation:conv-12\\0".
        body  = the event JSON the browser will receive, minus `offset` and `epoch`:
                {"type":..,"channel":..,"data":..,"timestamp":..}. Encoded once, by the publisher.
    Several records in one message (a broadcast, or the client publishes a worker took in one
    loop pass) cost the hub one receive; the hub takes a message whole or drops it whole.

Egress (hub -> workers, XPUB/SUB):
    topic + STAMP(offset, hub_time, epoch) + payload
        an event. payload = body with `offset` and `epoch` spliced in: the exact text every
        subscriber receives, built once by the hub, not once per worker. The topic comes first,
        so ZeroMQ's prefix filter still matches; the stamp repeats offset and epoch in binary
        for the worker's gap check, and carries the hub's clock for latency metrics.
    topic + STAMP(top, hub_time, epoch)
        a position: the hub saw a new subscription to topic and says where the channel stands
        (sent on the XPUB after the subscription is in place, so the new subscriber misses no
        event after `top`). Every subscriber of the topic gets it, which doubles as a check:
        a worker that saw less than `top` lost events at the high-water mark.

Confirmed ingress (a worker's client publishes and HTTP publishes, PUSH/PULL like any ingress):
    ANSWERED + len(reply_topic) + reply_topic + REQUEST_ID + records
    The hub stamps the records like any others, sends their events, then sends on the XPUB:
    reply_topic + REQUEST_ID + JSON {"ok": true, "positions": [[offset, epoch], ...]}
    The worker subscribes to its own reply topic, so the answer comes on the socket that brings
    the events, right after them: the same wake-up, usually the same write as the events. A reply
    topic starts with the ANSWERED byte, which no channel name holds.

Requests (DEALER -> the hub's ROUTER), multipart: [op, request id, body]; the reply echoes op
and id, then a JSON header, then (history only) the egress messages found:
    b"history"  body = JSON {"channel", "since": {"offset", "epoch"} | null, "limit"}
                reply header {"ok": true, "offset": top, "epoch", "covered"}
    b"publish"  body = an ingress message (one or more records), stamped like ingress
                reply header {"ok": true, "positions": [[offset, epoch], ...]} in record order
    any error   reply header {"ok": false, "error": why}
A request socket never carries the fan-out: the forwarding loop reads it between passes.

The hub never parses event JSON: it checks the framing, counts offsets and splices.
"""

from __future__ import annotations

import math
import re
import struct
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

TOPIC_END = b"\0"
BODY_LEN = struct.Struct("!I")  # ingress record: body length after the topic
EPOCH_BYTES = 16  # a channel's epoch: 16 hex characters (hub/history.py), so it reads as a JSON string too
STAMP = struct.Struct(f"!Qd{EPOCH_BYTES}s")  # offset (per channel, from 1), hub time.time(), epoch
ANSWERED = 0x01  # first byte of a confirmed ingress message and of every reply topic
REPLY_TOPIC_LEN = struct.Struct("!B")
REQUEST_ID = struct.Struct("!Q")
HISTORY_REQUEST = b"history"
PUBLISH_REQUEST = b"publish"
# Requests and replies queued per peer on the request sockets. Large and independent of the
# event HWM: a worker that fell behind heals every gapped channel with a read of its own, and a
# ROUTER drops replies over its HWM silently (the read would time out and its subscribers lose
# the channel). The 0 on the reply side means "no limit": a worker only gets what it asked for.
REQUEST_HWM = 100_000
REPLY_HWM = 0
MAX_CHANNEL_BYTES = 255  # Centrifugo's max_channel_length
MAX_TOPIC_BYTES = MAX_CHANNEL_BYTES + len(TOPIC_END)
EVENT_TYPE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
CHANNEL = re.compile(r"[A-Za-z0-9_\-.@]+:[A-Za-z0-9_\-.@:]+")
# Types the server itself sends: an event named like one of them would confuse every client.
RESERVED_TYPES = frozenset({"connected", "subscribed", "unsubscribed", "pong", "published", "refreshed", "error"})
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
    if not isinstance(type_, str):
        raise EnvelopeError("type must match [a-z][a-z0-9_.]{0,63}")
    return _checked_type(type_)


@lru_cache(maxsize=1024)  # a deployment uses a handful of types; a refused one raises, so is not kept
def _checked_type(type_: str) -> str:
    if not EVENT_TYPE.fullmatch(type_):
        raise EnvelopeError("type must match [a-z][a-z0-9_.]{0,63}")
    if type_ in RESERVED_TYPES:
        raise EnvelopeError(f"type {type_!r} is reserved for server replies")
    return type_


def topic_for(channel: str) -> bytes:
    return channel.encode() + TOPIC_END


def channel_of(topic: bytes) -> str:
    return topic[:-1].decode()


@lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    """'YYYY-MM-DDTHH:MM:SS.' of a Unix second: strftime costs ~3 us, and every event needs one."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def iso_timestamp(now: float) -> str:
    ms = int(now * 1000)  # one truncation for both parts, so .999 never pairs with the next second
    return f"{_second(ms // 1000)}{ms % 1000:03d}Z"


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


def event_body(channel: str, type_: str, data: Any, now: float) -> bytes:
    """The event JSON, for a channel and type already checked and data that came out of
    orjson.loads (so it holds no NaN and nothing JSON cannot carry)."""
    return orjson.dumps({"type": type_, "channel": channel, "data": data, "timestamp": iso_timestamp(now)})


def encode_event(channel: str, type_: str, data: Mapping[str, Any], now: float | None = None) -> tuple[bytes, bytes]:
    """(topic, body) for one event, checked. Raises EnvelopeError on a bad channel, type or data."""
    check_channel(channel)
    check_event_type(type_)
    if type(data) is not dict and not isinstance(data, Mapping):
        raise EnvelopeError("data must be a JSON object")
    try:
        body = event_body(channel, type_, data, time.time() if now is None else now)
    except TypeError as exc:  # orjson's error for values JSON cannot hold (huge ints, objects)
        raise EnvelopeError(f"data is not JSON: {exc}") from None
    # orjson writes NaN and ±Infinity as null: only a body with a null can hide one
    if b"null" in body and _non_finite(data):
        raise EnvelopeError("data holds NaN or Infinity, which JSON cannot carry")
    return topic_for(channel), body


# -- ingress ---------------------------------------------------------------------------------------
def ingress_record(topic: bytes, body: bytes) -> bytes:
    """One event as an ingress record; an ingress message is one or more of them joined."""
    return topic + BODY_LEN.pack(len(body)) + body


def read_ingress(message: bytes, max_body: int) -> tuple[list[tuple[bytes, bytes]], str | None]:
    """([(topic, body), ...], None) for a well-formed ingress message, else ([], what is wrong).
    Cheap: no JSON parsing; the topic must be terminated and short, the body look like {...}."""
    records: list[tuple[bytes, bytes]] = []
    size = len(message)
    pos = 0
    index = message.find
    while pos < size:
        end = index(TOPIC_END, pos, pos + MAX_TOPIC_BYTES) + 1
        if end <= pos + 1:  # no terminator within reach, or an empty topic
            return [], "topic"
        if end + BODY_LEN.size > size:
            return [], "body"
        (length,) = BODY_LEN.unpack_from(message, end)
        start = end + BODY_LEN.size
        stop = start + length
        if length > max_body or length < 2 or stop > size or message[start] != 0x7B or message[stop - 1] != 0x7D:
            return [], "body"  # not {...}, over the cap, or cut short
        records.append((message[pos:end], message[start:stop]))
        pos = stop
    if not records:
        return [], "empty"
    return records, None


# -- egress ----------------------------------------------------------------------------------------
EGRESS = b'%b%b%b,"offset":%d%b'  # topic, stamp, body without its "}", offset, epoch_tail(epoch)


def epoch_tail(epoch: bytes) -> bytes:
    """What closes every payload of an epoch: kept per channel, so an event formats in one step."""
    return b',"epoch":"%b"}' % epoch


def egress_event(topic: bytes, offset: int, hub_time: float, epoch: bytes, body: bytes) -> bytes:
    """The hub's message for one event: topic, stamp, then the exact client payload.
    (The hub's own hot path, HistoryStore.stamp, formats EGRESS with the channel's kept tail.)"""
    return EGRESS % (topic, STAMP.pack(offset, hub_time, epoch), body[:-1], offset, epoch_tail(epoch))


def egress_position(topic: bytes, top: int, hub_time: float, epoch: bytes) -> bytes:
    """The hub's message for a new subscription: where the channel stands, no payload."""
    return topic + STAMP.pack(top, hub_time, epoch)


def split_egress(message: bytes) -> tuple[bytes, int, float, bytes, bytes]:
    """(topic, offset, hub_time, epoch, client payload) of an egress message; the payload is
    empty for a position (a subscription confirmation)."""
    end = message.index(TOPIC_END) + 1
    offset, hub_time, epoch = STAMP.unpack_from(message, end)
    return message[:end], offset, hub_time, epoch, message[end + STAMP.size:]


# -- confirmed ingress ------------------------------------------------------------------------------
def reply_topic_for(name: str) -> bytes:
    """A worker's own topic for the hub's answers (name: unique per worker process)."""
    return bytes((ANSWERED,)) + name.encode() + TOPIC_END


def confirmed_ingress(reply_topic: bytes, request_id: int, records: bytes) -> bytes:
    return (bytes((ANSWERED,)) + REPLY_TOPIC_LEN.pack(len(reply_topic)) + reply_topic
            + REQUEST_ID.pack(request_id) + records)


def split_confirmed(message: bytes) -> tuple[bytes, int, bytes] | None:
    """(reply topic, request id, records) of a confirmed ingress message; None if malformed."""
    if len(message) < 2:
        return None
    end = 2 + message[1]
    if len(message) < end + REQUEST_ID.size or message[end - 1] != 0 or message[2] != ANSWERED:
        return None
    return message[2:end], REQUEST_ID.unpack_from(message, end)[0], message[end + REQUEST_ID.size:]


def answer_message(reply_topic: bytes, request_id: int, body: bytes) -> bytes:
    """The hub's answer to a confirmed ingress message, sent on the XPUB to its worker."""
    return reply_topic + REQUEST_ID.pack(request_id) + body


def split_answer(message: bytes) -> tuple[int, bytes]:
    """(request id, JSON body) of an answer."""
    end = message.index(TOPIC_END) + 1
    return REQUEST_ID.unpack_from(message, end)[0], message[end + REQUEST_ID.size:]
