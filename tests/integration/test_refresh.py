"""In-band token refresh, the client's liveness figures in `connected`, and personal channels."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.client import connect
from tests.service import TidingsService


@pytest.fixture(scope="module")
def svc() -> Iterator[TidingsService]:
    env = {"TIDINGS_JWT_LEEWAY": "0", "TIDINGS_IDLE_TIMEOUT": "30", "TIDINGS_PONG_TIMEOUT": "15"}
    with TidingsService(workers=1, env=env) as service:
        yield service


def test_connected_carries_the_liveness_figures(svc: TidingsService) -> None:
    _, hello = connect(svc.ws_url(svc.token("live")))
    assert hello["data"]["ping_interval"] == 30.0 and hello["data"]["pong_timeout"] == 15.0


def test_refresh_moves_the_expiry_without_reconnecting(svc: TidingsService) -> None:
    c, hello = connect(svc.ws_url(svc.token("fresh", channels=["conversation:*"], ttl=3)))
    new = svc.token("fresh", channels=["conversation:*"], ttl=600)
    reply = c.request("refresh", {"token": new}, "5")
    assert reply["type"] == "refreshed" and reply["id"] == "5"
    assert reply["data"]["expires_at"] > hello["data"]["expires_at"] + 500
    time.sleep(4.5)  # past the first token's exp: the connection lives on the new one
    assert c.request("ping", id_="after")["type"] == "pong"


def test_refresh_leaves_channels_the_new_token_no_longer_allows(svc: TidingsService) -> None:
    c, _ = connect(svc.ws_url(svc.token("narrow", channels=["conversation:*", "task:*"])))
    assert c.subscribe("conversation:narrow")["type"] == "subscribed"
    assert c.subscribe("task:narrow")["type"] == "subscribed"
    reply = c.request("refresh", {"token": svc.token("narrow", channels=["task:*"])}, "r")
    assert reply["type"] == "refreshed"
    told = c.recv()
    assert told == {"type": "unsubscribed", "data": {"channel": "conversation:narrow", "reason": "unauthorized"}}
    svc.publish_http("conversation:narrow", "chat_message", {"n": 1})
    svc.publish_http("task:narrow", "status_update", {"n": 2})
    assert c.recv()["channel"] == "task:narrow"  # the other one no longer reaches it
    c.nothing(0.3)


def test_a_refused_refresh_keeps_the_old_token(svc: TidingsService) -> None:
    c, _ = connect(svc.ws_url(svc.token("keep", channels=["conversation:*"])))
    for token, message in ((svc.token("somebody-else"), "token is for another user"),
                           ("not.a.token", "invalid token"),
                           (svc.token("keep", ttl=-10), "token expired")):
        reply = c.request("refresh", {"token": token}, "r")
        assert reply["type"] == "error" and reply["data"] == {"code": "unauthorized", "message": message}
    assert c.subscribe("conversation:still")["type"] == "subscribed"


def test_personal_channels_are_their_users_alone(svc: TidingsService) -> None:
    c, _ = connect(svc.ws_url(svc.token("alice", channels=["*"], publish=["*"])))
    reply = c.request("subscribe", {"channel": "user:bob"})
    assert reply["type"] == "error" and reply["data"]["code"] == "unauthorized"
    reply = c.request("publish", {"channel": "user:bob", "type": "notification", "data": {}})
    assert reply["type"] == "error" and reply["data"]["code"] == "unauthorized"
    svc_token = svc.token("notifier", publish=["user:bob"])  # an exact entry: allowed
    n, _ = connect(svc.ws_url(svc_token))
    assert n.request("publish", {"channel": "user:bob", "type": "notification", "data": {}})["type"] == "published"


def test_demo_page_is_served_only_when_asked() -> None:
    import urllib.error
    import urllib.request

    def get(svc: TidingsService, path: str) -> tuple[int, bytes, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{svc.port}{path}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:  # follows the /demo -> /demo/ redirect
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), ""

    with TidingsService(workers=1, env={"TIDINGS_DEMO": "1"}) as svc:
        status, body, kind = get(svc, "/demo?token=abc")
        assert status == 200 and kind.startswith("text/html") and b"tidings.js" in body
        status, body, kind = get(svc, "/demo/tidings.js")
        assert status == 200 and kind.startswith("text/javascript") and b"export class TidingsClient" in body
    with TidingsService(workers=1) as svc:
        assert get(svc, "/demo/")[0] == 404
