"""hub/envelope.py: channel and type checks, topics, ingress records, egress stamps, the client payload."""

from __future__ import annotations

import json
import math
import struct
from datetime import UTC, datetime

import pytest

from hub.envelope import (
    BODY_LEN,
    DOCUMENTED_TYPES,
    EPOCH_BYTES,
    MAX_CHANNEL_BYTES,
    RESERVED_TYPES,
    STAMP,
    EnvelopeError,
    channel_of,
    check_channel,
    check_event_type,
    egress_event,
    egress_position,
    encode_event,
    event_body,
    ingress_record,
    iso_timestamp,
    read_ingress,
    split_egress,
    topic_for,
)

NOW = 1_764_283_671.123  # 2025-11-27T22:47:51.123Z


# -- topics ------------------------------------------------------------------------------------------
def test_topic_is_channel_bytes_with_nul_terminator() -> None:
    assert topic_for("conversation:conv-1") == b"conversation:conv-1\0"


def test_topic_terminator_isolates_prefixes() -> None:
    # ZeroMQ SUB filters are byte prefixes: the terminator makes conv-1 not match conv-12.
    short, long = topic_for("conversation:conv-1"), topic_for("conversation:conv-12")
    assert not long.startswith(short)
    assert not short.startswith(long)
    assert long.startswith(b"conversation:conv-1")  # without the terminator it would match


@pytest.mark.parametrize("channel", ["a:b", "conversation:conv-123", "user:u1@example.com", "x:" + "y" * 253])
def test_channel_of_inverts_topic_for(channel: str) -> None:
    assert channel_of(topic_for(channel)) == channel


# -- channel names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("channel", [
    "conversation:conv-123", "user:u1", "task:a.b_c-d@e", "a:b:c", "A:Z", "n:" + "x" * (MAX_CHANNEL_BYTES - 2),
])
def test_good_channels_pass(channel: str) -> None:
    assert check_channel(channel) == channel


@pytest.mark.parametrize("channel", [
    pytest.param("n:" + "x" * (MAX_CHANNEL_BYTES - 1), id="256-bytes"),
    pytest.param("conversation:*", id="star"),
    pytest.param("*", id="lone-star"),
    pytest.param("conversation:a\u0000b", id="nul"),
    pytest.param("conversation:../etc", id="dot-dot-slash"),
    pytest.param("../etc:passwd", id="slash-in-namespace"),
    pytest.param("conversation:café", id="unicode-letter"),
    pytest.param("conversation:٣", id="unicode-digit"),
    pytest.param("conversation:conv 1", id="space"),
    pytest.param("conversation:conv-1\n", id="trailing-newline"),
    pytest.param("conv-123", id="missing-namespace"),
    pytest.param(":conv-123", id="empty-namespace"),
    pytest.param("conversation:", id="empty-name"),
    pytest.param("", id="empty"),
])
def test_bad_channel_names_are_refused(channel: str) -> None:
    with pytest.raises(EnvelopeError):
        check_channel(channel)


def test_channel_limit_counts_utf8_bytes_not_characters() -> None:
    # 255 characters is the limit, but only ASCII is allowed anyway: check the boundary exactly.
    check_channel("n:" + "x" * (MAX_CHANNEL_BYTES - 2))
    with pytest.raises(EnvelopeError, match="255 bytes"):
        check_channel("n:" + "x" * (MAX_CHANNEL_BYTES - 1))


@pytest.mark.parametrize("channel", [None, 1, b"a:b", ["a:b"], {"a": "b"}])
def test_non_string_channels_are_refused(channel: object) -> None:
    with pytest.raises(EnvelopeError, match="non-empty string"):
        check_channel(channel)


def test_lone_surrogate_channel_raises_envelope_error() -> None:
    with pytest.raises(EnvelopeError):
        check_channel("conversation:\ud800")


