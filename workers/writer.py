"""What one loop pass sends: frames per connection, and client publishes for the hub.

Everything queued while the event loop handles a batch of I/O leaves together at the end of the
pass (one `call_soon`, no timer): each connection's frames in one `write`, and every client
`publish` of the pass in one ZeroMQ message to the hub. Under load a pass holds many frames and
publishes, so the syscalls and ZeroMQ calls are paid per pass, not per message; at a low rate a
pass holds one of each and nothing waits.

A publish is answered when the hub has stamped it (`published` with its offset and epoch, from
the worker's confirmation path), or at once with `internal_error` when the request cannot leave.
The answer may therefore come after the replies to later commands: clients match replies by `id`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from workers.connection import text_frame


class Writable(Protocol):
    closed: bool
    raw: Any  # the transport under picows: `write`, `get_write_buffer_size`


class PublishReplies(Protocol):
    @property
    def failed(self) -> bytes: ...  # the reply when the hub did not take the event


# (ingress records, [(connection, its publish), ...] in the same order) -> False if none can leave
PushPublishes = Callable[[list[bytes], list[tuple[Any, Any]]], bool]


class LoopPassWriter:
    def __init__(self, loop: asyncio.AbstractEventLoop, push_publishes: PushPublishes,
                 max_pending_bytes: int, on_slow: Callable[[Any], None]) -> None:
        self.loop = loop
        self.push_publishes = push_publishes  # sends them as one confirmed ingress message per hub shard
        self.max_pending_bytes = max_pending_bytes
        self.on_slow = on_slow  # a connection over max_pending_bytes: the caller aborts it
        self.pending: dict[Any, list[bytes]] = {}
        self.records: list[bytes] = []  # ingress records of this pass's client publishes
        self.publishers: list[tuple[Any, Any]] = []  # (connection, its publish), in record order
        self.scheduled = False
        # History replays: a resuming or healing reader is handed up to recovery_max_events at once,
        # which can be more than the cap by itself; it may hold those bytes unsent on top of the cap
        # until its buffer is back under it. Rare, so kept out of the per-connection loop.
        self.replaying: dict[Any, int] = {}  # queued this pass: connection -> replayed bytes
        self.allowance: dict[Any, int] = {}  # written: connection -> bytes allowed over the cap

    # -- queueing ----------------------------------------------------------------------------
    def frame(self, conn: Writable, frame: bytes) -> None:
        """Queue one complete frame for conn."""
        queued = self.pending.get(conn)
        if queued is None:
            self.pending[conn] = [frame]
            self._schedule()
        else:
            queued.append(frame)

    def replay(self, conn: Writable, frames: bytes) -> None:
        """Queue a history replay (complete frames) for conn: its size is allowed over the cap."""
        self.frame(conn, frames)
        self.replaying[conn] = self.replaying.get(conn, 0) + len(frames)

    def fan_out(self, members: Iterable[Writable], data: bytes) -> None:
        """Queue the same bytes for every member: one append each, no copy."""
        pending = self.pending
        get = pending.get
        for conn in members:
            queued = get(conn)
            if queued is None:
                pending[conn] = [data]
            else:
                queued.append(data)
        self._schedule()

    def publish(self, conn: Writable, record: bytes, replies: PublishReplies) -> None:
        """Queue an ingress record for the hub; it leaves with the pass's other publishes."""
        self.records.append(record)
        self.publishers.append((conn, replies))
        self._schedule()

    def drop(self, conn: Writable) -> None:
        """Forget conn's queue (it is being aborted, or has gone)."""
        self.pending.pop(conn, None)
        self.replaying.pop(conn, None)
        self.allowance.pop(conn, None)

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    # -- sending -----------------------------------------------------------------------------
    def _send_publishes(self) -> None:
        records, publishers = self.records, self.publishers
        if not records:
            return
        self.records, self.publishers = [], []
        if not self.push_publishes(records, publishers):
            for conn, replies in publishers:
                if not conn.closed:
                    self.frame(conn, text_frame(replies.failed))

    def flush(self) -> None:
        """Send the pass's publishes, then write every connection's queue in one write each,
        aborting a connection whose unsent bytes are over the cap."""
        self.scheduled = False
        self._send_publishes()
        pending = self.pending
        if not pending:
            return
        self.pending = {}
        limit = self.max_pending_bytes
        for conn, frames in pending.items():
            if conn.closed:
                continue
            raw = conn.raw
            # What the kernel has not taken yet: over the cap, this reader is not keeping up.
            # (This pass's own bytes do not count, so one large batch never drops a healthy
            # reader; the bus bounds a batch's size.)
            if raw.get_write_buffer_size() > limit and not self._within_allowance(conn, limit):
                self.on_slow(conn)
                continue
            raw.write(frames[0] if len(frames) == 1 else b"".join(frames))
        if self.replaying or self.allowance:
            self._settle_allowances(limit)

    def _within_allowance(self, conn: Writable, limit: int) -> bool:
        extra = self.allowance.get(conn)
        return extra is not None and conn.raw.get_write_buffer_size() <= limit + extra

    def _settle_allowances(self, limit: int) -> None:
        """End the allowance of readers back under the cap (or gone); start those of the replays
        just written. After the loop, so a replay is never checked against its own pass."""
        allowance = self.allowance
        for conn in [c for c in allowance if c.closed or c.raw.get_write_buffer_size() <= limit]:
            del allowance[conn]
        for conn, size in self.replaying.items():
            if not conn.closed:
                allowance[conn] = allowance.get(conn, 0) + size
        self.replaying.clear()

    def flush_one(self, conn: Writable) -> None:
        """Write conn's queue now (before a close or a ping goes out on picows' own path)."""
        self._send_publishes()
        frames = self.pending.pop(conn, None)
        if frames and not conn.closed:
            conn.raw.write(b"".join(frames))
            size = self.replaying.pop(conn, None)
            if size is not None:
                self.allowance[conn] = self.allowance.get(conn, 0) + size
