"""TidingsClient: one WebSocket to tidings that reconnects, refreshes its token and resumes every
channel from its last position, so the application sees each event once, in order, or a Reset.

How it is put together:

- One task (`_run`) owns the connection: it dials, waits for the socket to end, asks the policy
  (policy.py) what the close code calls for, sleeps, dials again. It never opens a second socket
  while one is open.
- picows calls `_Listener.on_ws_frame` for every frame; `_dispatch` handles each message there and
  then, synchronously: a reply resolves its command's future (matched by `id`), an event goes to
  its subscription's bounded queue. A reply therefore never waits behind events a slow consumer
  has not read, and a subscription's position is updated in the order the server sent things.
- Per connection, two timers: liveness (no data for ping_interval + grace: send a ping; still
  nothing: drop the socket and reconnect) and token refresh (at 80-90 % of the token's lifetime).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import logging
import random as _random
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeAlias
from urllib.parse import quote, urlsplit, urlunsplit

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from tidings_client.errors import ClientClosed, ConnectionLost, ServerError, TidingsError, Unauthorized
from tidings_client.events import Connected, Connecting, Disconnected, Event, Position, Reset
from tidings_client.policy import Action, Policy

__all__ = ["Subscription", "TidingsClient"]

log = logging.getLogger("tidings_client")

TokenSource: TypeAlias = Callable[[], "Awaitable[str] | str"]
EventName: TypeAlias = Literal["connecting", "connected", "disconnected", "error"]
Reply: TypeAlias = dict[str, Any]
Pending: TypeAlias = "asyncio.Future[Reply] | Callable[[Reply], None]"

ABNORMAL = 1006  # no close frame: the TCP connection dropped or could not be made
NO_STATUS = 1005  # a close frame without a code
DEFAULT_PING_INTERVAL = 25.0  # the server's default, used until `connected` gives the real one
DEFAULT_PONG_TIMEOUT = 20.0
CLOSE_WAIT = 2.0  # seconds close() waits for the server to answer its close frame
# Subscribe errors that pass (the hub was briefly away, or we went too fast): try again later.
RETRYABLE = frozenset({"subscription_failed", "internal_error", "rate_limited"})
EVENTS: tuple[EventName, ...] = ("connecting", "connected", "disconnected", "error")


class Subscription:
    """One channel's events, in order: `async for item in sub`.

    Items are `Event`s, and a `Reset` where the server could not replay what the subscription
    missed (reload that channel's state from your backend). Iteration ends after `unsubscribe()`
    or `client.close()`, and raises if the server ended the subscription (`ServerError`) or the
    client stopped (`Unauthorized`).

    The queue is bounded (`queue_size` events). When it is full the subscription does not drop
    events silently and does not stall the connection: it stops taking the channel's events
    (`lagged` counts how often), and once the consumer has read the queue down to half, it
    subscribes again from `position`, so the server replays what was skipped (or, if it no
    longer can, a Reset says so)."""

    def __init__(self, client: TidingsClient, channel: str, queue_size: int,
                 since: Position | None = None) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.channel = channel
        self.recovered: bool | None = None  # the last resume's answer: True, False, or None (none asked)
        self.lagged = 0  # times the consumer fell behind and the channel was resubscribed
        self._client = client
        self._queue_size = queue_size
        self._low_water = queue_size // 2
        self._items: collections.deque[Event | Reset] = collections.deque()
        self._events = 0  # Events in _items (Resets do not count against the bound)
        self._waiter: asyncio.Future[None] | None = None
        self._position = since
        self._paused = False  # lagging: events are refused until the consumer catches up
        self._closed = False
        self._end_error: BaseException | None = None
        self._joined_once = False
        self._first_join: asyncio.Future[None] | None = None
        self._failures = 0  # refused subscribes in a row, for their retry delay
        self._last_error: ServerError | None = None

    # -- public -----------------------------------------------------------------------------------
    @property
    def position(self) -> Position | None:
        """The position of the last event queued (or the channel's position when subscribed):
        where the subscription resumes from after a reconnect."""
        return self._position

    @property
    def lagging(self) -> bool:
        """True while the queue is too full to take the channel's events."""
        return self._paused

    @property
    def closed(self) -> bool:
        return self._closed

    def qsize(self) -> int:
        """Items waiting to be read."""
        return len(self._items)

    async def unsubscribe(self, timeout: float | None = None) -> None:
        """Leave the channel. Items already queued can still be read; then iteration ends."""
        await self._client._unsubscribe(self, timeout)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event | Reset:
        while not self._items:
            if self._closed:
                if self._end_error is not None:
                    raise self._end_error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, Event):
            self._events -= 1
            if self._paused and self._events <= self._low_water and not self._closed:
                self._client._resume(self)
        return item

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} position={self._position} queued={len(self._items)}>"

    # -- driven by the client ---------------------------------------------------------------------
    def _accept(self, msg: Reply) -> None:
        """An event of this channel arrived: queue it, skip a duplicate, or start lagging."""
        offset, epoch = msg.get("offset"), msg.get("epoch")
        pos = self._position
        if pos is not None and epoch == pos.epoch and isinstance(offset, int) and offset <= pos.offset:
            return  # already delivered: a replay overlapping what arrived live
        if self._events >= self._queue_size:
            self._client._lag(self)
            return
        event = Event(msg.get("type", ""), self.channel, msg.get("data"), msg.get("timestamp", ""),
                      offset if isinstance(offset, int) else 0, epoch if isinstance(epoch, str) else "")
        if isinstance(offset, int) and isinstance(epoch, str) and epoch:
            self._position = Position(offset, epoch)
        self._events += 1
        self._push(event)

    def _joined(self, data: Reply, resumed: bool) -> None:
        """`subscribed` (or `connected`'s personal part) for this channel."""
        recovered = data.get("recovered")
        self.recovered = recovered if isinstance(recovered, bool) else None
        if recovered is not True:  # when recovered, the replayed events move the position on
            offset, epoch = data.get("offset"), data.get("epoch")
            if isinstance(offset, int) and isinstance(epoch, str) and epoch:
                self._position = Position(offset, epoch)
        # Joined again without a position to resume from: whatever came in between is unknown.
        if recovered is False or (self._joined_once and not resumed):
            self._push(Reset(self.channel, self._position))
        self._joined_once = True
        if self._first_join is not None and not self._first_join.done():
            self._first_join.set_result(None)

    def _push(self, item: Event | Reset) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _end(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._end_error = error
        if self._first_join is not None and not self._first_join.done():
            self._first_join.set_exception(error or ClientClosed("client closed"))
            self._first_join.exception()  # retrieved here: nobody may be awaiting it any more
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Listener(WSListener):
    """picows callbacks for one socket: frames in, close code out."""

    def __init__(self, client: TidingsClient, resumed_personal: bool) -> None:
        self.client = client
        self.resumed_personal = resumed_personal  # the connect URL carried `since`
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code = ABNORMAL
        self.close_reason = ""
        self.frames = 0  # every frame counts as a sign of life, pings included
        self.hello = False  # `connected` arrived
        self.connected_at = 0.0
        self.transport: WSTransport | None = None
        self._fragments: list[bytes] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.frames += 1
        msg_type = frame.msg_type
        try:
            if msg_type == WSMsgType.TEXT:
                if frame.fin:
                    self.client._dispatch(self, orjson.loads(frame.get_payload_as_memoryview()))
                else:  # tidings sends whole frames; reassemble anyway rather than misparse
                    self._fragments = [frame.get_payload_as_bytes()]
            elif msg_type == WSMsgType.CONTINUATION and self._fragments is not None:
                self._fragments.append(frame.get_payload_as_bytes())
                if frame.fin:
                    payload, self._fragments = b"".join(self._fragments), None
                    self.client._dispatch(self, orjson.loads(payload))
            elif msg_type == WSMsgType.PING:
                # Answered here rather than by picows so that a server ping counts as life.
                transport.send_pong(frame.get_payload_as_bytes())
            elif msg_type == WSMsgType.CLOSE:
                code = frame.get_close_code()
                self.close_code = int(code.value) or NO_STATUS
                self.close_reason = frame.get_close_reason() or ""
                if not transport.is_close_frame_sent:
                    transport.send_close(code if self.close_code != NO_STATUS else WSCloseCode.OK)
                transport.disconnect()
        except Exception:
            # A bad message or a bug here must not turn into a reconnect loop: log and go on.
            log.exception("tidings_client: could not handle a %s frame", msg_type)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.client._transport_closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self, code: int, reason: str) -> None:
        """Drop the socket without a close handshake (it is presumed dead); report `code`."""
        self.close_code, self.close_reason = code, reason
        if self.transport is not None:
            self.transport.disconnect(graceful=False)


