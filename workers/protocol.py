"""The per-connection protocol, sans I/O.

Rules of this module:
1. No sockets, no event loop, no clock of its own: time comes in as an argument (the wall clock
   that timestamps a published event is injected at construction), bytes come in
   from the glue, and what should happen goes out as `Output` values (replies to send, channels
   to join or leave, events to forward to the hub, a close).
2. Every input either produces a reply or an `error` reply; the only exception that escapes
   `Session.handle` is a bug, which the glue turns into `internal_error`.

The glue (`workers/connection.py`) feeds a text frame to `Session.handle` and carries out the
outputs in order.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from hub.envelope import EnvelopeError, check_channel, check_event_type, event_body, topic_for
from tidings.config import Config
from workers.auth import Claims
from workers.errors import RATE_ABUSE, Disconnect, ReplyCode, RequestError

MAX_ID_CHARS = 64
MAX_EPOCH_CHARS = 64  # the server's epochs are 16; anything much longer is not one of them
MAX_DEPTH = 32  # JSON nesting a client may send; deeper is refused before it reaches anything
ABUSE_WINDOW = 10.0  # seconds over which rate-limit refusals are counted towards a close


# -- outputs ------------------------------------------------------------------------------------
@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~4x on this per-message path
class Send:
    payload: bytes  # one JSON text frame


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~4x on this per-message path
class Join:
    """Add this connection to `channel` and answer with the channel's position once the hub
    sent it: `subscribed` (`subscribed_reply`), or `connected` for the personal channel at
    connect. With `since`, resume from that (offset, epoch) first (workers/recovery.py).
    `held`: the connection already holds the channel, only its position is asked.
    If the hub does not answer in time: send `failed` and undo the join, or, when `failed` is
    None (the personal channel), keep the membership (ZeroMQ re-sends the subscription) and
    answer anyway."""

    channel: str
    request_id: str | None
    since: tuple[int, bytes] | None = None
    connect: bool = False
    held: bool = False

    @property
    def failed(self) -> bytes | None:
        if self.connect or self.held:
            return None
        return error_reply(RequestError(ReplyCode.SUBSCRIPTION_FAILED, "hub did not confirm the channel"),
                           self.request_id)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~4x on this per-message path
class Leave:
    channel: str


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~4x on this per-message path
class Forward:
    """Hand an encoded event to the hub; once the hub stamped it, reply `published` with its
    offset and epoch (`published`), else `failed`."""

    topic: bytes
    body: bytes
    channel: str
    request_id: str | None

    def published(self, offset: int, epoch: bytes) -> bytes:
        return reply("published", self.request_id, {"channel": self.channel, "offset": offset, "epoch": epoch.decode()})

    @property
    def failed(self) -> bytes:  # built only when needed: the hub almost always takes the event
        return error_reply(RequestError(ReplyCode.INTERNAL_ERROR, "hub did not take the event"), self.request_id)

    @property
    def unanswered(self) -> bytes:
        """Sent, but the hub did not answer in time: it may have stamped the event or not."""
        return error_reply(RequestError(ReplyCode.INTERNAL_ERROR, "hub did not answer in time: the event may or "
                                                                  "may not have been published"), self.request_id)


@dataclass(slots=True)
class Refresh:
    """Check `token` (the glue holds the keys) and hand the verdict to `Session.refreshed`."""

    token: str
    request_id: str | None


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~4x on this per-message path
class Close:
    error: Disconnect


Output = Send | Join | Leave | Forward | Refresh | Close


# -- replies --------------------------------------------------------------------------------------
def reply(type_: str, id_: str | None, data: dict[str, Any]) -> bytes:
    if id_ is None:
        return orjson.dumps({"type": type_, "data": data})
    return orjson.dumps({"type": type_, "id": id_, "data": data})


def error_reply(error: RequestError, id_: str | None = None) -> bytes:
    return reply("error", id_, {"code": error.code.value, "message": error.message, **error.extra})


PONG_NO_ID = reply("pong", None, {})


def subscribed_reply(id_: str | None, channel: str, offset: int, epoch: bytes, recovered: bool | None) -> bytes:
    """`subscribed` with the channel's position; `recovered` only when the subscribe had `since`."""
    # No epoch yet (the hub never answered): no position rather than one nobody can resume from.
    data: dict[str, Any] = {"channel": channel}
    if epoch:
        data["offset"], data["epoch"] = offset, epoch.decode()
    if recovered is not None:
        data["recovered"] = recovered
    return reply("subscribed", id_, data)


