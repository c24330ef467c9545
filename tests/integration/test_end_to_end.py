"""End to end over loopback: a real `tidings run` (hub + 2 workers), real WebSocket clients."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator

import orjson
import pytest
from websocket import ABNF

from hub import Publisher
from tests.client import Client, connect
from tests.service import TidingsService, until_stamped


@pytest.fixture(scope="module")
def svc() -> Iterator[TidingsService]:
    with TidingsService(workers=2, env={"TIDINGS_UNSUBSCRIBE_GRACE": "0.2"}) as service:
        yield service


def _clients(svc: TidingsService, n: int, prefix: str, channels: list[str]) -> list[tuple[Client, dict]]:
    return [connect(svc.ws_url(svc.token(f"{prefix}{i}", channels=channels, publish=channels)))
            for i in range(n)]


def _metric(svc: TidingsService, name: str) -> float:
    total = 0.0
    for line in svc.metrics().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_metric(svc: TidingsService, name: str, want: float, timeout: float = 8.0) -> float:
    deadline = time.monotonic() + timeout
    value = _metric(svc, name)
    while value != want and time.monotonic() < deadline:
        time.sleep(0.2)
        value = _metric(svc, name)
    return value


def test_every_path_reaches_every_subscriber_once_on_both_workers(svc: TidingsService) -> None:
    channel = "conversation:e2e"
    conns = _clients(svc, 16, "e2e-user-", ["conversation:*"])
    workers = {hello["data"]["connection_id"].split("-")[0] for _, hello in conns}
    assert workers == {"0", "1"}, f"clients should land on both workers, got {workers}"
    clients = [c for c, _ in conns]
    for c in clients:
        assert c.subscribe(channel)["type"] == "subscribed"
    outsider, _ = connect(svc.ws_url(svc.token("outsider", channels=["conversation:*"])))
    assert outsider.subscribe("conversation:other")["type"] == "subscribed"

    # 1. the CLI
    cli = svc.cli("publish", "--channel", channel, "--type", "chat_message", "--data", '{"n": 1}')
    assert cli.returncode == 0, cli.stderr
    # 2. the Python Publisher
    with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
        pub.publish(channel, "status_update", {"n": 2})  # fire and forget: no position comes back
        # ... so wait until the hub stamped it: the hub fair-queues its publishers, and the HTTP
        # publish below, from another connection, could otherwise be stamped first.
        until_stamped(pub, channel, 2)
    # 3. the HTTP API
    status, body = svc.publish_http(channel, "notification", {"n": 3})
    assert status == 200 and body["ok"] is True and body["channels"] == 1 and body["channel"] == channel
    assert body["offset"] == 3  # the CLI's and the Publisher's came first: confirmed means stamped
    # 4. over the socket, by one of the subscribers: answered once the hub stamped it
    reply = clients[0].request("publish", {"channel": channel, "type": "chat_message", "data": {"n": 4}}, "p1")
    assert reply == {"type": "published", "id": "p1",
                     "data": {"channel": channel, "offset": 4, "epoch": body["epoch"]}}

    for i, c in enumerate(clients):
        events = [c.recv() for _ in range(4)]
        assert [e["data"]["n"] for e in events] == [1, 2, 3, 4], (i, events)
        assert [e["type"] for e in events] == ["chat_message", "status_update", "notification", "chat_message"]
        offsets = [e["offset"] for e in events]
        assert offsets == sorted(offsets) and len(set(offsets)) == 4
        assert all(e["channel"] == channel for e in events)
        assert len({e["epoch"] for e in events}) == 1
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", events[0]["timestamp"])
        c.nothing(0.2)  # exactly once
    # Offsets are per channel and consecutive when nothing else published there.
    assert offsets[-1] - offsets[0] == 3
    outsider.nothing(0.3)
    for c in [*clients, outsider]:
        c.close()


def test_broadcast_over_http_reaches_each_channel(svc: TidingsService) -> None:
    a, _ = connect(svc.ws_url(svc.token("bc-a", channels=["room:*"])))
    b, _ = connect(svc.ws_url(svc.token("bc-b", channels=["room:*"])))
    a.subscribe("room:1")
    b.subscribe("room:2")
    status, body = svc.api("/api/broadcast", {"channels": ["room:1", "room:2"], "type": "notification",
                                              "data": {"hello": True}})
    assert status == 200 and body["ok"] is True and body["channels"] == 2
    assert [(p["channel"], p["offset"]) for p in body["positions"]] == [("room:1", 1), ("room:2", 1)]
    got_a, got_b = a.recv(), b.recv()
    assert (got_a["channel"], got_a["offset"], got_a["epoch"]) == ("room:1", 1, body["positions"][0]["epoch"])
    assert (got_b["channel"], got_b["offset"], got_b["epoch"]) == ("room:2", 1, body["positions"][1]["epoch"])
    a.nothing(0.2)
    b.nothing(0.2)


def test_prefix_isolation(svc: TidingsService) -> None:
    one, _ = connect(svc.ws_url(svc.token("iso-1", channels=["conversation:*"])))
    twelve, _ = connect(svc.ws_url(svc.token("iso-12", channels=["conversation:*"])))
    one.subscribe("conversation:conv-1")
    twelve.subscribe("conversation:conv-12")
    svc.publish_http("conversation:conv-12", "chat_message", {"to": "12"})
    svc.publish_http("conversation:conv-1", "chat_message", {"to": "1"})
    assert one.recv()["data"] == {"to": "1"}
    assert twelve.recv()["data"] == {"to": "12"}
    one.nothing(0.3)
    twelve.nothing(0.3)


def test_unsubscribe_stops_delivery_and_releases_the_hub_subscription() -> None:
    # Its own instance: the hub's channel count must not move because of other tests' clients.
    with TidingsService(workers=1, env={"TIDINGS_UNSUBSCRIBE_GRACE": "0.2"}) as svc:
        _unsubscribe_releases(svc)


def _unsubscribe_releases(svc: TidingsService) -> None:
    c, _ = connect(svc.ws_url(svc.token("unsub-user", channels=["task:*"])))
    base = _wait_metric(svc, "tidings_hub_channels", 1)  # the personal channel user:unsub-user
    assert base == 1
    assert c.subscribe("task:t1")["type"] == "subscribed"
    assert _wait_metric(svc, "tidings_hub_channels", base + 1) == base + 1
    svc.publish_http("task:t1", "status_update", {"state": "running"})
    assert c.recv()["data"] == {"state": "running"}
    assert c.unsubscribe("task:t1") == {"type": "unsubscribed", "id": "unsub-task:t1",
                                        "data": {"channel": "task:t1"}}
    svc.publish_http("task:t1", "status_update", {"state": "done"})
    c.nothing(0.4)
    # The worker's last local subscriber left: after the grace period the hub forgets the channel.
    assert _wait_metric(svc, "tidings_hub_channels", base) == base
    # Unsubscribing again is harmless.
    assert c.unsubscribe("task:t1")["type"] == "unsubscribed"


def test_personal_channel_is_subscribed_at_connect(svc: TidingsService) -> None:
    c, hello = connect(svc.ws_url(svc.token("user-456")))
    assert hello["data"]["user_id"] == "user-456"
    assert isinstance(hello["data"]["expires_at"], int)
    status, _ = svc.publish_http("user:user-456", "notification", {"title": "New message"})
    assert status == 200
    event = c.recv()
    assert (event["type"], event["channel"], event["data"]) == ("notification", "user:user-456",
                                                                {"title": "New message"})
    # Another user's personal channel is not allowed.
    assert c.subscribe("user:someone-else")["data"]["code"] == "unauthorized"


def test_healthz_on_the_websocket_port(svc: TidingsService) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{svc.port}/healthz", timeout=5) as r:
        assert r.status == 200
        assert r.read().startswith(b'{"ok":true')


def test_http_api_errors(svc: TidingsService) -> None:
    assert svc.api("/api/publish", {"channel": "a:b", "type": "x", "data": {}}, key="wrong")[0] == 401
    assert svc.api("/api/publish", {"channel": "a:b", "type": "x", "data": {}}, key="")[0] == 401
    status, body = svc.api("/api/publish", b"{not json")
    assert status == 400 and body["error"] == "invalid_request"
    status, body = svc.api("/api/publish", {"channel": "nocolon", "type": "x", "data": {}})
    assert status == 400 and "namespace:name" in body["message"]
    status, body = svc.api("/api/publish", {"channel": "a:b", "type": "Bad Type", "data": {}})
    assert status == 400
    status, body = svc.api("/api/publish", {"channel": "a:b", "type": "pong", "data": {}})
    assert status == 400 and "reserved" in body["message"]
    status, body = svc.api("/api/publish", {"channel": "a:b", "type": "x", "data": [1]})
    assert status == 400
    status, body = svc.api("/api/broadcast", {"channels": [], "type": "x", "data": {}})
    assert status == 400
    status, body = svc.api("/api/broadcast", {"channels": [["nested"]], "type": "x", "data": {}})
    assert status == 400


def test_cli_token_and_config(svc: TidingsService) -> None:
    out = svc.cli("token", "--sub", "cli-user", "--channels", "conversation:*", "--ttl", "60")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    c, hello = connect(svc.ws_url(token))
    assert hello["data"]["user_id"] == "cli-user"
    assert c.subscribe("conversation:x")["type"] == "subscribed"
    cfg = svc.cli("config")
    assert cfg.returncode == 0
    assert svc.secret not in cfg.stdout and svc.api_key not in cfg.stdout
    assert "TIDINGS_JWT_SECRET" in cfg.stdout and "<redacted>" in cfg.stdout
    bad = svc.cli("publish", "--channel", "a:b", "--type", "x", "--data", "[1")
    assert bad.returncode == 2 and "JSON" in bad.stderr


def test_token_never_logged(svc: TidingsService) -> None:
    token = svc.token("log-check", channels=["x:*"])
    c, _ = connect(svc.ws_url(token))
    c.close()
    try:
        Client(svc.ws_url(token + "tampered")).expect_close()
    except Exception:
        pass
    time.sleep(0.3)
    logs = svc.logs()
    assert token not in logs
    assert token.split(".")[2] not in logs


def test_subscribe_then_unsubscribe_at_once_answers_both_in_order(svc: TidingsService) -> None:
    c, _ = connect(svc.ws_url(svc.token("quick", channels=["fresh:*"])))
    for i in range(5):  # new channels: each subscribe waits for the hub when the unsubscribe arrives
        c.send({"type": "subscribe", "id": f"s{i}", "data": {"channel": f"fresh:c{i}"}})
        c.send({"type": "unsubscribe", "id": f"u{i}", "data": {"channel": f"fresh:c{i}"}})
    replies = [c.recv() for _ in range(10)]
    for i in range(5):
        mine = [r for r in replies if r["data"]["channel"] == f"fresh:c{i}"]
        assert [(r["type"], r["id"]) for r in mine] == [("subscribed", f"s{i}"), ("unsubscribed", f"u{i}")]
    c.nothing(0.5)


def test_publishes_of_one_pass_are_confirmed_together_in_order(svc: TidingsService) -> None:
    # All frames in one TCP write, so one loop pass reads them: the publishes leave for the hub in
    # one request, and each `published` comes once the hub stamped it, with its offset. The pongs
    # need no hub, so they may come first: clients match replies by id.
    reader, _ = connect(svc.ws_url(svc.token("order-r", channels=["order:*"])))
    assert reader.subscribe("order:a")["type"] == "subscribed"
    c, _ = connect(svc.ws_url(svc.token("order-w", channels=["order:*"], publish=["order:*"])))
    msgs: list[dict[str, object]] = []
    for i in range(10):
        msgs.append({"type": "publish", "id": f"p{i}",
                     "data": {"channel": "order:a", "type": "chat_message", "data": {"i": i}}})
        msgs.append({"type": "ping", "id": f"g{i}", "data": {}})
    c.ws.sock.sendall(b"".join(ABNF.create_frame(orjson.dumps(m).decode(), ABNF.OPCODE_TEXT).format()
                               for m in msgs))
    replies = [c.recv() for _ in range(20)]
    pongs = [r["id"] for r in replies if r["type"] == "pong"]
    published = [r for r in replies if r["type"] == "published"]
    assert pongs == [f"g{i}" for i in range(10)]
    assert [r["id"] for r in published] == [f"p{i}" for i in range(10)]
    events = [reader.recv() for _ in range(10)]
    assert [e["data"]["i"] for e in events] == list(range(10))
    assert [e["offset"] for e in events] == list(range(events[0]["offset"], events[0]["offset"] + 10))
    # each publisher learns exactly where its event landed
    assert [(r["data"]["offset"], r["data"]["epoch"]) for r in published] == [(e["offset"], e["epoch"]) for e in events]


def test_connections_inherit_the_send_buffer(svc: TidingsService) -> None:
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed: cannot read a server socket's send buffer")
    c, _ = connect(svc.ws_url(svc.token("sndbuf")))
    client_port = c.ws.sock.getsockname()[1]
    out = subprocess.run(["ss", "-tmnH", f"sport = :{svc.port} and dport = :{client_port}"],
                         capture_output=True, text=True, timeout=10).stdout
    sizes = re.findall(r"\btb(\d+)", out)
    # TIDINGS_SEND_BUFFER_BYTES defaults to 64 KiB; the kernel doubles what it is given.
    assert sizes == ["131072"], out
