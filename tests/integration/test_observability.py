"""Metrics add up across processes; `tidings status` reads them; JSON logs carry no secrets."""

from __future__ import annotations

import time

import orjson
import pytest
import websocket

from tests.client import Client, connect
from tests.service import TidingsService


def _values(text: str, name: str) -> dict[str, float]:
    """Sample line (labels included) -> value, for one metric name."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _total(text: str, name: str) -> float:
    return sum(_values(text, name).values())


def test_metrics_add_up_across_workers_and_status_prints_them() -> None:
    with TidingsService(workers=2, env={"TIDINGS_LOG_FORMAT": "json"}) as svc:
        clients: list[Client] = []
        workers = set()
        while len(workers) < 2 or len(clients) < 10:
            c, hello = connect(svc.ws_url(svc.token(f"m{len(clients)}", channels=["room:*"])))
            workers.add(hello["data"]["connection_id"].split("-")[0])
            assert c.subscribe("room:metrics")["type"] == "subscribed"
            clients.append(c)
        for n in range(5):
            assert svc.publish_http("room:metrics", "notification", {"n": n})[0] == 200
        for c in clients:
            assert [c.recv()["data"]["n"] for _ in range(5)] == list(range(5))
        Client(svc.ws_url("bad-token")).expect_close()
        Client(svc.ws_url(None)).expect_close()
        time.sleep(1.5)  # every process flushes its counters once a second

        text = svc.metrics()
        n = len(clients)
        assert _total(text, "tidings_connections") == n  # summed over both workers
        assert _total(text, "tidings_connections_opened_total") == n
        assert _total(text, "tidings_subscriptions") == 2 * n  # room:metrics + the personal channel
        assert _total(text, "tidings_hub_events_in_total") == 5
        assert _total(text, "tidings_worker_events_in_total") == 10  # each worker got each event once
        assert _total(text, "tidings_deliveries_total") == 5 * n
        assert _values(text, "tidings_auth_failures_total") == {
            'tidings_auth_failures_total{reason="invalid"}': 1.0,
            'tidings_auth_failures_total{reason="missing"}': 1.0,
        }
        commands = _values(text, "tidings_commands_total")
        assert commands == {'tidings_commands_total{result="ok",type="subscribe"}': n}  # connects are no command
        assert _total(text, "tidings_process_resident_bytes") > 10 * 2**20
        assert "tidings_delivery_latency_seconds_bucket" in text

        for c in clients[:3]:
            c.close()
        time.sleep(1.5)
        text = svc.metrics()
        assert _total(text, "tidings_connections") == n - 3
        assert _values(text, "tidings_connections_closed_total") == {
            'tidings_connections_closed_total{code="1000"}': 3.0}

        status = svc.cli("status", "--api-port", str(svc.api_port))
        assert status.returncode == 0, status.stderr
        lines = dict(line.split("  ", 1) for line in status.stdout.splitlines() if "  " in line)
        assert lines["connections"].strip() == str(n - 3)
        assert lines["deliveries"].strip() == str(5 * n)

        # JSON logs: one object per line, no token anywhere.
        logged = [line for line in svc.logs().splitlines() if line.startswith("{")]
        assert logged and all(isinstance(orjson.loads(line), dict) for line in logged)
        assert any("refused a token: invalid" in orjson.loads(line)["msg"] for line in logged)
        assert svc.secret not in svc.logs()


def test_compression_is_never_negotiated() -> None:
    with TidingsService(workers=1) as svc:
        c = Client(svc.ws_url(svc.token("deflate")), headers=["Sec-WebSocket-Extensions: permessage-deflate"])
        assert "sec-websocket-extensions" not in {k.lower() for k in (c.ws.getheaders() or {})}
        assert c.recv()["type"] == "connected"
        c.send_raw_frame(websocket.ABNF(fin=1, rsv1=1, opcode=websocket.ABNF.OPCODE_TEXT, data=b"x"))
        assert c.expect_close()[0] == 1002


def test_worker_full_closes_4100() -> None:
    with TidingsService(workers=1, env={"TIDINGS_MAX_CONNECTIONS": "2"}) as svc:
        held = [connect(svc.ws_url(svc.token(f"full{i}")))[0] for i in range(2)]
        code, before = Client(svc.ws_url(svc.token("one-too-many"))).expect_close()
        assert code == 4100 and before == []
        held[0].close()
        time.sleep(0.3)
        c, _ = connect(svc.ws_url(svc.token("room-again")))
        c.close()


def test_unknown_paths_are_404() -> None:
    with TidingsService(workers=1) as svc:
        for path in ("/nope", "/ws/extra", "/echo"):  # /echo only with TIDINGS_CONFORMANCE_ECHO=1
            with pytest.raises(websocket.WebSocketBadStatusException) as e:
                Client(svc.ws_url(svc.token("x"), path=path))
            assert e.value.status_code == 404, path
