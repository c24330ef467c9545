"""The two failure families, each code defined once.

    TidingsError
    ├── RequestError(code, message)   a reply: {"type":"error",...}; the connection stays open
    └── Disconnect(reason)            ends the connection with a WebSocket close code

`ReplyCode` lists the codes an `error` reply can carry. `CloseReason` values list every way a
connection ends, with the band a client acts on:
    1000-1015  RFC 6455 (1001: server going away, reconnect with jittered backoff)
    4000-4099  do not reconnect without a new token
    4100-4199  back off before reconnecting
    4200-4299  reconnect soon, with jitter
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ReplyCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    SUBSCRIPTION_FAILED = "subscription_failed"
    INTERNAL_ERROR = "internal_error"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True, slots=True)
class CloseReason:
    code: int
    reason: str  # sent in the close frame; short (a close payload holds at most 123 bytes)
    graceful: bool = True  # False: abort, no close frame (its peer would never read it)


NORMAL = CloseReason(1000, "normal closure")
GOING_AWAY = CloseReason(1001, "server going away")
PROTOCOL_ERROR = CloseReason(1002, "protocol error")
UNSUPPORTED_DATA = CloseReason(1003, "unsupported data")
INVALID_PAYLOAD = CloseReason(1007, "invalid UTF-8")
POLICY_VIOLATION = CloseReason(1008, "policy violation")
MESSAGE_TOO_BIG = CloseReason(1009, "message too big")
INTERNAL_ERROR = CloseReason(1011, "internal error")
UNAUTHORIZED = CloseReason(4001, "unauthorized")
TOKEN_EXPIRED = CloseReason(4002, "token expired")
WORKER_FULL = CloseReason(4100, "server full")
USER_CONNECTION_LIMIT = CloseReason(4101, "too many connections for this user")
RATE_ABUSE = CloseReason(4129, "rate limit exceeded repeatedly")
PING_TIMEOUT = CloseReason(4200, "no pong", graceful=False)
SLOW_CONSUMER = CloseReason(4201, "slow consumer", graceful=False)

ALL_CLOSE_REASONS = (NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA, INVALID_PAYLOAD,
                     POLICY_VIOLATION, MESSAGE_TOO_BIG, INTERNAL_ERROR, UNAUTHORIZED, TOKEN_EXPIRED,
                     WORKER_FULL, USER_CONNECTION_LIMIT, RATE_ABUSE, PING_TIMEOUT, SLOW_CONSUMER)


class TidingsError(Exception):
    """Root of the errors the protocol core raises."""


class RequestError(TidingsError):
    """A command that gets an `error` reply; the connection stays open."""

    def __init__(self, code: ReplyCode, message: str, request_id: str | None = None, **extra: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id  # the client's `id`, when it was readable, to echo back
        self.extra = extra


class Disconnect(TidingsError):
    """Something that ends the connection, optionally after one last error reply."""

    def __init__(self, reason: CloseReason, reply: RequestError | None = None) -> None:
        super().__init__(reason.reason)
        self.reason = reason
        self.reply = reply
