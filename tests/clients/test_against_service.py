"""The Python client against a real `tidings run`: delivery, errors, resuming after a worker is
killed or restarted, a reconnecting crowd, token refresh and slow consumers.

Events published during an outage go straight to the hub (hub.Publisher, confirmed), so they do
not depend on the workers being faulted; each test then checks that every offset arrived once,
in order."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tidings_client import Disconnected, Event, Reset, ServerError, TidingsClient

from hub import Publisher
from tests.clients.helpers import eventually, run
from tests.service import TidingsService

READ = 5.0  # seconds to wait for an event that is due: generous for a loaded 2-core box


@pytest.fixture(scope="module")
def svc() -> Iterator[TidingsService]:
    with TidingsService(workers=2, env={"TIDINGS_JWT_LEEWAY": "1"}) as service:
        yield service


class TokenSource:
    """get_token() for one user: a fresh token per call, counted."""

    def __init__(self, svc: TidingsService, sub: str, ttl: float = 3600) -> None:
        self.svc, self.sub, self.ttl = svc, sub, ttl
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return self.svc.token(self.sub, channels=["conversation:*"], publish=["conversation:*"], ttl=self.ttl)


def client_for(svc: TidingsService, sub: str, **options: Any) -> TidingsClient:
    return TidingsClient(svc.ws_url(), get_token=TokenSource(svc, sub), **options)


def publisher(svc: TidingsService) -> Publisher:
    return Publisher(f"ipc://{svc.runtime_dir}/ingress")


async def read(sub: Any, n: int) -> list[Event]:
    """The next n items, which must all be events."""
    got: list[Event] = []
    async with asyncio.timeout(READ):
        while len(got) < n:
            item = await anext(sub)
            assert not isinstance(item, Reset), f"unexpected reset after {len(got)} events: {item}"
            got.append(item)
    return got


async def nothing_more(sub: Any, wait: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(wait):
            item = await anext(sub)
            raise AssertionError(f"unexpected {item}")


def worker_of(svc: TidingsService, client: TidingsClient) -> int:
    """The pid of the worker holding the client's connection (connection ids start with its index)."""
    assert client.info is not None
    return svc.children()[f"worker {client.info.connection_id.split('-')[0]}"]


class Stream:
    """Publishes `count` events to `channel` from a thread, straight to the hub, one every
    `interval` seconds: a backend that keeps going whatever happens to the workers."""

    def __init__(self, svc: TidingsService, channel: str, count: int, interval: float) -> None:
        self.positions: list[int] = []
        self._thread = threading.Thread(target=self._publish, args=(svc, channel, count, interval), daemon=True)

    def _publish(self, svc: TidingsService, channel: str, count: int, interval: float) -> None:
        with publisher(svc) as pub:
            for n in range(count):
                pos = pub.publish(channel, "chat_message", {"n": n}, confirm=True)
                assert pos is not None
                self.positions.append(pos.offset)
                time.sleep(interval)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(15)

    async def done(self) -> list[int]:
        await asyncio.to_thread(self._thread.join, 15)
        return self.positions


# -- delivery and errors -----------------------------------------------------------------------------
def test_subscribe_publish_receive(svc: TidingsService) -> None:
    async def body() -> None:
        async with client_for(svc, "basic") as client:
            sub = await client.subscribe("conversation:basic")
            pos = await client.publish("conversation:basic", "chat_message", {"content": "hi"})
            (event,) = await read(sub, 1)
            assert event.position == pos and event.data == {"content": "hi"} and event.type == "chat_message"
            assert sub.position == pos
            await asyncio.to_thread(svc.publish_http, "user:basic", "notification", {"title": "yo"})
            (note,) = await read(client.personal, 1)
            assert note.channel == "user:basic" and note.data == {"title": "yo"}
            assert 0 <= await client.ping() < 1
            await sub.unsubscribe()
            await client.publish("conversation:basic", "chat_message", {"content": "gone"})
            async for _ in sub:
                raise AssertionError("nothing after unsubscribe")
    run(body())


