"""Locust users for tidings capacity planning: real RFC 6455 WebSocket clients, plus an HTTP backend.

    locust -f loadtest/locustfile.py --headless -u 200 -r 50 -t 60s \\
        --ws-url ws://127.0.0.1:8080/ws --api-url http://127.0.0.1:8081 \\
        --jwt-secret "$TIDINGS_JWT_SECRET" --api-key "$TIDINGS_API_KEY" --load-shape step

(`python -m loadtest` does all of this for you, and starts a tidings when no URL is given.)

User classes, mixed by weight (`--mix Subscriber=40,ChatPublisher=2,BackendPublisher=1,Churn=2`):
- Subscriber: mints a token from the JWT secret, joins its personal channel (automatic) plus
  --channels-per-user group channels drawn from a Zipf(--channel-skew) popularity, pings now
  and then, counts events and gaps in each channel's `offset`.
- ChatPublisher: publishes `chat_message` over its socket at --chat-rate (Poisson arrivals).
- BackendPublisher: POSTs /api/publish, /api/broadcast and personal notifications at --backend-rate.
- Churn: connects, subscribes, holds about --churn-hold seconds, disconnects, again: reconnect traffic.

Metrics (request_type "WS", fired with events.request.fire, so they land in Locust's CSV/HTML):
- connect: TCP + upgrade + the `connected` frame; a refusal fails with its error code and close code.
- subscribe / ping / publish: request sent -> `subscribed` / `pong` / `published` received.
- event: publish-to-receive latency from the `ts` (unix seconds) the publisher puts in `data`.
  It compares two clocks, so it is only valid with publisher and subscriber on one host (or on
  PTP/NTP-synced hosts): every report says so.
- disconnect: an unexpected close or lost connection, failed with the close code.
- gap / duplicate: an `offset` that skipped ahead / went back within one epoch of one channel.

Locust runs on gevent and monkeypatches sockets, so the blocking websocket-client library is
cooperative here: one reader greenlet per connection matches replies and counts events, while
the user's task greenlet only sends.
"""

from __future__ import annotations

import itertools
import random
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gevent
import jwt
import orjson
import websocket
from locust import FastHttpUser, User, events, task

# Locust puts the locustfile's own folder on sys.path, not the repository root that holds the
# `loadtest` package; add it so `locust -f loadtest/locustfile.py` works from any directory.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from loadtest.capacity.options import ChannelPicker, add_options, parse_mix  # noqa: E402
from loadtest.capacity.shapes import CapacityShape  # noqa: E402, F401  (Locust picks the shape up from here)
from loadtest.capacity.tally import TALLY, install  # noqa: E402

WS = "WS"
REPLIES = {"subscribed": "subscribe", "unsubscribed": "unsubscribe", "pong": "ping", "published": "publish"}
PROCESS_TAG = uuid.uuid4().hex[:6]  # keeps `sub` claims distinct across Locust worker processes
_user_numbers = itertools.count()
_request_ids = itertools.count()
PICKER = ChannelPicker(100, 1.0)
_subscriber_numbers = itertools.count()
SOURCE_IPS: itertools.cycle[str] | None = None  # --source-ips, round robin
SUBSCRIBERS_STARTED = 0  # Subscribers this process has started: the range notifications aim at


class WSFailure(Exception):
    """A protocol-level failure; its text is what Locust groups failures by (keep it low-cardinality)."""


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    add_options(parser)


@events.init.add_listener
def _init(environment: Any, **_: Any) -> None:
    global PICKER, SOURCE_IPS
    opts = environment.parsed_options
    if opts is None:  # library use without a command line: keep the defaults
        return
    install(environment)
    PICKER = ChannelPicker(opts.channels, opts.channel_skew)
    ips = [ip.strip() for ip in opts.source_ips.split(",") if ip.strip()]
    if ips:
        if not opts.ws_url.startswith("ws://"):
            raise SystemExit("--source-ips works with ws:// only (websocket-client skips TLS on a given socket)")
        SOURCE_IPS = itertools.cycle(ips)
    BackendPublisher.host = opts.api_url
    mix = parse_mix(opts.mix)
    for cls in (Subscriber, ChatPublisher, BackendPublisher, Churn):
        if cls.__name__ in mix:
            cls.weight = mix[cls.__name__]
    # A weight of 0 means "not in this run"; Locust's dispatcher wants such classes removed.
    dropped = {name for name, w in mix.items() if w == 0}
    if dropped:
        environment.user_classes[:] = [c for c in environment.user_classes if c.__name__ not in dropped]
        for name in dropped:
            environment.user_classes_by_name.pop(name, None)


