"""The client's own logic against a scripted loopback server, in virtual time with seeded random:
reconnect delays and tokens per close code, refresh timing, liveness, resuming, slow consumers,
reply matching and clean-up."""

from __future__ import annotations

import asyncio
import gc
import random
import weakref
from typing import Any

import pytest
from tidings_client import (
    ClientClosed,
    Connected,
    Connecting,
    Disconnected,
    Event,
    Policy,
    Position,
    Reset,
    ServerError,
    TidingsClient,
    Unauthorized,
)

from tests.clients.helpers import EPOCH, FakeConnection, FakeServer, Tokens, VirtualTime, eventually, run, settle

POLICY = Policy.default()


class Recorder:
    """Every notice the client emits, in order."""

    def __init__(self, client: TidingsClient) -> None:
        self.seen: list[tuple[str, Any]] = []
        for name in ("connecting", "connected", "disconnected", "error"):
            client.on(name, lambda arg, name=name: self.seen.append((name, arg)))

    def of(self, kind: type) -> list[Any]:
        return [arg for _, arg in self.seen if isinstance(arg, kind)]

    def errors(self) -> list[BaseException]:
        return [arg for name, arg in self.seen if name == "error"]


def new_client(server: FakeServer, vt: VirtualTime, tokens: Tokens | None = None, seed: int = 7,
               **options: Any) -> TidingsClient:
    return TidingsClient(server.url, tokens or Tokens(), random=random.Random(seed).random,
                         clock=vt.clock, wall_clock=vt.wall, sleep=vt.sleep, **options)


async def disconnects(rec: Recorder, n: int) -> Disconnected:
    """The n-th Disconnected notice, once it came."""
    await eventually(lambda: len(rec.of(Disconnected)) >= n)
    return rec.of(Disconnected)[n - 1]


async def next_item(sub: Any) -> Any:
    async with asyncio.timeout(2):
        return await anext(sub)


# -- reconnect delays --------------------------------------------------------------------------------
def test_failed_dials_back_off_by_the_policy_one_socket_at_a_time() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            server.on_connect = FakeConnection.drop
            client = new_client(server, vt, seed=11)
            rec = Recorder(client)
            expected = random.Random(11)
            async with client:
                for n in range(1, 8):
                    gone = await disconnects(rec, n)
                    assert gone.code == 1006 and gone.reconnect
                    assert gone.delay == POLICY.backoff(n, expected.random)
                    await vt.advance(gone.delay)
                    await server.connection(n + 1)
                assert [c.attempt for c in rec.of(Connecting)] == list(range(8))
                assert server.most_live == 1  # never a second socket while one is open
            print("\nfailed dials, seed 11:", [round(d.delay, 3) for d in rec.of(Disconnected)[:7]])
    run(body())


def test_only_a_stable_connection_resets_the_failure_count() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server, new_client(server, vt) as client:
            rec = Recorder(client)
            for n in (1, 2, 3):  # connected for 1 s each: not stable, the count grows
                conn = await server.connection(n)
                await client.wait_connected()
                await vt.advance(1.0)
                conn.drop()
                gone = await disconnects(rec, n)
                assert POLICY.min_delay <= gone.delay <= POLICY.min_delay * 2**n
                await vt.advance(gone.delay)
            conn = await server.connection(4)
            await client.wait_connected()
            await vt.advance(POLICY.stable_after + 0.5)  # stable: the next failure is the first again
            conn.drop()
            gone = await disconnects(rec, 4)
            assert POLICY.min_delay <= gone.delay <= 2 * POLICY.min_delay
            await vt.advance(gone.delay)
            await server.connection(5)
            assert [c.attempt for c in rec.of(Connecting)] == [0, 1, 2, 3, 1]
    run(body())


