"""Faults over real processes: hub and worker killed, graceful stop, slow consumers, dead peers.

Times printed here (hub gap, worker restart) are observations for the closing note; the
assertions only bound them generously, the benchmark suite measures speed.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
import websocket

from tests.client import Client, connect
from tests.service import TidingsService


def _both_workers(svc: TidingsService, prefix: str, n: int = 12) -> dict[str, list[Client]]:
    by_worker: dict[str, list[Client]] = {}
    for i in range(n):
        c, hello = connect(svc.ws_url(svc.token(f"{prefix}{i}", channels=["conversation:*"],
                                                publish=["conversation:*"])))
        by_worker.setdefault(hello["data"]["connection_id"].split("-")[0], []).append(c)
    assert set(by_worker) == {"0", "1"}
    return by_worker


def _wait(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_hub_killed_clients_stay_connected_and_delivery_resumes() -> None:
    with TidingsService(workers=2) as svc:
        by_worker = _both_workers(svc, "hubkill-")
        clients = [c for cs in by_worker.values() for c in cs]
        for c in clients:
            assert c.subscribe("conversation:hk")["type"] == "subscribed"
        old_hub = svc.children()["hub"]
        mark = len(svc.logs())
        os.kill(old_hub, signal.SIGKILL)
        assert svc.wait_for_log("lost hub 0", after=mark)
        killed_at = time.monotonic()
        # While the hub is down a publish is refused, not pretended.
        reply = by_worker["0"][0].request("publish", {"channel": "conversation:hk", "type": "chat_message",
                                                      "data": {}})
        if reply["type"] == "error":
            assert reply["data"]["code"] == "internal_error"
        # The supervisor restarts the hub; workers reconnect and their subscriptions come back.
        assert _wait(lambda: svc.children().get("hub") not in (None, old_hub))
        # The new hub knows the channel under a new epoch (no persistence): every subscriber is told
        # its position means nothing any more, and resubscribes with it to learn the new one.
        # (Their personal channels too: every channel of the old hub is gone.)
        for c in clients:
            told = [c.recv(15), c.recv(15)]
            assert all(t["type"] == "unsubscribed" and t["data"]["reason"] == "insufficient_state" for t in told)
            assert sorted(t["data"]["channel"] for t in told)[0] == "conversation:hk"
            assert sorted(t["data"]["channel"] for t in told)[1].startswith("user:hubkill-")
        gap = time.monotonic() - killed_at
        print(f"\nhub kill -> every subscriber told to resubscribe after {gap:.2f}s")
        for c in clients:
            again = c.request("subscribe", {"channel": "conversation:hk", "since": {"offset": 0, "epoch": "old"}})
            assert again["type"] == "subscribed" and again["data"]["recovered"] is False, again
        status, body = svc.publish_http("conversation:hk", "chat_message", {"n": "after"})
        assert status == 200, body
        for c in clients:
            event = c.recv()
            assert (event["data"], event["offset"], event["epoch"]) == ({"n": "after"}, body["offset"], body["epoch"])
        # No client connection closed: every one still answers.
        for c in clients:
            assert c.request("ping", id_="after")["type"] == "pong"


def test_worker_killed_only_its_clients_drop_and_it_comes_back() -> None:
    with TidingsService(workers=2) as svc:
        by_worker = _both_workers(svc, "wkill-")
        for cs in by_worker.values():
            for c in cs:
                assert c.subscribe("conversation:wk")["type"] == "subscribed"
        victim = svc.children()["worker 1"]
        mark = len(svc.logs())
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        for c in by_worker["1"]:
            code, _ = c.expect_close()
            assert code is None  # TCP gone without a close frame: the client sees 1006
        assert _wait(lambda: svc.children().get("worker 1") not in (None, victim))
        assert svc.wait_for_log("worker 1 ready", after=mark)
        restart = time.monotonic() - killed_at
        print(f"\nworker kill -> replacement worker serving after {restart:.2f}s")
        # The survivors lost nothing.
        for n in range(20):
            svc.publish_http("conversation:wk", "chat_message", {"n": n})
        for c in by_worker["0"]:
            assert [c.recv()["data"]["n"] for _ in range(20)] == list(range(20))
            c.nothing(0.1)
        # New connections land on both workers again.
        assert _both_workers(svc, "wkill-again-", n=16)


def test_graceful_stop_sends_1001_and_exits_0() -> None:
    svc = TidingsService(workers=2, env={"TIDINGS_DRAIN_WINDOW": "1"})
    svc.start()
    try:
        clients = [c for cs in _both_workers(svc, "stop-").values() for c in cs]
    except BaseException:
        svc.stop()
        raise
    started = time.monotonic()
    codes: list[int | None] = []

    def read_all() -> None:
        for c in clients:
            codes.append(c.expect_close(timeout=8)[0])

    reader = threading.Thread(target=read_all)
    reader.start()
    rc = svc.stop()
    reader.join(10)
    print(f"\ngraceful stop of 2 workers with {len(clients)} clients: {time.monotonic() - started:.2f}s")
    assert rc == 0
    assert codes == [1001] * len(clients)


def test_slow_consumer_is_aborted_and_healthy_subscribers_lose_nothing() -> None:
    env = {"TIDINGS_MAX_PENDING_BYTES": str(256 * 1024), "TIDINGS_WORKERS": "1"}
    with TidingsService(workers=1, env=env) as svc:
        token = svc.token("reader", channels=["conversation:*"])
        healthy, _ = connect(svc.ws_url(token))
        healthy.subscribe("conversation:flood")
        slow = websocket.create_connection(
            svc.ws_url(svc.token("stalled", channels=["conversation:*"])), timeout=5,
            sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)], suppress_origin=True)
        slow.recv()  # connected
        slow.send('{"type":"subscribe","id":"s","data":{"channel":"conversation:flood"}}')
        slow.recv()  # subscribed; from here on it never reads
        got: list[int] = []

        def consume() -> None:
            while len(got) < 300:
                got.append(healthy.recv(10)["data"]["n"])

        reader = threading.Thread(target=consume)
        reader.start()
        pad = "x" * 16_000
        for n in range(300):
            status, _ = svc.publish_http("conversation:flood", "chat_message", {"n": n, "pad": pad})
            assert status == 200
        reader.join(30)
        assert got == list(range(300))
        assert svc.wait_for_log("slow consumer")
        # The stalled client's connection is gone (aborted: no close frame ever reached it).
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError,
                            websocket.WebSocketTimeoutException, OSError)):
            for _ in range(10_000):
                slow.recv()
        metrics = svc.metrics()
        assert "tidings_slow_consumer_drops_total 1.0" in metrics


def test_dead_peer_is_dropped_after_ping_timeout() -> None:
    env = {"TIDINGS_IDLE_TIMEOUT": "1", "TIDINGS_PONG_TIMEOUT": "1"}
    with TidingsService(workers=1, env=env) as svc:
        lively, _ = connect(svc.ws_url(svc.token("lively")))
        silent, _ = connect(svc.ws_url(svc.token("silent")))
        stop = threading.Event()

        def answer_pings() -> None:  # websocket-client answers each ping it reads
            while not stop.is_set():
                try:
                    lively.recv_frame(0.2)
                except (websocket.WebSocketTimeoutException, TimeoutError):
                    pass

        t = threading.Thread(target=answer_pings)
        t.start()
        assert svc.wait_for_log("no pong", timeout=10)
        stop.set()
        t.join()
        # The silent one is gone; the one that answered is still served.
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
            for _ in range(100):
                silent.recv_frame(2)
        assert lively.request("ping", id_="still")["type"] == "pong"


@pytest.mark.parametrize("history", ["enough", "too_little"])
def test_stalled_worker_heals_from_history_or_signals_and_others_lose_nothing(history: str) -> None:
    # A small high-water mark so a stalled worker overflows the hub's queue quickly.
    env = {"TIDINGS_HUB_HWM": "300"}
    if history == "enough":
        env |= {"TIDINGS_HISTORY": "conversation=3000/300s", "TIDINGS_RECOVERY_MAX_EVENTS": "3000"}
    total = 1500
    with TidingsService(workers=2, env=env) as svc:
        by_worker = _both_workers(svc, "stall-", n=8)
        for cs in by_worker.values():
            for c in cs:
                assert c.subscribe("conversation:stall")["type"] == "subscribed"
        stalled = svc.children()["worker 1"]
        os.kill(stalled, signal.SIGSTOP)
        try:
            from hub import Publisher

            received: dict[int, list[int]] = {}

            def read(i: int, c: Client) -> None:  # the running worker's clients keep reading
                received[i] = [c.recv(10)["data"]["n"] for _ in range(total)]

            readers = [threading.Thread(target=read, args=(i, c)) for i, c in enumerate(by_worker["0"])]
            for t in readers:
                t.start()
            with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
                for n in range(total):
                    pub.publish("conversation:stall", "chat_message", {"n": n, "pad": "x" * 2000})
                    if n % 10 == 9:
                        time.sleep(0.005)  # a pace the running worker keeps up with
            for t in readers:
                t.join(30)
            assert list(received.values()) == [list(range(total))] * len(by_worker["0"])
        finally:
            os.kill(stalled, signal.SIGCONT)
        # Dropped events are the newest ones, so the next event is what reveals the jump.
        time.sleep(0.5)
        status, after = svc.publish_http("conversation:stall", "chat_message", {"n": "after"})
        assert status == 200
        assert svc.wait_for_log("missed")
        for c in by_worker["1"]:
            got = []
            try:
                while True:
                    got.append(c.recv(1.0))
            except (websocket.WebSocketTimeoutException, TimeoutError):
                pass
            offsets = [m["offset"] for m in got if "offset" in m]
            if history == "enough":
                # healed: every event exactly once, in order, the history spliced before "after"
                assert [m["data"]["n"] for m in got] == [*range(total), "after"]
                assert offsets == list(range(1, total + 2))
            else:
                # not enough history: what arrived is in order, then the client is told to resubscribe
                assert got[-1] == {"type": "unsubscribed",
                                   "data": {"channel": "conversation:stall", "reason": "insufficient_state"}}
                assert offsets == list(range(1, len(offsets) + 1)) and len(offsets) < total
                again = c.request("subscribe", {"channel": "conversation:stall",
                                                "since": {"offset": offsets[-1], "epoch": after["epoch"]}})
                assert again["data"]["recovered"] is False and again["data"]["offset"] == after["offset"]
        metric = "healed" if history == "enough" else "signalled"
        deadline = time.monotonic() + 5
        while f'tidings_gap_heals_total{{result="{metric}"}}' not in svc.metrics() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f'tidings_gap_heals_total{{result="{metric}"}}' in svc.metrics()
        gaps = [line for line in svc.metrics().splitlines() if line.startswith("tidings_offset_gaps_total ")]
        assert gaps and float(gaps[0].split()[1]) > 0