def fire(environment: Any, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
    environment.events.request.fire(
        request_type=WS, name=name, response_time=ms, response_length=length, exception=exc, context={})


def close_code(frame: Any) -> int:
    data = bytes(frame.data or b"")
    return int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005  # 1005: no status in the frame


class SocketUser(User):
    """One WebSocket connection per user, with a reader greenlet; subclasses decide what to do."""

    abstract = True
    channel_claims: tuple[str, ...] = ()
    publish_claims: tuple[str, ...] = ()

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.opts = environment.parsed_options
        self.sub = f"lt-{PROCESS_TAG}-{next(_user_numbers)}"
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.closing = False
        self.pending: dict[str, tuple[str, float]] = {}
        self.offsets: dict[str, tuple[Any, int]] = {}  # channel -> (epoch, last offset)

    # -- connection lifecycle ---------------------------------------------------------------
    def token(self) -> str:
        now = int(time.time())
        ttl = max(3600, int(getattr(self.opts, "soak_time", 0)) + 600)
        claims = {"sub": self.sub, "iat": now, "exp": now + ttl,
                  "channels": list(self.channel_claims), "publish": list(self.publish_claims)}
        return jwt.encode(claims, self.opts.jwt_secret, algorithm="HS256")

    @property
    def is_open(self) -> bool:
        return self.ws is not None and not self.closing

    def connect(self) -> bool:
        """Handshake and wait for `connected`; fires `connect`. False when refused."""
        url = f"{self.opts.ws_url}?token={self.token()}"
        t0 = time.perf_counter()
        try:
            ws = websocket.create_connection(url, timeout=self.opts.reply_timeout, socket=self._socket())
        except websocket.WebSocketBadStatusException as e:
            fire(self.environment, "connect", _ms(t0), exc=WSFailure(f"http {e.status_code}"))
            return False
        except (OSError, websocket.WebSocketException) as e:
            fire(self.environment, "connect", _ms(t0), exc=WSFailure(type(e).__name__))
            return False
        try:
            raw = ws.recv()
            msg = orjson.loads(raw)
        except (OSError, websocket.WebSocketException, orjson.JSONDecodeError) as e:
            why = WSFailure(f"no connected frame: {type(e).__name__}")
            fire(self.environment, "connect", _ms(t0), exc=why)
            ws.shutdown()
            return False
        if msg.get("type") != "connected":
            # Refused after the upgrade: an `error` frame, then a close with the reason's code.
            code = (msg.get("data") or {}).get("code", msg.get("type"))
            try:
                op, frame = ws.recv_data_frame(True)
                close = close_code(frame) if op == websocket.ABNF.OPCODE_CLOSE else 0
            except (OSError, websocket.WebSocketException):
                close = 1006  # 1006: closed without a close frame
            TALLY.errors[str(code)] += 1
            fire(self.environment, "connect", _ms(t0), len(raw), WSFailure(f"error {code}, close {close}"))
            ws.shutdown()
            return False
        fire(self.environment, "connect", _ms(t0), len(raw))
        ws.settimeout(None)  # the reader blocks until traffic arrives; timeouts are per request
        self.ws, self.closing, self.offsets = ws, False, {}
        TALLY.opened()
        TALLY.counts["connects"] += 1
        self.reader = gevent.spawn(self._read, ws)
        return True

    def _socket(self) -> socket.socket | None:
        """A TCP socket bound to the next --source-ips address, or None to let websocket-client dial.

        One (source IP, server IP:port) pair has ~28k ephemeral ports; past that, connects fail
        with EADDRNOTAVAIL. Loopback has 127.0.0.0/8, and a NIC can carry several addresses.
        """
        if SOURCE_IPS is None:
            return None
        parts = urlsplit(self.opts.ws_url)
        return socket.create_connection((parts.hostname, parts.port or 80), timeout=self.opts.reply_timeout,
                                        source_address=(next(SOURCE_IPS), 0))

    def disconnect(self) -> None:
        """Close with 1000 (normal); replies still in flight are dropped, not failed."""
        ws, reader = self.ws, self.reader
        if ws is None:
            return
        self.closing = True
        if reader is not None:
            reader.kill(block=True)  # one greenlet per socket may read: the reader must be gone first
        try:
            ws.close(status=1000, timeout=2)
        except (OSError, websocket.WebSocketException):
            ws.shutdown()
        self._gone()

    def _gone(self) -> None:
        if self.ws is not None:
            self.ws = None
            self.pending.clear()
            TALLY.closed()

    def on_stop(self) -> None:
        self.disconnect()

    # -- requests and replies ---------------------------------------------------------------
    def request(self, name: str, type_: str, data: dict[str, Any]) -> None:
        if self.ws is None:
            return
        self.expire()
        rid = str(next(_request_ids))
        self.pending[rid] = (name, time.perf_counter())
        try:
            self.ws.send(orjson.dumps({"type": type_, "id": rid, "data": data}), websocket.ABNF.OPCODE_TEXT)
        except (OSError, websocket.WebSocketException) as e:
            self.pending.pop(rid, None)
            fire(self.environment, name, 0, exc=WSFailure(f"send failed: {type(e).__name__}"))

    def expire(self) -> None:
        """Unanswered requests older than --reply-timeout become failures."""
        limit = time.perf_counter() - self.opts.reply_timeout
        for rid, (name, t0) in list(self.pending.items()):
            if t0 < limit:
                del self.pending[rid]
                fire(self.environment, name, _ms(t0), exc=WSFailure("timeout"))

    def _read(self, ws: websocket.WebSocket) -> None:
        while True:
            try:
                op, frame = ws.recv_data_frame(True)
            except (OSError, websocket.WebSocketException) as e:
                if not self.closing and self.ws is ws:
                    self._lost(f"connection lost: {type(e).__name__}", "1006")
                return
            if op == websocket.ABNF.OPCODE_TEXT:
                self._message(frame.data)
            elif op == websocket.ABNF.OPCODE_CLOSE:
                if not self.closing and self.ws is ws:
                    code = close_code(frame)
                    self._lost(f"close {code}", str(code))
                return

    def _lost(self, why: str, code: str) -> None:
        TALLY.closes[code] += 1
        fire(self.environment, "disconnect", 0, exc=WSFailure(why))
        if self.ws is not None:
            self.ws.shutdown()
        self._gone()  # the next task reconnects, as a real client would after a backoff

    def _message(self, raw: bytes) -> None:
        msg = orjson.loads(raw)
        typ = msg.get("type")
        if typ in REPLIES:
            pending = self.pending.pop(str(msg.get("id")), None)
            if pending is not None:
                fire(self.environment, pending[0], _ms(pending[1]), len(raw))
        elif typ == "error":
            code = str((msg.get("data") or {}).get("code"))
            TALLY.errors[code] += 1
            pending = self.pending.pop(str(msg.get("id")), None)
            name, t0 = pending if pending is not None else ("error", time.perf_counter())
            fire(self.environment, name, _ms(t0), len(raw), WSFailure(f"error {code}"))
        elif typ != "connected":
            self._event(msg, len(raw))

    def _event(self, msg: dict[str, Any], length: int) -> None:
        TALLY.counts["events"] += 1
        channel, offset, epoch = msg.get("channel"), msg.get("offset"), msg.get("epoch")
        if isinstance(channel, str) and isinstance(offset, int):
            prev = self.offsets.get(channel)
            # The first event of a channel (or of a new hub epoch) is the baseline: what was
            # published before this client subscribed is not a gap.
            if prev is not None and prev[0] != epoch:
                TALLY.counts["epoch_changes"] += 1
            elif prev is not None and offset > prev[1] + 1:
                TALLY.counts["gaps"] += 1
                TALLY.counts["missed"] += offset - prev[1] - 1
                fire(self.environment, "gap", 0, exc=WSFailure("offset gap"))
            elif prev is not None and offset <= prev[1]:
                TALLY.counts["duplicates"] += 1
                fire(self.environment, "duplicate", 0, exc=WSFailure("offset repeated or went back"))
                return
            self.offsets[channel] = (epoch, offset)
        data = msg.get("data")
        ts = data.get("ts") if isinstance(data, dict) else None
        if isinstance(ts, int | float):
            fire(self.environment, "event", max(0.0, (time.time() - ts) * 1000), length)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class Subscriber(SocketUser):
    """Listens: personal channel plus K group channels; pings every --ping-interval on average."""

    weight = 40
    channel_claims = ("group:*",)

    def __init__(self, environment: Any) -> None:
        global SUBSCRIBERS_STARTED
        super().__init__(environment)
        # Predictable names, so a BackendPublisher in another Locust process can address them:
        # Locust's distributed dispatcher often gives each worker whole classes, so the
        # publisher cannot rely on a list of the Subscribers next to it. Two processes reuse
        # the same numbers: that is one user on two devices, and both receive the events.
        self.sub = f"lt-sub-{next(_subscriber_numbers)}"
        SUBSCRIBERS_STARTED += 1

    def wait_time(self) -> float:
        return random.uniform(0.5, 1.5) * self.opts.ping_interval

    def on_start(self) -> None:
        self.session()

    def session(self) -> None:
        if self.connect():
            for channel in PICKER.distinct(self.opts.channels_per_user):
                self.request("subscribe", "subscribe", {"channel": channel})

    @task
    def ping(self) -> None:
        if not self.is_open:
            self.session()
            return
        self.request("ping", "ping", {})


class ChatPublisher(SocketUser):
    """Talks: `chat_message` to a group channel over its socket, Poisson at --chat-rate."""

    weight = 2
    publish_claims = ("group:*",)

    def wait_time(self) -> float:
        return random.expovariate(self.opts.chat_rate)

    def on_start(self) -> None:
        self.connect()

    @task
    def publish(self) -> None:
        if not self.is_open and not self.connect():
            return
        channel = PICKER.one()
        self.request("publish", "publish", {"channel": channel, "type": "chat_message", "data": {
            "conversation_id": channel, "sender_id": self.sub, "content": "Hello there!",
            "ts": time.time()}})


class Churn(SocketUser):
    """Reconnect traffic: connect + subscribe, hold ~--churn-hold s, close with 1000, repeat."""

    weight = 2
    channel_claims = ("group:*",)

    def wait_time(self) -> float:
        return random.uniform(0.5, 1.5) * self.opts.churn_hold

    @task
    def flip(self) -> None:
        if self.is_open:
            self.disconnect()
        elif self.connect():
            self.request("subscribe", "subscribe", {"channel": PICKER.one()})


class BackendPublisher(FastHttpUser):
    """A backend in another language: the HTTP publish API, Poisson at --backend-rate."""

    weight = 1
    host = "http://127.0.0.1:8081"

    def wait_time(self) -> float:
        return random.expovariate(self.environment.parsed_options.backend_rate)

    def _post(self, path: str, body: dict[str, Any], name: str) -> None:
        key = self.environment.parsed_options.api_key
        self.client.post(path, data=orjson.dumps(body), name=name, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"})

    @task(3)
    def publish(self) -> None:
        channel = PICKER.one()
        self._post("/api/publish", {"channel": channel, "type": "status_update", "data": {
            "entity": channel, "status": "busy", "ts": time.time()}}, "/api/publish")

    @task(1)
    def broadcast(self) -> None:
        self._post("/api/broadcast", {"channels": PICKER.distinct(3), "type": "status_update", "data": {
            "status": "maintenance", "ts": time.time()}}, "/api/broadcast")

    @task(1)
    def notify(self) -> None:
        # Aim at the Subscribers of this process, or at the first --notify-range subscriber
        # names when this process runs none (another worker does); a user with no connection
        # is simply not delivered to.
        k = random.randrange(SUBSCRIBERS_STARTED or self.environment.parsed_options.notify_range)
        self._post("/api/publish", {"channel": f"user:lt-sub-{k}", "type": "notification", "data": {
            "title": "Load test", "body": "You have a new message", "ts": time.time()}},
            "/api/publish (notification)")