@pytest.mark.parametrize(
    ("code", "low", "high"),
    [(1001, 0.1, 1.0), (4200, 0.1, 1.0), (4201, 0.1, 1.0), (4100, 5.0, 10.0), (4101, 5.0, 10.0),
     (4129, 5.0, 10.0), (1011, 1.0, 2.0), (1000, 1.0, 2.0), (3000, 1.0, 2.0)],
)
def test_server_close_codes_pick_the_delay(code: int, low: float, high: float) -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server, new_client(server, vt) as client:
            rec = Recorder(client)
            conn = await server.connection(1)
            await client.wait_connected()
            conn.close(code, "bye")
            gone = await disconnects(rec, 1)
            assert (gone.code, gone.reason, gone.reconnect) == (code, "bye", True)
            assert low <= gone.delay <= high
            await vt.advance(gone.delay)
            await client.wait_connected()
            assert server.last.token == "tok-1"  # these codes never cost a new token
    run(body())


# -- tokens ------------------------------------------------------------------------------------------
def test_a_refused_token_is_replaced_before_the_next_dial() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            server.refused_tokens = {"tok-1"}
            tokens = Tokens()
            async with new_client(server, vt, tokens) as client:
                rec = Recorder(client)
                gone = await disconnects(rec, 1)
                assert gone.code == 4002 and 0.1 <= gone.delay <= 1.0
                await vt.advance(gone.delay)
                await client.wait_connected()
                assert [c.token for c in server.connections] == ["tok-1", "tok-2"]
                assert tokens.calls == 2
                # Expiry after a good run: a new token again, and the connection comes back.
                server.last.close(4002, "token expired")
                gone = await disconnects(rec, 2)
                await vt.advance(gone.delay)
                await client.wait_connected()
                assert [c.token for c in server.connections] == ["tok-1", "tok-2", "tok-3"]
    run(body())


def test_a_fresh_token_refused_at_once_stops_the_client() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            server.refused_tokens = {"tok-1", "tok-2"}
            tokens = Tokens()
            async with new_client(server, vt, tokens) as client:
                rec = Recorder(client)
                gone = await disconnects(rec, 1)
                await vt.advance(gone.delay)
                final = await disconnects(rec, 2)
                assert (final.code, final.reconnect, final.delay) == (4002, False, None)
                assert [type(e) for e in rec.errors()] == [ServerError, ServerError, Unauthorized]
                with pytest.raises(Unauthorized):
                    await client.wait_connected()
                with pytest.raises(Unauthorized):
                    await client.subscribe("conversation:x")
                await vt.advance(60)
                assert [c.token for c in server.connections] == ["tok-1", "tok-2"] and tokens.calls == 2
    run(body())


def test_the_same_token_is_never_dialled_again() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            server.refused_tokens = {"same"}
            tokens = Tokens(script=["same"])  # a get_token() that keeps returning its cached token
            async with new_client(server, vt, tokens) as client:
                rec = Recorder(client)
                gone = await disconnects(rec, 1)
                await vt.advance(gone.delay)
                await disconnects(rec, 2)
                assert isinstance(rec.errors()[-1], Unauthorized)
                assert len(server.connections) == 1 and tokens.calls == 2
    run(body())


def test_the_token_is_refreshed_at_80_to_90_percent_of_its_lifetime() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall, ttl=100.0) as server:
            tokens = Tokens()
            async with new_client(server, vt, tokens) as client:
                hello = await client.wait_connected()
                await settle()
                first = [d for d in vt.sleeps if 10 < d < 100]
                assert len(first) == 1 and 80.0 <= first[0] <= 90.0
                await vt.advance(first[0] - 0.01)
                assert server.last.commands("refresh") == []  # not early
                await vt.advance(0.02)
                await eventually(lambda: (client.expires_at or 0) > hello.expires_at + 80)
                assert server.last.commands("refresh")[0]["data"] == {"token": "tok-2"}
                assert tokens.calls == 2 and len(server.connections) == 1
                # and the next one is planned from the new expiry
                await settle()
                second = [d for d in vt.sleeps if 10 < d < 100][1]
                assert 80.0 <= second <= 90.0
    run(body())