@pytest.mark.parametrize(
    ("channel", "type_", "data", "code"),
    [
        ("task:t1", "status_update", {}, "unauthorized"),  # not in the token's publish patterns
        ("user:somebody-else", "notification", {}, "unauthorized"),
        ("conversation:e1", "no spaces allowed", {}, "invalid_request"),
        ("conversation:e1", "chat_message", [1, 2], "invalid_request"),  # data must be an object
        ("bad channel!", "chat_message", {}, "invalid_request"),
    ],
)
def test_publish_errors_raise_with_the_server_code(svc: TidingsService, channel: str, type_: str,
                                                   data: Any, code: str) -> None:
    async def body() -> None:
        async with client_for(svc, "errors") as client:
            with pytest.raises(ServerError) as refused:
                await client.publish(channel, type_, data)
            assert refused.value.code == code and refused.value.message
            assert await client.ping() >= 0  # the connection stays usable
    run(body())


def test_a_refused_subscribe_raises_and_is_not_kept(svc: TidingsService) -> None:
    async def body() -> None:
        async with client_for(svc, "nosub") as client:
            with pytest.raises(ServerError) as refused:
                await client.subscribe("task:t1")
            assert refused.value.code == "unauthorized" and "task:t1" not in client.subscriptions
    run(body())


def test_a_slow_consumer_does_not_hold_up_replies_and_loses_nothing(svc: TidingsService) -> None:
    async def body() -> None:
        async with client_for(svc, "slow") as client:
            sub = await client.subscribe("conversation:slow", queue_size=8)
            with Stream(svc, "conversation:slow", 40, 0.0) as stream:
                # Nobody reads `sub` while 40 events pour in; replies still come at once.
                for n in range(3):
                    started = time.monotonic()
                    await client.publish("conversation:slow", "chat_message", {"mine": n})
                    assert await client.ping() < 1
                    assert time.monotonic() - started < 1
                published = await stream.done()
            await eventually(lambda: sub.lagging)
            assert len(published) == 40 and sub.qsize() == 8
            events = await read(sub, 43)
            assert [e.offset for e in events] == list(range(1, 44))  # once each, in order
            await nothing_more(sub)
            print(f"\nslow consumer: paused {sub.lagged} times, 43 of 43 events delivered in order")
    run(body())


def test_the_token_is_refreshed_before_it_expires(svc: TidingsService) -> None:
    async def body() -> None:
        tokens = TokenSource(svc, "refresh", ttl=6)
        async with TidingsClient(svc.ws_url(), get_token=tokens) as client:
            gone: list[Disconnected] = []
            client.on("disconnected", gone.append)
            hello = await client.wait_connected(READ)
            sub = await client.subscribe("conversation:refresh")
            await asyncio.sleep(hello.expires_at + 1 + 1.0 - time.time())  # past exp + leeway
            assert client.connected and gone == [] and tokens.calls >= 2
            assert client.expires_at is not None and client.expires_at > hello.expires_at
            pos = await client.publish("conversation:refresh", "chat_message", {})
            assert (await read(sub, 1))[0].position == pos
    run(body(), timeout=30)