# -- event types -------------------------------------------------------------------------------------
@pytest.mark.parametrize("type_", [*DOCUMENTED_TYPES, "a", "x.y_z9", "a" + "b" * 63])
def test_good_event_types_pass(type_: str) -> None:
    assert check_event_type(type_) == type_


@pytest.mark.parametrize("type_", [
    "", "Chat", "9lives", "_x", ".x", "chat-message", "chat message", "a" + "b" * 64, "événement", "chat\n",
    None, 1, ["chat"],
])
def test_bad_event_types_are_refused(type_: object) -> None:
    with pytest.raises(EnvelopeError, match=r"\[a-z\]"):
        check_event_type(type_)


@pytest.mark.parametrize("type_", sorted(RESERVED_TYPES))
def test_reserved_types_are_refused(type_: str) -> None:
    with pytest.raises(EnvelopeError, match="reserved"):
        check_event_type(type_)


def test_reserved_types_are_the_server_replies() -> None:
    assert {"connected", "subscribed", "unsubscribed", "pong", "published", "refreshed", "error"} == RESERVED_TYPES


# -- encode_event ------------------------------------------------------------------------------------
def test_encode_event_gives_topic_and_body() -> None:
    data = {"conversation_id": "conv-123", "sender_id": "user-456", "content": "Hello there!"}
    topic, body = encode_event("conversation:conv-123", "chat_message", data, now=NOW)
    assert topic == b"conversation:conv-123\0"
    assert json.loads(body) == {"type": "chat_message", "channel": "conversation:conv-123", "data": data,
                                "timestamp": "2025-11-27T22:47:51.123Z"}
    assert body.startswith(b"{") and body.endswith(b"}")


def test_encode_event_uses_the_wall_clock_without_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    _, body = encode_event("a:b", "x", {})
    stamped = datetime.strptime(json.loads(body)["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before <= stamped <= datetime.now(UTC)


@pytest.mark.parametrize("channel", ["conversation:*", "n:" + "x" * 254, "nonamespace", "a:\u0000"])
def test_encode_event_refuses_bad_channels(channel: str) -> None:
    with pytest.raises(EnvelopeError, match="channel"):
        encode_event(channel, "chat_message", {}, now=NOW)


@pytest.mark.parametrize("type_", ["error", "pong", "Bad", ""])
def test_encode_event_refuses_bad_types(type_: str) -> None:
    with pytest.raises(EnvelopeError, match="type"):
        encode_event("a:b", type_, {}, now=NOW)


@pytest.mark.parametrize("data", [None, [], [1], "x", 1, b"{}"])
def test_encode_event_refuses_non_object_data(data: object) -> None:
    with pytest.raises(EnvelopeError, match="JSON object"):
        encode_event("a:b", "x", data, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**100, object(), {1, 2}, {1: "non-str key"}])
def test_encode_event_refuses_values_json_cannot_hold(value: object) -> None:
    with pytest.raises(EnvelopeError, match="not JSON"):
        encode_event("a:b", "x", {"v": value}, now=NOW)


def test_encode_event_keeps_64_bit_ints_exact() -> None:
    _, body = encode_event("a:b", "x", {"max": 2**64 - 1, "min": -(2**63)}, now=NOW)
    assert json.loads(body)["data"] == {"max": 2**64 - 1, "min": -(2**63)}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_encode_event_refuses_nan_and_infinity(value: float) -> None:
    with pytest.raises(EnvelopeError):
        encode_event("a:b", "x", {"v": value}, now=NOW)


# -- timestamps --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("now", "text"), [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (NOW, "2025-11-27T22:47:51.123Z"),
    (1_700_000_000.5, "2023-11-14T22:13:20.500Z"),
    (1_700_000_000.999, "2023-11-14T22:13:20.999Z"),
])
def test_iso_timestamp(now: float, text: str) -> None:
    assert iso_timestamp(now) == text