def test_a_refused_refresh_is_reported_and_tried_again_later() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall, ttl=100.0) as server:
            server.refused_tokens = {"tok-2"}
            async with new_client(server, vt) as client:
                rec = Recorder(client)
                await client.wait_connected()
                await settle()
                first = next(d for d in vt.sleeps if 10 < d < 100)
                await vt.advance(first)
                await eventually(lambda: bool(rec.errors()))
                error = rec.errors()[0]
                assert isinstance(error, ServerError) and error.code == "unauthorized"
                await settle()
                left = 100.0 - first
                retry = [d for d in vt.sleeps if 0.5 < d < left]  # 80-90 % of what is left
                assert len(retry) == 1 and 0.8 * left - 0.01 <= retry[0] <= 0.9 * left + 0.01
                await vt.advance(retry[0])
                await eventually(lambda: len(server.last.commands("refresh")) == 2)
                assert server.last.commands("refresh")[1]["data"] == {"token": "tok-3"}
                assert client.connected
    run(body())


def test_concurrent_token_needs_share_one_get_token_call() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            tokens = Tokens(delay=0.05)
            async with new_client(server, vt, tokens) as client:
                await client.wait_connected()
                assert tokens.calls == 1
                await asyncio.gather(client.refresh_token(), client.refresh_token(), client.refresh_token())
                assert tokens.calls == 2
    run(body())


# -- liveness ----------------------------------------------------------------------------------------
def test_a_silent_connection_is_pinged_then_dropped_as_4200() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall, ping_interval=10.0) as server, new_client(server, vt) as client:
            rec = Recorder(client)
            conn = await server.connection(1)
            await client.wait_connected()
            conn.silent = True  # the path died: nothing answered, nothing closed
            await vt.advance(10.0 + POLICY.liveness_grace - 0.1)
            assert conn.commands("ping") == []
            await vt.advance(0.2)
            await eventually(lambda: len(conn.commands("ping")) == 1)
            await vt.advance(20.0)  # the server's pong_timeout
            gone = await disconnects(rec, 1)
            assert (gone.code, gone.reason) == (4200, "no pong") and 0.1 <= gone.delay <= 1.0
            await vt.advance(gone.delay)
            await server.connection(2)
            await client.wait_connected()
    run(body())


def test_data_from_the_server_keeps_a_quiet_connection_alive() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall, ping_interval=10.0) as server, new_client(server, vt) as client:
            rec = Recorder(client)
            conn = await server.connection(1)
            await client.wait_connected()
            for _ in range(5):  # a server ping every 10 s, as tidings sends to an idle client
                await vt.advance(10.0)
                assert conn.transport is not None
                conn.transport.send_ping(b"x")
                await asyncio.sleep(0.01)
            assert conn.commands("ping") == [] and rec.of(Disconnected) == []
    run(body())


# -- resuming ----------------------------------------------------------------------------------------
def test_after_a_reconnect_every_channel_resumes_from_its_last_position() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server, new_client(server, vt) as client:
            rec = Recorder(client)
            sub = await client.subscribe("conversation:a")
            conn = server.last
            for offset in (1, 2, 3):
                conn.event("conversation:a", offset, n=offset)
            conn.event("user:u1", 1)
            assert [(await next_item(sub)).offset for _ in range(3)] == [1, 2, 3]
            assert (await next_item(client.personal)).offset == 1
            conn.drop()
            await vt.advance((await disconnects(rec, 1)).delay or 0)
            conn2 = await server.connection(2)
            assert conn2.since == f"1:{EPOCH}"  # the personal channel resumes through the URL
            await eventually(lambda: bool(conn2.commands("subscribe")))
            assert conn2.commands("subscribe")[0]["data"] == {
                "channel": "conversation:a", "since": {"offset": 3, "epoch": EPOCH}}
            conn2.event("conversation:a", 3)  # overlap: dropped as already delivered
            conn2.event("conversation:a", 4)
            assert (await next_item(sub)).offset == 4
            assert sub.position == Position(4, EPOCH) and sub.recovered is True
    run(body())


def test_events_that_could_not_be_recovered_leave_a_reset_in_the_stream() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            default = server.on_message

            def forgetful(conn: FakeConnection, msg: dict[str, Any]) -> None:
                data = msg.get("data") or {}
                if msg["type"] == "subscribe" and "since" in data:
                    conn.send({"type": "subscribed", "id": msg["id"], "data": {
                        "channel": data["channel"], "offset": 10, "epoch": "e2", "recovered": False}})
                else:
                    default(conn, msg)

            server.on_message = forgetful
            async with new_client(server, vt) as client:
                sub = await client.subscribe("conversation:a", since=(2, EPOCH))
                server.last.event("conversation:a", 11, epoch="e2")
                assert await next_item(sub) == Reset("conversation:a", Position(10, "e2"))
                assert (await next_item(sub)).position == Position(11, "e2")
                assert sub.recovered is False
    run(body())


