"""Hypothesis over Session.handle: arbitrary bytes and JSON shapes never raise, produce only the
five output kinds, and every error reply carries a ReplyCode (invalid_request for garbage)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.errors import RATE_ABUSE, ReplyCode
from workers.protocol import MAX_DEPTH, Close, Forward, Join, Leave, Send, SessionLimits, subscribed_reply

from .helpers import Clock, forward_reply, make_claims, make_client

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])
CODES = {code.value for code in ReplyCode}
SERVER_TYPES = {"subscribed", "unsubscribed", "pong", "published", "error", "connected"}
ROOMY = SessionLimits(max_subscriptions=8, rate_limit=1e9, rate_burst=10**9,
                      publish_rate_limit=1e9, publish_burst=10**9)

# -- strategies -----------------------------------------------------------------------------------------------
# ASCII plus a few awkward characters: lone surrogates, NUL, non-BMP (cheaper to draw than all of Unicode)
any_text = st.text(st.one_of(st.characters(max_codepoint=127), st.sampled_from("\ud800\udfff\u0000é☃\U0001f600")),
                   max_size=20)
channelish = st.one_of(
    st.sampled_from(["conversation:conv-1", "conversation:conv-12", "user:u1", "user:u2", "task:1",
                     "conversation:*", "*", "a:\u0000", "conversation:../x", "n:" + "x" * 254, "nonamespace"]),
    st.builds("{}:{}".format, st.sampled_from(["conversation", "user", "task"]),
              st.text("ab1-_.@:", min_size=1, max_size=6)),
    any_text,
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), any_text, channelish,
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)), max_leaves=8)
since_values = st.one_of(
    st.fixed_dictionaries({"offset": st.one_of(st.integers(min_value=-2, max_value=2**64), scalars),
                           "epoch": st.one_of(st.sampled_from(["3f2a9c0d1e5b7a88", "", "x" * 65]), any_text, scalars)}),
    json_values,
)
command_data = st.fixed_dictionaries({}, optional={
    "channel": st.one_of(channelish, json_values),
    "since": since_values,
    "type": st.one_of(st.sampled_from(["chat_message", "notification", "error", "pong", "Bad", "x.y"]), json_values),
    "data": json_values,
})
loose_messages = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["ping", "subscribe", "unsubscribe", "publish", "connected", "PING"]),
                       json_values)},
    optional={"id": st.one_of(any_text, st.text(max_size=70), json_values),
              "data": st.one_of(command_data, json_values)},
)
ids = st.one_of(st.none(), st.text(st.characters(max_codepoint=0x2FF), max_size=64))
event_types = st.one_of(st.sampled_from(["chat_message", "notification", "status_update", "x.y_1", "error"]),
                        st.builds(str.__add__, st.sampled_from("az"), st.text("az09_.", max_size=5)))


def command(type_: str, id_: str | None, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": type_, "data": data} if id_ is None else {"type": type_, "id": id_, "data": data}


well_formed = st.one_of(
    st.builds(command, st.just("ping"), ids, st.just({})),
    st.builds(command, st.sampled_from(["subscribe", "unsubscribe"]), ids,
              st.builds(lambda ch: {"channel": ch}, channelish)),
    st.builds(command, st.just("publish"), ids,
              st.builds(lambda ch, t, d: {"channel": ch, "type": t, "data": d},
                        channelish, event_types, st.dictionaries(any_text, json_values, max_size=3))),
)
messages = st.one_of(well_formed, loose_messages)


def deep(depth: int, leaf: Any) -> Any:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


deep_messages = st.builds(lambda depth, msg: {**msg, "data": deep(depth, msg.get("data"))},
                          st.integers(MAX_DEPTH - 3, 3 * MAX_DEPTH), messages)


def serialize(message: Any, how: str) -> bytes:
    if how == "json":  # NaN, Infinity and \udXXX escapes of lone surrogates as text
        return json.dumps(message, allow_nan=True).encode()
    if how == "raw":  # raw UTF-8, lone surrogates as their (invalid) 3-byte sequences
        return json.dumps(message, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    try:
        return orjson.dumps(message)
    except TypeError:
        return json.dumps(message, allow_nan=True).encode()


serialized = st.builds(serialize, st.one_of(messages, deep_messages, json_values),
                       st.sampled_from(["json", "raw", "orjson"]))


# -- properties ----------------------------------------------------------------------------------------------
def check_frame(payload: bytes) -> dict[str, Any]:
    message = json.loads(payload)
    assert isinstance(message, dict) and message["type"] in SERVER_TYPES, message
    if "id" in message:
        assert isinstance(message["id"], str) and len(message["id"]) <= 64
    assert isinstance(message["data"], dict)
    if message["type"] == "error":
        assert message["data"]["code"] in CODES, message
    return message


def check_outputs(outputs: list[Any]) -> None:
    assert isinstance(outputs, list) and outputs
    for out in outputs:
        assert type(out) in (Send, Join, Leave, Forward, Close), out
        if isinstance(out, Send):
            check_frame(out.payload)
        elif isinstance(out, Join):
            # the glue answers with the channel's position: whatever the request, that is a valid frame
            assert not out.connect  # only Session.open joins the personal channel at connect
            ok = check_frame(subscribed_reply(out.request_id, out.channel, 7, b"3f2a9c0d1e5b7a88", None))
            assert ok["type"] == "subscribed" and ok["data"]["channel"] == out.channel
            if out.since is not None:
                offset, epoch = out.since
                assert type(offset) is int and 0 <= offset < 2**63 and isinstance(epoch, bytes) and epoch.isascii()
                assert not out.held  # a channel already held is not resumed
            assert out.failed is not None or out.held  # a new subscribe is undone if the hub does not answer
            if out.failed is not None:
                assert check_frame(out.failed)["data"]["code"] == "subscription_failed"
        elif isinstance(out, Forward):
            assert check_frame(forward_reply(out))["type"] == "published"
            assert check_frame(out.failed)["type"] == "error"
            event = json.loads(out.body)
            assert out.topic == event["channel"].encode() + b"\0"
        elif isinstance(out, Close):
            assert out.error.reason is RATE_ABUSE


def is_json_object(payload: bytes) -> bool:
    try:
        return isinstance(orjson.loads(payload), dict)
    except orjson.JSONDecodeError:
        return False


def assert_invalid_request(outputs: list[Any]) -> None:
    assert len(outputs) == 1 and isinstance(outputs[0], Send), outputs
    assert json.loads(outputs[0].payload)["data"]["code"] == "invalid_request"


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(payload: bytes) -> None:
    outputs = make_client(make_claims(channels=("*",), publish=("*",)), ROOMY).send(payload)
    check_outputs(outputs)
    if not is_json_object(payload):
        assert_invalid_request(outputs)


@FUZZ
@given(serialized, st.booleans())
def test_json_shapes(payload: bytes, hub_up: bool) -> None:
    client = make_client(make_claims(channels=("conversation:*",), publish=("conversation:*",)), ROOMY,
                         hub_up=hub_up)
    client.session.open()
    outputs = client.send(payload)
    check_outputs(outputs)
    if not is_json_object(payload):
        assert_invalid_request(outputs)


@settings(FUZZ, max_examples=60)
@given(st.lists(st.tuples(st.one_of(serialized, st.binary(max_size=40)), st.floats(0, 2), st.booleans()),
                max_size=12))
def test_sequences_with_tight_limits(steps: list[tuple[bytes, float, bool]]) -> None:
    limits = SessionLimits(max_subscriptions=3, rate_limit=5.0, rate_burst=4, publish_rate_limit=1.0,
                           publish_burst=2, rate_abuse_limit=6)
    clock = Clock()
    client = make_client(make_claims(channels=("*",), publish=("conversation:*",)), limits, clock=clock)
    client.session.open()
    for payload, pause, hub_up in steps:
        clock.advance(pause)
        client.hub_up = hub_up
        outputs = client.send(payload)
        check_outputs(outputs)
        assert len(client.session.channels) <= limits.max_subscriptions
        if isinstance(outputs[-1], Close):
            break