def test_iso_timestamp_never_runs_a_second_ahead() -> None:
    # 22:13:20.9999996 is 22:13:20.999Z (truncated) or 22:13:21.000Z (rounded), never 22:13:21.999Z.
    assert iso_timestamp(1_700_000_000.9999996) in ("2023-11-14T22:13:20.999Z", "2023-11-14T22:13:21.000Z")


# -- ingress ---------------------------------------------------------------------------------------------
def test_read_ingress_returns_the_records_of_a_message() -> None:
    one = encode_event("a:b", "x", {"k": 1}, now=NOW)
    two = encode_event("conversation:conv-12", "chat_message", {"content": "}{\u0000"}, now=NOW)
    assert read_ingress(ingress_record(*one), max_body=65536) == ([one], None)
    message = ingress_record(*one) + ingress_record(*two)
    assert read_ingress(message, max_body=65536) == ([one, two], None)


def record(topic: bytes, body: bytes, length: int | None = None) -> bytes:
    return topic + BODY_LEN.pack(len(body) if length is None else length) + body


@pytest.mark.parametrize(("message", "why"), [
    (b"", "empty"),
    (b"a:b", "topic"),  # no terminator
    (record(b"\0", b"{}"), "topic"),  # empty topic
    (record(b"n:" + b"x" * MAX_CHANNEL_BYTES + b"\0", b"{}"), "topic"),  # terminator out of reach
    (b"a:b\0", "body"),  # no length
    (b"a:b\0\0\0", "body"),  # a length cut short
    (record(b"a:b\0", b""), "body"),
    (record(b"a:b\0", b"{"), "body"),
    (record(b"a:b\0", b"[]"), "body"),
    (record(b"a:b\0", b"{} "), "body"),
    (record(b"a:b\0", b"x{}"), "body"),
    (record(b"a:b\0", b"{" + b"x" * 99 + b"}"), "body"),  # 101 bytes, over max_body=100
    (record(b"a:b\0", b"{}", length=3), "body"),  # claims more than the message holds
    (record(b"a:b\0", b"{}") + b"a:b", "topic"),  # a good record, then garbage
])
def test_read_ingress_names_what_is_wrong(message: bytes, why: str) -> None:
    assert read_ingress(message, max_body=100) == ([], why)


def test_a_bad_record_drops_the_whole_message() -> None:
    good = ingress_record(*encode_event("a:b", "x", {}, now=NOW))
    assert read_ingress(good + record(b"a:b\0", b"[]"), max_body=100) == ([], "body")


def test_read_ingress_body_limit_is_inclusive() -> None:
    body = b"{" + b"x" * 98 + b"}"
    assert len(body) == 100
    assert read_ingress(record(b"a:b\0", body), max_body=100)[1] is None
    assert read_ingress(record(b"a:b\0", body), max_body=99) == ([], "body")


def test_longest_channel_fits_in_a_record() -> None:
    topic = topic_for("n:" + "x" * (MAX_CHANNEL_BYTES - 2))
    assert read_ingress(record(topic, b"{}"), max_body=100) == ([(topic, b"{}")], None)


# -- egress: stamps and the client payload -----------------------------------------------------------------
EPOCH = b"3f2a9c0d1e5b7a88"


@pytest.mark.parametrize("offset", [1, 17, 2**64 - 1])
def test_egress_round_trip(offset: int) -> None:
    topic, body = encode_event("conversation:conv-1", "x", {}, now=NOW)
    message = egress_event(topic, offset, NOW, EPOCH, body)
    assert message.startswith(b"conversation:conv-1\0")  # so a SUB to the topic still matches
    assert len(message) == len(topic) + STAMP.size + len(body) + len(f',"offset":{offset},"epoch":""') + EPOCH_BYTES
    got_topic, got_offset, hub_time, epoch, payload = split_egress(message)
    assert (got_topic, got_offset, hub_time, epoch) == (topic, offset, NOW, EPOCH)
    assert json.loads(payload)["offset"] == offset