def test_the_server_ending_a_subscription() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server, new_client(server, vt) as client:
            rec = Recorder(client)
            sub = await client.subscribe("conversation:a")
            conn = server.last
            conn.event("conversation:a", 1)
            conn.send({"type": "unsubscribed", "data": {"channel": "conversation:a", "reason": "insufficient_state"}})
            await eventually(lambda: len(conn.commands("subscribe")) == 2)
            assert conn.commands("subscribe")[1]["data"]["since"] == {"offset": 1, "epoch": EPOCH}
            # a refresh narrowed the token: no resubscribe; iteration ends with the reason
            conn.send({"type": "unsubscribed", "data": {"channel": "conversation:a", "reason": "unauthorized"}})
            assert (await next_item(sub)).offset == 1
            with pytest.raises(ServerError) as ended:
                await next_item(sub)
            assert ended.value.code == "unauthorized"
            assert "conversation:a" not in client.subscriptions
            assert isinstance(rec.errors()[-1], ServerError)
            await settle()
            assert len(conn.commands("subscribe")) == 2
    run(body())


def test_a_full_queue_pauses_the_channel_and_resumes_it_from_its_position() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server, new_client(server, vt) as client:
            sub = await client.subscribe("conversation:a", queue_size=4)
            conn = server.last
            for n in range(1, 11):
                server.publish("conversation:a", n=n)
            await eventually(lambda: sub.lagging)
            await settle()
            # Four queued, the rest refused (not dropped: the position stays at the last queued)
            # and the channel left at the server so it stops sending.
            assert sub.qsize() == 4 and sub.position == Position(4, EPOCH) and sub.lagged == 1
            assert [m["data"] for m in conn.commands("unsubscribe")] == [{"channel": "conversation:a"}]
            got = [(await next_item(sub)).offset for _ in range(2)]  # down to half: resume from 4
            await eventually(lambda: len(conn.commands("subscribe")) == 2)
            assert conn.commands("subscribe")[1]["data"]["since"] == {"offset": 4, "epoch": EPOCH}
            # The replay fills the queue again, so it pauses and resumes once more on the way.
            got += [(await next_item(sub)).offset for _ in range(8)]
            assert got == list(range(1, 11)) and not sub.lagging and sub.lagged == 2
            server.publish("conversation:a", n=11)
            assert (await next_item(sub)).offset == 11
    run(body())


def test_a_refused_leave_does_not_lose_events_either() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            default = server.answer
            refusals = [1]

            def busy(conn: FakeConnection, msg: dict[str, Any]) -> None:
                if msg["type"] == "unsubscribe" and refusals:  # the first leave is rate limited
                    refusals.pop()
                    conn.send({"type": "error", "id": msg["id"], "data": {
                        "code": "rate_limited", "message": "slow down", "retry_after_ms": 200}})
                else:
                    default(conn, msg)

            server.on_message = busy
            async with new_client(server, vt) as client:
                sub = await client.subscribe("conversation:a", queue_size=4)
                for n in range(1, 11):
                    server.publish("conversation:a", n=n)
                await eventually(lambda: sub.lagging)
                got = [(await next_item(sub)).offset for _ in range(2)]
                # The channel was still held, so the resume was answered without a replay: the
                # client notices its position is behind and leaves and resumes again.
                await eventually(lambda: len(server.last.commands("subscribe")) == 2)
                await settle()
                await vt.advance(POLICY.max_delay)
                got += [(await next_item(sub)).offset for _ in range(8)]
                assert got == list(range(1, 11))
                assert not any(isinstance(item, Reset) for item in sub._items)
    run(body())


def test_subscribing_to_the_personal_channel_by_name_is_refused() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            client = new_client(server, vt)
            client.start()  # not connected yet: the client does not know whose channel it is
            with pytest.raises(ServerError) as refused:
                await client.subscribe("user:u1")
            assert refused.value.code == "invalid_request"
            assert client.subscriptions == {"user:u1": client.personal}
            await client.close()
    run(body())