# -- faults ------------------------------------------------------------------------------------------
def resume_across(fault: Callable[[TidingsService, TidingsClient], None], sub_name: str) -> list[Disconnected]:
    """Subscribe, start a stream of events, apply `fault` to the client's worker mid-stream, and
    check that every event published before, during and after arrives once, in order, on the
    channel and on the personal channel. Returns the client's disconnect notices."""
    with TidingsService(workers=2) as svc:
        async def body() -> list[Disconnected]:
            async with client_for(svc, sub_name) as client:
                gone: list[Disconnected] = []
                client.on("disconnected", gone.append)
                sub = await client.subscribe("conversation:resume")
                with Stream(svc, "conversation:resume", 60, 0.03) as stream:
                    await asyncio.sleep(0.4)
                    fault(svc, client)
                    await eventually(lambda: not client.connected)
                    with publisher(svc) as pub:  # the personal channel misses one during the gap
                        await asyncio.to_thread(pub.publish, f"user:{sub_name}", "notification", {}, True)
                    await client.wait_connected(10)
                    published = await stream.done()
                events = await read(sub, len(published))
                assert [e.offset for e in events] == published == list(range(1, 61))
                await nothing_more(sub)
                (note,) = await read(client.personal, 1)
                assert note.channel == f"user:{sub_name}"
                assert sub.recovered is True and client.personal.recovered is True
                return gone

        result: list[Disconnected] = []

        async def keep() -> None:
            result.extend(await body())

        run(keep(), timeout=40)
        return result


def test_a_worker_killed_mid_stream_loses_nothing() -> None:
    def kill(svc: TidingsService, client: TidingsClient) -> None:
        os.kill(worker_of(svc, client), signal.SIGKILL)

    gone = resume_across(kill, "killed")
    assert gone[0].code == 1006 and gone[0].reconnect
    assert gone[0].delay is not None and 1.0 <= gone[0].delay <= 2.0
    print(f"\nworker killed: reconnected after {gone[0].delay:.3f}s, 60 of 60 events in order")


def test_a_graceful_restart_reconnects_soon_and_loses_nothing() -> None:
    def restart(svc: TidingsService, client: TidingsClient) -> None:
        os.kill(worker_of(svc, client), signal.SIGTERM)  # drains with 1001; the supervisor restarts it

    gone = resume_across(restart, "restarted")
    assert gone[0].code == 1001 and gone[0].reconnect
    assert gone[0].delay is not None and 0.1 <= gone[0].delay <= 1.0
    print(f"\ngraceful restart: 1001, reconnected after {gone[0].delay:.3f}s, 60 of 60 events in order")


def test_a_hundred_clients_dropped_at_once_spread_their_reconnects() -> None:
    with TidingsService(workers=2) as svc:
        async def body() -> None:
            clients = [client_for(svc, f"herd-{i}") for i in range(100)]
            first: dict[int, Disconnected] = {}
            back: dict[int, float] = {}

            def watch(i: int, client: TidingsClient) -> None:
                def dropped(notice: Disconnected) -> None:
                    first.setdefault(i, notice)

                def connected(_: object) -> None:
                    if i in first:  # back after the drop (the first connect does not count)
                        back.setdefault(i, time.monotonic())

                client.on("disconnected", dropped)
                client.on("connected", connected)
                client.start()

            for i, client in enumerate(clients):
                watch(i, client)
            await asyncio.gather(*(c.wait_connected(15) for c in clients))
            workers = [pid for role, pid in svc.children().items() if role.startswith("worker")]
            killed_at = time.monotonic()
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            await eventually(lambda: len(back) == 100, timeout=20)
            delays = sorted(d.delay or 0.0 for d in first.values())
            returns = sorted(t - killed_at for t in back.values())
            print(f"\n100 clients dropped at once: first-retry delays min {delays[0]:.3f}s, "
                  f"median {statistics.median(delays):.3f}s, max {delays[-1]:.3f}s; "
                  f"reconnected after min {returns[0]:.2f}s, median {statistics.median(returns):.2f}s, "
                  f"max {returns[-1]:.2f}s")
            assert all(d.code == 1006 for d in first.values())
            assert delays[0] >= 1.0 and delays[-1] <= 2.0
            # spread over the whole second, not a pulse (100 draws of 1001 whole milliseconds
            # repeat a few by chance)
            assert delays[-1] - delays[0] > 0.7 and len(set(delays)) > 80
            await asyncio.gather(*(c.close() for c in clients))

        run(body(), timeout=40)
