"""History and exact recovery over real processes: resume with `since`, confirmed publishes,
gap healing, epochs, restarts and the journal."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hub import HubUnavailable, Publisher
from tests.client import Client, connect
from tests.service import TidingsService, until_stamped

CHANNELS = ["conversation:*", "room:*", "task:*"]


@pytest.fixture(scope="module")
def svc() -> Iterator[TidingsService]:
    env = {"TIDINGS_HISTORY": "conversation=100/300s,task=5/1s,user=20/300s", "TIDINGS_RECOVERY_MAX_EVENTS": "60",
           "TIDINGS_UNSUBSCRIBE_GRACE": "0.2"}
    with TidingsService(workers=2, env=env) as service:
        yield service


def client(svc: TidingsService, sub: str, **kw: Any) -> tuple[Client, dict[str, Any]]:
    return connect(svc.ws_url(svc.token(sub, channels=CHANNELS, publish=CHANNELS)) + kw.pop("query", ""), **kw)


def subscribe(c: Client, channel: str, since: dict[str, Any] | None = None, id_: str = "s") -> dict[str, Any]:
    data: dict[str, Any] = {"channel": channel}
    if since is not None:
        data["since"] = since
    reply = c.request("subscribe", data, id_)
    assert reply["type"] == "subscribed", reply
    return reply["data"]


def position(event_or_data: dict[str, Any]) -> dict[str, Any]:
    return {"offset": event_or_data["offset"], "epoch": event_or_data["epoch"]}


def publish(svc: TidingsService, channel: str, n: int, tag: str = "") -> list[dict[str, Any]]:
    bodies = []
    for i in range(n):
        status, body = svc.publish_http(channel, "chat_message", {"i": i, "tag": tag})
        assert status == 200, body
        bodies.append(body)
    return bodies


def read_events(c: Client, n: int) -> list[dict[str, Any]]:
    return [c.recv() for _ in range(n)]


# -- positions and resume ------------------------------------------------------------------------
def test_subscribed_always_carries_a_position(svc: TidingsService) -> None:
    c, hello = client(svc, "pos")
    assert hello["data"]["personal"]["channel"] == "user:pos"
    assert hello["data"]["personal"]["offset"] == 0 and len(hello["data"]["personal"]["epoch"]) == 16
    fresh = subscribe(c, "conversation:never-published")
    assert fresh["offset"] == 0 and len(fresh["epoch"]) == 16 and "recovered" not in fresh
    publish(svc, "conversation:pos", 3)
    data = subscribe(c, "conversation:pos", id_="s2")
    assert data["offset"] == 3
    again = subscribe(c, "conversation:pos", id_="s3")  # already held: the same position, nothing replayed
    assert position(again) == position(data)
    c.nothing(0.2)


def test_resume_replays_the_missed_events_in_order_then_live(svc: TidingsService) -> None:
    channel = "conversation:resume"
    c, _ = client(svc, "resume")
    start = subscribe(c, channel)
    c.close()
    publish(svc, channel, 50)
    c2, _ = client(svc, "resume")
    data = subscribe(c2, channel, since=position(start))
    assert data["recovered"] is True and data["offset"] == start["offset"] + 50
    events = read_events(c2, 50)
    assert [e["offset"] for e in events] == list(range(start["offset"] + 1, start["offset"] + 51))
    assert [e["data"]["i"] for e in events] == list(range(50))
    publish(svc, channel, 1, "live")
    live = c2.recv()
    assert live["offset"] == start["offset"] + 51 and live["data"]["tag"] == "live"
    c2.nothing(0.2)


def test_resume_while_the_channel_keeps_publishing_is_exact(svc: TidingsService) -> None:
    """A publisher runs throughout; each round a client misses a burst, resumes, and must see
    every offset from its position on exactly once, history and live spliced."""
    channel = "conversation:busy"
    watcher, _ = client(svc, "busy-watch")
    subscribe(watcher, channel)
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_publishing() -> None:
        try:
            with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
                n = 0
                while not stop.is_set():
                    pub.publish(channel, "chat_message", {"n": n})
                    n += 1
                    time.sleep(0.002)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=keep_publishing)
    thread.start()
    try:
        for round_ in range(12):
            c, _ = client(svc, f"busy-{round_}")
            start = subscribe(c, channel)
            got = [c.recv() for _ in range(3)]
            last = got[-1]
            c.close()
            time.sleep(0.05)  # events go by while it is away
            c2, _ = client(svc, f"busy-{round_}")
            data = subscribe(c2, channel, since=position(last))
            assert data["recovered"] is True, data
            seen = [c2.recv()["offset"] for _ in range(40)]
            assert seen == list(range(last["offset"] + 1, last["offset"] + 41)), (round_, seen[:5], start)
            c2.close()
    finally:
        stop.set()
        thread.join(10)
    assert not errors
    watcher.close()


def test_personal_channel_resumes_from_the_connect_url(svc: TidingsService) -> None:
    c, hello = client(svc, "personal")
    mark = hello["data"]["personal"]
    c.close()
    with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
        for i in range(5):
            pub.publish("user:personal", "notification", {"i": i})
        until_stamped(pub, "user:personal", mark["offset"] + 5)
    c2, hello2 = client(svc, "personal", query=f"&since={mark['offset']}:{mark['epoch']}")
    personal = hello2["data"]["personal"]
    assert personal["recovered"] is True and personal["offset"] == mark["offset"] + 5
    assert [e["data"]["i"] for e in read_events(c2, 5)] == list(range(5))
    c2.nothing(0.2)


def test_nothing_missed_is_recovered_without_events(svc: TidingsService) -> None:
    channel = "conversation:quiet"
    publish(svc, channel, 2)
    c, _ = client(svc, "quiet")
    data = subscribe(c, channel)
    c.close()
    c2, _ = client(svc, "quiet")
    again = subscribe(c2, channel, since=position(data))
    assert again["recovered"] is True and position(again) == position(data)
    c2.nothing(0.3)


def test_nothing_missed_outlives_the_history_ttl(svc: TidingsService) -> None:
    channel = "task:ttl-quiet"  # task keeps 5 events for 1 s
    publish(svc, channel, 3)
    c, _ = client(svc, "ttl-quiet")
    data = subscribe(c, channel)
    c.close()
    time.sleep(2.5)  # the events expired; the position did not
    c2, _ = client(svc, "ttl-quiet")
    again = subscribe(c2, channel, since=position(data))
    assert again["recovered"] is True and position(again) == position(data)
    c2.nothing(0.3)


@pytest.mark.parametrize("case", ["foreign_epoch", "history_too_short", "ttl_expired", "above_the_cap", "future"])
def test_unrecoverable_resumes_get_no_events_and_the_position(svc: TidingsService, case: str) -> None:
    channel = {"foreign_epoch": "conversation:foreign", "history_too_short": "room:short",
               "ttl_expired": "task:expired", "above_the_cap": "conversation:cap",
               "future": "conversation:future"}[case]
    c, _ = client(svc, f"unrec-{case}")
    start = subscribe(c, channel)
    c.close()
    missed = {"above_the_cap": 61, "ttl_expired": 3}.get(case, 4)  # room keeps no history at all
    publish(svc, channel, missed)
    if case == "ttl_expired":
        time.sleep(2.5)
    since = position(start)
    if case == "foreign_epoch":
        since["epoch"] = "0123456789abcdef"
    if case == "future":
        since["offset"] += 1000
    c2, _ = client(svc, f"unrec-{case}")
    data = subscribe(c2, channel, since=since)
    assert data["recovered"] is False
    assert data["offset"] == start["offset"] + missed and data["epoch"] == start["epoch"]
    c2.nothing(0.3)  # never a partial list
    publish(svc, channel, 1, "live")
    assert c2.recv()["offset"] == data["offset"] + 1  # live from the position it was given


def test_bad_since_is_an_invalid_request(svc: TidingsService) -> None:
    c, _ = client(svc, "bad-since")
    for since in ({"offset": -1, "epoch": "x"}, {"offset": "3", "epoch": "x"}, {"offset": 3}, "3:x",
                  {"offset": 3, "epoch": "x" * 65}):
        reply = c.request("subscribe", {"channel": "conversation:bad", "since": since})
        assert reply["type"] == "error" and reply["data"]["code"] == "invalid_request", (since, reply)
    status, _ = _ws_status(svc, "&since=notanumber:abc")
    assert status == 400


def _ws_status(svc: TidingsService, query: str) -> tuple[int, str]:
    import websocket

    try:
        Client(svc.ws_url(svc.token("bad-url")) + query).close()
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code, str(exc)
    return 101, ""


# -- confirmed publishes and the backend API --------------------------------------------------------
def test_confirmed_publishes_return_their_position(svc: TidingsService) -> None:
    channel = "conversation:confirm"
    c, _ = client(svc, "confirm")
    start = subscribe(c, channel)
    with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
        first = pub.publish(channel, "chat_message", {"via": "publisher"}, confirm=True)
        assert first is not None and first.channel == channel and first.offset == start["offset"] + 1
        assert pub.publish(channel, "chat_message", {"via": "fire-and-forget"}) is None
        # It takes the other socket (see hub/publisher.py): stamped before the broadcast only if we wait.
        until_stamped(pub, channel, first.offset + 1)
        both = pub.broadcast_confirmed([channel, "conversation:confirm-2"], "notification", {"via": "broadcast"})
    assert [p.offset for p in both] == [start["offset"] + 3, 1]
    reply = c.request("publish", {"channel": channel, "type": "chat_message", "data": {"via": "socket"}}, "p")
    assert reply["data"]["offset"] == start["offset"] + 4 and reply["data"]["epoch"] == start["epoch"]
    events = [e for e in (c.recv() for _ in range(4))]
    assert [(e["data"]["via"], e["offset"]) for e in events] == [
        ("publisher", first.offset), ("fire-and-forget", first.offset + 1), ("broadcast", first.offset + 2),
        ("socket", first.offset + 3)]
    status, body = svc.api("/api/publish", {"channel": channel, "type": "x", "data": {}, "confirm": False})
    assert (status, body) == (200, {"ok": True, "channels": 1, "confirmed": False})
    status, body = svc.api("/api/publish", {"channel": channel, "type": "x", "data": {}, "confirm": "yes"})
    assert status == 400


def test_history_api_and_publisher_history(svc: TidingsService) -> None:
    channel = "conversation:api-history"
    bodies = publish(svc, channel, 10)
    epoch = bodies[0]["epoch"]
    status, found = svc.api(f"/api/history?channel={channel}&since=4&epoch={epoch}&limit=3")
    assert status == 200 and found["covered"] is True and found["offset"] == 10 and found["epoch"] == epoch
    assert [e["offset"] for e in found["events"]] == [5, 6, 7]
    status, last = svc.api(f"/api/history?channel={channel}&limit=2")
    assert [e["data"]["i"] for e in last["events"]] == [8, 9]
    status, foreign = svc.api(f"/api/history?channel={channel}&since=4&epoch=feedfeedfeedfeed")
    assert status == 200 and foreign["covered"] is False and foreign["events"] == []
    for bad in ("channel=nope", f"channel={channel}&since=4", f"channel={channel}&limit=-1",
                f"channel={channel}&since=x&epoch={epoch}"):
        assert svc.api(f"/api/history?{bad}")[0] == 400, bad
    assert svc.api(f"/api/history?channel={channel}", key="wrong-key")[0] == 401
    with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
        history = pub.history(channel, since=(8, epoch))
    assert history.covered and history.offset == 10 and [e["data"]["i"] for e in history.events] == [8, 9]


# -- restarts, epochs, healing -----------------------------------------------------------------------
def _kill_hub_and_wait(svc: TidingsService) -> None:
    old = svc.children()["hub"]
    mark = len(svc.logs())
    os.kill(old, signal.SIGKILL)
    assert svc.wait_for_log("lost hub 0", after=mark)
    deadline = time.monotonic() + 15
    while svc.children().get("hub") in (None, old) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert svc.wait_for_log("hub serving", after=mark, timeout=15)
    assert svc.wait_for_log("linked to hub 0", after=mark, timeout=15)


def test_hub_restart_without_persistence_is_not_recovered() -> None:
    with TidingsService(workers=1) as svc:
        channel = "conversation:restart"
        c, _ = client(svc, "restart")
        subscribe(c, channel)
        publish(svc, channel, 3)
        last = read_events(c, 3)[-1]
        c.close()
        _kill_hub_and_wait(svc)
        c2, _ = client(svc, "restart")
        data = subscribe(c2, channel, since=position(last))
        assert data["recovered"] is False and data["epoch"] != last["epoch"] and data["offset"] == 0
        c2.nothing(0.3)


def test_hub_restart_with_persistence_recovers_and_repairs_a_torn_tail() -> None:
    with TidingsService(workers=1, env={"TIDINGS_HISTORY_PERSIST": "1", "TIDINGS_HISTORY_FSYNC_SECONDS": "0"}) as svc:
        channel = "conversation:persist"
        c, _ = client(svc, "persist")
        start = subscribe(c, channel)
        c.close()
        publish(svc, channel, 5)
        journal = svc.runtime_dir / "state" / "history.journal"
        size = journal.stat().st_size
        with open(journal, "ab") as fh:
            fh.write(b"\x00\x00\x01\x00torn")  # half a record, as a crash in the middle of a write leaves
        _kill_hub_and_wait(svc)
        assert svc.wait_for_log("cut")
        assert journal.stat().st_size >= size  # the torn bytes went, what was written stayed
        c2, _ = client(svc, "persist")
        data = subscribe(c2, channel, since=position(start))
        assert data["recovered"] is True and data["epoch"] == start["epoch"], data
        assert [e["data"]["i"] for e in read_events(c2, 5)] == list(range(5))
        publish(svc, channel, 1, "after")
        assert c2.recv()["offset"] == start["offset"] + 6  # offsets carry on: none handed out twice


def test_live_subscribers_heal_after_a_persistent_hub_restart() -> None:
    with TidingsService(workers=1, env={"TIDINGS_HISTORY_PERSIST": "1"}) as svc:
        channel = "conversation:heal-restart"
        c, _ = client(svc, "heal-restart")
        subscribe(c, channel)
        publish(svc, channel, 2)
        read_events(c, 2)
        _kill_hub_and_wait(svc)
        publish(svc, channel, 3, "after-restart")
        events = read_events(c, 3)
        assert [e["offset"] for e in events] == [3, 4, 5]
        c.nothing(0.3)


def test_metadata_ttl_starts_a_new_epoch_and_keeps_memory_flat() -> None:
    env = {"TIDINGS_HISTORY": "conversation=10/1s", "TIDINGS_HISTORY_META_TTL": "2"}
    with TidingsService(workers=1, env=env) as svc:
        first = publish(svc, "conversation:meta", 2)
        time.sleep(4)  # past the metadata TTL: nobody subscribes, publishes or reads
        again = publish(svc, "conversation:meta", 1)
        assert again[0]["offset"] == 1 and again[0]["epoch"] != first[0]["epoch"]
        # A flood of one-shot channels: the hub's channel count returns to (almost) nothing.
        with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
            for i in range(20_000):
                pub.publish(f"conversation:one-shot-{i}", "notification", {"i": i})
        assert _wait_gauge(svc, "tidings_history_channels", lambda v: v >= 20_000)
        assert _wait_gauge(svc, "tidings_history_channels", lambda v: v <= 2, timeout=10)
        assert _wait_gauge(svc, "tidings_history_bytes", lambda v: v == 0)


def _wait_gauge(svc: TidingsService, name: str, ok: Any, timeout: float = 6.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in svc.metrics().splitlines():
            if line.startswith(name + " ") and ok(float(line.split()[1])):
                return True
        time.sleep(0.2)
    return False


def test_confirmed_publish_fails_clearly_while_the_hub_is_down() -> None:
    with TidingsService(workers=1) as svc:
        c, _ = client(svc, "down")
        hub = svc.children()["hub"]
        connected = Publisher(f"ipc://{svc.runtime_dir}/ingress", reply_timeout_ms=500)
        assert connected.publish("conversation:down", "chat_message", {}, confirm=True) is not None
        os.kill(hub, signal.SIGSTOP)  # a hub that takes nothing and answers nothing
        try:
            # Sent, never answered: the publisher cannot know whether the hub stamped it, and says so.
            with pytest.raises(HubUnavailable, match="may or may not"):
                connected.publish("conversation:down", "chat_message", {}, confirm=True)
            connected.close()
            # Never sent (no hub to take it): a plain refusal.
            with Publisher(f"ipc://{svc.runtime_dir}/ingress", send_timeout_ms=300) as fresh, \
                    pytest.raises(HubUnavailable, match="did not take"):
                fresh.publish("conversation:down", "chat_message", {}, confirm=True)
            reply = c.request("publish", {"channel": "conversation:down", "type": "chat_message", "data": {}}, "p")
            assert reply["type"] == "error" and reply["data"]["code"] == "internal_error"
            status, body = svc.publish_http("conversation:down", "chat_message", {})
            assert status == 503 and body["error"] == "hub_unavailable"
        finally:
            os.kill(hub, signal.SIGCONT)


def test_a_worker_behind_on_many_channels_heals_them_all() -> None:
    """Hundreds of personal channels gap at once (the worker was stopped past the hub's
    high-water mark): each is healed from history, every user gets every event once, in order."""
    users = 150
    # HWM 200 (> users): the stop overflows it (600 events of 2 KB), the paced "after" round cannot
    with TidingsService(workers=1, env={"TIDINGS_HUB_HWM": "200"}) as svc:
        clients = [client(svc, f"many-{i}")[0] for i in range(users)]
        worker = svc.children()["worker 0"]
        os.kill(worker, signal.SIGSTOP)
        try:
            with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
                for n in range(4):
                    for i in range(users):
                        pub.publish(f"user:many-{i}", "notification", {"n": n, "pad": "x" * 2000})
                # Kept open until the hub stamped them all: a PUSH socket closed while the hub
                # pushes back can lose its tail (fire-and-forget is at most once).
                until_stamped(pub, f"user:many-{users - 1}", 4)
        finally:
            os.kill(worker, signal.SIGCONT)
        time.sleep(0.5)
        # The next event of each channel reveals its gap. Paced (each confirmed), so that these do
        # not overflow the small high-water mark themselves: a dropped *last* event shows no jump.
        with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
            for i in range(users):
                pub.publish(f"user:many-{i}", "notification", {"n": "after"}, confirm=True)
        for c in clients:
            events = read_events(c, 5)
            assert [e["data"]["n"] for e in events] == [0, 1, 2, 3, "after"]
            assert [e["offset"] for e in events] == [1, 2, 3, 4, 5]
        assert "missed" in svc.logs()  # the high-water mark did drop events: they came from history
        for c in clients:
            c.nothing(0.01)


def test_a_replay_bigger_than_the_slow_consumer_cap_is_not_held_against_the_reader() -> None:
    """A resume hands the reader its whole gap in one write, which may be more than the cap on
    unsent bytes: that reader is not slow, and the live events after the replay must not abort it
    (it would reconnect, resume, and be aborted again, for ever)."""
    cap = 128 * 1024
    with TidingsService(workers=1, env={"TIDINGS_MAX_PENDING_BYTES": str(cap),
                                        "TIDINGS_HISTORY": "conversation=300/300s",
                                        "TIDINGS_RECOVERY_MAX_EVENTS": "300"}) as svc:
        channel = "conversation:big-replay"
        c, _ = client(svc, "big-replay")
        start = subscribe(c, channel)
        c.close()
        missed = 200  # 200 events of 3 KB: a 600 KB replay, over the 128 KB cap and the kernel's buffers
        with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
            for n in range(missed + 1):
                pub.publish(channel, "chat_message", {"n": n, "pad": "x" * 3000})
            until_stamped(pub, channel, missed + 1)  # not a confirmed publish: it could overtake these
            c, _ = client(svc, "big-replay")
            assert subscribe(c, channel, since=position(start))["recovered"] is True
            time.sleep(0.3)  # not reading: the replay sits in the worker's buffer
            for n in range(missed + 1, missed + 6):  # live events, each a pass of its own
                pub.publish(channel, "chat_message", {"n": n}, confirm=True)
                time.sleep(0.02)
        events = read_events(c, missed + 6)
        assert [e["data"]["n"] for e in events] == list(range(missed + 6))
        assert [e["offset"] for e in events] == list(range(1, missed + 7))
        assert "slow consumer" not in svc.logs()


def test_a_gap_inside_a_batch_loses_nothing_queued_before_it() -> None:
    """The events a worker reads in one pass before an offset jump still reach the members who
    then wait for the jump to heal: events keep flowing while the stopped worker resumes, so a
    pass holds both the queued events and the first one past the dropped range."""
    # 600 events of 3 KB is 1.8 MB, read by a thread that shares the GIL with the publisher: it can
    # fall more than the slow-consumer cap (1 MiB) behind, which is not what this test is about.
    with TidingsService(workers=1, env={"TIDINGS_HUB_HWM": "20", "TIDINGS_HISTORY": "conversation=2000/300s",
                                        "TIDINGS_RECOVERY_MAX_EVENTS": "2000",
                                        "TIDINGS_MAX_PENDING_BYTES": str(16 << 20)}) as svc:
        c, _ = client(svc, "in-batch")
        subscribe(c, "conversation:in-batch")
        worker = svc.children()["worker 0"]
        total = 600
        events: list[dict[str, Any]] = []
        failures: list[BaseException] = []

        def read() -> None:  # as they come: 600 events of 3 KB unread would make it a slow consumer
            try:
                for _ in range(total):
                    events.append(c.recv())
            except BaseException as exc:  # reported below, with what arrived
                failures.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        with Publisher(f"ipc://{svc.runtime_dir}/ingress") as pub:
            os.kill(worker, signal.SIGSTOP)
            try:
                for n in range(300):  # overflows the high-water mark: the hub drops some
                    pub.publish("conversation:in-batch", "chat_message", {"n": n, "pad": "x" * 3000})
            finally:
                os.kill(worker, signal.SIGCONT)
            for n in range(300, total):  # the worker reads its backlog while these arrive
                pub.publish("conversation:in-batch", "chat_message", {"n": n, "pad": "x" * 3000})
                if n >= 320:
                    # The first ones join the backlog in the worker's first pass; the rest are paced
                    # so that a busy machine does not overflow the tiny high-water mark again (a
                    # worker that keeps falling behind gives up healing after MAX_READS reads: unit-tested).
                    time.sleep(0.002)
            until_stamped(pub, "conversation:in-batch", total)
        reader.join(20)
        assert not failures, (failures, [e.get("offset", e) for e in events][-5:], len(events), svc.logs()[-3000:])
        assert [e["offset"] for e in events] == list(range(1, total + 1))
        c.nothing(0.2)
        assert "missed" in svc.logs()