# -- commands ----------------------------------------------------------------------------------------
def test_replies_are_matched_by_id_and_errors_carry_the_code() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            default = server.on_message
            held: list[dict[str, Any]] = []

            def slow_publish(conn: FakeConnection, msg: dict[str, Any]) -> None:
                if msg["type"] == "publish" and msg["data"]["channel"] == "conversation:slow":
                    held.append(msg)  # answered later, after the ping's pong
                elif msg["type"] == "publish" and msg["data"]["channel"] == "conversation:no":
                    conn.send({"type": "error", "id": msg["id"], "data": {
                        "code": "rate_limited", "message": "slow down", "retry_after_ms": 250}})
                else:
                    default(conn, msg)

            server.on_message = slow_publish
            async with new_client(server, vt) as client:
                publish = asyncio.ensure_future(client.publish("conversation:slow", "chat_message", {}))
                await eventually(lambda: bool(held))
                assert await client.ping() >= 0 and not publish.done()
                server.last.send({"type": "published", "id": held[0]["id"],
                                  "data": {"channel": "conversation:slow", "offset": 9, "epoch": EPOCH}})
                assert await publish == Position(9, EPOCH)
                with pytest.raises(ServerError) as refused:
                    await client.publish("conversation:no", "chat_message", {})
                assert (refused.value.code, refused.value.retry_after_ms) == ("rate_limited", 250)
    run(body())


def test_close_releases_handlers_timers_and_waiters() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            client = new_client(server, vt)

            class Sink:
                def __init__(self) -> None:
                    self.seen: list[object] = []

                def __call__(self, arg: object) -> None:
                    self.seen.append(arg)

            sink, removed = Sink(), Sink()
            alive = weakref.ref(sink)
            client.on("connected", sink)
            client.on("disconnected", sink)
            remove = client.on("connected", removed)
            remove()
            remove()  # twice is harmless, and removes nothing else
            client.start()
            await client.wait_connected()
            sub = await client.subscribe("conversation:a")
            waiting = asyncio.ensure_future(anext(sub))
            await settle()
            await client.close()
            assert [type(x) for x in sink.seen] == [Connected, Disconnected]
            assert sink.seen[-1] == Disconnected(1000, "closed by the client", False, None)
            assert removed.seen == []
            with pytest.raises(StopAsyncIteration):
                await waiting
            with pytest.raises(ClientClosed):
                await client.publish("conversation:a", "chat_message", {})
            await eventually(lambda: server.live == 0)
            assert server.last.close_handshake_code == 1000
            await settle()
            assert asyncio.all_tasks() == {asyncio.current_task()}  # no timer left behind
            assert all(not handlers for handlers in client._handlers.values())
            del sink
            gc.collect()
            assert alive() is None  # the client keeps no reference to a handler after close
            await client.close()  # idempotent
    run(body())


def test_close_during_a_backoff_wait_does_not_dial_again() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server:
            server.on_connect = FakeConnection.drop
            client = new_client(server, vt)
            rec = Recorder(client)
            client.start()
            await disconnects(rec, 1)
            await client.close()
            await vt.advance(60)
            await asyncio.sleep(0.05)
            assert len(server.connections) == 1 and not client.connected
    run(body())


def test_events_are_typed_and_carry_their_position() -> None:
    async def body() -> None:
        vt = VirtualTime()
        async with FakeServer(vt.wall) as server, new_client(server, vt) as client:
            sub = await client.subscribe("conversation:a")
            server.last.event("conversation:a", 1, text="hi")
            event = await next_item(sub)
            assert isinstance(event, Event) and event.data == {"text": "hi"}
            assert event.position == Position(1, EPOCH) and event.type == "chat_message"
            with pytest.raises(ValueError):
                await client.subscribe("conversation:a")
            with pytest.raises(ValueError):
                await client.subscribe(client.personal.channel)
            await sub.unsubscribe()
            await eventually(lambda: bool(server.last.commands("unsubscribe")))
            assert "conversation:a" not in client.subscriptions
    run(body())