@pytest.mark.parametrize("top", [0, 1, 41, 2**64 - 1])
def test_a_position_is_a_stamp_with_an_empty_payload(top: int) -> None:
    # the hub's answer to a new subscription: where the channel stands, no event
    topic = topic_for("conversation:conv-1")
    message = egress_position(topic, top, NOW, EPOCH)
    assert message == topic + STAMP.pack(top, NOW, EPOCH) and len(message) == len(topic) + STAMP.size
    assert split_egress(message) == (topic, top, NOW, EPOCH, b"")


def test_a_position_and_an_event_tell_apart_by_their_payload() -> None:
    topic, body = encode_event("conversation:conv-1", "x", {}, now=NOW)
    assert split_egress(egress_position(topic, 5, NOW, EPOCH))[4] == b""
    assert split_egress(egress_event(topic, 5, NOW, EPOCH, body))[4]  # an event's payload is never empty


def test_egress_refuses_negative_offsets() -> None:
    with pytest.raises(struct.error):
        egress_event(b"a:b\0", -1, NOW, EPOCH, b"{}")


def test_client_payload_is_the_event_plus_offset_and_epoch() -> None:
    data = {"conversation_id": "conv-123", "content": "Hello \"there\" \u00e9\u2603 }"}
    topic, body = encode_event("conversation:conv-123", "chat_message", data, now=NOW)
    payload = split_egress(egress_event(topic, 17, NOW, EPOCH, body))[4]
    message = json.loads(payload)
    assert message == {"type": "chat_message", "channel": "conversation:conv-123", "data": data,
                       "timestamp": "2025-11-27T22:47:51.123Z", "offset": 17, "epoch": EPOCH.decode()}
    assert list(message)[-2:] == ["offset", "epoch"]
    assert payload.decode("utf-8")  # a valid text frame


def test_client_payload_with_empty_event_data() -> None:
    topic, body = encode_event("a:b", "x", {}, now=NOW)
    assert json.loads(split_egress(egress_event(topic, 1, NOW, EPOCH, body))[4])["data"] == {}  # type: ignore[index]


def test_event_body_matches_encode_event() -> None:
    data = {"k": [1, 2.5, None, "é"]}
    assert event_body("a:b", "x", data, NOW) == encode_event("a:b", "x", data, now=NOW)[1]


# -- confirmed ingress ----------------------------------------------------------------------------
def test_confirmed_ingress_round_trip() -> None:
    from hub.envelope import (
        ANSWERED,
        answer_message,
        confirmed_ingress,
        reply_topic_for,
        split_answer,
        split_confirmed,
    )

    reply = reply_topic_for("worker-0-123-abcd")
    assert reply[0] == ANSWERED and reply.endswith(b"\0")
    records = ingress_record(*encode_event("conversation:c1", "chat_message", {"n": 1}))
    message = confirmed_ingress(reply, 2**40 + 7, records)
    assert message[0] == ANSWERED  # the hub tells it from a plain ingress message by its first byte
    assert split_confirmed(message) == (reply, 2**40 + 7, records)
    assert read_ingress(records, 1 << 16)[1] is None
    # the answer: the reply topic first, so ZeroMQ routes it to that worker alone
    out = answer_message(reply, 2**40 + 7, b'{"ok":true,"positions":[[1,"e"]]}')
    assert out.startswith(reply) and split_answer(out) == (2**40 + 7, b'{"ok":true,"positions":[[1,"e"]]}')


@pytest.mark.parametrize("bad", [b"\x01", b"\x01\x05ab", b"\x01\x03\x01a\x00" + b"\x00" * 3,
                                 b"\x01\x03xa\x00" + b"\x00" * 8, b"\x01\x03\x01ab" + b"\x00" * 8])
def test_a_malformed_confirmed_header_is_refused(bad: bytes) -> None:
    from hub.envelope import split_confirmed

    assert split_confirmed(bad) is None
