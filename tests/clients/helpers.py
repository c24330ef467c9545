"""Test doubles for the Python client: a scripted in-process WebSocket server and virtual time.

FakeServer speaks just enough of the tidings protocol (connected, subscribed, pong, published,
refreshed) for the client's own logic to be tested without the real service, and lets a test
close, drop or silence a connection at will. VirtualTime is the client's injected clock and
sleep: nothing waits for real, and a test moves time forward with `advance`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

EPOCH = "e0000000000000a1"
WAIT = 5.0  # real seconds a test waits for something that should take milliseconds


class VirtualTime:
    """clock(), wall() and sleep() for the client; time only moves when the test says."""

    def __init__(self, wall_start: float = 1_800_000_000.0) -> None:
        self.now = 0.0
        self.wall_start = wall_start
        self.sleeps: list[float] = []  # every delay asked for, in order
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall_start + self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, delay), next(self._seq), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time on by `seconds`, waking every sleeper due on the way, in order."""
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            due, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, due)
            if not future.done():
                future.set_result(None)
                await settle()
        self.now = target
        await settle()


async def settle(rounds: int = 20) -> None:
    """Let ready callbacks and tasks run (real loopback I/O needs a few passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait, in real time, until `predicate()` holds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


class FakeConnection(WSListener):
    """One accepted socket: what the client sent, and handles to answer, close or drop it."""

    def __init__(self, server: FakeServer, request: WSUpgradeRequest) -> None:
        query = parse_qs(urlsplit(request.path.decode()).query)
        self.server = server
        self.token = query.get("token", [""])[0]
        self.since = query.get("since", [None])[0]
        self.received: list[dict[str, Any]] = []
        self.transport: WSTransport | None = None
        self.open = True
        self.silent = False  # when True, nothing is answered (a dead server)
        self.close_handshake_code: int | None = None  # the code of the client's close frame
        self.channels: set[str] = set()  # what this connection holds, for FakeServer.publish

    # -- picows -------------------------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.server.live += 1
        self.server.most_live = max(self.server.most_live, self.server.live)
        self.server.connections.append(self)
        self.server.on_connect(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_handshake_code = int(frame.get_close_code().value)
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        msg = orjson.loads(frame.get_payload_as_bytes())
        self.received.append(msg)
        if not self.silent:
            self.server.on_message(self, msg)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.open = False
        self.server.live -= 1

    # -- the test's handles -------------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, orjson.dumps(msg))

    def hello(self, expires_at: float, ping_interval: float = 25.0, personal: dict[str, Any] | None = None,
              user: str = "u1") -> None:
        self.send({"type": "connected", "data": {
            "user_id": user, "connection_id": f"0-fake-{len(self.server.connections)}",
            "expires_at": expires_at, "ping_interval": ping_interval, "pong_timeout": 20.0,
            "personal": personal or {"channel": f"user:{user}", "offset": 0, "epoch": EPOCH}}})

    def event(self, channel: str, offset: int, epoch: str = EPOCH, **data: Any) -> None:
        self.send({"type": "chat_message", "channel": channel, "data": data,
                   "timestamp": "2026-01-01T00:00:00.000Z", "offset": offset, "epoch": epoch})

    def close(self, code: int, reason: str = "") -> None:
        assert self.transport is not None
        self.transport.send_close(WSCloseCode(code), reason.encode())
        self.transport.disconnect()

    def drop(self) -> None:
        assert self.transport is not None
        self.transport.disconnect(graceful=False)

    def commands(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("type") == type_]


class FakeServer:
    """A loopback picows server. By default it greets each connection like tidings does and
    answers ping, subscribe (replaying from its history after `since`), unsubscribe, publish and
    refresh; tests replace `on_connect` or `on_message` to script something else."""

    def __init__(self, wall: Callable[[], float], ttl: float = 3600.0, ping_interval: float = 1000.0) -> None:
        self.wall = wall
        self.ttl = ttl
        self.ping_interval = ping_interval  # long by default: only the liveness tests want pings
        self.connections: list[FakeConnection] = []
        self.live = 0
        self.most_live = 0
        self.refused_tokens: set[str] = set()
        self.positions: dict[str, int] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}  # every event published, by channel
        # What happens on each connection and message; tests swap these to script the server.
        self.on_connect: Callable[[FakeConnection], None] = self.greet
        self.on_message: Callable[[FakeConnection, dict[str, Any]], None] = self.answer
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FakeServer:
        self._server = await ws_create_server(lambda request: FakeConnection(self, request), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.connections:
            if conn.open and conn.transport is not None:
                conn.transport.disconnect(graceful=False)
        await settle()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def last(self) -> FakeConnection:
        return self.connections[-1]

    async def connection(self, n: int) -> FakeConnection:
        """The n-th connection (1-based), once it exists."""
        await eventually(lambda: len(self.connections) >= n)
        return self.connections[n - 1]

    def publish(self, channel: str, **data: Any) -> int:
        """Stamp an event, keep it, and send it to every connection holding the channel."""
        offset = self.positions[channel] = self.positions.get(channel, 0) + 1
        event = {"type": "chat_message", "channel": channel, "data": data,
                 "timestamp": "2026-01-01T00:00:00.000Z", "offset": offset, "epoch": EPOCH}
        self.history.setdefault(channel, []).append(event)
        for conn in self.connections:
            if conn.open and channel in conn.channels:
                conn.send(event)
        return offset

    # -- default behaviour --------------------------------------------------------------------
    def greet(self, conn: FakeConnection) -> None:
        if conn.token in self.refused_tokens:
            conn.send({"type": "error", "data": {"code": "unauthorized", "message": "token expired"}})
            conn.close(4002, "token expired")
            return
        conn.channels.add("user:u1")
        conn.hello(self.wall() + self.ttl, self.ping_interval,
                   {"channel": "user:u1", "offset": self.positions.get("user:u1", 0), "epoch": EPOCH})

    def answer(self, conn: FakeConnection, msg: dict[str, Any]) -> None:
        type_, id_, data = msg.get("type"), msg.get("id"), msg.get("data") or {}
        if type_ == "ping":
            conn.send({"type": "pong", "id": id_, "data": {}})
        elif type_ == "subscribe":
            channel = data["channel"]
            reply: dict[str, Any] = {"channel": channel, "offset": self.positions.get(channel, 0), "epoch": EPOCH}
            if channel in conn.channels:  # held already: the position, no replay, as tidings does
                conn.send({"type": "subscribed", "id": id_, "data": reply})
                return
            if "since" in data:
                reply["recovered"] = True
            conn.send({"type": "subscribed", "id": id_, "data": reply})
            conn.channels.add(channel)
            if "since" in data:  # replay from history, as tidings does
                for event in self.history.get(channel, []):
                    if event["offset"] > data["since"]["offset"]:
                        conn.send(event)
        elif type_ == "unsubscribe":
            conn.channels.discard(data["channel"])
            conn.send({"type": "unsubscribed", "id": id_, "data": {"channel": data["channel"]}})
        elif type_ == "publish":
            channel = data["channel"]
            self.positions[channel] = self.positions.get(channel, 0) + 1
            conn.send({"type": "published", "id": id_,
                       "data": {"channel": channel, "offset": self.positions[channel], "epoch": EPOCH}})
        elif type_ == "refresh":
            if data["token"] in self.refused_tokens:
                conn.send({"type": "error", "id": id_, "data": {"code": "unauthorized", "message": "invalid token"}})
            else:
                conn.send({"type": "refreshed", "id": id_, "data": {"expires_at": self.wall() + self.ttl}})


class Tokens:
    """get_token() for tests: hands out tok-1, tok-2, ... (or a fixed script) and counts calls."""

    def __init__(self, script: list[str] | None = None, delay: float = 0.0) -> None:
        self.script = script
        self.calls = 0
        self.delay = delay

    async def __call__(self) -> str:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.script is not None:
            return self.script[min(self.calls, len(self.script)) - 1]
        return f"tok-{self.calls}"


def run(coro: Awaitable[None], timeout: float = 20.0) -> None:
    """Run one async test body with a hard cap, so a hang fails instead of stalling the suite."""
    async def capped() -> None:
        async with asyncio.timeout(timeout):
            await coro

    asyncio.run(capped())
