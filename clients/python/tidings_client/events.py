"""Values the client hands to the application: events, positions and connection notices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["Connected", "Connecting", "Disconnected", "Event", "Position", "Reset"]


class Position(NamedTuple):
    """Where an event sits in its channel: `offset` counts up by one per event within an `epoch`."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Event:
    """An event of a subscribed channel."""

    type: str
    channel: str
    data: Any
    timestamp: str
    offset: int
    epoch: str

    @property
    def position(self) -> Position:
        return Position(self.offset, self.epoch)


@dataclass(frozen=True, slots=True)
class Reset:
    """Yielded by a subscription, in order, where events could not be recovered.

    The server could not replay what the subscription missed (history no longer holds it, or the
    channel restarted in a new epoch). Events before this item were delivered; events after it
    start at `position`. Reload the channel's state from your backend."""

    channel: str
    position: Position | None


@dataclass(frozen=True, slots=True)
class Connecting:
    """The client is dialling. `attempt` counts the failures in a row before this dial (0 for the
    first connect, and again once a connection has stayed up for the policy's stable_after)."""

    attempt: int


@dataclass(frozen=True, slots=True)
class Connected:
    """The server accepted the connection (its `connected` message)."""

    user_id: str
    connection_id: str
    expires_at: float
    ping_interval: float
    pong_timeout: float


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection ended, or a dial failed (`code` 1006 when no close frame came: refused,
    dropped, timed out; 4200 when the client found the connection dead).

    `reconnect` is False when the client will not dial again (close(), or an Unauthorized stop);
    otherwise `delay` is the wait, in seconds, before the next dial."""

    code: int
    reason: str
    reconnect: bool
    delay: float | None