class TidingsClient:
    """An asyncio client for tidings.

        async with TidingsClient("ws://127.0.0.1:8080/ws", get_token=fetch_token) as client:
            sub = await client.subscribe("conversation:c1")
            await client.publish("conversation:c1", "chat_message", {"content": "hi"})
            async for item in sub:
                ...

    `get_token` (sync or async) returns a JWT. It is called for the first connect, whenever the
    server refused or expired the token, and to refresh it before it expires (concurrent needs
    share one call). Raise `Unauthorized` from it to stop the client.

    Reconnects follow `policy` (policy.json by default): exponential backoff with full jitter
    (1 s to 30 s) for drops and unknown codes, the same from a higher floor after 4100-4199, a
    short random delay after 1001 and 4200-4299, a new token first after 4000-4099 (stopping with
    `Unauthorized` when a fresh one is refused before `connected` too), and no reconnect after
    close(). One socket at a time. After each reconnect every subscription resumes from its
    position, and the personal channel from the connect URL's `since`.

    Test hooks: `random` (a 0..1 float source), `clock` (monotonic seconds), `wall_clock` (Unix
    seconds, compared with the token's `expires_at`) and `sleep` drive every delay and timer.
    """

    def __init__(
        self,
        url: str,
        get_token: TokenSource,
        *,
        queue_size: int = 1000,
        request_timeout: float = 10.0,
        personal_since: Position | tuple[int, str] | None = None,
        policy: Policy | None = None,
        ssl_context: ssl.SSLContext | None = None,
        random: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._url = url
        self._get_token = get_token
        self._queue_size = queue_size
        self._request_timeout = request_timeout
        self._policy = policy or Policy.default()
        self._ssl_context = ssl_context
        self._random = random or _random.SystemRandom().random
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep

        self.personal = Subscription(self, "", queue_size, _position(personal_since))
        """The personal channel user:<sub>, joined at every connect; its name is known once connected."""
        self._subs: dict[str, Subscription] = {}
        self._handlers: dict[str, list[Callable[[Any], object]]] = {name: [] for name in EVENTS}
        self._ids = itertools.count(1)
        self._pending: dict[str, Pending] = {}

        self._token: str | None = None
        self._refused_token: str | None = None  # never dialled with again
        self._refused_since_connected = False  # a token was refused and none has worked since
        self._token_fetch: asyncio.Future[str] | None = None
        self._expires_at: float | None = None
        self._info: Connected | None = None

        self._listener: _Listener | None = None
        self._connected = False
        self._ready: asyncio.Event | None = None  # set while connected, and once finished
        self._run_task: asyncio.Task[None] | None = None
        self._conn_tasks: set[asyncio.Task[Any]] = set()  # timers that die with the connection
        self._callback_tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._finished = False
        self._stop_error: BaseException | None = None
        self._last_close: tuple[int, str] = (ABNORMAL, "")

    # -- lifecycle --------------------------------------------------------------------------------
    async def __aenter__(self) -> TidingsClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting in the background (`async with` does this). Commands wait for the
        connection, within their timeout."""
        if self._run_task is not None:
            return
        self._ready = asyncio.Event()
        self._run_task = asyncio.get_running_loop().create_task(self._run(), name="tidings_client")

    async def wait_connected(self, timeout: float | None = None) -> Connected:
        """Wait until the client is connected; raises what stopped it, if it stopped."""
        async with asyncio.timeout(timeout):
            await self._until_connected()
        assert self._info is not None
        return self._info

    async def close(self) -> None:
        """Close the connection with 1000 and stop reconnecting. Subscriptions end, commands
        still waiting raise ClientClosed, and every handler is released."""
        if self._run_task is None:
            self._finished = True
            self._handlers = {name: [] for name in EVENTS}
            return
        self._closing = True
        listener = self._listener
        if listener is not None and listener.transport is not None and not listener.closed.done():
            transport = listener.transport
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK, b"client closed")
            transport.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(listener.closed), CLOSE_WAIT)
        self._run_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._run_task
        # Async handlers already started (the final "disconnected" among them) run to their end;
        # nothing new will be called.
        self._handlers = {name: [] for name in EVENTS}

    # -- state ------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def info(self) -> Connected | None:
        """What the last `connected` said (user, connection id, token expiry, ping figures)."""
        return self._info

    @property
    def expires_at(self) -> float | None:
        """When the token in use expires (Unix seconds), as the server last said."""
        return self._expires_at

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """Channel -> Subscription, the personal channel included once known (a copy)."""
        return dict(self._subs)

    def on(self, event: EventName, callback: Callable[[Any], object]) -> Callable[[], None]:
        """Call `callback(arg)` on "connecting" (Connecting), "connected" (Connected),
        "disconnected" (Disconnected) or "error" (an exception). A callback may be sync or async;
        an async one runs as its own task, so a slow handler never holds up the connection.
        Returns a function that removes exactly this registration."""
        if event not in self._handlers:
            raise ValueError(f"unknown event {event!r}; one of {', '.join(EVENTS)}")
        self._handlers[event].append(callback)

        def remove() -> None:
            handlers = self._handlers.get(event, [])
            for i, registered in enumerate(handlers):
                if registered is callback:
                    del handlers[i]
                    return

        return remove

    # -- commands ---------------------------------------------------------------------------------
    async def subscribe(self, channel: str, since: Position | tuple[int, str] | None = None, *,
                        queue_size: int | None = None, timeout: float | None = None) -> Subscription:
        """Subscribe and wait for the server's `subscribed`.

        With `since` (a position you kept), the server first replays the events after it, or
        the subscription starts with a Reset if it can no longer. Raises ServerError if refused
        (unauthorized, invalid_request); passing refusals (subscription_failed, rate_limited,
        internal_error) are retried until `timeout` (default: the client's request_timeout),
        then raised. While disconnected it waits for the connection, within the same timeout."""
        self._check_open()
        if self._ready is None:
            raise TidingsError("the client is not started: use `async with` or start()")
        if channel in self._subs:
            raise ValueError(f"already subscribed to {channel!r}: use that Subscription"
                             " (client.personal for the personal channel)")
        sub = Subscription(self, channel, queue_size or self._queue_size, _position(since))
        sub._first_join = asyncio.get_running_loop().create_future()
        self._subs[channel] = sub
        if self._connected:
            self._send_subscribe(sub)
        try:
            async with asyncio.timeout(self._request_timeout if timeout is None else timeout):
                await asyncio.shield(sub._first_join)
        except BaseException as exc:
            if self._subs.get(channel) is sub:
                del self._subs[channel]
                sub._end(None)
                if self._connected:
                    self._send("unsubscribe", {"channel": channel}, _ignore)
            if isinstance(exc, TimeoutError) and sub._last_error is not None:
                raise sub._last_error from None  # it kept being refused: say why, not just "late"
            raise
        return sub

    async def publish(self, channel: str, type: str, data: Any, *,
                      timeout: float | None = None) -> Position:
        """Publish an event; returns where the hub stamped it.

        Raises ServerError with the server's code (unauthorized, invalid_request, rate_limited
        with retry_after_ms, internal_error), ConnectionLost if the connection dropped before
        the reply (the event may have been published), TimeoutError after `timeout`."""
        reply = await self._request("publish", {"channel": channel, "type": type, "data": data}, timeout)
        d = reply["data"]
        return Position(int(d["offset"]), str(d["epoch"]))

    async def ping(self, timeout: float | None = None) -> float:
        """Round trip to the server and back, in seconds."""
        started = time.perf_counter()
        await self._request("ping", {}, timeout)
        return time.perf_counter() - started

    async def refresh_token(self, timeout: float | None = None) -> float:
        """Get a new token now and hand it to the server over the open connection (it runs by
        itself before the token expires). Returns the new expiry (Unix seconds)."""
        token = await self._fetch_token()
        if token == self._token:
            raise TidingsError("get_token() returned the token in use: nothing to refresh")
        try:
            reply = await self._request("refresh", {"token": token}, timeout)
        except ServerError as exc:
            if exc.code == "unauthorized":
                self._refused_token = token  # never dial with it either
            raise
        self._token = token
        self._expires_at = float(reply["data"]["expires_at"])
        return self._expires_at

    # -- the connection loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._connect_loop()
        except Unauthorized as exc:
            self._stop_error = exc
        except asyncio.CancelledError:
            pass  # close()
        except Exception as exc:  # a bug: report it rather than die silently
            log.exception("tidings_client: connection loop failed")
            self._stop_error = exc
        finally:
            self._finish()

    async def _connect_loop(self) -> None:
        attempt = 0  # failures in a row since the last stable connection
        while True:
            self._emit("connecting", Connecting(attempt))
            token: str | None = None
            try:
                token = await self._token_for_connect()
            except Unauthorized:
                raise
            except Exception as exc:  # get_token() failed: count it as a failed dial
                self._emit("error", exc)
                code, reason, up_for = ABNORMAL, f"get_token failed: {_describe(exc)}", None
            else:
                code, reason, up_for = await self._session(token)
            self._last_close = (code, reason)
            if self._closing:
                return
            if up_for is not None and up_for >= self._policy.stable_after:
                attempt = 0
            attempt += 1
            plan = self._policy.plan(code, attempt, self._random)
            if plan.action is Action.NEW_TOKEN:
                if up_for is None and self._refused_since_connected:
                    # A fresh token refused before `connected`, like the one before it: asking
                    # get_token() again would only loop.
                    raise Unauthorized(f"a fresh token was refused too: {code} {reason}".rstrip(), code)
                self._refused_token = token
                self._refused_since_connected = True
            self._emit("disconnected", Disconnected(code, reason, True, plan.delay))
            await self._sleep(plan.delay)

    async def _token_for_connect(self) -> str:
        token = self._token
        expired = self._expires_at is not None and self._wall() >= self._expires_at
        if token is None or token == self._refused_token or expired:
            token = await self._fetch_token()
            if token == self._refused_token:
                raise Unauthorized("get_token() returned the token the server refused")
            self._token, self._expires_at = token, None
        return token

    async def _session(self, token: str) -> tuple[int, str, float | None]:
        """One socket, from dial to close: (close code, reason, seconds it was connected or None)."""
        personal = self.personal
        resumed = not personal._paused and personal._position is not None
        listener = _Listener(self, resumed)
        # Current before the handshake completes: `connected` may arrive in the same read as the 101.
        self._listener = listener
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._policy.connect_timeout  # dial to `connected`, all told
        try:
            async with asyncio.timeout_at(deadline):
                await ws_connect(lambda: listener, self._connect_url(token, resumed),
                                 ssl_context=self._ssl_context, enable_auto_pong=False,
                                 websocket_handshake_timeout=self._policy.connect_timeout,
                                 use_aiofastnet=False, logger_name="tidings_client")
        except Exception as exc:  # refused, reset, handshake error, timeout: all count as a drop
            self._transport_closed(listener)
            if listener.closed.done():  # closed by the server within the handshake's read
                return listener.close_code, listener.close_reason, None
            return ABNORMAL, _describe(exc), None
        # The server sends `connected` once it holds the personal channel (at most its subscribe
        # timeout); a socket that never says it is as good as dead.
        no_hello = loop.call_at(
            deadline, lambda: None if listener.hello else listener.abort(ABNORMAL, "connect timeout"))
        try:
            await asyncio.shield(listener.closed)
        finally:
            no_hello.cancel()
        if listener.hello:
            return listener.close_code, listener.close_reason, self._clock() - listener.connected_at
        return listener.close_code, listener.close_reason, None

    def _connect_url(self, token: str, resumed: bool) -> str:
        parts = urlsplit(self._url)
        query = [q for q in parts.query.split("&") if q and not q.startswith(("token=", "since="))]
        query.append("token=" + quote(token, safe=""))
        pos = self.personal._position
        if resumed and pos is not None:
            query.append(f"since={pos.offset}:{quote(pos.epoch, safe='')}")
        return urlunsplit(parts._replace(query="&".join(query)))

    def _transport_closed(self, listener: _Listener) -> None:
        """The socket is gone (any reason): fail what waited on it, stop its timers."""
        if self._listener is not listener:
            return
        self._listener = None
        self._connected = False
        if self._ready is not None and not self._finished:
            self._ready.clear()
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if isinstance(waiter, asyncio.Future) and not waiter.done():
                waiter.set_exception(ConnectionLost("connection lost before the reply"))
        for task in self._conn_tasks:
            task.cancel()
        self._conn_tasks.clear()

    def _finish(self) -> None:
        """The client is done (close() or a stop): release everything, say so once."""
        self._finished = True
        self._closing = True
        error = self._stop_error
        listener = self._listener
        if listener is not None:
            if listener.transport is not None:
                listener.transport.disconnect(graceful=False)
            self._transport_closed(listener)
        if self._ready is not None:
            self._ready.set()  # wakes commands waiting for a connection; they see _finished
        for sub in [*self._subs.values(), self.personal]:
            sub._end(error)
        self._subs.clear()
        if self._token_fetch is not None and not self._token_fetch.done():
            self._token_fetch.cancel()
        if error is not None:
            self._emit("error", error)
        code, reason = self._last_close if error is not None else (1000, "closed by the client")
        self._emit("disconnected", Disconnected(code, reason, False, None))

    # -- tokens -----------------------------------------------------------------------------------
    async def _fetch_token(self) -> str:
        """get_token(), shared: a refresh and a reconnect needing a token at once make one call."""
        fetch = self._token_fetch
        if fetch is None or fetch.done():
            fetch = self._token_fetch = asyncio.ensure_future(self._call_get_token())
            fetch.add_done_callback(_retrieve)
        return await asyncio.shield(fetch)

    async def _call_get_token(self) -> str:
        token = self._get_token()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise Unauthorized("get_token() returned no token")
        return token

    async def _refresh_loop(self) -> None:
        while (delay := self._policy.refresh_delay(self._remaining(), self._random)) is not None:
            await self._sleep(delay)
            try:
                await self.refresh_token()
            except Unauthorized as exc:  # get_token() gave up: the application wants us stopped
                self._stop_error = exc
                self._closing = True
                if self._listener is not None:
                    self._listener.abort(ABNORMAL, "get_token() refused to refresh the token")
                return
            except ConnectionLost:
                return  # the socket went; the next `connected` starts a new timer
            except Exception as exc:
                # Refused or failed: try again at the same fraction of what is left. Close to
                # expiry the loop ends, and the server's 4002 and the reconnect (which fetches a
                # new token first) take over.
                self._emit("error", exc)

    def _remaining(self) -> float:
        return (self._expires_at or 0.0) - self._wall()

    # -- liveness ---------------------------------------------------------------------------------
    async def _watch(self, listener: _Listener, ping_interval: float, pong_timeout: float) -> None:
        """No frame for ping_interval + grace: send a ping; nothing within pong_timeout after it:
        drop the socket as 4200 (reconnect soon). The server pings an idle connection every
        ping_interval, so silence that long means the path is gone, whatever TCP says."""
        quiet_limit = ping_interval + self._policy.liveness_grace
        seen, quiet_since = listener.frames, self._clock()
        while True:
            await self._sleep(max(0.0, quiet_since + quiet_limit - self._clock()))
            if listener.frames != seen:
                seen, quiet_since = listener.frames, self._clock()
                continue
            self._send("ping", {}, _ignore)
            await self._sleep(pong_timeout)
            if listener.frames == seen:
                log.warning("tidings_client: no data from the server for %.1fs; reconnecting",
                            quiet_limit + pong_timeout)
                listener.abort(4200, "no pong")
                return
            seen, quiet_since = listener.frames, self._clock()

    # -- messages in ------------------------------------------------------------------------------
    def _dispatch(self, listener: _Listener, msg: Reply) -> None:
        if listener is not self._listener:
            return
        channel = msg.get("channel")
        if channel is not None:  # an event: only events carry a top-level channel
            sub = self._subs.get(channel)
            if sub is not None and not sub._paused and not sub._closed:
                sub._accept(msg)
            return
        id_ = msg.get("id")
        if id_ is not None:
            waiter = self._pending.pop(id_, None)
            if waiter is not None:
                if isinstance(waiter, asyncio.Future):
                    if not waiter.done():
                        waiter.set_result(msg)
                else:
                    waiter(msg)
                return
        type_ = msg.get("type")
        data = msg.get("data") or {}
        if type_ == "connected":
            self._on_connected(listener, data)
        elif type_ == "unsubscribed":
            self._on_server_unsubscribed(data)
        elif type_ == "error":
            self._emit("error", _server_error(msg))

    def _on_connected(self, listener: _Listener, data: Reply) -> None:
        listener.hello = True
        listener.connected_at = self._clock()
        self._connected = True
        info = Connected(str(data.get("user_id", "")), str(data.get("connection_id", "")),
                         float(data.get("expires_at") or 0), float(data.get("ping_interval") or DEFAULT_PING_INTERVAL),
                         float(data.get("pong_timeout") or DEFAULT_PONG_TIMEOUT))
        self._info = info
        if info.expires_at:
            self._expires_at = info.expires_at
        personal_data = data.get("personal") or {}
        personal = self.personal
        name = personal_data.get("channel")
        if isinstance(name, str) and name and name != personal.channel:
            if personal.channel:
                self._subs.pop(personal.channel, None)
            personal.channel = name
            clash = self._subs.get(name)
            if clash is not None:  # subscribed by name before the first connect told us whose it is
                refusal = ServerError("invalid_request", f"{name} is the personal channel: use client.personal")
                self._drop(clash, refusal, report=clash._joined_once)
            self._subs[name] = personal
        if personal._paused:
            # The server joined it anyway; stop the flow until the consumer catches up.
            self._leave(personal)
        elif personal.channel:
            personal._joined(personal_data, listener.resumed_personal)
        for sub in list(self._subs.values()):
            if sub is not personal and not sub._paused and not sub._closed:
                self._send_subscribe(sub)
        self._refused_since_connected = False
        self._spawn(self._watch(listener, info.ping_interval, info.pong_timeout))
        if info.expires_at:
            self._spawn(self._refresh_loop())
        if self._ready is not None:
            self._ready.set()
        self._emit("connected", info)

    def _on_server_unsubscribed(self, data: Reply) -> None:
        sub = self._subs.get(str(data.get("channel")))
        if sub is None or sub._closed:
            return
        if data.get("reason") == "unauthorized":
            # The refreshed token no longer allows it: resubscribing would be refused too.
            self._drop(sub, ServerError("unauthorized", f"the token no longer allows {sub.channel}"))
        elif not sub._paused:  # insufficient_state (or a reason this client does not know): resume
            self._send_subscribe(sub)

    def _subscribe_reply(self, sub: Subscription, msg: Reply, resumed: bool) -> None:
        if sub._closed or self._subs.get(sub.channel) is not sub:
            return
        if msg.get("type") == "subscribed":
            data = msg.get("data") or {}
            if resumed and "recovered" not in data and _ahead(data, sub._position):
                # The server still held the channel (a leave did not take), so it replayed
                # nothing and we refused what it sent meanwhile: leave and resume again.
                sub._failures += 1
                self._later(self._policy.backoff(sub._failures, self._random), lambda: self._resync(sub))
                return
            sub._failures = 0
            sub._last_error = None
            sub._joined(data, resumed)
            return
        error = _server_error(msg)
        sub._last_error = error
        if error.code not in RETRYABLE:  # unauthorized, invalid_request: asking again will not help
            self._drop(sub, error, report=sub._joined_once)
            return
        # The hub was briefly away, or many channels resubscribed at once: try again later.
        sub._failures += 1
        if error.code == "rate_limited" and error.retry_after_ms:
            wait = error.retry_after_ms / 1000
            delay = wait + self._random() * self._policy.min_delay
        else:
            delay = self._policy.backoff(sub._failures, self._random)
        self._later(delay, lambda: self._send_subscribe(sub))

    # -- messages out -----------------------------------------------------------------------------
    def _send(self, type_: str, data: Reply, waiter: Pending) -> str:
        listener = self._listener
        if listener is None or listener.transport is None or not self._connected:
            raise ConnectionLost("not connected")
        id_ = str(next(self._ids))
        self._pending[id_] = waiter
        listener.transport.send(WSMsgType.TEXT, orjson.dumps({"type": type_, "id": id_, "data": data}))
        return id_

    def _send_subscribe(self, sub: Subscription) -> None:
        if sub._closed or sub._paused or not self._connected or self._subs.get(sub.channel) is not sub:
            return
        data: Reply = {"channel": sub.channel}
        pos = sub._position
        if pos is not None and pos.epoch:
            data["since"] = {"offset": pos.offset, "epoch": pos.epoch}
        resumed = "since" in data
        self._send("subscribe", data, lambda msg: self._subscribe_reply(sub, msg, resumed))

    async def _request(self, type_: str, data: Reply, timeout: float | None) -> Reply:
        self._check_open()
        async with asyncio.timeout(self._request_timeout if timeout is None else timeout):
            await self._until_connected()
            reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            id_ = self._send(type_, data, reply)
            try:
                msg = await reply
            finally:
                self._pending.pop(id_, None)
        if msg.get("type") == "error":
            raise _server_error(msg)
        return msg

    async def _until_connected(self) -> None:
        while not self._connected:
            self._check_open()
            if self._ready is None:
                raise TidingsError("the client is not started: use `async with` or start()")
            await self._ready.wait()
            if self._finished:
                self._check_open()

    def _check_open(self) -> None:
        if self._stop_error is not None:
            raise self._stop_error
        if self._finished or self._closing:
            raise ClientClosed("client closed")

    async def _unsubscribe(self, sub: Subscription, timeout: float | None) -> None:
        if sub is self.personal:
            raise ValueError("the personal channel is joined with every connection; it cannot be left")
        if sub._closed:
            return
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
        sub._end(None)
        if self._connected:
            # The server forgets it with the connection anyway, so a lost reply is harmless.
            with contextlib.suppress(ConnectionLost, TimeoutError):
                await self._request("unsubscribe", {"channel": sub.channel}, timeout)

    # -- slow consumers ---------------------------------------------------------------------------
    def _lag(self, sub: Subscription) -> None:
        """A full queue: refuse the channel's events from here on (its position stays at the last
        one queued) and leave it at the server, so nothing is sent for nothing."""
        sub._paused = True
        sub.lagged += 1
        log.warning("tidings_client: %s: consumer is %d events behind; pausing the channel",
                    sub.channel, sub._events)
        if self._connected:
            self._leave(sub)

    def _leave(self, sub: Subscription) -> None:
        """Unsubscribe a paused channel at the server, trying again if refused (rate_limited):
        a channel still held would keep sending events that are only refused."""
        def left(msg: Reply) -> None:
            if msg.get("type") == "error" and sub._paused and not sub._closed:
                retry = _server_error(msg).retry_after_ms
                self._later(retry / 1000 if retry else self._policy.min_delay, lambda: self._leave(sub))

        if self._connected and sub._paused and not sub._closed:
            self._send("unsubscribe", {"channel": sub.channel}, left)

    def _resync(self, sub: Subscription) -> None:
        """Leave and subscribe again from the position (the server handles the two in order)."""
        if sub._closed or sub._paused or not self._connected or self._subs.get(sub.channel) is not sub:
            return
        self._send("unsubscribe", {"channel": sub.channel}, _ignore)
        self._send_subscribe(sub)

    def _resume(self, sub: Subscription) -> None:
        """The consumer caught up: subscribe again from the last queued event. The server replays
        what was refused (or the subscription gets a Reset). If disconnected, the next
        connect does it."""
        sub._paused = False
        if self._connected:
            self._send_subscribe(sub)

    def _drop(self, sub: Subscription, error: ServerError, report: bool = True) -> None:
        """End a subscription the server will not give us (its iterator raises `error`)."""
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
        sub._end(error)
        if report:  # not for the application's own subscribe(): that call raises it instead
            self._emit("error", error)

    # -- helpers ----------------------------------------------------------------------------------
    def _later(self, delay: float, action: Callable[[], None]) -> None:
        """Run `action` after `delay`, unless the connection goes first (a reconnect redoes it)."""
        async def wait_then() -> None:
            await self._sleep(delay)
            with contextlib.suppress(ConnectionLost):
                action()

        self._spawn(wait_then())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """A task that lives as long as the connection: cancelled when the socket goes."""
        task = asyncio.get_running_loop().create_task(work)
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_task_done)

    def _conn_task_done(self, task: asyncio.Task[Any]) -> None:
        self._conn_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("tidings_client: connection task failed", exc_info=task.exception())

    def _emit(self, event: EventName, arg: object) -> None:
        for callback in list(self._handlers.get(event, ())):
            try:
                result = callback(arg)
            except Exception:
                log.exception("tidings_client: %s handler failed", event)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(_guarded(result, event))
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_tasks.discard)


def _position(value: Position | tuple[int, str] | None) -> Position | None:
    if value is None:
        return None
    offset, epoch = value
    return Position(int(offset), str(epoch))


def _server_error(msg: Reply) -> ServerError:
    data = msg.get("data") or {}
    retry = data.get("retry_after_ms")
    return ServerError(str(data.get("code", "internal_error")), str(data.get("message", "")),
                       int(retry) if isinstance(retry, int | float) else None)


def _ahead(data: Reply, position: Position | None) -> bool:
    """Whether a reply's channel position lies past `position` (events we do not have)."""
    offset, epoch = data.get("offset"), data.get("epoch")
    if position is None or not isinstance(offset, int) or not epoch:
        return False
    return epoch != position.epoch or offset > position.offset


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _ignore(_msg: Reply) -> None:
    """The reply to a command sent for the client's own bookkeeping: nothing to do."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Mark the exception seen: a token fetch whose only waiter gave up must not log a warning.
    if not future.cancelled():
        future.exception()


async def _guarded(awaitable: Awaitable[object], event: str) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("tidings_client: %s handler failed", event)

