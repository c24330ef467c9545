"""Every error reply and close code over a real connection (one worker, small limits)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import jwt
import orjson
import pytest
from websocket import ABNF

from tests.client import Client, connect
from tests.service import TidingsService

LIMITS = {
    "TIDINGS_WORKERS": "1",
    "TIDINGS_MAX_SUBSCRIPTIONS": "3",
    "TIDINGS_RATE_LIMIT": "5",
    "TIDINGS_RATE_BURST": "10",
    "TIDINGS_PUBLISH_RATE_LIMIT": "1",
    "TIDINGS_PUBLISH_BURST": "2",
    "TIDINGS_RATE_ABUSE_LIMIT": "30",
    "TIDINGS_MAX_CONNECTIONS_PER_USER": "2",
    "TIDINGS_MAX_MESSAGE_BYTES": "4096",
    "TIDINGS_JWT_LEEWAY": "0",
    "TIDINGS_ALLOWED_ORIGINS": "https://app.example",
}


@pytest.fixture(scope="module")
def svc() -> Iterator[TidingsService]:
    with TidingsService(workers=1, env=LIMITS) as service:
        yield service


def user(svc: TidingsService, sub: str, **kw: object) -> Client:
    kw.setdefault("channels", ["conversation:*"])
    kw.setdefault("publish", ["conversation:*"])
    client, _ = connect(svc.ws_url(svc.token(sub, **kw)))  # type: ignore[arg-type]
    return client


def error_code(msg: dict) -> str:
    assert msg["type"] == "error", msg
    return str(msg["data"]["code"])


# -- error replies: the connection stays open --------------------------------------------------
@pytest.mark.parametrize(("raw", "why"), [
    ("not json", "not JSON"),
    ("[1, 2]", "an array"),
    ('"text"', "a string"),
    ('{"type": "dance", "data": {}}', "unknown type"),
    ('{"data": {}}', "missing type"),
    ('{"type": 7, "data": {}}', "type not a string"),
    ('{"type": "subscribe"}', "missing data"),
    ('{"type": "subscribe", "data": []}', "data not an object"),
    ('{"type": "subscribe", "data": {}}', "missing channel"),
    ('{"type": "subscribe", "data": {"channel": "no-namespace"}}', "bad channel"),
    ('{"type": "subscribe", "data": {"channel": "a:b*"}}', "wildcard"),
    ('{"type": "subscribe", "data": {"channel": "a:' + "x" * 300 + '"}}', "too long"),
    ('{"type": "subscribe", "data": {"channel": "a:\\u0000"}}', "NUL"),
    ('{"type": "subscribe", "id": 5, "data": {"channel": "a:b"}}', "numeric id"),
    ('{"type": "subscribe", "id": "' + "i" * 65 + '", "data": {"channel": "a:b"}}', "long id"),
    ('{"type": "ping", "data": ' + "[" * 40 + "]" * 40 + "}", "deep nesting"),
    ('{"type": "ping", "data": {"x": NaN}}', "NaN"),
    ('{"type": "publish", "data": {"channel": "conversation:a", "type": "Bad!", "data": {}}}', "bad type"),
    ('{"type": "publish", "data": {"channel": "conversation:a", "type": "error", "data": {}}}', "reserved"),
    ('{"type": "publish", "data": {"channel": "conversation:a", "type": "x", "data": 5}}', "data not obj"),
])
def test_invalid_request(svc: TidingsService, raw: str, why: str) -> None:
    c = user(svc, "invalid")
    c.send(raw)
    assert error_code(c.recv()) == "invalid_request", why
    assert c.request("ping", id_="alive")["type"] == "pong"  # still open
    c.close()


def test_id_is_echoed_on_errors(svc: TidingsService) -> None:
    c = user(svc, "echo-id")
    reply = c.request("subscribe", {"channel": "nope"}, id_="abc")
    assert reply["id"] == "abc" and error_code(reply) == "invalid_request"
    assert reply["data"]["message"]
    c.close()


def test_binary_frame_is_invalid_request(svc: TidingsService) -> None:
    c = user(svc, "binary")
    c.send_raw_frame(ABNF.create_frame(b"\x00\x01", ABNF.OPCODE_BINARY))
    assert error_code(c.recv()) == "invalid_request"
    assert c.request("ping")["type"] == "pong"
    c.close()


def test_unauthorized_subscribe_and_publish_keep_the_connection(svc: TidingsService) -> None:
    c = user(svc, "limited", channels=["conversation:mine"], publish=[])
    assert error_code(c.subscribe("conversation:theirs")) == "unauthorized"
    assert c.subscribe("conversation:mine")["type"] == "subscribed"
    reply = c.request("publish", {"channel": "conversation:mine", "type": "chat_message", "data": {}})
    assert error_code(reply) == "unauthorized"
    assert c.request("ping")["type"] == "pong"
    c.close()


def test_subscription_limit(svc: TidingsService) -> None:
    c = user(svc, "greedy")  # holds user:greedy already: limit 3 leaves 2
    assert c.subscribe("conversation:1")["type"] == "subscribed"
    assert c.subscribe("conversation:2")["type"] == "subscribed"
    assert error_code(c.subscribe("conversation:3")) == "subscription_failed"
    assert c.unsubscribe("conversation:1")["type"] == "unsubscribed"
    assert c.subscribe("conversation:3")["type"] == "subscribed"
    c.close()


def test_rate_limited_then_closed_4129(svc: TidingsService) -> None:
    c = user(svc, "spammer")
    for i in range(60):
        c.send({"type": "ping", "id": str(i), "data": {}})
    replies: list[dict] = []
    code, replies = c.expect_close()
    limited = [r for r in replies if r["type"] == "error"]
    assert limited and all(error_code(r) == "rate_limited" for r in limited)
    assert all(r["data"]["retry_after_ms"] >= 1 for r in limited)
    assert sum(r["type"] == "pong" for r in replies) >= 10  # the burst went through
    assert code == 4129


def test_publish_rate_limit(svc: TidingsService) -> None:
    c = user(svc, "publisher")
    replies = [c.request("publish", {"channel": "conversation:p", "type": "x", "data": {}}, id_=str(i))
               for i in range(3)]
    assert [r["type"] for r in replies[:2]] == ["published", "published"]
    assert error_code(replies[2]) == "rate_limited"
    c.close()


# -- closes ------------------------------------------------------------------------------------
def test_missing_invalid_and_expired_tokens(svc: TidingsService) -> None:
    now = int(time.time())
    cases = {
        None: ("missing token", 4001),
        "": ("missing token", 4001),
        "garbage": ("invalid token", 4001),
        jwt.encode({"sub": "x", "exp": now + 60}, "another-secret-of-at-least-32-bytes!!", "HS256"):
            ("invalid token", 4001),
        jwt.encode({"sub": "x", "exp": now - 10}, svc.secret, "HS256"): ("token expired", 4002),
        jwt.encode({"sub": "x", "exp": str(now + 60)}, svc.secret, "HS256"): ("invalid token", 4001),
        jwt.encode({"sub": "x", "exp": now + 10 * 86400}, svc.secret, "HS256"): ("invalid token", 4001),
        jwt.encode({"exp": now + 60}, svc.secret, "HS256"): ("invalid token", 4001),
        "a" * 9000: ("invalid token", 4001),
    }
    for token, (message, close) in cases.items():
        c = Client(svc.ws_url(token))
        code, before = c.expect_close()
        assert [m["data"] for m in before] == [{"code": "unauthorized", "message": message}], token
        assert code == close, token


def test_token_expiry_while_idle_closes_4002(svc: TidingsService) -> None:
    c = user(svc, "short-lived", ttl=2)
    started = time.monotonic()
    code, before = c.expect_close(timeout=6)
    assert code == 4002
    assert [m["data"] for m in before] == [{"code": "unauthorized", "message": "token expired"}]
    assert time.monotonic() - started < 2 + 0 + 1.5  # exp + leeway (0 here) + the 1 s sweep


def test_connections_per_user_close_4101(svc: TidingsService) -> None:
    a = user(svc, "many")
    b = user(svc, "many")
    c = Client(svc.ws_url(svc.token("many")))
    code, _ = c.expect_close()
    assert code == 4101
    a.close()
    b.close()


def test_message_too_big_closes_1009(svc: TidingsService) -> None:
    c = user(svc, "big")
    c.send({"type": "ping", "data": {"pad": "x" * 5000}})
    assert c.expect_close()[0] == 1009


def test_fragmented_message_over_the_cap_closes_1009(svc: TidingsService) -> None:
    c = user(svc, "frags")
    c.send_raw_frame(ABNF(fin=0, opcode=ABNF.OPCODE_TEXT, data=b"[" + b" " * 2000))
    c.send_raw_frame(ABNF(fin=0, opcode=ABNF.OPCODE_CONT, data=b" " * 2000))
    c.send_raw_frame(ABNF(fin=1, opcode=ABNF.OPCODE_CONT, data=b" " * 2000 + b"]"))
    assert c.expect_close()[0] == 1009


def test_fragmented_message_within_the_cap_is_reassembled(svc: TidingsService) -> None:
    c = user(svc, "frags-ok")
    msg = orjson.dumps({"type": "ping", "id": "frag", "data": {}})
    c.send_raw_frame(ABNF(fin=0, opcode=ABNF.OPCODE_TEXT, data=msg[:10]))
    c.send_raw_frame(ABNF(fin=1, opcode=ABNF.OPCODE_CONT, data=msg[10:]))
    assert c.recv() == {"type": "pong", "id": "frag", "data": {}}
    c.close()


def test_rsv_bits_close_1002(svc: TidingsService) -> None:
    c = user(svc, "rsv")
    c.send_raw_frame(ABNF(fin=1, rsv1=1, opcode=ABNF.OPCODE_TEXT, data=b'{"type":"ping"}'))
    assert c.expect_close()[0] == 1002


def test_continuation_without_start_closes_1002(svc: TidingsService) -> None:
    c = user(svc, "cont")
    c.send_raw_frame(ABNF(fin=1, opcode=ABNF.OPCODE_CONT, data=b"x"))
    assert c.expect_close()[0] == 1002


def test_invalid_utf8_closes_1007(svc: TidingsService) -> None:
    c = user(svc, "utf8")
    c.send(b'{"type":"ping","id":"\xff\xfe"}')
    assert c.expect_close()[0] == 1007


def test_invalid_close_code_from_client_closes_1002(svc: TidingsService) -> None:
    c = user(svc, "closer")
    c.send_raw_frame(ABNF(fin=1, opcode=ABNF.OPCODE_CLOSE, data=(999).to_bytes(2, "big")))
    assert c.expect_close()[0] == 1002


def test_client_close_is_echoed(svc: TidingsService) -> None:
    c = user(svc, "bye")
    c.send_raw_frame(ABNF(fin=1, opcode=ABNF.OPCODE_CLOSE, data=(1000).to_bytes(2, "big") + b"bye"))
    assert c.expect_close()[0] == 1000


def test_origin_checks(svc: TidingsService) -> None:
    import websocket

    token = svc.token("browser")
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        Client(svc.ws_url(token), origin="https://evil.example")
    assert refused.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as twice:
        Client(svc.ws_url(token), origin="https://app.example", headers=["Origin: https://evil.example"])
    assert twice.value.status_code == 403
    ok, _ = connect(svc.ws_url(token), origin="https://app.example")
    ok.close()
    same, _ = connect(svc.ws_url(token), origin=f"http://127.0.0.1:{svc.port}")
    same.close()
    none, _ = connect(svc.ws_url(token))  # not a browser: no Origin at all
    none.close()