def unsubscribed_reply(id_: str | None, channel: str, reason: str | None = None) -> bytes:
    """`unsubscribed`; with a `reason` when the server ended the subscription by itself."""
    data = {"channel": channel} if reason is None else {"channel": channel, "reason": reason}
    return reply("unsubscribed", id_, data)


# The server's reason for ending a subscription whose client missed events that history no longer
# holds (or whose channel restarted with a new epoch): resubscribe with `since` to learn the position.
INSUFFICIENT_STATE = "insufficient_state"
# ... and when a refreshed token no longer allows the channel: do not resubscribe.
UNAUTHORIZED_REASON = "unauthorized"


def parse_since(value: object) -> tuple[int, bytes] | None:
    """`since` of a subscribe: {"offset": int >= 0, "epoch": str}, or RequestError."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(ReplyCode.INVALID_REQUEST, "since must be an object {offset, epoch}")
    offset, epoch = value.get("offset"), value.get("epoch")
    if type(offset) is not int or not 0 <= offset < 1 << 63:
        raise RequestError(ReplyCode.INVALID_REQUEST, "since.offset must be an integer >= 0")
    if not isinstance(epoch, str) or len(epoch) > MAX_EPOCH_CHARS or not epoch.isascii():
        raise RequestError(ReplyCode.INVALID_REQUEST, f"since.epoch must be a string of at most {MAX_EPOCH_CHARS} "
                                                      "characters, as the server sent it")
    return offset, epoch.encode()


def parse_connect_since(text: str | None) -> tuple[int, bytes] | None:
    """The connect URL's `since=OFFSET:EPOCH` for the personal channel; ValueError if malformed."""
    if text is None:
        return None
    offset, sep, epoch = text.partition(":")
    digits = offset.isascii() and offset.isdigit() and len(offset) <= 19  # fits the hub's uint64
    if not sep or not digits or not epoch or len(epoch) > MAX_EPOCH_CHARS or not epoch.isascii():
        raise ValueError("since must be OFFSET:EPOCH, as the server sent them")
    return int(offset), epoch.encode()


def pong(id_: str | None) -> bytes:
    """The commonest reply, spliced rather than encoded: about half the cost of orjson.dumps(dict)."""
    return PONG_NO_ID if id_ is None else b'{"type":"pong","id":%s,"data":{}}' % orjson.dumps(id_)


# -- rate limiting ---------------------------------------------------------------------------------
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up. Time is passed in."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = self.tokens = float(burst)  # one float until the first take
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one will be there."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_subscriptions: int = 256
    rate_limit: float = 100.0
    rate_burst: int = 200
    publish_rate_limit: float = 20.0
    publish_burst: int = 20
    rate_abuse_limit: int = 1000
    ping_interval: float = 25.0  # told to clients in `connected`: how long the server waits in silence
    pong_timeout: float = 20.0  # ... and how long it then waits for the pong

    @classmethod
    def from_config(cls, config: Config) -> SessionLimits:
        return cls(config.max_subscriptions, config.rate_limit, config.rate_burst,
                   config.publish_rate_limit, config.publish_burst, config.rate_abuse_limit,
                   config.idle_timeout, config.pong_timeout)


# -- parsing ------------------------------------------------------------------------------------------
def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_message(payload: bytes) -> tuple[str, str | None, dict[str, Any]]:
    """(type, id, data) of one client message, or RequestError(invalid_request)."""
    try:
        msg = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise RequestError(ReplyCode.INVALID_REQUEST, "message is not valid JSON") from None
    if not isinstance(msg, dict):
        raise RequestError(ReplyCode.INVALID_REQUEST, "message must be a JSON object")
    id_ = msg.get("id")
    if id_ is not None and (not isinstance(id_, str) or len(id_) > MAX_ID_CHARS):
        raise RequestError(ReplyCode.INVALID_REQUEST, f"id must be a string of at most {MAX_ID_CHARS} characters")
    # A cheap byte count first: only a message with many brackets can be too deep.
    if len(payload) > MAX_DEPTH * 2 and payload.count(b"{") + payload.count(b"[") > MAX_DEPTH \
            and _too_deep(msg, MAX_DEPTH):
        raise RequestError(ReplyCode.INVALID_REQUEST, f"message is nested deeper than {MAX_DEPTH} levels", id_)
    type_ = msg.get("type")
    if not isinstance(type_, str):
        raise RequestError(ReplyCode.INVALID_REQUEST, "type must be a string", id_)
    data = msg.get("data", {} if type_ == "ping" else None)
    if not isinstance(data, dict):
        raise RequestError(ReplyCode.INVALID_REQUEST, "data must be a JSON object", id_)
    return type_, id_, data


