"""`tidings run --hubs 2` on one machine: two hub shards, every publish path routed to the
channel's owner, and a shard that dies pauses only its own channels.

Raw protocol clients (tests/client.py) on purpose: these tests look at the exact messages a
shard restart produces (`unsubscribed` with `insufficient_state`), which the client library
turns into a resubscribe."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from hub import Publisher
from hub.shards import shard_of
from tests.client import Client, connect
from tests.service import TidingsService, until_stamped


def _owned_by(shard: int, prefix: str = "conversation:s") -> str:
    n = 0
    while shard_of(f"{prefix}{n}".encode(), 2) != shard:
        n += 1
    return f"{prefix}{n}"


A, B = _owned_by(0), _owned_by(1)


@pytest.fixture
def svc() -> Iterator[TidingsService]:
    with TidingsService(workers=2, env={"TIDINGS_HUBS": "2"}) as service:
        yield service


def _subscribers(svc: TidingsService, n: int = 6) -> dict[str, list[Client]]:
    """At least n clients, on both workers (the kernel picks the worker, so keep connecting until
    each has one), each subscribed to A and B; keyed by worker."""
    by_worker: dict[str, list[Client]] = {}
    i = 0
    while i < n or len(by_worker) < 2:
        assert i < 40, f"40 connections and still one worker: {set(by_worker)}"
        i += 1
        # Users whose personal channel is shard 0's too: a shard 1 restart concerns B alone.
        sub = _owned_by(0, f"user:s{i}-")[len("user:"):]
        c, hello = connect(svc.ws_url(svc.token(sub, channels=["conversation:*"], publish=["conversation:*"])))
        for ch in (A, B):
            assert c.subscribe(ch)["type"] == "subscribed"
        by_worker.setdefault(hello["data"]["connection_id"].split("-")[0], []).append(c)
    assert set(by_worker) == {"0", "1"}
    return by_worker


def _events(c: Client, count: int) -> list[dict]:
    got = []
    while len(got) < count:
        msg = c.recv()
        if msg["type"] not in ("published", "pong"):
            got.append(msg)
    return got


def test_every_publish_path_reaches_the_owner_and_offsets_stay_per_channel(svc: TidingsService) -> None:
    by_worker = _subscribers(svc)
    clients = [c for cs in by_worker.values() for c in cs]
    rt = svc.runtime_dir
    with Publisher([f"ipc://{rt}/hub-0/ingress", f"ipc://{rt}/hub-1/ingress"]) as pub:
        pub.publish(A, "n", {"k": "fire"})
        pub.publish(B, "n", {"k": "fire"})
        # Unconfirmed publishes take another socket than confirmed ones (hub/publisher.py): wait
        # until they are stamped, or the broadcast below could overtake them.
        until_stamped(pub, A, 1)
        until_stamped(pub, B, 1)
        positions = pub.broadcast_confirmed([B, A], "n", {"k": "confirmed"})
    assert [p.channel for p in positions] == [B, A]  # in the order asked, though on two shards
    status, body = svc.api("/api/broadcast", {"channels": [A, B], "type": "n", "data": {"k": "http"}})
    assert status == 200 and [p["offset"] for p in body["positions"]] == [3, 3], body
    reply = by_worker["1"][0].request("publish", {"channel": A, "type": "n", "data": {"k": "client"}})
    assert reply["type"] == "published" and reply["data"]["offset"] == 4, reply
    for c in clients:
        got = _events(c, 7)
        for ch, kinds in ((A, ["fire", "confirmed", "http", "client"]), (B, ["fire", "confirmed", "http"])):
            mine = [e for e in got if e["channel"] == ch]
            assert [e["data"]["k"] for e in mine] == kinds
            assert [e["offset"] for e in mine] == list(range(1, len(kinds) + 1))
            assert len({e["epoch"] for e in mine}) == 1
        c.nothing(0.2)
    # Two processes, two epochs: each channel's epoch names the hub that stamped it.
    epochs = {ch: {e["epoch"] for e in got if e["channel"] == ch} for ch in (A, B)}
    assert epochs[A] != epochs[B]


def test_a_killed_shard_pauses_only_its_channels(svc: TidingsService) -> None:
    by_worker = _subscribers(svc, n=4)
    clients = [c for cs in by_worker.values() for c in cs]
    old = svc.children()["hub 1"]
    mark = len(svc.logs())
    os.kill(old, signal.SIGKILL)
    assert svc.wait_for_log("lost hub 1", after=mark)
    # Shard 0's channel keeps flowing while shard 1 is away (or restarting).
    status, body = svc.publish_http(A, "n", {"k": "during"})
    assert status == 200, body
    for c in clients:
        assert _events(c, 1)[0]["data"]["k"] == "during"
    # The supervisor restarts shard 1: its channel comes back in a new epoch, so B's subscribers
    # are told to resubscribe; nobody hears anything about A.
    deadline = time.monotonic() + 15
    while svc.children().get("hub 1") in (None, old):
        assert time.monotonic() < deadline, "shard 1 was not restarted"
        time.sleep(0.05)
    for c in clients:
        msg = c.recv(timeout=10)
        assert msg["type"] == "unsubscribed", msg
        assert msg["data"] == {"channel": B, "reason": "insufficient_state"}, msg
        again = c.request("subscribe", {"channel": B, "since": {"offset": 0, "epoch": "0" * 16}}, id_="again")
        assert again["type"] == "subscribed" and again["data"]["recovered"] is False, again
    for ch in (A, B):
        status, body = svc.publish_http(ch, "n", {"k": "after"})
        assert status == 200, body
    for c in clients:
        got = _events(c, 2)
        assert sorted(e.get("channel", "") for e in got) == sorted([A, B]), got
        assert [e["offset"] for e in got if e["channel"] == B] == [1]
        c.nothing(0.2)
