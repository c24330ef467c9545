"""Resuming a channel from a position without a gap or a duplicate. Pure: no sockets, no clock.

A connection that resumes (`subscribe` with `since`, or `since` on the connect URL for its
personal channel) and a live member that saw an offset jump (its worker fell behind the hub's
high-water mark) both become a `Waiter` on the channel: it stops receiving live events, the
worker keeps receiving them (the channel stays subscribed at the hub) and holds them in the
channel's `ChannelRecovery`, asks the hub for history once, then merges history and held events
by offset: deduplicated, checked contiguous from the waiter's position to the channel's live
position. Only then does the waiter get its events, in order, and go live again. Everything held
arrived after the read was asked for or before it, so together they cover every offset; a hole
means history no longer has the events (or the worker lost some while waiting): the waiter gets
nothing of it, never a partial list.

One read at a time per channel, for the lowest position waiting: reconnecting clients of one
channel share it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_READS = 3  # reads for one recovery before giving up (each retry covers events held meanwhile)


class WaiterKind:
    SUBSCRIBE = 0  # answered with `subscribed` (recovered true or false)
    CONNECT = 1  # the personal channel at connect: answered with `connected`
    HEAL = 2  # a live member healing a gap: its events, or `unsubscribed` when they are gone


@dataclass(slots=True, eq=False)
class Waiter:
    member: Any
    since: int  # the last offset this member has
    kind: int
    request_id: str | None = None


@dataclass(slots=True)
class Outcome:
    """A waiter's result: its events (payloads, in order) or None (not recoverable)."""

    waiter: Waiter
    events: list[bytes] | None


def merge(since: int, upto: int, *sources: Iterable[tuple[int, bytes]]) -> list[bytes] | None:
    """The payloads of offsets since+1 .. upto, each once and in order, from any mix of sources
    (duplicates across them are dropped); None if any offset in that range is missing."""
    if upto <= since:
        return []
    found: dict[int, bytes] = {}
    for source in sources:
        for offset, payload in source:
            if since < offset <= upto and offset not in found:
                found[offset] = payload
    if len(found) != upto - since:
        return None
    return [found[offset] for offset in range(since + 1, upto + 1)]


@dataclass(slots=True)
class ChannelRecovery:
    """Waiters of one channel, the live events held for them, and the read in flight."""

    waiters: list[Waiter] = field(default_factory=list)
    held: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, payload) since recovery began
    read_id: bytes | None = None  # the hub request in flight
    read_since: int = 0
    reads: int = 0
    unsent_since: float | None = None  # when a read first could not be sent (None: the last one went)
    retry_pending: bool = False  # a read that could not be sent is tried again shortly

    def next_read(self) -> int | None:
        """The position to read from, or None when a read is in flight or due again, or nobody waits."""
        if self.read_id is not None or self.retry_pending or not self.waiters:
            return None
        return min(w.since for w in self.waiters)

    def read_unsent(self, now: float, patience: float) -> bool:
        """A read could not be sent: True to try again (a retry is then pending), False once it
        has not gone for `patience` seconds (the caller gives up)."""
        if self.unsent_since is None:
            self.unsent_since = now
        self.retry_pending = now - self.unsent_since < patience
        return self.retry_pending

    def read_sent(self, read_id: bytes, since: int) -> None:
        self.read_id, self.read_since, self.unsent_since = read_id, since, None
        self.reads += 1

    def settle(self, covered: bool, same_epoch: bool, history: list[tuple[int, bytes]],
               live: int, max_events: int) -> list[Outcome]:
        """The read came back. `live` is the channel's position now (the last offset the worker
        received; held events run up to it). Returns the waiters that are done; the others
        (position below this read, or a hole above what the hub had) wait for the next read."""
        self.read_id = None
        done: list[Outcome] = []
        waiting: list[Waiter] = []
        history_end = history[-1][0] if history else self.read_since
        for waiter in self.waiters:
            since = waiter.since
            if not same_epoch or live - since > max_events:
                done.append(Outcome(waiter, None))
                continue
            if since < self.read_since:
                waiting.append(waiter)  # joined after this read was asked for, from further back
                continue
            events = merge(since, live, history, self.held)
            if events is not None:
                done.append(Outcome(waiter, events))
            elif covered and self.reads < MAX_READS and live > history_end:
                waiting.append(waiter)  # the hole is above what the hub sent: read again
            else:
                done.append(Outcome(waiter, None))
        self.waiters = waiting
        if not waiting:
            self.held = []
        return done

    def give_up(self) -> list[Outcome]:
        """The hub did not answer in time: nobody recovers."""
        done = [Outcome(w, None) for w in self.waiters]
        self.waiters, self.held, self.read_id = [], [], None
        self.unsent_since, self.retry_pending = None, False
        return done

    def remove(self, member: Any) -> list[Waiter]:
        """member left the channel: its waiters, to answer."""
        gone = [w for w in self.waiters if w.member == member]
        if gone:
            self.waiters = [w for w in self.waiters if w.member != member]
        return gone
