"""workers/protocol.py: every command and error path of Session.handle, rate limits, TokenBucket."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hub.envelope import topic_for
from workers.errors import RATE_ABUSE, ReplyCode, RequestError
from workers.protocol import (
    ABUSE_WINDOW,
    INSUFFICIENT_STATE,
    MAX_DEPTH,
    MAX_EPOCH_CHARS,
    MAX_ID_CHARS,
    Forward,
    Join,
    Leave,
    Refresh,
    Send,
    Session,
    SessionLimits,
    TokenBucket,
    parse_connect_since,
    parse_message,
    parse_since,
    subscribed_reply,
    unsubscribed_reply,
)

from .helpers import (
    Clock,
    assert_closed_with,
    assert_error_code,
    assert_join,
    assert_reply,
    decode,
    make_claims,
    make_client,
    only,
)

INVALID = ReplyCode.INVALID_REQUEST
CHANNEL = "conversation:conv-123"


def nested(depth: int, id_: str | None = None) -> bytes:
    """A ping whose JSON is `depth` containers deep (the message object itself is level 1)."""
    head = '{"type":"ping",' + ('' if id_ is None else f'"id":"{id_}",')
    if depth <= 2:
        return (head + '"data":{}}').encode()
    return (head + '"data":{"x":' + "[" * (depth - 2) + "]" * (depth - 2) + "}}").encode()


# -- connect -------------------------------------------------------------------------------------------
def test_open_joins_the_personal_channel_and_says_connected() -> None:
    client = make_client(make_claims("u-42", exp=1_900_000_000.75), connection_id="conn-7")
    join = assert_join(client.session.open(), "user:u-42", None, connect=True)
    assert join.failed is None  # the personal channel is kept even if the hub is slow to confirm
    assert client.session.channels == ("user:u-42",)
    # `connected` is built by the glue once the hub said where the personal channel stands
    connected = decode(client.session.connected_reply(7, b"3f2a9c0d1e5b7a88", None))
    assert connected == {"type": "connected", "data": {
        "user_id": "u-42", "connection_id": "conn-7", "expires_at": 1_900_000_000,
        "ping_interval": 25.0, "pong_timeout": 20.0,  # SessionLimits' defaults: the client's liveness timer
        "personal": {"channel": "user:u-42", "offset": 7, "epoch": "3f2a9c0d1e5b7a88"}}}


@pytest.mark.parametrize("recovered", [True, False])
def test_connected_says_whether_the_personal_channel_was_recovered(recovered: bool) -> None:
    client = make_client(make_claims("u1"))
    personal = decode(client.session.connected_reply(0, b"e" * 16, recovered))["data"]["personal"]
    assert personal == {"channel": "user:u1", "offset": 0, "epoch": "e" * 16, "recovered": recovered}


def test_open_resumes_the_personal_channel_from_the_connect_since() -> None:
    clock = Clock()
    session = Session(make_claims("u1"), "c-1", SessionLimits(), clock.now, since=(12, b"3f2a9c0d1e5b7a88"))
    assert_join(session.open(), "user:u1", None, since=(12, b"3f2a9c0d1e5b7a88"), connect=True)
    assert session.since is None  # used once: not kept for the connection's lifetime


# -- parsing: not a valid message ----------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [
    b"", b"{", b"}", b"not json", b"\xff\xfe", b'{"type":"ping",}', b"NaN", b"Infinity",
    b'{"type":"ping","data":{"x":NaN}}', b'{"type":"ping","data":{"x":-Infinity}}',
    b'{"type":"ping","data":{"x":1e400}}',
    b'{"type":"ping","id":"\\ud800"}', b'{"type":"ping","id":"\xed\xa0\x80"}', b"\x00",
    b"[" * 5000 + b"]" * 5000,
])
def test_not_json_is_invalid_request(payload: bytes) -> None:
    data = assert_error_code(make_client().send(payload), INVALID)
    assert data["message"] == "message is not valid JSON"


@pytest.mark.parametrize("payload", [b"[]", b"[1]", b"1", b'"ping"', b"null", b"true", b'[{"type":"ping"}]'])
def test_json_that_is_not_an_object_is_invalid_request(payload: bytes) -> None:
    data = assert_error_code(make_client().send(payload), INVALID)
    assert data["message"] == "message must be a JSON object"


def test_unknown_type_is_invalid_request_with_the_id_echoed() -> None:
    client = make_client()
    data = assert_error_code(client.send({"type": "dance", "id": "9", "data": {}}), INVALID, "9")
    assert "dance" in data["message"]
    assert client.session.last_type == "unknown"
    assert client.session.last_result == "error"


def test_unknown_type_message_is_truncated() -> None:
    data = assert_error_code(make_client().send({"type": "x" * 10_000, "data": {}}), INVALID)
    assert len(data["message"]) < 100


@pytest.mark.parametrize("type_", [None, 1, ["ping"], {"ping": 1}, True])
def test_type_must_be_a_string(type_: object) -> None:
    data = assert_error_code(make_client().send({"type": type_, "id": "t", "data": {}}), INVALID, "t")
    assert data["message"] == "type must be a string"


def test_missing_type_is_invalid_request() -> None:
    assert_error_code(make_client().send({"id": "t", "data": {}}), INVALID, "t")


@pytest.mark.parametrize("type_", ["subscribe", "unsubscribe", "publish"])
@pytest.mark.parametrize("data", ["missing", None, [], "x", 1])
def test_commands_need_an_object_data(type_: str, data: object) -> None:
    message: dict[str, object] = {"type": type_, "id": "k"}
    if data != "missing":
        message["data"] = data
    assert assert_error_code(make_client().send(message), INVALID, "k")["message"] == "data must be a JSON object"


def test_ping_without_data_is_fine_but_null_data_is_not() -> None:
    assert_reply(make_client().send({"type": "ping", "id": "p"}), "pong", "p")
    assert_error_code(make_client().send({"type": "ping", "id": "p", "data": None}), INVALID, "p")


@pytest.mark.parametrize("id_", [1, 1.5, True, ["1"], {"id": "1"}, "x" * (MAX_ID_CHARS + 1)])
def test_bad_id_is_refused_and_not_echoed(id_: object) -> None:
    data = assert_error_code(make_client().send({"type": "ping", "id": id_, "data": {}}), INVALID)
    assert "id must be a string" in data["message"]


@pytest.mark.parametrize("id_", ["", "1", "x" * MAX_ID_CHARS, "naïve ☃", "\u0000"])
def test_good_ids_are_echoed_exactly(id_: str) -> None:
    assert_reply(make_client().ping(id_), "pong", id_)


def test_null_id_means_no_id() -> None:
    assert_reply(make_client().send({"type": "ping", "id": None, "data": {}}), "pong")


def test_depth_limit_is_exactly_max_depth() -> None:
    assert MAX_DEPTH == 32
    assert_reply(make_client().send(nested(MAX_DEPTH, "d")), "pong", "d")
    data = assert_error_code(make_client().send(nested(MAX_DEPTH + 1)), INVALID)
    assert "nested deeper than 32" in data["message"]


def test_depth_error_echoes_the_id() -> None:
    assert_error_code(make_client().send(nested(MAX_DEPTH + 1, "d")), INVALID, "d")


def test_nesting_helper_builds_what_it_says() -> None:
    def depth(value: object) -> int:
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        return 0
    assert [depth(json.loads(nested(n))) for n in (2, 3, 32, 33)] == [2, 3, 32, 33]


@pytest.mark.parametrize("depth", [33, 100, 1000])
def test_deep_objects_are_refused_whatever_the_command(depth: int) -> None:
    inner = '{"a":' * (depth - 2) + "1" + "}" * (depth - 2)
    payload = '{"type":"publish","data":{"channel":"conversation:x","type":"t","data":' + inner + "}}"
    client = make_client()
    data = assert_error_code(client.send(payload.encode()), INVALID)
    assert "nested deeper" in data["message"]


def test_many_brackets_inside_strings_do_not_count_as_depth() -> None:
    payload = json.dumps({"type": "ping", "id": "s", "data": {"text": "[{" * 1000}}).encode()
    assert_reply(make_client().send(payload), "pong", "s")


def test_wide_shallow_messages_are_fine() -> None:
    payload = json.dumps({"type": "ping", "id": "w", "data": {"x": [[1]] * 1000}}).encode()
    assert_reply(make_client().send(payload), "pong", "w")


def test_parse_message_returns_type_id_and_data() -> None:
    assert parse_message(b'{"type":"subscribe","id":"1","data":{"channel":"a:b"}}') == \
        ("subscribe", "1", {"channel": "a:b"})
    assert parse_message(b'{"type":"ping"}') == ("ping", None, {})


# -- ping ------------------------------------------------------------------------------------------------
def test_ping_with_and_without_id() -> None:
    client = make_client()
    assert assert_reply(client.ping("3"), "pong", "3") == {}
    assert assert_reply(client.ping(), "pong") == {}
    assert client.session.last_type == "ping"
    assert client.session.last_result == "ok"


# -- subscribe ------------------------------------------------------------------------------------------------
def test_subscribe_allowed_joins_and_replies_subscribed() -> None:
    client = make_client()
    join = assert_join(client.subscribe(CHANNEL, "1"), CHANNEL, "1")
    # the glue answers with the channel's position once the hub sent it
    assert decode(subscribed_reply(join.request_id, join.channel, 5, b"3f2a9c0d1e5b7a88", None)) == {
        "type": "subscribed", "id": "1", "data": {"channel": CHANNEL, "offset": 5, "epoch": "3f2a9c0d1e5b7a88"}}
    assert join.failed is not None
    failed = decode(join.failed)
    assert failed["type"] == "error" and failed["id"] == "1"
    assert failed["data"]["code"] == ReplyCode.SUBSCRIPTION_FAILED.value
    assert CHANNEL in client.session.channels


def test_sessions_on_one_channel_hold_one_name_and_no_publish_bucket() -> None:
    # per-connection memory: the name is shared (interned), the publish bucket waits for a publish
    a, b = make_client(), make_client()
    a.subscribe(CHANNEL)
    b.subscribe("conversation:" + "conv-123")  # an equal string, built apart
    assert a.session.channels == b.session.channels == (CHANNEL,)
    assert a.session.channels[0] is b.session.channels[0]
    assert a.session.last_type == "subscribe" and a.session.publishes is None


def test_subscribe_unauthorized_keeps_the_connection_and_holds_nothing() -> None:
    client = make_client(make_claims(channels=("conversation:conv-1",)))
    assert_error_code(client.subscribe("conversation:conv-12", "1"), ReplyCode.UNAUTHORIZED, "1")
    assert_error_code(client.subscribe("task:1", "2"), ReplyCode.UNAUTHORIZED, "2")
    assert client.session.channels == ()
    only(client.subscribe("conversation:conv-1", "3"), Join)  # still usable


def test_subscribe_with_no_channel_claims_is_unauthorized() -> None:
    client = make_client(make_claims(channels=()))
    assert_error_code(client.subscribe(CHANNEL), ReplyCode.UNAUTHORIZED)


def test_subscription_limit() -> None:
    client = make_client(limits=SessionLimits(max_subscriptions=3))
    for i in range(3):
        only(client.subscribe(f"conversation:c{i}"), Join)
    data = assert_error_code(client.subscribe("conversation:c3", "x"), ReplyCode.SUBSCRIPTION_FAILED, "x")
    assert "limit of 3" in data["message"]
    assert len(client.session.channels) == 3
    # a held channel is still answered (its position only), and leaving one makes room
    assert_join(client.subscribe("conversation:c0", "again"), "conversation:c0", "again", held=True)
    client.unsubscribe("conversation:c0")
    only(client.subscribe("conversation:c3"), Join)


def test_subscribe_while_hub_down_fails_then_works_when_it_is_back() -> None:
    client = make_client(hub_up=False)
    data = assert_error_code(client.subscribe(CHANNEL, "1"), ReplyCode.SUBSCRIPTION_FAILED, "1")
    assert "hub" in data["message"]
    assert client.session.channels == ()
    client.hub_up = True
    only(client.subscribe(CHANNEL, "2"), Join)


def test_subscribe_is_idempotent() -> None:
    client = make_client()
    assert_join(client.subscribe(CHANNEL, "1"), CHANNEL, "1")
    # held: only the position is asked, and nothing resumes (the connection receives it live)
    again = client.send({"type": "subscribe", "id": "2",
                         "data": {"channel": CHANNEL, "since": {"offset": 1, "epoch": "3f2a9c0d1e5b7a88"}}})
    assert_join(again, CHANNEL, "2", held=True)
    client.hub_up = False
    assert_join(client.subscribe(CHANNEL, "3"), CHANNEL, "3", held=True)  # held: not refused for the hub
    assert client.session.channels == (CHANNEL,)


@pytest.mark.parametrize("channel", [CHANNEL, "user:u1"])
def test_a_held_subscribe_is_never_undone(channel: str) -> None:
    client = make_client(make_claims("u1"))
    client.session.open()
    client.subscribe(CHANNEL)
    client.hub_up = False
    join = assert_join(client.subscribe(channel, "again"), channel, "again", held=True)
    assert join.failed is None  # keep the membership: the connection held it before this subscribe


def test_personal_channel_is_always_allowed_and_held_from_connect() -> None:
    client = make_client(make_claims("u1", channels=()))
    client.session.open()
    outputs = client.subscribe("user:u1", "1")
    assert_join(outputs, "user:u1", "1", held=True)  # already held: its position only
    assert client.session.channels == ("user:u1",)
    assert_error_code(client.subscribe("user:u2", "2"), ReplyCode.UNAUTHORIZED, "2")


def test_personal_channel_can_be_joined_without_channel_claims() -> None:
    client = make_client(make_claims("u1", channels=()))  # never opened: not held yet
    assert only(client.subscribe("user:u1"), Join).channel == "user:u1"


def test_forget_undoes_a_failed_join() -> None:
    client = make_client()
    only(client.subscribe(CHANNEL), Join)
    client.session.forget(CHANNEL)
    assert client.session.channels == ()
    only(client.subscribe(CHANNEL), Join)  # a fresh join, not the idempotent reply


@pytest.mark.parametrize("channel", [None, 1, "", "conversation:*", "nonamespace", "conversation:a b",
                                     "n:" + "x" * 254, "conversation:../x", "conversation:é"])
def test_subscribe_bad_channel_is_invalid_request(channel: object) -> None:
    client = make_client(make_claims(channels=("*",)))
    assert_error_code(client.send({"type": "subscribe", "id": "c", "data": {"channel": channel}}), INVALID, "c")
    assert client.session.channels == ()


def test_subscribe_checks_the_name_before_the_claims() -> None:
    client = make_client(make_claims(channels=()))
    assert_error_code(client.subscribe("conversation:*"), INVALID)


# -- subscribe with since, and the position in replies -----------------------------------------------------------
EPOCH = "3f2a9c0d1e5b7a88"


def test_subscribe_with_since_asks_to_resume() -> None:
    client = make_client()
    outputs = client.send({"type": "subscribe", "id": "r",
                           "data": {"channel": CHANNEL, "since": {"offset": 41, "epoch": EPOCH}}})
    join = assert_join(outputs, CHANNEL, "r", since=(41, EPOCH.encode()))
    assert join.failed is not None and decode(join.failed)["data"]["code"] == ReplyCode.SUBSCRIPTION_FAILED.value
    assert client.session.channels == (CHANNEL,)


def test_subscribe_with_null_since_is_a_plain_subscribe() -> None:
    client = make_client()
    assert_join(client.send({"type": "subscribe", "data": {"channel": CHANNEL, "since": None}}), CHANNEL)


@pytest.mark.parametrize("since", [
    1, "41:" + EPOCH, [41, EPOCH], {}, {"offset": 41}, {"epoch": EPOCH},
    {"offset": -1, "epoch": EPOCH}, {"offset": 1 << 63, "epoch": EPOCH}, {"offset": 1.0, "epoch": EPOCH},
    {"offset": "41", "epoch": EPOCH}, {"offset": True, "epoch": EPOCH}, {"offset": None, "epoch": EPOCH},
    {"offset": 41, "epoch": 7}, {"offset": 41, "epoch": None}, {"offset": 41, "epoch": "x" * (MAX_EPOCH_CHARS + 1)},
    {"offset": 41, "epoch": "\u00e9poch"},
])
def test_subscribe_with_a_bad_since_is_invalid_and_holds_nothing(since: object) -> None:
    client = make_client()
    message = {"type": "subscribe", "id": "s", "data": {"channel": CHANNEL, "since": since}}
    data = assert_error_code(client.send(message), INVALID, "s")
    assert "since" in data["message"]
    assert client.session.channels == ()


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    ({"offset": 0, "epoch": EPOCH}, (0, EPOCH.encode())),
    ({"offset": (1 << 63) - 1, "epoch": ""}, ((1 << 63) - 1, b"")),
    ({"offset": 3, "epoch": "x" * MAX_EPOCH_CHARS, "extra": 1}, (3, b"x" * MAX_EPOCH_CHARS)),
])
def test_parse_since_accepts(value: object, expected: object) -> None:
    assert parse_since(value) == expected


def test_parse_since_refuses_with_invalid_request() -> None:
    with pytest.raises(RequestError) as info:
        parse_since({"offset": -5, "epoch": EPOCH})
    assert info.value.code is INVALID


@pytest.mark.parametrize(("text", "expected"), [
    (None, None),
    ("0:" + EPOCH, (0, EPOCH.encode())),
    ("41:" + EPOCH, (41, EPOCH.encode())),
    ("9" * 19 + ":e", (int("9" * 19), b"e")),
    ("5:" + "x" * MAX_EPOCH_CHARS, (5, b"x" * MAX_EPOCH_CHARS)),
])
def test_parse_connect_since_accepts(text: str | None, expected: object) -> None:
    assert parse_connect_since(text) == expected


@pytest.mark.parametrize("text", [
    "", "41", "41" + EPOCH, ":" + EPOCH, "41:", "-1:" + EPOCH, "+1:" + EPOCH, " 1:" + EPOCH, "x:" + EPOCH,
    "1.5:" + EPOCH, "9" * 20 + ":e", "5:" + "x" * (MAX_EPOCH_CHARS + 1), "5:\u00e9poch",
])
def test_parse_connect_since_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="OFFSET:EPOCH"):
        parse_connect_since(text)


@pytest.mark.parametrize("recovered", [True, False])
def test_subscribed_says_recovered_only_for_a_resume(recovered: bool) -> None:
    data = decode(subscribed_reply(None, CHANNEL, 9, EPOCH.encode(), recovered))
    assert data == {"type": "subscribed", "data": {"channel": CHANNEL, "offset": 9, "epoch": EPOCH,
                                                   "recovered": recovered}}
    assert "recovered" not in decode(subscribed_reply(None, CHANNEL, 9, EPOCH.encode(), None))["data"]


# -- unsubscribe ------------------------------------------------------------------------------------------------
def test_unsubscribe_leaves_then_replies() -> None:
    client = make_client()
    client.subscribe(CHANNEL)
    outputs = client.unsubscribe(CHANNEL, "2")
    assert outputs[0] == Leave(CHANNEL)
    assert assert_reply(outputs, "unsubscribed", "2") == {"channel": CHANNEL}
    assert len(outputs) == 2
    assert client.session.channels == ()


def test_unsubscribe_is_idempotent() -> None:
    client = make_client()
    client.subscribe(CHANNEL)
    client.unsubscribe(CHANNEL)
    for channel, id_ in ((CHANNEL, "3"), ("conversation:never", "4"), ("task:not-allowed", None)):
        outputs = client.unsubscribe(channel, id_)
        only(outputs, Send)  # no Leave for a channel not held
        assert assert_reply(outputs, "unsubscribed", id_) == {"channel": channel}


def test_unsubscribed_reply_with_and_without_a_reason() -> None:
    assert decode(unsubscribed_reply("9", CHANNEL)) == {"type": "unsubscribed", "id": "9", "data": {"channel": CHANNEL}}
    assert decode(unsubscribed_reply(None, CHANNEL, INSUFFICIENT_STATE)) == {
        "type": "unsubscribed", "data": {"channel": CHANNEL, "reason": "insufficient_state"}}


def test_unsubscribe_bad_channel_is_invalid_request() -> None:
    assert_error_code(make_client().unsubscribe("bad", "u"), INVALID, "u")


# -- publish ------------------------------------------------------------------------------------------------
def test_publish_allowed_forwards_the_encoded_event() -> None:
    client = make_client()
    data = {"conversation_id": "conv-123", "sender_id": "user-456", "content": "Hello there!"}
    forward = only(client.publish(CHANNEL, "chat_message", data, "4"), Forward)
    assert forward.topic == topic_for(CHANNEL)
    event = json.loads(forward.body)
    assert {k: event[k] for k in ("type", "channel", "data")} == \
        {"type": "chat_message", "channel": CHANNEL, "data": data}
    assert event["timestamp"].endswith("Z")
    assert assert_reply([forward], "published", "4")["channel"] == CHANNEL
    failed = decode(forward.failed)
    assert (failed["id"], failed["data"]["code"]) == ("4", ReplyCode.INTERNAL_ERROR.value)
    assert client.session.channels == ()  # publishing does not subscribe


def test_publish_without_event_data_sends_an_empty_object() -> None:
    client = make_client()
    forward = only(client.send({"type": "publish", "data": {"channel": CHANNEL, "type": "notification"}}), Forward)
    assert json.loads(forward.body)["data"] == {}


def test_publish_unauthorized() -> None:
    client = make_client(make_claims(channels=("*",), publish=("conversation:conv-1",)))
    assert_error_code(client.publish("conversation:conv-12", id_="p"), ReplyCode.UNAUTHORIZED, "p")
    assert_error_code(make_client(make_claims(publish=())).publish(CHANNEL), ReplyCode.UNAUTHORIZED)
    # the personal channel is for subscribing, not publishing
    assert_error_code(make_client(make_claims("u1", publish=())).publish("user:u1"), ReplyCode.UNAUTHORIZED)


def test_publish_while_hub_down_is_internal_error() -> None:
    client = make_client(hub_up=False)
    data = assert_error_code(client.publish(CHANNEL, id_="p"), ReplyCode.INTERNAL_ERROR, "p")
    assert "hub" in data["message"]


@pytest.mark.parametrize("type_", ["error", "subscribed", "connected", "Bad", "", None, 7])
def test_publish_bad_event_type_is_invalid_request(type_: object) -> None:
    client = make_client()
    assert_error_code(client.send({"type": "publish", "id": "p",
                                   "data": {"channel": CHANNEL, "type": type_, "data": {}}}), INVALID, "p")


@pytest.mark.parametrize("event_data", [None, [], "x", 3])
def test_publish_event_data_must_be_an_object(event_data: object) -> None:
    client = make_client()
    data = assert_error_code(client.send({"type": "publish", "id": "p",
                                          "data": {"channel": CHANNEL, "type": "t", "data": event_data}}),
                             INVALID, "p")
    assert "data.data" in data["message"]


@pytest.mark.parametrize("channel", [None, "conversation:*", "nonamespace"])
def test_publish_bad_channel_is_invalid_request(channel: object) -> None:
    client = make_client(make_claims(publish=("*",)))
    assert_error_code(client.send({"type": "publish", "id": "p",
                                   "data": {"channel": channel, "type": "t", "data": {}}}), INVALID, "p")


# -- rate limiting (injected clock, no sleeping) ---------------------------------------------------------------------
def test_command_burst_then_refusal_with_retry_after() -> None:
    client = make_client(limits=SessionLimits(rate_limit=10.0, rate_burst=3))
    for i in range(3):
        assert_reply(client.ping(str(i)), "pong", str(i))
    outputs = client.ping("late")
    data = assert_error_code(outputs, ReplyCode.RATE_LIMITED)  # refused before parsing: no id
    assert data["retry_after_ms"] == 100
    assert client.session.last_result == "rate_limited"


def test_refill_after_waiting_and_burst_cap() -> None:
    client = make_client(limits=SessionLimits(rate_limit=10.0, rate_burst=3))
    for _ in range(3):
        client.ping()
    assert_error_code(client.ping(), ReplyCode.RATE_LIMITED)
    client.clock.advance(0.1)
    assert_reply(client.ping("a"), "pong", "a")
    assert_error_code(client.ping(), ReplyCode.RATE_LIMITED)
    client.clock.advance(60.0)  # a long rest saves up no more than the burst
    for i in range(3):
        assert_reply(client.ping(str(i)), "pong", str(i))
    assert_error_code(client.ping(), ReplyCode.RATE_LIMITED)


def test_every_command_counts_towards_the_rate_even_garbage() -> None:
    client = make_client(limits=SessionLimits(rate_limit=1.0, rate_burst=2))
    assert_error_code(client.send(b"garbage"), INVALID)
    client.subscribe(CHANNEL)
    assert_error_code(client.send(b"garbage"), ReplyCode.RATE_LIMITED)


def test_waiting_retry_after_ms_is_enough() -> None:
    client = make_client(limits=SessionLimits(rate_limit=100.0, rate_burst=1))
    client.ping()
    client.clock.advance(0.0045)  # 0.45 token saved: the next one is 5.5 ms away
    retry_after_ms = assert_error_code(client.ping(), ReplyCode.RATE_LIMITED)["retry_after_ms"]
    client.clock.advance(retry_after_ms / 1000)
    assert_reply(client.ping("retry"), "pong", "retry")


def test_publish_has_its_own_stricter_bucket() -> None:
    client = make_client(limits=SessionLimits(publish_rate_limit=2.0, publish_burst=2))
    for i in range(2):
        only(client.publish(CHANNEL, id_=str(i)), Forward)
    data = assert_error_code(client.publish(CHANNEL, id_="p"), ReplyCode.RATE_LIMITED, "p")
    assert data["retry_after_ms"] == 500
    assert_reply(client.ping("still"), "pong", "still")  # other commands are not held back
    only(client.subscribe(CHANNEL), Join)
    client.clock.advance(0.5)
    only(client.publish(CHANNEL), Forward)


def test_rejected_publishes_do_not_use_publish_tokens() -> None:
    client = make_client(make_claims(publish=("conversation:conv-1",)),
                         limits=SessionLimits(publish_rate_limit=1.0, publish_burst=1))
    assert_error_code(client.publish("conversation:conv-2"), ReplyCode.UNAUTHORIZED)
    assert_error_code(client.publish("conversation:conv-1", "error"), INVALID)
    only(client.publish("conversation:conv-1"), Forward)


def test_sustained_abuse_closes_with_4129() -> None:
    client = make_client(limits=SessionLimits(rate_limit=1.0, rate_burst=1, rate_abuse_limit=3))
    client.ping()
    for _ in range(3):
        assert_error_code(client.ping(), ReplyCode.RATE_LIMITED)
    close = assert_closed_with(client.ping(), RATE_ABUSE)
    assert close.error.reason.code == 4129
    assert close.error.reply is not None and close.error.reply.code is ReplyCode.RATE_LIMITED
    assert client.session.last_result == "closed"


def test_publish_refusals_count_towards_abuse() -> None:
    client = make_client(limits=SessionLimits(publish_rate_limit=0.001, publish_burst=1, rate_abuse_limit=2))
    only(client.publish(CHANNEL), Forward)
    assert_error_code(client.publish(CHANNEL, id_="1"), ReplyCode.RATE_LIMITED, "1")
    assert_error_code(client.publish(CHANNEL, id_="2"), ReplyCode.RATE_LIMITED, "2")
    assert_closed_with(client.publish(CHANNEL, id_="3"), RATE_ABUSE)


def test_abuse_is_counted_per_window() -> None:
    client = make_client(limits=SessionLimits(rate_limit=0.01, rate_burst=1, rate_abuse_limit=3))
    client.ping()
    for _ in range(3):
        assert_error_code(client.ping(), ReplyCode.RATE_LIMITED)
    client.clock.advance(ABUSE_WINDOW + 0.5)  # refills 0.105 token only
    for _ in range(3):  # a new window: the count starts over
        assert_error_code(client.ping(), ReplyCode.RATE_LIMITED)
    assert_closed_with(client.ping(), RATE_ABUSE)


# -- TokenBucket ------------------------------------------------------------------------------------------------
def test_token_bucket_starts_full_and_empties() -> None:
    bucket = TokenBucket(rate=4.0, burst=2, now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.25)


def test_token_bucket_partial_refill() -> None:
    bucket = TokenBucket(rate=4.0, burst=1, now=0.0)
    bucket.take(0.0)
    assert bucket.take(0.0625) == pytest.approx((1 - 0.25) / 4)
    assert bucket.tokens == pytest.approx(0.25)
    assert bucket.take(0.25) == 0.0  # exactly one token after 1/rate
    assert bucket.tokens == pytest.approx(0.0)


def test_token_bucket_wait_is_the_time_to_the_next_token() -> None:
    bucket = TokenBucket(rate=3.0, burst=5, now=10.0)
    for _ in range(5):
        assert bucket.take(10.0) == 0.0
    wait = bucket.take(10.0)
    assert wait == pytest.approx(1 / 3)
    assert bucket.take(10.0 + wait + 1e-9) == 0.0


def test_token_bucket_caps_at_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=3, now=0.0)
    assert sum(bucket.take(1_000.0) == 0.0 for _ in range(10)) == 3


def test_token_bucket_refusals_do_not_consume() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
    bucket.take(0.0)
    for t in (0.1, 0.2, 0.3):
        assert bucket.take(t) == pytest.approx(1 - t)
    assert bucket.take(1.0) == 0.0


def test_session_limits_from_config() -> None:
    from tidings.config import Config
    config = Config.load(environ={}).replace(max_subscriptions=7, rate_limit=3.0, rate_burst=4,
                                             publish_rate_limit=1.5, publish_burst=2, rate_abuse_limit=9)
    assert SessionLimits.from_config(config) == SessionLimits(7, 3.0, 4, 1.5, 2, 9)
    assert SessionLimits.from_config(Config.load(environ={})) == SessionLimits()


# -- refresh ----------------------------------------------------------------------------------------------
def _refresh(client: Any, token: object = "t", id_: str = "r") -> list[Any]:
    return client.send({"type": "refresh", "id": id_, "data": {"token": token}})


def test_refresh_asks_the_glue_to_check_the_token() -> None:
    client = make_client(make_claims("u1"))
    out = _refresh(client, "new-token", "5")
    assert len(out) == 1 and isinstance(out[0], Refresh) and (out[0].token, out[0].request_id) == ("new-token", "5")
    for bad in ("", None, 5, ["t"]):
        assert_error_code(_refresh(client, bad), ReplyCode.INVALID_REQUEST, "r")


def test_refreshed_replaces_the_claims_and_leaves_what_they_no_longer_allow() -> None:
    client = make_client(make_claims("u1", channels=("conversation:*", "task:*")))
    client.session.open()
    client.subscribe("conversation:a")
    client.subscribe("task:1")
    narrower = make_claims("u1", channels=("task:*",), exp=1_900_000_123.0)
    out = client.session.refreshed(narrower, "", "5")
    assert decode(out[0].payload) == {"type": "refreshed", "id": "5", "data": {"expires_at": 1_900_000_123}}
    assert [type(o).__name__ for o in out[1:]] == ["Leave", "Send"]
    assert out[1].channel == "conversation:a"
    assert decode(out[2].payload) == {"type": "unsubscribed",
                                      "data": {"channel": "conversation:a", "reason": "unauthorized"}}
    assert client.session.channels == ("user:u1", "task:1")  # the personal channel always stays
    assert client.session.claims is narrower


def test_refreshed_refuses_another_user_or_a_bad_token_and_keeps_the_old_claims() -> None:
    client = make_client(make_claims("u1"))
    old = client.session.claims
    out = client.session.refreshed(make_claims("u2"), "", "5")
    assert_error_code(out, ReplyCode.UNAUTHORIZED, "5")
    out = client.session.refreshed(None, "token expired", "6")
    assert_error_code(out, ReplyCode.UNAUTHORIZED, "6")
    assert decode(out[0].payload)["data"]["message"] == "token expired"
    assert client.session.claims is old