def _channel(data: dict[str, Any]) -> str:
    try:
        return check_channel(data.get("channel"))
    except EnvelopeError as exc:
        raise RequestError(ReplyCode.INVALID_REQUEST, str(exc)) from None


# -- the session ----------------------------------------------------------------------------------------
class Session:
    """One client connection's protocol state: its claims, channels and rate buckets.

    One per connection, so kept small (slots, no bucket for a connection that never publishes)."""

    __slots__ = ("abuse_count", "abuse_window_start", "channels", "claims", "commands", "connection_id",
                 "last_result", "last_type", "limits", "publishes", "since", "wall_clock")

    def __init__(self, claims: Claims, connection_id: str, limits: SessionLimits, now: float,
                 wall_clock: Callable[[], float] = time.time, since: tuple[int, bytes] | None = None) -> None:
        self.claims = claims
        self.since = since  # the personal channel's position to resume from at connect
        self.wall_clock = wall_clock
        self.connection_id = connection_id
        self.limits = limits
        # The channels held, in join order. A tuple, not a set: ~160 bytes less for the usual few
        # channels, and a scan of at most max_subscriptions names per (un)subscribe is cheap.
        self.channels: tuple[str, ...] = ()
        self.commands = TokenBucket(limits.rate_limit, limits.rate_burst, now)
        self.publishes: TokenBucket | None = None  # made at the first publish: most connections never do
        self.abuse_window_start = now
        self.abuse_count = 0
        self.last_type = ""  # for metrics: the type of the command just handled ...
        self.last_result = ""  # ... and how it ended: ok, error, rate_limited or closed

    def open(self) -> list[Output]:
        """On connect: join the personal channel (resuming it from `since` when given), then say
        `connected` with its position (`connected_reply`)."""
        personal = self.claims.personal_channel
        self.channels += (personal,)
        since, self.since = self.since, None
        return [Join(personal, None, since, connect=True)]

    def connected_reply(self, offset: int, epoch: bytes, recovered: bool | None) -> bytes:
        personal: dict[str, Any] = {"channel": self.claims.personal_channel}
        if epoch:  # none yet when the hub never answered: no position rather than an unusable one
            personal["offset"], personal["epoch"] = offset, epoch.decode()
        if recovered is not None:
            personal["recovered"] = recovered
        # ping_interval and pong_timeout let a client run its own liveness timer: a browser cannot
        # see WebSocket pings, so it sends a `ping` after that much silence and expects `pong`.
        return reply("connected", None, {
            "user_id": self.claims.sub, "connection_id": self.connection_id,
            "expires_at": int(self.claims.exp), "ping_interval": self.limits.ping_interval,
            "pong_timeout": self.limits.pong_timeout, "personal": personal,
        })

    def forget(self, channel: str) -> None:
        """The glue could not complete a join: the channel is not held."""
        self.channels = tuple(c for c in self.channels if c != channel)

    def handle(self, payload: bytes, now: float, hub_up: Callable[[str], bool]) -> list[Output]:
        """One client message -> what to do. `hub_up(channel)`: is the hub shard owning it linked?"""
        self.last_type = "unknown"
        self.last_result = "error"
        wait = self.commands.take(now)
        if wait:
            return self._refuse(now, wait, None)
        try:
            type_, id_, data = parse_message(payload)
        except RequestError as exc:
            return [Send(error_reply(exc, exc.request_id))]
        self.last_result = "ok"
        # last_type is set from literals: shared strings, not each connection's parsed copy
        try:
            if type_ == "ping":
                self.last_type = "ping"
                return [Send(pong(id_))]
            if type_ == "subscribe":
                self.last_type = "subscribe"
                return self._subscribe(_channel(data), parse_since(data.get("since")), id_, hub_up)
            if type_ == "unsubscribe":
                self.last_type = "unsubscribe"
                return self._unsubscribe(_channel(data), id_)
            if type_ == "publish":
                self.last_type = "publish"
                return self._publish(data, id_, now, hub_up)
            if type_ == "refresh":
                self.last_type = "refresh"
                token = data.get("token")
                if not isinstance(token, str) or not token:
                    raise RequestError(ReplyCode.INVALID_REQUEST, "data.token must be a non-empty string")
                return [Refresh(token, id_)]
            raise RequestError(ReplyCode.INVALID_REQUEST, f"unknown type {type_[:32]!r}")
        except RequestError as exc:
            if exc.code is ReplyCode.RATE_LIMITED:
                return self._refuse(now, exc.extra["retry_after_ms"] / 1000, id_)
            self.last_result = "error"
            return [Send(error_reply(exc, id_))]

    def refreshed(self, claims: Claims | None, refusal: str, id_: str | None) -> list[Output]:
        """The verdict on a `refresh` token: claims, or None and the client-facing `refusal`.
        A refused token changes nothing (the connection keeps the token it has). An accepted one
        must name the same user; its claims replace the old ones, and channels they no longer
        allow are left, each with an `unsubscribed` carrying the reason."""
        if claims is None:
            self.last_result = "error"
            return [Send(error_reply(RequestError(ReplyCode.UNAUTHORIZED, refusal), id_))]
        if claims.sub != self.claims.sub:
            self.last_result = "error"
            return [Send(error_reply(RequestError(ReplyCode.UNAUTHORIZED, "token is for another user"), id_))]
        self.claims = claims
        outputs: list[Output] = [Send(reply("refreshed", id_, {"expires_at": int(claims.exp)}))]
        kept = tuple(ch for ch in self.channels if claims.may_subscribe(ch))
        for channel in self.channels:
            if channel not in kept:
                outputs += [Leave(channel), Send(unsubscribed_reply(None, channel, UNAUTHORIZED_REASON))]
        self.channels = kept
        return outputs

    # -- commands ---------------------------------------------------------------------------------
    def _subscribe(self, channel: str, since: tuple[int, bytes] | None, id_: str | None,
                   hub_up: Callable[[str], bool]) -> list[Output]:
        if channel in self.channels:
            # Idempotent: already receiving it live, so nothing to resume; report the position.
            return [Join(channel, id_, None, held=True)]
        if not self.claims.may_subscribe(channel):
            raise RequestError(ReplyCode.UNAUTHORIZED, f"token does not allow subscribing to {channel}")
        if len(self.channels) >= self.limits.max_subscriptions:
            raise RequestError(ReplyCode.SUBSCRIPTION_FAILED,
                               f"subscription limit of {self.limits.max_subscriptions} reached")
        if not hub_up(channel):
            raise RequestError(ReplyCode.SUBSCRIPTION_FAILED, "hub unavailable, try again shortly")
        # Interned: every connection on a channel holds the same name (the registry's too), not
        # its own copy parsed out of its subscribe.
        channel = sys.intern(channel)
        self.channels += (channel,)
        return [Join(channel, id_, since)]

    def _unsubscribe(self, channel: str, id_: str | None) -> list[Output]:
        ok = Send(unsubscribed_reply(id_, channel))
        if channel not in self.channels:
            return [ok]  # idempotent
        self.forget(channel)
        return [Leave(channel), ok]

    def _publish(self, data: dict[str, Any], id_: str | None, now: float,
                 hub_up: Callable[[str], bool]) -> list[Output]:
        channel = _channel(data)
        try:
            type_ = check_event_type(data.get("type"))
        except EnvelopeError as exc:
            raise RequestError(ReplyCode.INVALID_REQUEST, str(exc)) from None
        event_data = data.get("data", {})
        if not isinstance(event_data, dict):
            raise RequestError(ReplyCode.INVALID_REQUEST, "data.data must be a JSON object")
        if not self.claims.may_publish(channel):
            raise RequestError(ReplyCode.UNAUTHORIZED, f"token does not allow publishing to {channel}")
        bucket = self.publishes
        if bucket is None:  # a full bucket, as it would be had it been made at connect
            limits = self.limits
            bucket = self.publishes = TokenBucket(limits.publish_rate_limit, limits.publish_burst, now)
        wait = bucket.take(now)
        if wait:
            raise RequestError(ReplyCode.RATE_LIMITED, "publish rate limit",
                               retry_after_ms=max(1, math.ceil(wait * 1000)))
        if not hub_up(channel):
            raise RequestError(ReplyCode.INTERNAL_ERROR, "hub unavailable, event not published")
        # channel and type are checked above, and event_data came out of orjson: encode as is
        body = event_body(channel, type_, event_data, self.wall_clock())
        return [Forward(topic_for(channel), body, channel, id_)]

    def _refuse(self, now: float, wait: float, id_: str | None) -> list[Output]:
        self.last_result = "rate_limited"
        if now - self.abuse_window_start > ABUSE_WINDOW:
            self.abuse_window_start = now
            self.abuse_count = 0
        self.abuse_count += 1
        error = RequestError(ReplyCode.RATE_LIMITED, "too many requests",
                             retry_after_ms=max(1, math.ceil(wait * 1000)))
        if self.abuse_count > self.limits.rate_abuse_limit:
            self.last_result = "closed"
            return [Close(Disconnect(RATE_ABUSE, error))]
        return [Send(error_reply(error, id_))]
